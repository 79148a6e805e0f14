"""Photos go from the resident's phone straight to object storage through a presigned URL that
binds the declared type and size; the service checks what arrived (size, declared type, the
bytes themselves) before it attaches it, and deletes whatever it refuses. Real SeaweedFS S3,
plain HTTP for the upload and the view."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from civic.tickets.v1 import tickets_pb2
from minio import Minio

from services.common.objects import checked
from services.common.uploads import Sweep, UploadSweeper
from services.tickets.domain import MAX_PHOTO_BYTES, MAX_PHOTOS
from services.tickets.main import PHOTO_BUCKET, TicketsService
from tests.objects import (
    GPS,
    get,
    jpeg_bytes,
    jpeg_with_exif,
    object_exists,
    png_bytes,
    put,
    put_refused,
)
from tests.tickets.conftest import Pilot, TicketCaller, rid


async def stored(bucket: Minio, key: str) -> bool:
    """Whether the object is in the photo bucket (asked of the store directly, not the service)."""
    return await object_exists(bucket, PHOTO_BUCKET, key)


async def upload_slot(
    caller: TicketCaller, ticket_id: str, content_type: str, size: int
) -> tickets_pb2.CreatePhotoUploadResponse:
    response: tickets_pb2.CreatePhotoUploadResponse = await caller.CreatePhotoUpload(
        tickets_pb2.CreatePhotoUploadRequest(
            ticket_id=ticket_id, content_type=content_type, size_bytes=size
        )
    )
    return response


async def attach(caller: TicketCaller, ticket_id: str, key: str) -> tickets_pb2.Ticket:
    response = await caller.AttachPhoto(
        tickets_pb2.AttachPhotoRequest(request_id=rid(), ticket_id=ticket_id, object_key=key)
    )
    ticket: tickets_pb2.Ticket = response.ticket
    return ticket


async def photos_of(pilot: Pilot, ticket_id: str) -> list[tickets_pb2.Photo]:
    got = await pilot.resident.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
    return list(got.ticket.photos)


# ---- the tests ---------------------------------------------------------------------------------


async def test_photos_upload_through_presigned_urls_and_are_viewable(pilot: Pilot) -> None:
    ticket = await pilot.submit()
    images = [("image/png", png_bytes(), ".png"), ("image/jpeg", jpeg_bytes(), ".jpg")]
    keys = []
    for content_type, body, extension in images:
        before = datetime.now(UTC)
        slot = await upload_slot(pilot.resident, ticket.ticket_id, content_type, len(body))
        assert slot.object_key.startswith(f"tickets/{ticket.ticket_id}/")
        assert slot.object_key.endswith(extension)
        expires = slot.expires_at.ToDatetime(UTC)
        assert before + timedelta(minutes=14) < expires < datetime.now(UTC) + timedelta(minutes=16)
        await put(slot.upload_url, body, content_type)
        attached = await attach(pilot.resident, ticket.ticket_id, slot.object_key)
        # Known from now on by where it is kept: a key no upload link reaches.
        assert checked(slot.object_key) in [photo.object_key for photo in attached.photos]
        keys.append(checked(slot.object_key))

    photos = await photos_of(pilot, ticket.ticket_id)
    assert [photo.object_key for photo in photos] == keys
    for photo, (content_type, body, _) in zip(photos, images, strict=True):
        assert photo.content_type == content_type
        assert photo.size_bytes == len(body)
        # The view link is a presigned GET on the store: the same bytes come back.
        assert await get(photo.url) == body


async def test_create_upload_refuses_non_images_and_oversized_photos(pilot: Pilot) -> None:
    ticket = await pilot.submit()
    refused = [
        ("text/plain", 1000, "content_type"),
        ("image/gif", 1000, "content_type"),
        ("image/jpeg", MAX_PHOTO_BYTES + 1, "size_bytes"),
        ("image/png", 0, "size_bytes"),
    ]
    for content_type, size, field in refused:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await upload_slot(pilot.resident, ticket.ticket_id, content_type, size)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (content_type, size)
        assert (error.value.details() or "").startswith(f"{field}:"), error.value.details()
    # Exactly at the limit is allowed.
    slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/jpeg", MAX_PHOTO_BYTES)
    assert slot.upload_url


# What a phone may PUT at a presigned URL, as declared, that the service must not accept: text
# declared as an image, and a sound file declared as WebP (RIFF begins WebP, and WAV and AVI too).
NOT_IMAGES = {
    "text-declared-as-png": (b"not a photo, just text\n" * 10, "image/png"),
    "wav-declared-as-webp": (b"RIFF\x24\x08\x00\x00WAVEfmt " + b"\x00" * 64, "image/webp"),
}


@pytest.mark.parametrize("case", list(NOT_IMAGES))
async def test_attach_refuses_an_upload_that_is_not_the_image_declared_and_deletes_it(
    pilot: Pilot, bucket: Minio, case: str
) -> None:
    body, declared = NOT_IMAGES[case]
    ticket = await pilot.submit()
    slot = await upload_slot(pilot.resident, ticket.ticket_id, declared, len(body))
    await put(slot.upload_url, body, declared)
    assert await stored(bucket, slot.object_key)  # the store took it; the service has not yet

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await attach(pilot.resident, ticket.ticket_id, slot.object_key)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("object_key:"), error.value.details()
    assert not await stored(bucket, slot.object_key)
    assert await photos_of(pilot, ticket.ticket_id) == []


PADDED_PNG = png_bytes() + b"\x00" * (MAX_PHOTO_BYTES + 1 - len(png_bytes()))


async def test_the_store_refuses_an_upload_of_another_size_or_type_than_declared(
    pilot: Pilot, bucket: Minio
) -> None:
    """The link binds what the phone declared: a link for a small photo stores no gigabytes."""
    assert len(PADDED_PNG) == MAX_PHOTO_BYTES + 1
    ticket = await pilot.submit()
    body = png_bytes()
    slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", len(body))
    for sent, sent_as in [
        (PADDED_PNG, "image/png"),
        (body, "text/plain"),
        (body[:-8], "image/png"),
    ]:
        await put_refused(slot.upload_url, sent, sent_as)
        assert not await stored(bucket, slot.object_key)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await attach(pilot.resident, ticket.ticket_id, slot.object_key)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await photos_of(pilot, ticket.ticket_id) == []


@pytest.mark.parametrize(
    ("body", "stored_as", "field"),
    [(png_bytes(), "text/plain", "content_type"), (PADDED_PNG, "image/png", "size_bytes")],
    ids=["png-stored-as-text", "png-over-the-limit"],
)
async def test_attach_checks_type_and_size_itself_whatever_the_store_let_through(
    pilot: Pilot, bucket: Minio, body: bytes, stored_as: str, field: str
) -> None:
    """An S3 store that does not check a link's signed headers, or an object written there some
    other way: the service's own check still refuses it, and deletes it."""
    ticket = await pilot.submit()
    slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", 4096)
    await asyncio.to_thread(
        bucket.put_object,
        PHOTO_BUCKET,
        slot.object_key,
        io.BytesIO(body),
        len(body),
        content_type=stored_as,
    )

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await attach(pilot.resident, ticket.ticket_id, slot.object_key)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(f"{field}:"), error.value.details()
    assert not await stored(bucket, slot.object_key)
    assert await photos_of(pilot, ticket.ticket_id) == []


async def test_attach_needs_an_upload_made_for_this_ticket(pilot: Pilot, bucket: Minio) -> None:
    mine = await pilot.submit("street-light")
    other = await pilot.submit("noise")
    body = png_bytes(8, 8)
    slot = await upload_slot(pilot.resident, other.ticket_id, "image/png", len(body))
    await put(slot.upload_url, body, "image/png")
    name = slot.object_key.rsplit("/", 1)[1]

    # Another ticket's upload, named directly or through a path that starts with this ticket's.
    for key in (slot.object_key, f"tickets/{mine.ticket_id}/../{other.ticket_id}/{name}"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await attach(pilot.resident, mine.ticket_id, key)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, key
        assert (error.value.details() or "").startswith("object_key:"), error.value.details()
    assert await photos_of(pilot, mine.ticket_id) == []
    # The refusal leaves the other ticket's upload alone: it still attaches there.
    assert await stored(bucket, slot.object_key)
    attached = await attach(pilot.resident, other.ticket_id, slot.object_key)
    assert [photo.object_key for photo in attached.photos] == [checked(slot.object_key)]

    # A slot that was never uploaded to: nothing to attach.
    empty = await upload_slot(pilot.resident, mine.ticket_id, "image/jpeg", 2048)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await attach(pilot.resident, mine.ticket_id, empty.object_key)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert await photos_of(pilot, mine.ticket_id) == []


async def test_a_second_upload_to_the_link_does_not_replace_the_attached_photo(
    pilot: Pilot,
) -> None:
    """The upload link stays valid for its window after the attach: what was checked is what is
    kept and shown."""
    ticket = await pilot.submit()
    body = png_bytes()
    slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", len(body))
    await put(slot.upload_url, body, "image/png")
    await attach(pilot.resident, ticket.ticket_id, slot.object_key)

    # The same size and type, as the link requires, but other bytes.
    await put(slot.upload_url, bytes(reversed(body)), "image/png")

    [photo] = await photos_of(pilot, ticket.ticket_id)
    assert (photo.content_type, photo.size_bytes) == ("image/png", len(body))
    assert await get(photo.url) == body


async def test_attaches_at_once_stop_at_the_limit_and_each_upload_attaches_once(
    pilot: Pilot,
) -> None:
    ticket = await pilot.submit()
    keys = []
    for size in range(MAX_PHOTOS + 3):
        body = png_bytes(8 + size, 8)
        slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", len(body))
        await put(slot.upload_url, body, "image/png")
        keys.append(slot.object_key)
    requests = [
        tickets_pb2.AttachPhotoRequest(request_id=rid(), ticket_id=ticket.ticket_id, object_key=k)
        for k in [keys[0], *keys]  # the first upload twice (a second tap)
    ]
    answers = await asyncio.gather(
        *(pilot.resident.AttachPhoto(r) for r in requests), return_exceptions=True
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert {a.code() for a in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
    photos = await photos_of(pilot, ticket.ticket_id)
    assert len(photos) == MAX_PHOTOS
    assert len({photo.object_key for photo in photos}) == MAX_PHOTOS
    # A retry of an attach that went through is answered as it was, limit or not.
    done = next(r for r, a in zip(requests, answers, strict=True) if not isinstance(a, Exception))
    again = await pilot.resident.AttachPhoto(done)
    assert checked(done.object_key) in [photo.object_key for photo in again.ticket.photos]


async def test_a_photo_is_kept_without_where_and_with_what_it_was_taken(pilot: Pilot) -> None:
    """Integrators and officials see the photo; not the GPS of the resident's home in it."""
    ticket = await pilot.submit()
    phone, picture = jpeg_with_exif()
    slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/jpeg", len(phone))
    await put(slot.upload_url, phone, "image/jpeg")
    [photo] = (await attach(pilot.resident, ticket.ticket_id, slot.object_key)).photos
    assert photo.size_bytes == len(picture)
    kept = await get(photo.url)
    assert kept == picture and GPS not in kept


async def test_uploads_never_attached_are_swept_and_attached_photos_kept(
    pilot: Pilot, tickets_service: TicketsService, bucket: Minio
) -> None:
    ticket = await pilot.submit()
    keys = []
    for _ in range(3):
        body = png_bytes()
        slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", len(body))
        await put(slot.upload_url, body, "image/png")
        keys.append(slot.object_key)
    attached, abandoned, legacy = keys
    await attach(pilot.resident, ticket.ticket_id, attached)
    # A photo attached before accepted photos were copied: its record names the upload.
    photo = {"key": legacy, "content_type": "image/png", "size": len(png_bytes())}
    await tickets_service.db["tickets"].update_one(
        {"_id": ticket.ticket_id}, {"$push": {"photos": photo}}
    )
    sweeper = UploadSweeper(
        tickets_service.uploads.store,
        [
            Sweep(
                f"tickets/{ticket.ticket_id}/",
                keep_for=timedelta(0),
                referenced=tickets_service.store.photos_named,
            )
        ],
        clock=lambda: datetime.now(UTC) + timedelta(minutes=1),  # everything is old enough
    )

    assert await sweeper.sweep() == 1

    assert not await stored(bucket, abandoned)
    assert await stored(bucket, legacy)
    assert await stored(bucket, checked(attached))
    assert len(await photos_of(pilot, ticket.ticket_id)) == 2


async def test_a_refused_attach_keeps_no_checked_copy_and_a_retry_gets_its_first_answer(
    pilot: Pilot, bucket: Minio
) -> None:
    """Who may attach, to a ticket in which state, and whether it has room are settled before
    the upload is accepted: a refused upload stays where the upload sweep removes it, never
    copied to `checked/`, where nothing would refer to it."""
    full, rejected = [
        (await pilot.routed((await pilot.submit(category)).ticket_id)).ticket_id  # to the ward
        for category in ("street-light", "noise")
    ]

    async def uploaded(ticket_id: str) -> str:
        body = png_bytes()
        slot = await upload_slot(pilot.resident, ticket_id, "image/png", len(body))
        await put(slot.upload_url, body, "image/png")
        return slot.object_key

    async def refused(
        caller: TicketCaller, ticket_id: str, key: str, code: grpc.StatusCode
    ) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await attach(caller, ticket_id, key)
        assert error.value.code() == code, error.value.details()
        assert not await stored(bucket, checked(key))
        assert await stored(bucket, key)  # the upload sweep's to remove

    # The group leader sees the ward's ticket but does not handle it.
    await refused(pilot.leader, full, await uploaded(full), grpc.StatusCode.PERMISSION_DENIED)
    # An attach without its request_id is bad input, refused before the upload is touched.
    spare = await uploaded(full)
    with pytest.raises(grpc.aio.AioRpcError) as unnamed:
        await pilot.resident.AttachPhoto(
            tickets_pb2.AttachPhotoRequest(ticket_id=full, object_key=spare)
        )
    assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (unnamed.value.details() or "").startswith("request_id: ")
    assert not await stored(bucket, checked(spare))
    assert await stored(bucket, spare)
    # No room for a seventh photo: the one uploaded before the ticket filled up is refused, and
    # no upload is handed out for another.
    for _ in range(MAX_PHOTOS):
        await attach(pilot.resident, full, await uploaded(full))
    await refused(pilot.resident, full, spare, grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(grpc.aio.AioRpcError) as no_room:
        await upload_slot(pilot.resident, full, "image/png", 100)
    assert no_room.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A decided ticket takes no more photos; a retry of an attach made before is answered as
    # it was.
    first = tickets_pb2.AttachPhotoRequest(
        request_id=rid(), ticket_id=rejected, object_key=await uploaded(rejected)
    )
    answer = await pilot.resident.AttachPhoto(first)
    late = await uploaded(rejected)
    await pilot.ward_officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(request_id=rid(), ticket_id=rejected, reason="trùng")
    )
    await refused(pilot.resident, rejected, late, grpc.StatusCode.FAILED_PRECONDITION)
    assert await pilot.resident.AttachPhoto(first) == answer
    assert await stored(bucket, checked(first.object_key))


async def test_a_checked_copy_no_ticket_refers_to_is_swept(
    pilot: Pilot, tickets_service: TicketsService, bucket: Minio
) -> None:
    """An upload accepted by an attach whose transaction then failed (MongoDB away, or another
    attach took the last place first) is kept under `checked/` and named by no ticket: the
    service's sweep removes it a day later, as it does an upload never attached."""
    ticket = await pilot.submit()
    keys = []
    for _ in range(2):
        body = png_bytes()
        slot = await upload_slot(pilot.resident, ticket.ticket_id, "image/png", len(body))
        await put(slot.upload_url, body, "image/png")
        keys.append(slot.object_key)
    attached, orphaned = keys
    await attach(pilot.resident, ticket.ticket_id, attached)
    # The first half of an attach, the copy to checked/, with no transaction after it.
    await tickets_service.servicer.photos.accept_image(orphaned, MAX_PHOTO_BYTES)
    assert await stored(bucket, checked(orphaned))
    # The service's own sweeps, kept to this ticket's objects and with everything old enough.
    sweeper = UploadSweeper(
        tickets_service.uploads.store,
        [
            replace(sweep, prefix=f"{sweep.prefix}{ticket.ticket_id}/", keep_for=timedelta(0))
            for sweep in tickets_service.uploads.sweeps
        ],
        clock=lambda: datetime.now(UTC) + timedelta(minutes=1),
    )

    assert await sweeper.sweep() == 1

    assert not await stored(bucket, checked(orphaned))
    assert await stored(bucket, checked(attached))
    assert [photo.object_key for photo in await photos_of(pilot, ticket.ticket_id)] == [
        checked(attached)
    ]
