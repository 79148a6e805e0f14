"""Object storage (MinIO in production, any S3 here) through the `minio` client.

A client gets a short-lived presigned URL and uploads straight to the store; the link binds the
type and size the client declared, so the store itself refuses anything else, and the service
then checks what arrived (its first bytes too) before it accepts it. What it accepts is the
bytes it checked, stored again under `checked/` (a key no upload link is ever signed for) and
known by that key from then on: the upload link stays valid for its whole window, and a second
upload to it must not replace a checked file.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import S3Error

from services.common.config import Settings
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.media import IMAGE_SIGNATURES, check_upload, is_a, without_metadata
from services.common.presign import presigned_url

T = TypeVar("T")
UPLOAD_WINDOW = timedelta(minutes=15)
VIEW_WINDOW = timedelta(hours=1)
STORE_CONNECT_SECONDS = 3.0
STORE_READ_SECONDS = 30.0
# Fixed: presigning is then pure computation, with no round trip to the store.
REGION = "us-east-1"

# Accepted uploads are kept, and shown, under this prefix; no upload link is signed for it.
CHECKED = "checked/"


def checked(upload_key: str) -> str:
    """Where an upload is kept once accepted."""
    return CHECKED + upload_key


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str


class ObjectStore:
    def __init__(self, settings: Settings, bucket: str) -> None:
        self._client = _client(settings, settings.s3_endpoint, settings.s3_secure)
        # Links are signed for the address their users reach: the host is part of the signature.
        public = urlsplit(settings.s3_public_url) if settings.s3_public_url else None
        self._public_base = (
            f"{public.scheme}://{public.netloc}"
            if public
            else f"{'https' if settings.s3_secure else 'http'}://{settings.s3_endpoint}"
        )
        # A public address with a path (https://city.example/files) is a proxy that passes the
        # rest of the path on to the store: links go through it, signed for what the store sees.
        self._public_path = public.path.rstrip("/") if public else ""
        self._access_key = settings.s3_access_key
        self._secret_key = settings.s3_secret_key
        self.bucket = bucket

    def upload_url(self, key: str, content_type: str = "", size_bytes: int = 0) -> str:
        """A PUT link for `key`, valid for UPLOAD_WINDOW. Given the type and size the client
        declared, the store takes only a PUT of exactly that Content-Type and Content-Length."""
        declared = {}
        if content_type:
            declared["Content-Type"] = content_type
        if size_bytes:
            declared["Content-Length"] = str(size_bytes)
        return self._link("PUT", key, UPLOAD_WINDOW, declared)

    def view_url(self, key: str) -> str:
        return self._link("GET", key, VIEW_WINDOW)

    def _link(
        self, method: str, key: str, expires: timedelta, headers: Mapping[str, str] | None = None
    ) -> str:
        signed = presigned_url(
            method,
            f"{self._public_base}/{self.bucket}/{key}",
            access_key=self._access_key,
            secret_key=self._secret_key,
            region=REGION,
            now=datetime.now(UTC),
            expires=expires,
            headers=headers,
        )
        return self._public_base + self._public_path + signed.removeprefix(self._public_base)

    async def put(self, key: str, file: BinaryIO, content_type: str) -> None:
        """Stores a file the service made itself (an export), from its start: read as it is
        sent, a part at a time, not held whole."""
        await self._io(self._put_file, key, file, content_type)

    async def accept_image(self, key: str, max_bytes: int) -> StoredObject:
        """The uploaded image, if it is one and small enough; otherwise it is deleted."""
        return await self.accept(key, max_bytes, IMAGE_SIGNATURES)

    async def accept(
        self, key: str, max_bytes: int, signatures: Mapping[str, re.Pattern[bytes]]
    ) -> StoredObject:
        """The upload, if its declared type is accepted (a key of `signatures`), its bytes begin
        as that type's do and it is small enough; otherwise it is deleted. The bytes checked are
        kept at `checked(key)` (an image without its metadata: where and when it was taken, the
        device), the key it is known by from then on, and the upload removed; accepting it again
        (a retry) gives the same answer, and a second upload to the same link while it is still
        valid is dropped: what was checked and accepted stays."""
        with contextlib.suppress(NotFound):
            return await self._accepted(key)
        try:
            data, content_type = await self._io(self._get, key, max_bytes + 1)
        except NotFound:
            # Another accept of the same upload (a second tap) kept it and removed the upload
            # between the look above and this read: its answer is this one's too.
            return await self._accepted(key)
        try:
            check_upload(content_type, len(data), max_bytes, signatures)
            if not is_a(content_type, data, signatures):
                raise InvalidArgument("object_key", f"the uploaded file is not a {content_type}")
        except InvalidArgument:
            await self._io(self._client.remove_object, self.bucket, key)
            raise
        kept = without_metadata(content_type, data)
        await self._io(self._put, checked(key), kept, content_type)
        await self._io(self._client.remove_object, self.bucket, key)
        return StoredObject(checked(key), len(kept), content_type)

    async def _accepted(self, key: str) -> StoredObject:
        """The upload as accepted before, the upload itself removed; NotFound if it was not."""
        size, content_type = await self._io(self._stat, checked(key))
        with contextlib.suppress(NotFound):
            await self._io(self._client.remove_object, self.bucket, key)
        return StoredObject(checked(key), size, content_type)

    async def read(self, key: str, max_bytes: int) -> bytes:
        """The whole object, if it is there and not larger than max_bytes."""
        data, _ = await self._io(self._get, key, max_bytes + 1)
        if len(data) > max_bytes:
            raise InvalidArgument("object_key", f"the file is over the limit of {max_bytes} bytes")
        return data

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        """A blocking call to the store, off the event loop. A store that cannot be reached, or
        has lost its bucket, is UNAVAILABLE (the caller may retry), not an internal error."""
        try:
            return await asyncio.to_thread(call, *args)
        except urllib3.exceptions.HTTPError as error:
            raise Unavailable(f"object storage is unreachable ({type(error).__name__})") from None
        except S3Error as error:
            if error.code in MISSING:
                raise NotFound(f"nothing was uploaded at {error.object_name}") from None
            if error.code == "NoSuchBucket":
                raise Unavailable(f"object storage has no bucket {self.bucket}") from None
            raise

    async def written_before(self, prefix: str, moment: datetime) -> list[str]:
        """Keys under `prefix` last written before `moment` (by the store's clock); those kept
        under `checked/` only when `prefix` is itself there."""
        uploads_only = not prefix.startswith(CHECKED)

        def listed() -> list[str]:
            return [
                str(item.object_name)
                for item in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if not (uploads_only and str(item.object_name).startswith(CHECKED))
                and item.last_modified is not None
                and item.last_modified < moment
            ]

        return await self._io(listed)

    async def remove(self, keys: list[str]) -> None:
        def removed() -> None:
            failed = list(self._client.remove_objects(self.bucket, (DeleteObject(k) for k in keys)))
            if failed:
                raise Unavailable(f"object storage kept {len(failed)} objects: {failed[0]}")

        if keys:
            await self._io(removed)

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        self._put_file(key, io.BytesIO(data), content_type)

    def _put_file(self, key: str, file: BinaryIO, content_type: str) -> None:
        length = file.seek(0, io.SEEK_END)
        file.seek(0)
        self._client.put_object(self.bucket, key, file, length, content_type=content_type)

    def _stat(self, key: str) -> tuple[int, str]:
        stat = self._client.stat_object(self.bucket, key)
        return stat.size or 0, _media_type(stat.content_type)

    def _get(self, key: str, length: int) -> tuple[bytes, str]:
        """At most `length` bytes of the object, and its media type."""
        response = self._client.get_object(self.bucket, key, offset=0, length=length)
        try:
            data: bytes = response.read()
            return data, _media_type(response.headers.get("Content-Type"))
        finally:
            response.close()
            response.release_conn()


MISSING = ("NoSuchKey", "NoSuchObject", "NotFound")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip()


def _client(settings: Settings, endpoint: str, secure: bool) -> Minio:
    return Minio(
        endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=secure,
        region=REGION,
        # The client's own defaults wait 5 minutes to connect and again to read, 5 times over:
        # a request's worker thread, and its caller, would hang on a store that is away.
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=STORE_CONNECT_SECONDS, read=STORE_READ_SECONDS),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        ),
    )
