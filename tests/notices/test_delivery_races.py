"""The first delivery and the registry's changes, meeting halfway: a batch's records are written
before the batch is counted and announced, and households move, merge or empty in between. The
reach always equals the live records, and a household left without residents keeps nothing. A
revision retried after the notice was retracted gets its first answer."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2

import services.notices.delivery as delivery_module
from tests.notices.conftest import Town, deliver_by_hand, eventually, refused, rid


async def live_records(town: Town, notice_id: str) -> int:
    return await town.service.store.deliveries.count_documents(
        {"notice_id": notice_id, "withdrawn_at": None}
    )


async def test_a_group_merged_after_its_records_are_written_is_counted_once(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge lands after the batch's records are written and before the batch is counted:
    the registry consumer sees records not yet counted."""
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

        async def withdrawn() -> bool:
            return await store.deliveries.count_documents(
                {"household_id": {"$in": leaving}, "withdrawn_at": {"$ne": None}}
            ) == len(leaving)

        await eventually(withdrawn, what="the reconciler withdrew the just-written records")
        return n

    notice = await deliver_by_hand(town, monkeypatch, write_then_merge)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    doc = await store.get(notice.notice_id)
    assert doc is not None
    live = await live_records(town, notice.notice_id)
    assert reach.total.delivered == live == doc["fanout"]["delivered"]


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
