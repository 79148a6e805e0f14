"""The registry's events as an outside consumer sees them on civic.registry.v1: CloudEvents in
Kafka binary mode, keyed by aggregate id, decodable with the published protos, free of personal
data, and emitted once per command even when the command is retried."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from civic.registry.v1 import events_pb2, registry_pb2

from services.common.auth import Role
from services.common.config import Settings
from services.registry.events import TOPIC
from services.registry.main import RegistryService
from tests.kafka_reader import Record, TopicReader, eventually, of_type, with_key
from tests.registry_fixtures import City, citizen_id, person, rid

HOUSEHOLD_CREATED = "civic.registry.v1.HouseholdCreated"
PERSON_REGISTERED = "civic.registry.v1.PersonRegistered"
HOUSEHOLD_UPDATED = "civic.registry.v1.HouseholdUpdated"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")

HEAD_NAME = "Phạm Quốc Trung"
HEAD_BORN = "1969-11-30"
CHILD_NAME = "Phạm Ngọc Diệp"
CHILD_BORN = "2026-01-02"
OCCUPATION = "thợ mộc lành nghề"


def only(records: list[Record]) -> Record:
    assert len(records) == 1, [(r.event_type, r.key_text, r.event_id) for r in records]
    return records[0]


def assert_cloud_event(record: Record, type_name: str, started: datetime) -> None:
    headers = record.header_map
    assert headers["ce_specversion"] == "1.0"
    assert re.fullmatch(r"[0-9a-f]{24}", headers["ce_id"]), headers["ce_id"]
    assert headers["ce_type"] == type_name
    assert headers["ce_source"] == "/civic/registry"
    assert RFC3339.match(headers["ce_time"]), headers["ce_time"]
    occurred = datetime.fromisoformat(headers["ce_time"].replace("Z", "+00:00"))
    assert started - timedelta(seconds=5) <= occurred <= datetime.now(UTC)
    assert headers["content-type"] == "application/protobuf"
    assert TRACEPARENT.match(headers["traceparent"]), headers["traceparent"]


async def test_events_carry_cloudevents_headers_and_decode_with_the_published_protos(
    city: City, settings: Settings, registry: RegistryService
) -> None:
    started = datetime.now(UTC)
    head_cid = citizen_id(HEAD_BORN, registry_pb2.SEX_MALE)
    head = person(
        HEAD_NAME, HEAD_BORN, registry_pb2.SEX_MALE, head_cid, registry_pb2.RELATIONSHIP_HEAD
    )
    head.occupation = OCCUPATION
    created = await city.leader.CreateHousehold(
        registry_pb2.CreateHouseholdRequest(
            request_id=rid(),
            unit_id=city.group,
            address="7 Kiệt 12 Lê Lợi",
            housing=registry_pb2.Housing(floor_area_m2=48.0, storeys=2, sub_households=1),
            residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
            head=head,
        )
    )
    household_id = created.household.household_id
    head_id = created.head.person_id
    birth = registry_pb2.RegisterBirthRequest(
        request_id=rid(),
        household_id=household_id,
        child=person(
            CHILD_NAME, CHILD_BORN, registry_pb2.SEX_FEMALE, "", registry_pb2.RELATIONSHIP_CHILD
        ),
    )
    born = await city.leader.RegisterBirth(birth)
    child_id = born.person.person_id

    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        records = await reader.collect(
            lambda rs: (
                bool(of_type(with_key(rs, household_id), HOUSEHOLD_CREATED))
                and bool(of_type(with_key(rs, child_id), PERSON_REGISTERED))
            ),
            what=f"HouseholdCreated {household_id} and PersonRegistered {child_id}",
        )

    # Household events are keyed by household_id, person events by person_id; one event each.
    household_record = only(of_type(with_key(records, household_id), HOUSEHOLD_CREATED))
    birth_record = only(of_type(with_key(records, child_id), PERSON_REGISTERED))
    head_record = only(of_type(with_key(records, head_id), PERSON_REGISTERED))
    assert household_record.key == household_id.encode()
    assert birth_record.key == child_id.encode()

    assert_cloud_event(household_record, HOUSEHOLD_CREATED, started)
    assert_cloud_event(birth_record, PERSON_REGISTERED, started)
    assert_cloud_event(head_record, PERSON_REGISTERED, started)
    assert len({household_record.event_id, birth_record.event_id, head_record.event_id}) == 3
    # Who caused the event rides along as the `actor` extension (a token subject).
    assert birth_record.header("ce_actor") == f"{Role.GROUP_LEADER.value}@{city.group}"

    # Decoded with nothing but the published protos...
    household_event = events_pb2.HouseholdCreated.FromString(household_record.value)
    assert household_event.household_id == household_id
    assert household_event.unit_id == city.group
    assert household_event.head_person_id == head_id
    assert household_event.housing.storeys == 2
    birth_event = events_pb2.PersonRegistered.FromString(birth_record.value)
    assert birth_event.person_id == child_id
    assert birth_event.household_id == household_id
    assert birth_event.unit_id == city.group
    assert birth_event.reason == events_pb2.REGISTRATION_REASON_BIRTH
    assert birth_event.birth_date == CHILD_BORN
    assert birth_event.sex == registry_pb2.SEX_FEMALE
    head_event = events_pb2.PersonRegistered.FromString(head_record.value)
    assert head_event.reason == events_pb2.REGISTRATION_REASON_HEAD_OF_NEW_HOUSEHOLD
    # ...and generically, by ce_type, as the platform's own consumers do.
    assert birth_record.event().message() == birth_event
    assert household_record.event().message() == household_event

    # Personal data stays out of events: no names, no citizen IDs, no occupation, anywhere.
    for record in (household_record, birth_record, head_record):
        wire = record.value + b"".join(value for _, value in record.headers)
        for secret in (HEAD_NAME, CHILD_NAME, head_cid, OCCUPATION):
            assert secret.encode() not in wire, f"{secret!r} leaked into {record.event_type}"
    assert head_cid.encode() not in household_record.value


async def test_retried_command_returns_the_same_response_and_emits_no_second_event(
    city: City, settings: Settings, registry: RegistryService
) -> None:
    created = await city.leader.CreateHousehold(
        registry_pb2.CreateHouseholdRequest(
            request_id=rid(),
            unit_id=city.group,
            address="3 Kiệt 8 Hùng Vương",
            residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
            head=person(
                "Võ Văn Tâm",
                "1980-04-04",
                registry_pb2.SEX_MALE,
                citizen_id("1980-04-04", registry_pb2.SEX_MALE),
                registry_pb2.RELATIONSHIP_HEAD,
            ),
        )
    )
    household_id = created.household.household_id
    # A newborn has no citizen ID yet, so running the command twice would succeed twice:
    # only the stored response keeps the retry from registering a second child.
    birth = registry_pb2.RegisterBirthRequest(
        request_id=rid(),
        household_id=household_id,
        child=person(
            "Võ Thị Mai", "2026-02-01", registry_pb2.SEX_FEMALE, "", registry_pb2.RELATIONSHIP_CHILD
        ),
    )
    first = await city.leader.RegisterBirth(birth)
    retried = await city.leader.RegisterBirth(birth)
    assert retried == first

    # A later command on the same household, as a barrier: once its event is sent, anything the
    # retry had staged before it has been published too (the relay publishes in commit order).
    updated = await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household_id,
            update_fields=["address"],
            address="5 Kiệt 8 Hùng Vương",
        )
    )
    assert updated.household.address == "5 Kiệt 8 Hùng Vương"
    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        await reader.collect(
            lambda rs: bool(of_type(with_key(rs, household_id), HOUSEHOLD_UPDATED)),
            what=f"HouseholdUpdated {household_id}",
        )
        barrier = only(of_type(with_key(reader.records, household_id), HOUSEHOLD_UPDATED))
        await wait_sent(registry, barrier.event_id)
        records = await reader.read_to_end()

    births = [
        event
        for record in of_type(records, PERSON_REGISTERED)
        if (event := events_pb2.PersonRegistered.FromString(record.value)).household_id
        == household_id
        and event.reason == events_pb2.REGISTRATION_REASON_BIRTH
    ]
    assert [event.person_id for event in births] == [first.person.person_id]
    members = await city.leader.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=household_id)
    )
    assert len(members.members) == 2  # the head and one child


async def wait_sent(registry: RegistryService, event_id: str) -> None:
    """Wait until the relay has published the outbox entry holding `event_id` and marked it."""
    outbox = registry.db["outbox"]
    await eventually(
        lambda: outbox.find_one({"events._id": event_id, "sent_at": {"$exists": True}}),
        what=f"event {event_id} marked sent",
    )


async def test_a_command_that_changes_nothing_emits_nothing(
    city: City, registry: RegistryService
) -> None:
    """A client retrying under a new request_id, or a leader repeating what is already so, is
    answered as usual but adds nothing to the topic, which is kept for ever."""
    created = await city.leader.CreateHousehold(
        registry_pb2.CreateHouseholdRequest(
            request_id=rid(),
            unit_id=city.group,
            address="3 Kiệt 9 Lê Lợi",
            residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
            head=person(
                HEAD_NAME, HEAD_BORN, registry_pb2.SEX_MALE, "", registry_pb2.RELATIONSHIP_HEAD
            ),
        )
    )
    household_id, head_id = created.household.household_id, created.head.person_id
    households = registry.db["households"]
    active_at = (await households.find_one({"_id": household_id}) or {})["last_activity_at"]

    for _ in range(2):
        absent = await city.leader.MarkPersonAbsent(
            registry_pb2.MarkPersonAbsentRequest(request_id=rid(), person_id=head_id, absent=True)
        )
        assert absent.person.marked_absent
        renamed = await city.ward_officer.RenameUnit(
            registry_pb2.RenameUnitRequest(request_id=rid(), unit_id=city.group, name="Tổ 17 mới")
        )
        assert renamed.unit.name == "Tổ 17 mới"
        same_head = await city.leader.UpdateHousehold(
            registry_pb2.UpdateHouseholdRequest(
                request_id=rid(),
                household_id=household_id,
                update_fields=["head_person_id"],
                head_person_id=head_id,
            )
        )
        assert same_head.household.head_person_id == head_id

    async def staged(key: str) -> list[str]:
        return [
            event["type"].rsplit(".", 1)[-1]
            async for entry in registry.db["outbox"].find({"events.key": key}).sort("order")
            for event in entry["events"]
            if event["key"] == key
        ]

    assert await staged(head_id) == ["PersonRegistered", "PersonMarkedAbsent"]
    assert await staged(city.group) == ["UnitCreated", "UnitRenamed"]
    assert await staged(household_id) == ["HouseholdCreated"]
    # Nor is restating the head a sign of life in the household.
    assert (await households.find_one({"_id": household_id}) or {})["last_activity_at"] == active_at
