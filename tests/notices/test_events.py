"""Every step of a notice is an event on civic.notices.v1, read here as an outside integrator
would: CloudEvents headers, keyed by notice, decoded with nothing but the published protos."""

from __future__ import annotations

from civic.notices.v1 import notices_pb2

from services.common.config import Settings
from services.notices.events import TOPIC
from tests.kafka_reader import Record, TopicReader, with_key
from tests.notices.conftest import Town, events_pb2, rid

PREFIX = "civic.notices.v1."


async def test_each_step_of_a_notice_reaches_the_topic(town: Town, settings: Settings) -> None:
    notice = await town.publish(requires_acknowledgement=True)
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]
    await town.resident(household).AcknowledgeNotice(
        notices_pb2.AcknowledgeNoticeRequest(request_id=rid(), notice_id=notice.notice_id)
    )
    await town.ward_officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, reason="trùng lịch"
        )
    )
    expected = [
        "NoticePublished",
        "NoticeDelivered",
        "NoticeDeliveryCompleted",
        "NoticeRead",
        "NoticeAcknowledged",
        "NoticeRetracted",
    ]

    def kinds(records: list[Record]) -> list[str]:
        mine = with_key(records, notice.notice_id)
        return [r.event_type.removeprefix(PREFIX) for r in mine]

    async with TopicReader(settings.kafka_bootstrap_servers, TOPIC) as reader:
        records = await reader.collect(
            lambda rs: "NoticeRetracted" in kinds(rs), what=f"{notice.notice_id}'s events"
        )
    seen = kinds(records)
    assert list(dict.fromkeys(seen)) == expected, seen
    mine = with_key(records, notice.notice_id)
    for record in mine:
        assert record.header("ce_specversion") == "1.0"
        assert record.header("ce_source") == "/civic/notices"
        assert record.header("content-type") == "application/protobuf"
        assert record.header("ce_subject") == notice.notice_id
    read = next(r for r in mine if r.event_type == PREFIX + "NoticeRead")
    message = events_pb2.NoticeRead.FromString(read.value)
    assert (message.household_id, message.revision) == (household, 1)
    # A resident's receipt names the household, not the person who opened it.
    assert read.header("ce_actor") == ""
    published = next(r for r in mine if r.event_type == PREFIX + "NoticePublished")
    assert published.header("ce_actor") == f"ward_officer@{town.city.ward}"
    delivered = [
        h
        for r in mine
        if r.event_type == PREFIX + "NoticeDelivered"
        for h in events_pb2.NoticeDelivered.FromString(r.value).household_ids
    ]
    assert sorted(delivered) == sorted(town.everyone)
