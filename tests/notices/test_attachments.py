"""Attachments go from the official's browser straight to object storage through a presigned
URL that binds the declared type and size; publishing (or revising) checks each upload's
declared type, its first bytes and its size, and refuses the notice, deleting the upload, when
one is wrong. Real SeaweedFS S3."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
from civic.notices.v1 import notices_pb2
from minio import Minio

from services.common.auth import Role
from services.common.objects import checked
from services.common.uploads import UploadSweeper
from services.notices.domain import ATTACHMENT_SIGNATURES, MAX_ATTACHMENT_BYTES
from services.notices.main import ATTACHMENT_BUCKET
from tests.indexes import index_uses, used_since
from tests.notices.conftest import NoticeCaller, Town, refused, rid
from tests.objects import get, object_exists, png_bytes, put, put_refused

PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
PDF_TYPE = "application/pdf"


async def upload(caller: NoticeCaller, body: bytes, declared: str) -> str:
    slot = await caller.CreateAttachmentUpload(
        notices_pb2.CreateAttachmentUploadRequest(content_type=declared, size_bytes=len(body))
    )
    await put(slot.upload_url, body, declared)
    return str(slot.object_key)


def attach(key: str, name: str) -> notices_pb2.AttachmentUpload:
    return notices_pb2.AttachmentUpload(object_key=key, file_name=name)


async def notices_in(town: Town) -> int:
    return await town.service.store.notices.count_documents({"unit_id": town.city.ward})


async def test_attachments_are_uploaded_checked_and_viewable(town: Town) -> None:
    officer = town.ward_officer
    pdf_key = await upload(officer, PDF, PDF_TYPE)
    png_key = await upload(officer, png_bytes(), "image/png")
    assert pdf_key.startswith(f"notices/{town.city.ward}/") and pdf_key.endswith(".pdf")
    notice = await town.publish(
        attachments=[attach(pdf_key, "ke-hoach.pdf"), attach(png_key, "so-do.png")]
    )
    assert [(a.file_name, a.content_type, a.size_bytes) for a in notice.attachments] == [
        ("ke-hoach.pdf", PDF_TYPE, len(PDF)),
        ("so-do.png", "image/png", len(png_bytes())),
    ]
    await town.delivered(notice.notice_id)
    household = town.households[town.city.group][0]
    (mine,) = await town.inbox(household)
    # The links are presigned GETs on the store: the same bytes come back.
    assert [await get(a.url) for a in mine.notice.attachments] == [PDF, png_bytes()]

    # A revision keeps an attachment by its key (renamed here) and drops the other.
    response = await officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(),
            notice_id=notice.notice_id,
            title=notice.title,
            body=notice.body,
            attachments=[attach(png_key, "so-do-moi.png")],
        )
    )
    assert [a.file_name for a in response.notice.attachments] == ["so-do-moi.png"]
    # Its publisher still sees what each revision carried.
    assert [a.file_name for a in response.notice.revisions[0].attachments] == [
        "ke-hoach.pdf",
        "so-do.png",
    ]

    # A household no longer gets the file the revision dropped (one sent by mistake, say),
    # from its list, from GetNotice or from the live stream; nor any file once it is retracted.
    def files(notice: notices_pb2.Notice) -> set[str]:
        return {a.file_name for a in notice.attachments} | {
            a.file_name for r in notice.revisions for a in r.attachments
        }

    resident = town.resident(household)

    async def seen() -> tuple[set[str], set[str]]:
        (listed,) = await town.inbox(household)
        got = await resident.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice.notice_id))
        return files(listed.notice), files(got.notice)

    assert await seen() == ({"so-do-moi.png"}, {"so-do-moi.png"})
    await officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id=notice.notice_id, reason="sai")
    )
    assert await seen() == (set(), set())


async def test_a_bad_upload_is_refused_and_deleted_and_nothing_is_published(
    town: Town, bucket: Minio
) -> None:
    officer = town.ward_officer
    good = await upload(officer, PDF, PDF_TYPE)
    padded = PDF + b"\x00" * (MAX_ATTACHMENT_BYTES + 1 - len(PDF))
    cases = [
        ((b"just text, not a document\n" * 200)[:4096], PDF_TYPE, PDF_TYPE, "object_key"),
        (png_bytes(), "image/png", "text/plain", "content_type"),
        (padded, PDF_TYPE, PDF_TYPE, "size_bytes"),
    ]
    before = await notices_in(town)
    for body, declared, sent_as, field in cases:
        slot = await officer.CreateAttachmentUpload(
            notices_pb2.CreateAttachmentUploadRequest(content_type=declared, size_bytes=4096)
        )
        if (len(body), sent_as) == (4096, declared):
            await put(slot.upload_url, body, sent_as)
        else:
            # The store refuses such a PUT (the link binds type and size); one that does not
            # check signed headers would take it, and the service must still refuse it.
            await put_refused(slot.upload_url, body, sent_as)
            await asyncio.to_thread(
                bucket.put_object,
                ATTACHMENT_BUCKET,
                slot.object_key,
                io.BytesIO(body),
                len(body),
                content_type=sent_as,
            )
        assert await object_exists(bucket, ATTACHMENT_BUCKET, slot.object_key)
        await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            town.publish(attachments=[attach(good, "ok.pdf"), attach(slot.object_key, "x.pdf")]),
            f"attachments[1].{field}",
        )
        assert not await object_exists(bucket, ATTACHMENT_BUCKET, slot.object_key)
    assert await notices_in(town) == before
    # The good upload was accepted, and is kept, and still attaches.
    published = await town.publish(attachments=[attach(good, "ok.pdf")])
    assert [(a.object_key, a.size_bytes) for a in published.attachments] == [
        (checked(good), len(PDF))
    ]


async def test_uploads_are_declared_properly_and_attached_by_their_unit_only(town: Town) -> None:
    officer = town.ward_officer
    refusals = [
        ("text/plain", 1000, "content_type"),
        ("image/gif", 1000, "content_type"),
        (PDF_TYPE, MAX_ATTACHMENT_BYTES + 1, "size_bytes"),
        (PDF_TYPE, 0, "size_bytes"),
    ]
    for content_type, size, field in refusals:
        await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            officer.CreateAttachmentUpload(
                notices_pb2.CreateAttachmentUploadRequest(
                    content_type=content_type, size_bytes=size
                )
            ),
            field,
        )
    resident = town.resident(town.households[town.city.group][0])
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        resident.CreateAttachmentUpload(
            notices_pb2.CreateAttachmentUploadRequest(content_type=PDF_TYPE, size_bytes=100)
        ),
    )
    # Another unit's upload, named directly or through a path under this unit's folder.
    theirs = await upload(town.other_leader, PDF, PDF_TYPE)
    name = theirs.rsplit("/", 1)[1]
    for key in (theirs, f"notices/{town.city.group}/../{town.city.other_group}/{name}"):
        await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            town.publish(town.leader, unit_id=town.city.group, attachments=[attach(key, "a")]),
            "attachments[0].object_key",
        )
    # An upload slot nobody uploaded to.
    slot = await officer.CreateAttachmentUpload(
        notices_pb2.CreateAttachmentUploadRequest(content_type=PDF_TYPE, size_bytes=100)
    )
    await refused(
        grpc.StatusCode.NOT_FOUND, town.publish(attachments=[attach(slot.object_key, "a")])
    )
    # Names are plain file names.
    mine = await upload(officer, PDF, PDF_TYPE)
    for bad_name in ("", "../etc/passwd", "a\nb"):
        await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            town.publish(attachments=[attach(mine, bad_name)]),
            "attachments[0].file_name",
        )


async def test_a_revision_retried_after_its_attachment_was_dropped_gets_its_first_answer(
    town: Town,
) -> None:
    """A revision keeps an attachment by the key the notice shows; a later one drops it. The
    first, retried, is answered as it was, not checked again against the notice of now."""
    officer = town.ward_officer
    notice = await town.publish(attachments=[attach(await upload(officer, PDF, PDF_TYPE), "a.pdf")])
    keep = notices_pb2.ReviseNoticeRequest(
        request_id=rid(),
        notice_id=notice.notice_id,
        title="Lịch mới",
        body="Nội dung mới",
        attachments=[attach(notice.attachments[0].object_key, "ke-hoach.pdf")],
    )
    first = await officer.ReviseNotice(keep)
    await officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(), notice_id=notice.notice_id, title="Lịch mới", body="Bỏ tệp"
        )
    )
    assert await officer.ReviseNotice(keep) == first  # the same request, retried


async def test_the_upload_sweep_keeps_what_notices_attach_and_removes_the_rest(
    town: Town, bucket: Minio
) -> None:
    """Found by the attachment's index (the sweep runs hourly over every notice kept). An
    upload accepted by a publication whose transaction then failed is named by no notice and
    goes too."""
    officer = town.ward_officer
    kept_key = await upload(officer, PDF, PDF_TYPE)
    abandoned = await upload(officer, png_bytes(), "image/png")
    orphaned = await upload(officer, PDF, PDF_TYPE)
    await town.publish(attachments=[attach(kept_key, "ke-hoach.pdf")])
    # The first half of a publication, accepting the file, with no transaction after it.
    await town.service.servicer.files.accept(orphaned, MAX_ATTACHMENT_BYTES, ATTACHMENT_SIGNATURES)
    notices = town.service.store.notices
    before = await index_uses(notices)
    # The service's own sweeps, kept to this ward's objects, with everything old enough.
    sweeper = UploadSweeper(
        town.service.uploads.store,
        [
            replace(sweep, prefix=f"{sweep.prefix}{town.city.ward}/", keep_for=timedelta(0))
            for sweep in town.service.uploads.sweeps
        ],
        clock=lambda: datetime.now(UTC) + timedelta(minutes=1),
    )
    assert await sweeper.sweep() == 2
    assert not await object_exists(bucket, ATTACHMENT_BUCKET, abandoned)
    assert not await object_exists(bucket, ATTACHMENT_BUCKET, checked(orphaned))
    assert await object_exists(bucket, ATTACHMENT_BUCKET, checked(kept_key))
    assert "revisions.attachments.key_1" in await used_since(notices, before)


async def test_an_attachment_a_revision_dropped_can_be_attached_again(town: Town) -> None:
    officer = town.ward_officer
    plan = await upload(officer, PDF, PDF_TYPE)
    notice = await town.publish(attachments=[attach(plan, "ke-hoach.pdf")])
    kept_key = notice.attachments[0].object_key

    async def revise(*attachments: notices_pb2.AttachmentUpload) -> notices_pb2.Notice:
        answer: notices_pb2.ReviseNoticeResponse = await officer.ReviseNotice(
            notices_pb2.ReviseNoticeRequest(
                request_id=rid(),
                notice_id=notice.notice_id,
                title="Lịch mới",
                body="Nội dung mới",
                attachments=list(attachments),
            )
        )
        return answer.notice

    assert not (await revise()).attachments
    restored = await revise(attach(kept_key, "ke-hoach-moi.pdf"))
    assert [(a.object_key, a.file_name) for a in restored.attachments] == [
        (kept_key, "ke-hoach-moi.pdf")
    ]


async def test_a_file_withdrawn_from_a_notice_is_handed_only_to_its_publisher_and_above(
    town: Town,
) -> None:
    """A file a revision dropped (a list of households sent by mistake, say), or every file of
    a retracted notice, is no longer handed to the officials below the publisher who read the
    notice (a group leader finding the ward's notice), nor to auditors or integrators."""
    city, officer = town.city, town.ward_officer
    sent = await upload(officer, PDF, PDF_TYPE)
    kept = await upload(officer, png_bytes(), "image/png")
    notice = await town.publish(
        attachments=[attach(sent, "danh-sach-ho-ngheo.pdf"), attach(kept, "so-do.png")]
    )
    await officer.ReviseNotice(
        notices_pb2.ReviseNoticeRequest(
            request_id=rid(),
            notice_id=notice.notice_id,
            title=notice.title,
            body=notice.body,
            attachments=[attach(notice.attachments[1].object_key, "so-do.png")],
        )
    )
    below = [
        town.leader,
        town.caller(Role.AUDITOR, city.ward),
        town.caller(Role.INTEGRATOR, city.city),
    ]

    async def files(caller: NoticeCaller) -> tuple[set[str], set[str]]:
        """The files of the notice as GetNotice and ListNotices (from above) hand them."""
        got = await caller.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice.notice_id))
        listed = await caller.ListNotices(
            notices_pb2.ListNoticesRequest(unit_id=city.group, from_above=True)
        )
        (found,) = [n for n in listed.notices if n.notice_id == notice.notice_id]
        return tuple(  # type: ignore[return-value]
            {a.file_name for a in n.attachments}
            | {a.file_name for r in n.revisions for a in r.attachments}
            for n in (got.notice, found)
        )

    every = {"danh-sach-ho-ngheo.pdf", "so-do.png"}
    for caller in (officer, town.admin):  # the publisher and an official above
        assert await files(caller) == (every, every)
    for caller in below:
        assert await files(caller) == ({"so-do.png"}, {"so-do.png"})
    await officer.RetractNotice(
        notices_pb2.RetractNoticeRequest(request_id=rid(), notice_id=notice.notice_id, reason="sai")
    )
    assert await files(officer) == (every, every)
    for caller in below:
        assert await files(caller) == (set(), set())
