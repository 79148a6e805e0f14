"""Read receipts and acknowledgements, and what the publisher sees of them: delivered, opened
and acknowledged households per group, live, and the households not reached yet. A notice is a
household's to see and open once its delivery there is counted and announced."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
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
from tests.notices.test_schedule_and_moves import reconciled


async def acknowledge(town: Town, household: str, notice_id: str) -> notices_pb2.HouseholdNotice:
    response = await town.resident(household).AcknowledgeNotice(
        notices_pb2.AcknowledgeNoticeRequest(request_id=rid(), notice_id=notice_id)
    )
    acknowledged: notices_pb2.HouseholdNotice = response.notice
    return acknowledged


def by_group(reach: notices_pb2.GetReachResponse) -> dict[str, tuple[int, int, int]]:
    return {g.unit_id: (g.delivered, g.opened, g.acknowledged) for g in reach.groups}


async def test_reads_and_acknowledgements_show_in_the_reach_counts(town: Town) -> None:
    city = town.city
    notice = await town.publish(requires_acknowledgement=True, title="Họp tổ dân phố")
    await town.delivered(notice.notice_id)
    a, b, c = town.households[city.group]
    d, _ = town.households[city.other_group]

    opened = await town.open(a, notice.notice_id)
    assert opened.opened and not opened.acknowledged
    again = await town.open(a, notice.notice_id)  # a second look is no second receipt
    assert again.opened_at == opened.opened_at
    acknowledged = await acknowledge(town, b, notice.notice_id)  # acknowledging opens too
    assert acknowledged.opened and acknowledged.acknowledged
    await acknowledge(town, d, notice.notice_id)
    await acknowledge(town, d, notice.notice_id)

    reach = await town.ward_officer.GetReach(
        notices_pb2.GetReachRequest(notice_id=notice.notice_id)
    )
    assert (reach.total.delivered, reach.total.opened, reach.total.acknowledged) == (5, 3, 2)
    assert by_group(reach) == {city.group: (3, 2, 1), city.other_group: (2, 1, 1)}

    reads = await town.events(notice.notice_id, events_pb2.NoticeRead)
    assert sorted(e.household_id for e in reads) == sorted([a, b, d])
    acks = await town.events(notice.notice_id, events_pb2.NoticeAcknowledged)
    assert sorted(e.household_id for e in acks) == sorted([b, d])

    # A group leader counts their own group of the ward's notice, and knocks on its doors.
    mine = await town.leader.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert mine.total.unit_id == city.group
    assert by_group(mine) == {city.group: (3, 2, 1)}
    not_reached = await town.leader.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)
    )
    assert [h.household_id for h in not_reached.households] == [c]
    assert not_reached.households[0].address == "12 Kiệt 45 Trần Phú"
    assert not_reached.households[0].unit_id == city.group

    # Page by page across the ward.
    seen, token = [], ""
    while True:
        page = await town.ward_officer.ListNotReached(
            notices_pb2.ListNotReachedRequest(
                notice_id=notice.notice_id,
                page=types_pb2.PageRequest(page_size=1, page_token=token),
            )
        )
        seen += [h.household_id for h in page.households]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(set(town.everyone) - {a, b, d})
    # A token it never issued is refused, not taken for the first page.
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        town.ward_officer.ListNotReached(
            notices_pb2.ListNotReachedRequest(
                notice_id=notice.notice_id,
                page=types_pb2.PageRequest(page_size=1, page_token="dl-made-up"),
            )
        ),
        "page.page_token",
    )

    # Out of reach: another group's leader asking for this group; residents asking at all.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.other_leader.GetReach(
            notices_pb2.GetReachRequest(notice_id=notice.notice_id, unit_id=city.group)
        ),
    )
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.resident(a).GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id)),
    )
    # Auditors and the treasurer count reach; the addresses behind it are for officials.
    for role in (Role.AUDITOR, Role.TREASURER):
        caller = town.caller(role, city.group)
        counted = await caller.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
        assert counted.total.delivered == 3
        await refused(
            grpc.StatusCode.PERMISSION_DENIED,
            caller.ListNotReached(notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)),
        )


async def test_receipts_are_for_the_households_own_notices(town: Town) -> None:
    city = town.city
    notice = await town.publish(town.leader, unit_id=city.group)
    await town.delivered(notice.notice_id)
    outsider = town.households[city.other_group][0]
    await refused(
        grpc.StatusCode.NOT_FOUND,
        town.resident(outsider).OpenNotice(
            notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
        ),
    )
    member = town.households[city.group][0]
    # It does not ask for acknowledgement.
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        town.resident(member).AcknowledgeNotice(
            notices_pb2.AcknowledgeNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
        ),
    )
    # Officials have no household to open it for.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.leader.OpenNotice(
            notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
        ),
    )
    # A retried open (same request_id) answers the same and records one receipt.
    request = notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
    first = await town.resident(member).OpenNotice(request)
    second = await town.resident(member).OpenNotice(request)
    assert first == second
    assert len(await town.events(notice.notice_id, events_pb2.NoticeRead)) == 1
    auditor = town.caller(Role.AUDITOR, city.ward)
    reach = await auditor.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert (reach.total.delivered, reach.total.opened) == (3, 1)


async def test_a_retracted_notice_takes_no_more_read_receipts(town: Town) -> None:
    """The reach stays as it stood when the notice was retracted: a household that had not
    opened it (or not its latest revision) is refused; one that had is answered as before, and
    a retry of its open gets its first answer."""
    city = town.city
    notice = await town.publish(town.leader, unit_id=city.group, title="Cắt nước thứ Hai")
    await town.delivered(notice.notice_id)
    early, late, earlier_revision = town.households[city.group]
    request = notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
    first = await town.resident(early).OpenNotice(request)
    await town.open(earlier_revision, notice.notice_id)
    await town.leader.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, title="Cắt nước thứ Ba", body="8 giờ"
        )
    )
    await town.open(early, notice.notice_id)
    await town.leader.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="Công ty cấp nước hoãn"
        )
    )
    reads_before = await town.events(notice.notice_id, events_pb2.NoticeRead)

    for household in (late, earlier_revision):
        details = await refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            town.resident(household).OpenNotice(
                notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
            ),
        )
        assert "retracted" in details, details
    (unread,) = [n for n in await town.inbox(late) if n.notice.notice_id == notice.notice_id]
    assert not unread.opened and unread.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    (older,) = [
        n for n in await town.inbox(earlier_revision) if n.notice.notice_id == notice.notice_id
    ]
    assert older.opened and older.opened_revision == 1

    assert await town.resident(early).OpenNotice(request) == first
    again = await town.open(early, notice.notice_id)
    assert again.opened and again.opened_revision == 2
    assert again.opened_at == first.notice.opened_at

    assert await town.events(notice.notice_id, events_pb2.NoticeRead) == reads_before
    reach = await town.leader.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert (reach.total.delivered, reach.total.opened) == (3, 2)
    not_reached = await town.leader.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)
    )
    assert [h.household_id for h in not_reached.households] == [late]


async def test_an_acknowledgement_repeated_after_the_notice_ended_is_answered_as_before(
    town: Town, clock: Clock
) -> None:
    """ "I will attend" tapped again (a second tap, the app sending it anew) once the notice has
    expired or been retracted: the household that said it is told so again, nothing recorded;
    one that had not is refused."""
    city = town.city
    expiring = await town.publish(
        town.leader,
        unit_id=city.group,
        requires_acknowledgement=True,
        expires_at=stamp(clock() + timedelta(hours=1)),
    )
    retracted = await town.publish(town.leader, unit_id=city.group, requires_acknowledgement=True)
    await town.delivered(expiring.notice_id)
    await town.delivered(retracted.notice_id)
    said, silent, _ = town.households[city.group]
    first = {n: await acknowledge(town, said, n) for n in (expiring.notice_id, retracted.notice_id)}
    await town.leader.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=retracted.notice_id, reason="Hoãn họp"
        )
    )
    clock.advance(hours=2)
    for notice_id, acknowledged in first.items():
        acks = await town.events(notice_id, events_pb2.NoticeAcknowledged)
        again = await acknowledge(town, said, notice_id)
        assert again.acknowledged and again.acknowledged_at == acknowledged.acknowledged_at
        assert await town.events(notice_id, events_pb2.NoticeAcknowledged) == acks
        await refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            town.resident(silent).AcknowledgeNotice(
                notices_pb2.AcknowledgeNoticeRequest(request_id=rid(), notice_id=notice_id)
            ),
        )


async def test_a_notice_is_shown_and_opened_only_once_its_delivery_is_announced(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the batch's write and its announcement a resident neither lists, reads nor opens
    the notice (as before its record was written), and it is not yet a door to knock on: the
    household's receipt can never come before the NoticeDelivered naming it."""
    store = town.service.store
    reader = town.households[town.city.group][0]
    resident = town.resident(reader)
    write = store.insert_deliveries

    async def write_then_look(docs: list[Any]) -> int:
        written = await write(docs)
        notice_id = docs[0]["notice_id"]
        assert notice_id not in [n.notice.notice_id for n in await town.inbox(reader)]
        for call in (
            resident.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id)),
            resident.OpenNotice(
                notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=notice_id)
            ),
            resident.AcknowledgeNotice(
                notices_pb2.AcknowledgeNoticeRequest(request_id=rid(), notice_id=notice_id)
            ),
        ):
            await refused(grpc.StatusCode.NOT_FOUND, call)
        listed = await town.leader.ListNotReached(
            notices_pb2.ListNotReachedRequest(notice_id=notice_id)
        )
        assert list(listed.households) == []
        return written

    notice = await deliver_by_hand(
        town, monkeypatch, write_then_look, requires_acknowledgement=True
    )
    await town.open(reader, notice.notice_id)
    kinds = []
    async for entry in (
        town.service.db["outbox"].find({"events.key": notice.notice_id}).sort([("_id", 1)])
    ):
        kinds += [e["type"].rsplit(".", 1)[1] for e in entry["events"]]
    assert kinds.index("NoticeDelivered") < kinds.index("NoticeRead"), kinds


async def empty_group(town: Town) -> None:
    """Every resident of the town's group moves out of the area, once the service's view has
    it."""
    view = town.service.store.view
    households = town.households[town.city.group]
    async for head in view.persons.find({"household_id": {"$in": households}}):
        await town.city.ward_officer.MoveOut(
            registry_pb2.MoveOutRequest(request_id=rid(), person_id=head["_id"], destination="Huế")
        )

    async def emptied() -> bool:
        left = {"_id": {"$in": households}, "residents": {"$gt": 0}}
        return await view.households.count_documents(left) == 0

    await eventually(emptied, what="the group emptied in the service's view")


async def test_a_batch_withdrawing_its_records_leaves_no_receipt_counted(
    town: Town, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group's households are left empty between the batch's read of them and its write; a
    resident tries to open the notice before the batch withdraws its records unannounced."""
    city = town.city
    store = town.service.store
    leaving = list(town.households[city.group])
    write = store.insert_deliveries

    async def empty_write_open(docs: list[Any]) -> int:
        await empty_group(town)
        written = await write(docs)
        await refused(
            grpc.StatusCode.NOT_FOUND,
            town.resident(leaving[0]).OpenNotice(
                notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id=docs[0]["notice_id"])
            ),
        )
        return written

    notice = await deliver_by_hand(town, monkeypatch, empty_write_open)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    live = await store.deliveries.count_documents(
        {"notice_id": notice.notice_id, "withdrawn_at": None}
    )
    assert (live, reach.total.delivered, reach.total.opened) == (0, 0, 0)
    assert await town.events(notice.notice_id, events_pb2.NoticeRead) == []


async def test_paging_the_doors_to_knock_on_skips_none_when_one_moves_group(town: Town) -> None:
    """A household at the end of a page that moves to another group of the ward before the next
    page is asked for does not take the next page past the other households still to visit."""
    city = town.city
    notice = await town.publish(title="Kiểm tra phòng cháy")
    await town.delivered(notice.notice_id)
    first = await town.ward_officer.ListNotReached(
        notices_pb2.ListNotReachedRequest(
            notice_id=notice.notice_id, page=types_pb2.PageRequest(page_size=1)
        )
    )
    (mover,) = first.households
    later_group = max(city.group, city.other_group)
    assert mover.unit_id < later_group  # its own group comes first in the list
    await reconciled(
        town,
        [
            registry_events.HouseholdMoved(
                household_id=mover.household_id,
                from_unit_id=mover.unit_id,
                to_unit_id=later_group,
            )
        ],
    )

    seen, token = [mover.household_id], first.next_page_token
    while token:
        page = await town.ward_officer.ListNotReached(
            notices_pb2.ListNotReachedRequest(
                notice_id=notice.notice_id,
                page=types_pb2.PageRequest(page_size=1, page_token=token),
            )
        )
        seen += [h.household_id for h in page.households]
        token = page.next_page_token
    assert set(seen) == set(town.everyone)
