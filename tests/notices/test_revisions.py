"""Edits after publication are new revisions that readers see (and whether they read the latest);
retraction needs a reason and leaves the notice visible as retracted; nothing is deleted."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from civic.notices.v1 import notices_pb2

from services.common.auth import Role
from tests.conftest import Clock
from tests.notices.conftest import Town, events_pb2, refused, rid, stamp


async def revise(town: Town, notice_id: str, **fields: Any) -> notices_pb2.Notice:
    response = await town.ward_officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(request_id=rid(), notice_id=notice_id, **fields)
    )
    notice: notices_pb2.Notice = response.notice
    return notice


async def test_a_revision_is_what_readers_see_next(town: Town) -> None:
    notice = await town.publish(title="Tiêm chủng thứ Bảy", body="7 giờ sáng")
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]
    await town.open(household, notice.notice_id)

    revised = await revise(
        town, notice.notice_id, title="Tiêm chủng Chủ nhật", body="8 giờ sáng", note="đổi ngày"
    )
    assert revised.revision == 2
    assert [(r.revision, r.title, r.note) for r in revised.revisions] == [
        (1, "Tiêm chủng thứ Bảy", ""),
        (2, "Tiêm chủng Chủ nhật", "đổi ngày"),
    ]
    (mine,) = await town.inbox(household)
    assert mine.notice.title == "Tiêm chủng Chủ nhật" and mine.notice.body == "8 giờ sáng"
    assert mine.notice.revision == 2 and mine.opened_revision == 1  # revised since read
    again = await town.open(household, notice.notice_id)
    assert again.opened_revision == 2
    reads = await town.events(notice.notice_id, events_pb2.NoticeRead)
    assert [(e.household_id, e.revision) for e in reads] == [(household, 1), (household, 2)]
    assert [e.revision for e in await town.events(notice.notice_id, events_pb2.NoticeRevised)] == [
        2
    ]
    # Reach counts a household once however many revisions it opened.
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.opened == 1


async def test_retraction_needs_a_reason_and_hides_nothing(town: Town, clock: Clock) -> None:
    notice = await town.publish(title="Cắt điện", priority=notices_pb2.PRIORITY_EMERGENCY)
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]

    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        town.ward_officer.RetractNotice(
            notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
        ),
        "reason",
    )
    # A group leader cannot retract the ward's notice.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.leader.RetractNotice(
            notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, reason="nhầm"
            )
        ),
    )
    response = await town.ward_officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="Điện lực hoãn lịch cắt"
        )
    )
    assert response.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    (mine,) = await town.inbox(household)
    assert mine.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    assert mine.notice.retraction_reason == "Điện lực hoãn lịch cắt"
    assert mine.notice.title == "Cắt điện"
    retracted = await town.events(notice.notice_id, events_pb2.NoticeRetracted)
    assert [e.reason for e in retracted] == ["Điện lực hoãn lịch cắt"]

    # No more changes, no more re-sends; every record is still there.
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        town.ward_officer.ReviseNotice(
            notices_pb2.ReviseNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, title="x", body="y"
            )
        ),
    )
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        town.ward_officer.RetractNotice(
            notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, reason="lần nữa"
            )
        ),
    )
    clock.advance(hours=1)
    await town.service.deliverer.run_once()
    assert await town.events(notice.notice_id, events_pb2.NoticeResent) == []
    store = town.service.store
    assert await store.deliveries.count_documents({"notice_id": notice.notice_id}) == 5
    assert (
        await store.deliveries.count_documents(
            {"notice_id": notice.notice_id, "resend_due": {"$exists": True}}
        )
        == 0
    )


async def test_an_expired_notice_can_still_be_retracted_but_not_revised(
    town: Town, clock: Clock
) -> None:
    """Residents list expired notices on request: one sent in error stays readable unless its
    publisher can still retract it after its expiry."""
    notice = await town.publish(
        town.leader,
        unit_id=town.city.group,
        title="Danh sách hộ nghèo",
        expires_at=stamp(clock() + timedelta(hours=1)),
    )
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]
    clock.advance(hours=2)
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        town.leader.ReviseNotice(
            notices_pb2.ReviseNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, title="x", body="y"
            )
        ),
    )
    response = await town.leader.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="Gửi nhầm danh sách"
        )
    )
    assert response.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    (mine,) = await town.inbox(household, include_expired=True)
    assert mine.notice.state == notices_pb2.NOTICE_STATE_RETRACTED
    retracted = await town.events(notice.notice_id, events_pb2.NoticeRetracted)
    assert [e.reason for e in retracted] == ["Gửi nhầm danh sách"]


async def test_a_scheduled_notice_retracted_before_its_time_is_never_delivered(
    town: Town, clock: Clock
) -> None:
    notice = await town.publish(publish_at=stamp(clock() + timedelta(hours=1)))
    await town.ward_officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="hoãn"
        )
    )
    clock.advance(hours=2)
    await town.service.deliverer.run_once()
    assert await town.service.store.deliveries.count_documents({"notice_id": notice.notice_id}) == 0
    assert await town.events(notice.notice_id, events_pb2.NoticePublished) == []


async def test_a_notice_out_of_sight_is_not_there_to_revise_or_retract(town: Town) -> None:
    """Another ward's officer is not told the notice exists, nor who published it; a group
    leader who sees the ward's notice may still not change it."""
    notice = await town.publish()
    stranger = town.caller(Role.WARD_OFFICER, f"{town.city.district}.other")
    for caller, code in (
        (stranger, grpc.StatusCode.NOT_FOUND),
        (town.leader, grpc.StatusCode.PERMISSION_DENIED),
    ):
        for call in (
            caller.ReviseNotice(
                notices_pb2.ReviseNoticeRequest(
                    request_id=rid(), notice_id=notice.notice_id, title="Sửa", body="Nội dung"
                )
            ),
            caller.RetractNotice(
                notices_pb2.RetractNoticeRequest(
                    request_id=rid(), notice_id=notice.notice_id, reason="nhầm"
                )
            ),
        ):
            details = await refused(code, call)
            if code == grpc.StatusCode.NOT_FOUND:
                assert town.city.ward not in details, details
    stored = await town.service.store.get(notice.notice_id)
    assert stored is not None
    assert (len(stored["revisions"]), stored["state"]) == (1, notice.state)
