"""A burst of registry events under live notices: an import of many households followed at once
by a merge of groups reaches the notices service in fetches of many events each, reconciled a
fetch at a time. The view ends equal to the registry, and each household is delivered to late
exactly once by each live notice whose audience it is in, and counted once where it ends."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

from services.registry.main import RegistryService
from services.registry.store import RESIDENT
from tests.notices.conftest import Town, events_pb2, eventually, rid
from tests.registry_fixtures import citizen_id, numbered, person

HOUSEHOLDS = 40
ELDERLY = "1930-03-04"


def rows(town: Town) -> list[registry_pb2.ImportRow]:
    """HOUSEHOLDS households of a head and a second member, in turn in the city's two groups;
    every third one's second member is elderly."""
    found = []
    for number in range(HOUSEHOLDS):
        group = (town.city.group, town.city.other_group)[number % 2]
        ref = f"BURST-{number}"
        head = person(
            numbered("Trần Văn Số", number),
            "1980-01-01",
            registry_pb2.SEX_MALE,
            citizen_id("1980-01-01", registry_pb2.SEX_MALE),
            registry_pb2.RELATIONSHIP_HEAD,
        )
        born = ELDERLY if number % 3 == 0 else "2001-06-07"
        member = person(
            numbered("Lê Thị Số", number), born, relationship=registry_pb2.RELATIONSHIP_PARENT
        )
        for index, details in enumerate((head, member)):
            found.append(
                registry_pb2.ImportRow(
                    row_number=2 * number + index + 1,
                    unit_id=group,
                    household_ref=ref,
                    address=f"{number} Lê Duẩn",
                    residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
                    person=details,
                )
            )
    return found


async def one_request(
    rows: list[registry_pb2.ImportRow],
) -> AsyncIterator[registry_pb2.ImportPersonsRequest]:
    yield registry_pb2.ImportPersonsRequest(rows=rows)


async def test_a_burst_of_imports_and_a_merge_is_reconciled_once_per_household(
    town: Town, registry: RegistryService
) -> None:
    city = town.city
    ward_notice = await town.publish(title="Cả phường: lịch cắt điện")
    group_notice = await town.publish(town.leader, unit_id=city.group, title="Tổ 17 họp")
    elderly_notice = await town.publish(
        title="Khám sức khoẻ người cao tuổi",
        audience=notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=70)),
    )
    for notice in (ward_notice, group_notice, elderly_notice):
        await town.delivered(notice.notice_id)
    before = set(town.everyone)

    imported = await city.ward_officer.ImportPersons(one_request(rows(town)))
    assert not imported.errors and imported.households_created == HOUSEHOLDS
    # At once, so its events follow the import's in the same fetches.
    await city.admin.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
        )
    )

    in_ward = (
        await registry.db["households"].find({"unit_id": {"$regex": f"^{city.ward}\\."}}).to_list()
    )
    new = {h["_id"] for h in in_ward} - before
    assert len(new) == HOUSEHOLDS
    assert {h["unit_id"] for h in in_ward} == {city.other_group}
    elderly = {
        p["household_id"]
        for p in await registry.db["persons"].find({"household_id": {"$in": list(new)}}).to_list()
        if p["birth_date"] == ELDERLY
    }
    assert len(elderly) == len(range(0, HOUSEHOLDS, 3))

    async def reached_everyone() -> bool:
        reach: notices_pb2.GetReachResponse = await town.admin.GetReach(
            notices_pb2.GetReachRequest(notice_id=ward_notice.notice_id)
        )
        return reach.total.delivered == len(in_ward)

    await eventually(reached_everyone, what="every imported household reached")

    # The group's notice keeps reaching the group's households, old and imported, in the group
    # they were merged into.
    in_group = len(town.households[city.group]) + HOUSEHOLDS // 2

    async def settled() -> bool:
        reach: notices_pb2.GetReachResponse = await town.admin.GetReach(
            notices_pb2.GetReachRequest(notice_id=group_notice.notice_id)
        )
        merged = await town.service.store.view.households.count_documents(
            {"_id": {"$in": list(new)}, "unit_id": city.other_group}
        )
        return reach.total.delivered == in_group and merged == HOUSEHOLDS

    await eventually(settled, what="the merge reconciled")

    # The view is the registry's: every household's place and residents.
    residents = Counter(
        p["household_id"]
        for p in await registry.db["persons"]
        .find({"household_id": {"$in": [h["_id"] for h in in_ward]}, "status": RESIDENT})
        .to_list()
    )
    view = {
        h["_id"]: (h["unit_id"], h.get("residents", 0))
        for h in await town.service.store.view.households.find(
            {"_id": {"$in": [h["_id"] for h in in_ward]}}
        ).to_list()
    }
    assert view == {h["_id"]: (h["unit_id"], residents[h["_id"]]) for h in in_ward}

    # Late deliveries: exactly once per imported household, to those in the audience only.
    for notice, audience in ((ward_notice, new), (elderly_notice, elderly)):
        late = Counter(
            household_id
            for event in await town.events(notice.notice_id, events_pb2.NoticeDelivered)
            if event.late
            for household_id in event.household_ids
        )
        assert late == Counter(audience), notice.title
        reach = await town.admin.GetReach(
            notices_pb2.GetReachRequest(notice_id=notice.notice_id, unit_id=city.ward)
        )
        records = await town.service.store.deliveries.count_documents(
            {"notice_id": notice.notice_id, "withdrawn_at": None}
        )
        assert reach.total.delivered == records
        # Counted where they are now: all in the group they were merged into.
        assert {g.unit_id for g in reach.groups if g.delivered} <= {city.other_group}
    # The group's notice: counted where its households are now, and only theirs. A household
    # whose own move by the merge the service saw before the merge itself (another partition)
    # kept it all along: nothing is withdrawn, and each household imported into the group is
    # delivered to once.
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=group_notice.notice_id))
    live = await town.service.store.deliveries.distinct(
        "household_id", {"notice_id": group_notice.notice_id, "withdrawn_at": None}
    )
    assert {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {
        city.other_group: in_group
    }
    assert len(live) == in_group
    assert set(town.households[city.group]) <= set(live) <= set(town.households[city.group]) | new
    withdrawn = Counter(
        e.household_id
        for e in await town.events(group_notice.notice_id, events_pb2.NoticeWithdrawn)
    )
    delivered_late = Counter(
        household_id
        for e in await town.events(group_notice.notice_id, events_pb2.NoticeDelivered)
        if e.late
        for household_id in e.household_ids
    )
    assert withdrawn == Counter()
    assert delivered_late == Counter(set(live) - set(town.households[city.group]))
