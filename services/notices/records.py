"""Notice and delivery documents to and from gRPC messages and domain values."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from civic.notices.v1 import notices_pb2

from services.common.mongo import Document
from services.common.wire import duration, timestamp
from services.notices import domain
from services.notices.domain import Audience, Priority, State

UrlFor = Callable[[str], str]


def audience_from_message(message: notices_pb2.Audience) -> Audience:
    member = message.member
    return domain.check_audience(
        member.min_age,
        member.max_age if member.HasField("max_age") else None,
        member.sex,
        list(message.residence_kinds),
        message.HasField("member"),
    )


def audience_document(audience: Audience) -> Document:
    # The upper bound is stored as "under_age", younger than which (None: none): notices
    # stored before infants could be an audience have a "max_age" whose 0 meant no bound.
    under_age = None if audience.max_age is None else audience.max_age + 1
    return {
        "min_age": audience.min_age,
        "under_age": under_age,
        "sex": audience.sex,
        "residence_kinds": list(audience.residence_kinds),
    }


def audience_of(doc: Document) -> Audience:
    a = doc["audience"]
    if "under_age" in a:
        max_age = None if a["under_age"] is None else a["under_age"] - 1
    else:
        max_age = a["max_age"] or None
    return Audience(a["min_age"], max_age, a["sex"], tuple(a["residence_kinds"]))


def audience_message(doc: Document) -> notices_pb2.Audience:
    audience = audience_of(doc)
    message = notices_pb2.Audience(residence_kinds=list(audience.residence_kinds))  # type: ignore[arg-type]
    if audience.filters_members:
        message.member.CopyFrom(
            notices_pb2.MemberFilter(
                min_age=audience.min_age,
                max_age=audience.max_age,  # unset when None
                sex=audience.sex,  # type: ignore[arg-type]
            )
        )
    return message


def attachments_message(
    docs: list[Document], url_for: UrlFor | None
) -> list[notices_pb2.Attachment]:
    return [
        notices_pb2.Attachment(
            object_key=a["key"],
            file_name=a["name"],
            content_type=a["content_type"],
            size_bytes=a["size"],
            url=url_for(a["key"]) if url_for else "",
        )
        for a in docs
    ]


def notice_message(
    doc: Document, now: datetime, url_for: UrlFor | None = None
) -> notices_pb2.Notice:
    current = doc["revisions"][-1]
    resend = doc.get("resend_after_s")
    return notices_pb2.Notice(
        notice_id=doc["_id"],
        title=current["title"],
        body=current["body"],
        priority=doc["priority"],
        publisher=notices_pb2.Publisher(**doc["publisher"]),
        unit_id=doc["unit_id"],
        audience=audience_message(doc),
        attachments=attachments_message(current["attachments"], url_for),
        publish_at=timestamp(doc.get("publish_at")),
        expires_at=timestamp(doc.get("expires_at")),
        published_at=timestamp(doc.get("published_at")),
        state=int(domain.state_at(State(doc["state"]), doc.get("expires_at"), now)),  # type: ignore[arg-type]
        requires_acknowledgement=doc["requires_ack"],
        revision=current["revision"],
        revisions=[
            notices_pb2.Revision(
                revision=r["revision"],
                title=r["title"],
                body=r["body"],
                attachments=attachments_message(r["attachments"], url_for),
                revised_at=timestamp(r["at"]),
                revised_by=r["by"],
                note=r["note"],
            )
            for r in doc["revisions"]
        ],
        retraction_reason=doc.get("retraction_reason", ""),
        retracted_at=timestamp(doc.get("retracted_at")),
        resend_after=duration(timedelta(seconds=resend)) if resend else None,
        households_delivered=doc["fanout"]["delivered"],
        delivery_complete=doc["fanout"]["complete"],
        created_at=timestamp(doc["created_at"]),
    )


def as_sent(message: notices_pb2.Notice) -> notices_pb2.Notice:
    """A household sees what was sent, not how it was aimed or how far it went; and of the files,
    only those the notice still carries (`without_withdrawn_files`)."""
    message.ClearField("audience")
    message.households_delivered = 0
    message.delivery_complete = False
    return without_withdrawn_files(message)


def without_withdrawn_files(message: notices_pb2.Notice) -> notices_pb2.Notice:
    """Only the files the notice still carries: a revision that dropped one (sent by mistake,
    say), or the notice's retraction, withdraws it from all but its publisher and the officials
    above."""
    retracted = message.state == notices_pb2.NOTICE_STATE_RETRACTED
    if retracted:
        del message.attachments[:]
    for revision in message.revisions:
        if retracted or revision.revision != message.revision:
            del revision.attachments[:]
    return message


def household_notice(
    delivery: Document, notice: Document, now: datetime, url_for: UrlFor | None = None
) -> notices_pb2.HouseholdNotice:
    return notices_pb2.HouseholdNotice(
        notice=as_sent(notice_message(notice, now, url_for)),
        delivered_at=timestamp(delivery["delivered_at"]),
        opened=delivery["read"],
        opened_at=timestamp(delivery.get("opened_at")),
        opened_revision=delivery.get("opened_revision", 0),
        acknowledged=delivery["acked"],
        acknowledged_at=timestamp(delivery.get("acked_at")),
        resent_count=delivery.get("resent", 0),
        resent_at=timestamp(delivery.get("resent_at")),
    )


def delivery_document(
    notice: Document, household_id: str, unit_id: str, now: datetime, *, pending: bool = False
) -> Document:
    """A household's new delivery record; an emergency's also says when to send it again. One
    the first delivery writes is `pending` until its batch counts and announces it: residents do
    not see it until then."""
    doc: Document = {
        "_id": domain.delivery_id(notice["_id"], household_id),
        "notice_id": notice["_id"],
        "household_id": household_id,
        "unit_id": unit_id,
        "at": notice["published_at"],
        "delivered_at": now,
        "expires_at": notice.get("expires_at"),
        "read": False,
        "acked": False,
    }
    if pending:
        doc["pending"] = True
    return doc | next_resend(notice, now)


def next_resend(notice: Document, now: datetime) -> Document:
    """When an emergency delivered (or delivered again) at `now` is next sent again."""
    if notice["priority"] != Priority.EMERGENCY:
        return {}
    return {"resend_due": now + timedelta(seconds=notice["resend_after_s"])}
