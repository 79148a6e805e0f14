"""Bad input of each kind gets the right status, a message that starts with the field, and
leaves nothing written: no notice, no event, no stored command."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from civic.common.v1 import types_pb2
from civic.notices.v1 import notices_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from services.notices.domain import MAX_BODY, MAX_TITLE
from tests.conftest import Clock
from tests.notices.conftest import Town, refused, rid, stamp


async def written(town: Town) -> tuple[int, int, int, int]:
    db = town.service.db
    return (
        await db["notices"].count_documents({}),
        await db["outbox"].count_documents({}),
        await db["commands"].count_documents({}),
        await db["deliveries"].count_documents({}),
    )


async def test_bad_publish_requests_write_nothing(town: Town, clock: Clock) -> None:
    before = await written(town)
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    later = clock() + timedelta(hours=3)
    cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"request_id": ""}, INVALID, "request_id"),
        ({"title": ""}, INVALID, "title"),
        ({"title": "   "}, INVALID, "title"),
        ({"title": "x" * (MAX_TITLE + 1)}, INVALID, "title"),
        ({"title": "hai\ndòng"}, INVALID, "title"),
        ({"body": ""}, INVALID, "body"),
        ({"body": "x" * (MAX_BODY + 1)}, INVALID, "body"),
        ({"body": "chuông \x07"}, INVALID, "body"),
        ({"priority": notices_pb2.PRIORITY_UNSPECIFIED}, INVALID, "priority"),
        ({"priority": 9}, INVALID, "priority"),
        ({"unit_id": ""}, INVALID, "unit_id"),
        ({"unit_id": f"{town.city.ward}.Tổ 17"}, INVALID, "unit_id"),
        ({"unit_id": f"{town.city.ward}..g17"}, INVALID, "unit_id"),
        ({"expires_at": stamp(clock() - timedelta(hours=1))}, INVALID, "expires_at"),
        (
            {"publish_at": stamp(later), "expires_at": stamp(later - timedelta(hours=1))},
            INVALID,
            "expires_at",
        ),
        ({"publish_at": stamp(clock() + timedelta(days=400))}, INVALID, "publish_at"),
        ({"publish_at": Timestamp(seconds=2**40)}, INVALID, "publish_at"),
        ({"expires_at": Timestamp(seconds=-(2**40))}, INVALID, "expires_at"),
        ({"unit_id": f"{town.city.ward}.nowhere"}, grpc.StatusCode.NOT_FOUND, ""),
    ]
    for fields, code, field in cases:
        request = notices_pb2.PublishNoticeRequest(
            request_id=fields.pop("request_id", rid()),
            title=fields.pop("title", "Tiêu đề"),
            body=fields.pop("body", "Nội dung"),
            priority=fields.pop("priority", notices_pb2.PRIORITY_NORMAL),
            unit_id=fields.pop("unit_id", town.city.ward),
            **fields,
        )
        await refused(code, town.ward_officer.PublishNotice(request), field)
    assert await written(town) == before


async def test_bad_requests_to_other_calls(town: Town) -> None:
    notice = await town.publish()
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]
    resident = town.resident(household)
    before = await written(town)
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    calls = [
        (
            resident.OpenNotice(notices_pb2.OpenNoticeRequest(request_id=rid())),
            INVALID,
            "notice_id",
        ),
        (
            resident.OpenNotice(notices_pb2.OpenNoticeRequest(notice_id=notice.notice_id)),
            INVALID,
            "request_id",
        ),
        (
            resident.OpenNotice(
                notices_pb2.OpenNoticeRequest(request_id=rid(), notice_id="nt-nothing")
            ),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            town.ward_officer.ReviseNotice(
                notices_pb2.ReviseNoticeRequest(
                    request_id=rid(), notice_id=notice.notice_id, title="", body="b"
                )
            ),
            INVALID,
            "title",
        ),
        (
            town.ward_officer.ReviseNotice(
                notices_pb2.ReviseNoticeRequest(
                    request_id=rid(), notice_id="nt-nothing", title="t", body="b"
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "",
        ),
        (
            town.ward_officer.RetractNotice(
                notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id="", reason="r")
            ),
            INVALID,
            "notice_id",
        ),
        (
            resident.ListMyNotices(
                notices_pb2.ListMyNoticesRequest(page=types_pb2.PageRequest(page_size=5000))
            ),
            INVALID,
            "page.page_size",
        ),
        *(
            (
                resident.ListMyNotices(
                    notices_pb2.ListMyNoticesRequest(page=types_pb2.PageRequest(page_token=token))
                ),
                INVALID,
                "page.page_token",
            )
            for token in (
                "junk",
                "0|0001-01-01T00:00:00+01:00|x",  # before year 1 in UTC
                "0|2026-05-01T08:00:00|x",  # no offset
                "2|2026-05-01T08:00:00+00:00|x",
            )
        ),
        *(
            (
                town.ward_officer.ListNotices(
                    notices_pb2.ListNoticesRequest(page=types_pb2.PageRequest(page_token=token))
                ),
                INVALID,
                "page.page_token",
            )
            for token in ("junk", "nt-6b04f9b641d85dd699ac054a|")
        ),
        (
            town.ward_officer.GetReach(
                notices_pb2.GetReachRequest(notice_id=notice.notice_id, unit_id=town.city.district)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "",
        ),
    ]
    for call, code, field in calls:
        await refused(code, call, field)
    assert await written(town) == before
    # Reusing a request_id for a different request is refused too.
    request_id = rid()
    await resident.OpenNotice(
        notices_pb2.OpenNoticeRequest(request_id=request_id, notice_id=notice.notice_id)
    )
    other = await town.publish()
    await town.delivered(other.notice_id)
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        resident.OpenNotice(
            notices_pb2.OpenNoticeRequest(request_id=request_id, notice_id=other.notice_id)
        ),
    )


async def test_a_malformed_unit_id_is_bad_input_wherever_it_is_asked_for(town: Town) -> None:
    """Not taken for a unit outside the caller's scope (PERMISSION_DENIED): no unit is named."""
    notice = await town.publish()
    officer, notice_id = town.ward_officer, notice.notice_id
    for unit_id in ("Tổ 17", "a..b", f"{town.city.ward}/t17"):
        for call in (
            officer.ListNotices(notices_pb2.ListNoticesRequest(unit_id=unit_id)),
            officer.GetReach(notices_pb2.GetReachRequest(notice_id=notice_id, unit_id=unit_id)),
            officer.ListNotReached(
                notices_pb2.ListNotReachedRequest(notice_id=notice_id, unit_id=unit_id)
            ),
        ):
            await refused(grpc.StatusCode.INVALID_ARGUMENT, call, "unit_id")
