"""The first delivery and the registry's changes, meeting halfway: a batch's records are written
before the batch is counted and announced, and households move, merge or empty in between. The
reach always equals the live records, and a household left without residents keeps nothing. A
revision retried after the notice was retracted gets its first answer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

import services.notices.delivery as delivery_module
from services.common.registry_view import GONE
from services.notices.records import delivery_document
from tests.conftest import Clock
from tests.notices.conftest import (
    Town,
    deliver_by_hand,
    events_pb2,
    eventually,
    refused,
    rid,
    stamp,
)


async def live_records(town: Town, notice_id: str) -> int:
    return await town.service.store.deliveries.count_documents(
        {"notice_id": notice_id, "withdrawn_at": None}
    )


async def test_a_group_merged_after_its_records_are_written_is_counted_once(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge lands after the batch's records are written and before the batch is counted:
    the registry consumer sees records not yet counted. The group's households keep its notice,
    counted once, in the group they were merged into."""
    city = town.city
    store = town.service.store
    leaving = list(town.households[city.group])
    write = store.insert_deliveries

    async def write_then_merge(docs: list[Any]) -> int:
        n = await write(docs)
        await city.admin.MergeGroups(
            registry_pb2.MergeGroupsRequest(
                request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
            )
        )

        async def moved() -> bool:
            return await store.deliveries.count_documents(
                {"household_id": {"$in": leaving}, "unit_id": city.other_group}
            ) == len(leaving)

        await eventually(moved, what="the reconciler moved the just-written records")
        return n

    notice = await deliver_by_hand(town, monkeypatch, write_then_merge)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    doc = await store.get(notice.notice_id)
    assert doc is not None
    live = await live_records(town, notice.notice_id)
    assert reach.total.delivered == live == doc["fanout"]["delivered"] == len(leaving)
    assert {g.unit_id: g.delivered for g in reach.groups} == {city.other_group: len(leaving)}
    assert sorted(await announced(town, notice.notice_id)) == sorted(leaving)
    assert await town.events(notice.notice_id, events_pb2.NoticeWithdrawn) == []


async def test_a_household_emptied_after_a_crash_mid_batch_is_not_counted(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    city = town.city
    deliverer = town.service.deliverer
    store = town.service.store
    emptied = town.households[city.group][0]

    def crash(name: str) -> None:
        if name == "CIVIC_FAULT_CRASH_MID_DELIVERY":
            raise RuntimeError("crash")

    await deliverer.stop()
    try:
        notice = await town.publish(town.leader, unit_id=city.group)
        monkeypatch.setattr(delivery_module, "fault", crash)
        with pytest.raises(RuntimeError):
            await deliverer.fan_out_batch()
        monkeypatch.undo()
        assert await live_records(town, notice.notice_id) == 3
        head = await store.view.persons.find_one({"household_id": emptied})
        assert head is not None
        await city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
        )

        async def withdrawn() -> bool:
            r = await store.delivery(notice.notice_id, emptied)
            return r is not None and r.get("withdrawn_at") is not None

        await eventually(withdrawn, what="withdrawn by the reconciler")
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    doc = await store.get(notice.notice_id)
    assert doc is not None
    live = await live_records(town, notice.notice_id)
    assert reach.total.delivered == live == doc["fanout"]["delivered"] == 2


async def test_a_revision_retried_after_a_retraction_gets_its_first_answer(town: Town) -> None:
    notice = await town.publish()
    request = notices_pb2.ReviseNoticeRequest(
        request_id=rid(), notice_id=notice.notice_id, title="Lịch mới", body="Nội dung mới"
    )
    first = await town.ward_officer.ReviseNotice(request)
    await town.ward_officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id=notice.notice_id, reason="mưa")
    )
    again = await town.ward_officer.ReviseNotice(request)  # the same request, retried
    assert again.notice.revision == first.notice.revision


async def test_a_household_emptied_while_its_batch_is_written_gets_nothing(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    city = town.city
    store = town.service.store
    emptied = town.households[city.group][0]
    write = store.insert_deliveries

    async def empty_then_write(docs: list[Any]) -> int:
        head = await store.view.persons.find_one({"household_id": emptied})
        assert head is not None
        await city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
        )

        async def empty() -> bool:
            h = await store.view.households.find_one({"_id": emptied})
            return h is not None and h.get("residents") == 0

        await eventually(empty, what="emptied in the view")
        return await write(docs)

    notice = await deliver_by_hand(town, monkeypatch, empty_then_write)
    record = await store.delivery(notice.notice_id, emptied)
    assert record is None or record.get("withdrawn_at") is not None


async def test_a_revision_note_is_plain_text(town: Town) -> None:
    notice = await town.publish()
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        town.ward_officer.ReviseNotice(
            notices_pb2.ReviseNoticeRequest(
                request_id=rid(),
                notice_id=notice.notice_id,
                title="Lịch mới",
                body="Nội dung mới",
                note="sửa\x00lịch",
            )
        ),
        "note",
    )


async def not_reached(town: Town, notice_id: str) -> list[str]:
    page = await town.admin.ListNotReached(notices_pb2.ListNotReachedRequest(notice_id=notice_id))
    return [h.household_id for h in page.households]


async def announced(town: Town, notice_id: str) -> list[str]:
    events = await town.events(notice_id, events_pb2.NoticeDelivered)
    return [h for e in events for h in e.household_ids]


async def nothing_delivered(town: Town, notice_id: str) -> None:
    """No household of the town has the notice, or is counted, announced or listed for it:
    every record written for it is withdrawn, and its first delivery is over."""
    for household in town.everyone:
        inbox = await town.inbox(household, include_expired=True)
        assert notice_id not in [n.notice.notice_id for n in inbox]
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id))
    assert (reach.total.delivered, await live_records(town, notice_id)) == (0, 0)
    assert await not_reached(town, notice_id) == []
    assert await announced(town, notice_id) == []
    doc = await town.service.store.get(notice_id)
    assert doc is not None and "fanout_pending" not in doc


@pytest.mark.parametrize("ending", ["retracted", "expired"])
async def test_a_notice_ended_while_a_batch_is_written_is_withdrawn_from_the_batch(
    town: Town, monkeypatch: pytest.MonkeyPatch, clock: Clock, ending: str
) -> None:
    """The batch's records are written, then the notice is retracted or expires before the
    batch is counted and announced: they are withdrawn, unannounced, and the delivery ends."""
    store = town.service.store
    write = store.insert_deliveries

    async def write_then_end(docs: list[Any]) -> int:
        written = await write(docs)
        if ending == "retracted":
            request = notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=docs[0]["notice_id"], reason="nhầm"
            )
            await town.leader.RetractNotice(request)
        else:
            clock.advance(hours=2)
            assert await town.service.deliverer.expire_due() == 1
        return written

    notice = await deliver_by_hand(
        town, monkeypatch, write_then_end, expires_at=stamp(clock() + timedelta(hours=1))
    )
    await nothing_delivered(town, notice.notice_id)
    withdrawn = {"notice_id": notice.notice_id, "withdrawn_at": {"$ne": None}}
    assert await store.deliveries.count_documents(withdrawn) == len(
        town.households[town.city.group]
    )


async def test_a_batch_interrupted_before_a_retraction_is_withdrawn_when_delivery_resumes(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliverer = town.service.deliverer

    def crash(name: str) -> None:
        if name == "CIVIC_FAULT_CRASH_MID_DELIVERY":
            raise RuntimeError("crash")

    await deliverer.stop()
    try:
        notice = await town.publish(town.leader, unit_id=town.city.group)
        monkeypatch.setattr(delivery_module, "fault", crash)
        with pytest.raises(RuntimeError):
            await deliverer.fan_out_batch()
        monkeypatch.undo()
        await town.leader.RetractNotice(
            notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, reason="nhầm"
            )
        )
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    await nothing_delivered(town, notice.notice_id)


async def test_a_household_leaving_as_its_batch_commits_is_not_counted(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry consumer withdraws a record of the batch after the batch's transaction has
    read it and before it commits: one of the two sees the other's outcome."""
    store = town.service.store
    leaving = town.households[town.city.group][0]
    count = store.count

    # The batch's transaction counts before it writes anything else: the consumer's change
    # commits after the transaction's snapshot and before its writes.
    async def leave_then_count(notice_id: str, changes: Any, session: Any) -> None:
        monkeypatch.setattr(store, "count", count)  # once: the transaction may run again
        await move_out(town, leaving)

        async def withdrawn() -> bool:
            record = await store.delivery(notice_id, leaving)
            return record is not None and record.get("withdrawn_at") is not None

        await eventually(withdrawn, what="the record withdrawn by the registry consumer")
        await count(notice_id, changes, session)

    async def first_write(docs: list[Any]) -> int:
        monkeypatch.setattr(store, "count", leave_then_count)
        return await store.__class__.insert_deliveries(store, docs)

    notice = await deliver_by_hand(town, monkeypatch, first_write)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    doc = await store.get(notice.notice_id)
    assert doc is not None
    stayed = len(town.households[town.city.group]) - 1
    assert reach.total.delivered == await live_records(town, notice.notice_id) == stayed
    assert doc["fanout"]["delivered"] == stayed
    assert leaving not in await announced(town, notice.notice_id)
    assert await town.events(notice.notice_id, events_pb2.NoticeWithdrawn) == []


async def test_households_moving_groups_as_their_batch_commits_are_counted_where_they_went(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ward's notice: the group of the first batch merges into the other group, one the
    delivery has yet to reach, after the batch's transaction read the records and before it
    commits. They are counted and announced once, in the group they went to."""
    city = town.city
    store = town.service.store
    moving = list(town.households[city.group])
    count = store.count

    async def merge_then_count(notice_id: str, changes: Any, session: Any) -> None:
        monkeypatch.setattr(store, "count", count)  # as above
        await city.admin.MergeGroups(
            registry_pb2.MergeGroupsRequest(
                request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
            )
        )

        async def moved() -> bool:
            records = {"_id": {"$in": [f"{notice_id}:{h}" for h in moving]}}
            return await store.deliveries.count_documents(
                records | {"unit_id": city.other_group}
            ) == len(moving)

        await eventually(moved, what="the records moved by the registry consumer")
        await count(notice_id, changes, session)

    async def first_write(docs: list[Any]) -> int:
        monkeypatch.setattr(store, "count", merge_then_count)
        return await store.__class__.insert_deliveries(store, docs)

    notice = await deliver_by_hand(town, monkeypatch, first_write, unit_id=city.ward)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    everyone = sorted(town.everyone)
    assert {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {
        city.other_group: len(everyone)
    }
    assert sorted(await announced(town, notice.notice_id)) == everyone


async def move_out(town: Town, household_id: str) -> None:
    """The household's only resident moves out of the area (no waiting for the notices)."""
    head = await town.service.store.view.persons.find_one({"household_id": household_id})
    assert head is not None
    await town.city.ward_officer.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
    )


async def test_a_record_left_pending_behind_the_marker_is_settled_when_delivery_ends(
    town: Town,
) -> None:
    """An instance that fell behind wrote a household's record behind where the delivery had
    got to (its member filter saw an older register), then died before settling it: the last
    batch settles it, so the household is not left with a notice it can never see."""
    deliverer = town.service.deliverer
    store = town.service.store
    batch_size = deliverer.batch_size
    await deliverer.stop()
    try:
        notice = await town.publish(
            audience=notices_pb2.Audience(member=notices_pb2.MemberFilter(min_age=90))
        )
        deliverer.batch_size = 2
        assert await deliverer.fan_out_batch()  # two households, none in the audience
        doc = await store.get(notice.notice_id)
        assert doc is not None
        behind = doc["fanout"]["after"]["household"]
        assert await store.delivery(notice.notice_id, behind) is None
        unit = doc["fanout"]["after"]["unit"]
        await store.deliveries.insert_one(
            delivery_document(doc, behind, unit, datetime.now(UTC), pending=True)
        )
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.batch_size = batch_size
        deliverer.start()
    left_pending = await store.deliveries.count_documents(
        {"notice_id": notice.notice_id, "pending": True}
    )
    assert left_pending == 0
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.delivered == await live_records(town, notice.notice_id)


async def test_a_household_whose_matching_member_leaves_while_its_batch_is_written_gets_nothing(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notice for young men: the household's only young man moves away between the batch's
    look at its members and its write, the rest of the household staying. The registry's
    change found no record to withdraw then; the batch does not announce one either."""
    city = town.city
    store = town.service.store
    household = town.households[city.group][0]
    this_year = datetime.now(UTC).year
    born = f"{this_year - 20}-01-01"
    await town.add_member(household, born, registry_pb2.SEX_MALE)
    young = await store.view.persons.find_one({"household_id": household, "birth_date": born})
    assert young is not None
    write = store.insert_deliveries

    async def leave_then_write(docs: list[Any]) -> int:
        await city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=young["_id"], destination="Huế")
        )

        async def gone() -> bool:
            person = await store.view.persons.find_one({"_id": young["_id"]})
            return person is not None and person["status"] == GONE

        await eventually(gone, what="the young man gone in the notices view")
        return await write(docs)

    young_men = notices_pb2.Audience(
        member=notices_pb2.MemberFilter(max_age=25, sex=registry_pb2.SEX_MALE)
    )
    notice = await deliver_by_hand(town, monkeypatch, leave_then_write, audience=young_men)
    record = await store.delivery(notice.notice_id, household)
    assert record is None or record.get("withdrawn_at") is not None
    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == 0
