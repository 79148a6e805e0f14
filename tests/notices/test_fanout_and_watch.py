"""The first delivery is resumable and idempotent: records a crashed run already wrote, or a
second instance writes at the same time, end up once, and each household is announced in one
event. A resident's app hears of its notices as they are delivered, revised and retracted."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import grpc
import pytest
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
from services.notices.delivery import Deliverer
from services.notices.domain import batch_of
from services.notices.records import delivery_document
from tests.conftest import Clock
from tests.notices.conftest import (
    FANOUT_BATCH,
    Town,
    deliver_by_hand,
    events_pb2,
    eventually,
    merge_group_away,
    refused,
    rid,
    stamp,
)


async def test_a_delivery_interrupted_mid_way_completes_without_duplicates(
    town: Town, clock: Clock
) -> None:
    service = town.service
    store = service.store
    await service.deliverer.stop()
    try:
        notice = await town.publish(title="Phát gạo hỗ trợ")
        doc = await store.get(notice.notice_id)
        assert doc is not None and doc["fanout_pending"]
        # A run that crashed after writing some records, before moving its marker past them.
        first = town.households[town.city.group][:2]
        written = [delivery_document(doc, h, town.city.group, clock(), pending=True) for h in first]
        assert await store.insert_deliveries(written) == 2
        # Two instances then deliver side by side.
        twin = Deliverer(
            service.client,
            store,
            service.host.outbox,
            clock,
            service.deliverer.reconciler,
            1.0,
            FANOUT_BATCH,
        )
        while (await store.get(notice.notice_id) or {}).get("fanout_pending"):
            await asyncio.gather(service.deliverer.fan_out_batch(), twin.fan_out_batch())
    finally:
        service.deliverer.start()

    records = await store.deliveries.find({"notice_id": notice.notice_id}).to_list()
    assert sorted(r["household_id"] for r in records) == sorted(town.everyone)
    batches = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    named = [h for batch in batches for h in batch.household_ids]
    assert sorted(named) == sorted(town.everyone)
    assert len(await town.events(notice.notice_id, events_pb2.NoticeDeliveryCompleted)) == 1
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.delivered == 5 and reach.delivery_complete


async def next_change(
    call: Any, notice_id: str, seen: list[str], within: float = 10
) -> notices_pb2.WatchMyNoticesResponse:
    """The stream's next update about `notice_id`; every notice it passes on is noted in seen."""

    async def read() -> notices_pb2.WatchMyNoticesResponse:
        while True:
            update = await call.read()
            assert update is not grpc.aio.EOF, "the stream ended"
            seen.append(update.notice.notice.notice_id)
            if update.notice.notice.notice_id == notice_id:
                return update  # type: ignore[no-any-return]

    return await asyncio.wait_for(read(), within)


async def test_a_residents_app_hears_of_its_notices_live(town: Town) -> None:
    household = town.households[town.city.group][0]
    call = town.resident(household).WatchMyNotices(notices_pb2.WatchMyNoticesRequest())
    hub = town.service.servicer.hub
    await eventually(lambda: _true(hub.watching(household)), what="the app's stream open")

    seen: list[str] = []
    other_group = await town.publish(town.other_leader, unit_id=town.city.other_group)
    notice = await town.publish(title="Ngày chủ nhật xanh")
    delivered = await next_change(call, notice.notice_id, seen)
    assert delivered.change == notices_pb2.NOTICE_CHANGE_DELIVERED
    assert delivered.notice.notice.title == "Ngày chủ nhật xanh"
    assert not delivered.notice.opened

    await town.ward_officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(),
            notice_id=notice.notice_id,
            title="Ngày chủ nhật xanh (8 giờ)",
            body="Dọn vệ sinh kiệt 45",
        )
    )
    revised = await next_change(call, notice.notice_id, seen)
    assert revised.change == notices_pb2.NOTICE_CHANGE_REVISED
    assert revised.notice.notice.revision == 2

    await town.ward_officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id=notice.notice_id, reason="mưa")
    )
    retracted = await next_change(call, notice.notice_id, seen)
    assert retracted.change == notices_pb2.NOTICE_CHANGE_RETRACTED
    assert retracted.notice.notice.retraction_reason == "mưa"
    # The other group's notice never came down this household's stream.
    await town.delivered(other_group.notice_id)
    assert other_group.notice_id not in seen
    call.cancel()

    leader = town.caller(Role.GROUP_LEADER, town.city.group)
    officials = leader.WatchMyNotices(notices_pb2.WatchMyNoticesRequest())
    await refused(grpc.StatusCode.PERMISSION_DENIED, officials.read())


async def _true(value: bool) -> bool:
    return value


async def test_a_household_that_moved_away_is_not_streamed_the_notices_later_changes(
    town: Town,
) -> None:
    household = town.households[town.city.other_group][0]
    notice = await town.publish()
    await town.delivered(notice.notice_id)
    await town.empty(household)
    call = town.resident(household).WatchMyNotices(notices_pb2.WatchMyNoticesRequest())
    hub = town.service.servicer.hub
    await eventually(lambda: _true(hub.watching(household)), what="the stream open")
    await town.ward_officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, title="Lịch mới", body="Nội dung mới"
        )
    )

    async def revised() -> None:
        # The move's own withdrawal may still come down the stream, when the hub's change
        # stream catches up after the app subscribed: that is the household's news, the
        # revision is not.
        while (await next_change(call, notice.notice_id, [])).change != (
            notices_pb2.NOTICE_CHANGE_REVISED
        ):
            pass

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(revised(), 3)
    call.cancel()


async def test_a_group_merged_during_delivery_has_each_household_announced_once(
    town: Town,
) -> None:
    """Delivery goes group by group in order. The first group, delivered, merges into a later
    one: its households come round again there, and must not be announced a second time."""
    city = town.city
    deliverer = town.service.deliverer
    await deliverer.stop()
    try:
        notice = await town.publish()  # the ward's: its first group, then the other
        assert await deliverer.fan_out_batch()  # the first group's households
        await city.admin.MergeGroups(
            registry_pb2.MergeGroupsRequest(
                request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
            )
        )
        moved = town.households[city.group]

        async def reconciled() -> bool:
            in_target = {"notice_id": notice.notice_id, "unit_id": city.other_group}
            records = town.service.store.deliveries
            return await records.count_documents(in_target | {"household_id": {"$in": moved}}) == (
                len(moved)
            )

        await eventually(reconciled, what="the merged group's records moved with it")
        while await deliverer.fan_out_batch():
            pass
        announced = [
            h
            for e in await town.events(notice.notice_id, events_pb2.NoticeDelivered)
            for h in e.household_ids
        ]
        assert sorted(announced) == sorted(town.everyone)
        reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
        assert reach.total.delivered == len(town.everyone)
    finally:
        deliverer.start()


async def test_a_group_merged_away_while_its_batch_is_written_is_delivered_where_it_went(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group merges away between the batch's read of the households and its write: the
    batch's records, written for the old group, are announced once, counted in the new one."""
    city = town.city
    store = town.service.store
    leaving = list(town.households[city.group])
    write = store.insert_deliveries

    async def merge_then_write(docs: list[Any]) -> int:
        await merge_group_away(town)
        return await write(docs)

    notice = await deliver_by_hand(town, monkeypatch, merge_then_write)
    for household in leaving:
        assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]
    announced = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert sorted(h for e in announced for h in e.household_ids) == sorted(leaving)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {
        city.other_group: len(leaving)
    }


async def delivered_to(town: Town, notice_id: str) -> tuple[list[str], list[str]]:
    """The households the notice's NoticeDelivered events name: in batches, and late."""
    events = await town.events(notice_id, events_pb2.NoticeDelivered)
    in_batches = [h for e in events if not e.late for h in e.household_ids]
    return in_batches, [h for e in events if e.late for h in e.household_ids]


async def test_a_household_the_first_delivery_has_yet_to_reach_gets_it_from_the_delivery(
    town: Town,
) -> None:
    """A registry event about a household that never moved, in a group the delivery of a ward's
    notice has not reached yet: the delivery announces it there, not as a late arrival."""
    city = town.city
    deliverer = town.service.deliverer
    stayer = town.households[city.other_group][0]
    await deliverer.stop()
    try:
        notice = await town.publish()  # the ward's: first group, then the other
        assert await deliverer.fan_out_batch()  # the first group's three households
        await town.add_member(stayer, "2010-05-05", registry_pb2.SEX_FEMALE)
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    in_batches, late = await delivered_to(town, notice.notice_id)
    assert (sorted(in_batches), late) == (sorted(town.everyone), [])
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.delivered == len(town.everyone)


async def test_a_household_arriving_where_a_batch_is_being_written_is_announced_with_it(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It arrives in the group of the last batch after that batch read the households: the
    batch did not write its record, yet announces it, once, with its own."""
    city = town.city
    deliverer = town.service.deliverer
    store = town.service.store
    write = store.insert_deliveries
    arrived: list[str] = []

    async def arrive_then_write(docs: list[Any]) -> int:
        arrived.append(await town.add_household(city.other_group))
        return await write(docs)

    await deliverer.stop()
    try:
        notice = await town.publish()
        assert await deliverer.fan_out_batch()  # the first group
        monkeypatch.setattr(store, "insert_deliveries", arrive_then_write)
        assert await deliverer.fan_out_batch()  # the other group, the last batch
        monkeypatch.setattr(store, "insert_deliveries", write)
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    in_batches, late = await delivered_to(town, notice.notice_id)
    assert len(arrived) == 1
    assert (sorted(in_batches), late) == (sorted(town.everyone), [])
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.delivered == len(town.everyone) and reach.delivery_complete


async def test_a_batch_interrupted_before_records_were_marked_pending_is_announced(
    town: Town, clock: Clock
) -> None:
    """An earlier version marked a batch's records with the batch's key only, and left it there
    once announced: a batch it was interrupted in is announced when delivery resumes."""
    store = town.service.store
    deliverer = town.service.deliverer
    await deliverer.stop()
    try:
        notice = await town.publish(town.leader, unit_id=town.city.group)
        doc = await store.get(notice.notice_id)
        assert doc is not None
        key = batch_of(doc["fanout"]["after"])
        await store.insert_deliveries(
            [
                delivery_document(doc, h, town.city.group, clock()) | {"batch": key}
                for h in town.households[town.city.group]
            ]
        )
        await store.ensure_indexes()  # as the new version starts
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.start()
    in_batches, _ = await delivered_to(town, notice.notice_id)
    assert sorted(in_batches) == sorted(town.households[town.city.group])
    for household in town.households[town.city.group]:
        assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]


async def test_an_app_showing_an_expired_notice_hears_of_its_retraction(
    town: Town, clock: Clock
) -> None:
    """Residents keep expired notices on request; one retracted after its expiry (sent in error)
    must leave the apps showing it too, not only those that list again."""
    household = town.households[town.city.group][0]
    notice = await town.publish(
        town.leader,
        unit_id=town.city.group,
        title="Danh sách hộ nghèo",
        expires_at=stamp(clock() + timedelta(hours=1)),
    )
    await town.delivered(notice.notice_id)
    clock.advance(hours=2)
    call = town.resident(household).WatchMyNotices(notices_pb2.WatchMyNoticesRequest())
    hub = town.service.servicer.hub
    await eventually(lambda: _true(hub.watching(household)), what="the app's stream open")
    await town.leader.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="Gửi nhầm danh sách"
        )
    )
    retracted = await next_change(call, notice.notice_id, [])
    assert retracted.change == notices_pb2.NOTICE_CHANGE_RETRACTED
    assert retracted.notice.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    assert not retracted.notice.notice.attachments
    call.cancel()
