"""Object storage (MinIO in production, any S3 here) through the `minio` client.

Files never pass through the services: a client gets a short-lived presigned URL, uploads
straight to the store, and the service then checks what arrived before it accepts it.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from minio import Minio
from minio.error import S3Error

from services.common.config import Settings
from services.common.errors import InvalidArgument, NotFound

UPLOAD_WINDOW = timedelta(minutes=15)
VIEW_WINDOW = timedelta(hours=1)

# What each accepted image type's bytes start with: the declared type must match the content.
IMAGE_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/webp": (b"RIFF",),
}


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    content_type: str


def check_upload(
    content_type: str, size: int, max_bytes: int, signatures: Mapping[str, tuple[bytes, ...]]
) -> None:
    """A declared upload: one of the accepted types (the keys of `signatures`), not too big."""
    if content_type not in signatures:
        allowed = ", ".join(signatures)
        raise InvalidArgument("content_type", f"must be one of {allowed}")
    if size <= 0:
        raise InvalidArgument("size_bytes", "must be positive")
    if size > max_bytes:
        raise InvalidArgument("size_bytes", f"is over the limit of {max_bytes} bytes")


def check_image_upload(content_type: str, size: int, max_bytes: int) -> None:
    check_upload(content_type, size, max_bytes, IMAGE_SIGNATURES)


class ObjectStore:
    def __init__(self, settings: Settings, bucket: str) -> None:
        self._client = _client(settings, settings.s3_endpoint, settings.s3_secure)
        # Links are signed for the address their users reach: the host is part of the signature.
        public = urlsplit(settings.s3_public_url) if settings.s3_public_url else None
        self._presigner = (
            _client(settings, public.netloc, public.scheme == "https") if public else self._client
        )
        self.bucket = bucket

    def upload_url(self, key: str) -> str:
        url: str = self._presigner.presigned_put_object(self.bucket, key, expires=UPLOAD_WINDOW)
        return url

    def view_url(self, key: str) -> str:
        url: str = self._presigner.presigned_get_object(self.bucket, key, expires=VIEW_WINDOW)
        return url

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Stores a file the service made itself (an export)."""
        await asyncio.to_thread(
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
        )

    async def accept_image(self, key: str, max_bytes: int) -> StoredObject:
        """The uploaded image, if it is one and small enough; otherwise it is deleted."""
        return await self.accept(key, max_bytes, IMAGE_SIGNATURES)

    async def accept(
        self, key: str, max_bytes: int, signatures: Mapping[str, tuple[bytes, ...]]
    ) -> StoredObject:
        """The upload, if its declared type is accepted (a key of `signatures`), its bytes start
        as that type's do and it is small enough; otherwise it is deleted."""
        try:
            stat = await asyncio.to_thread(self._client.stat_object, self.bucket, key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise NotFound(f"nothing was uploaded at {key}") from None
            raise
        content_type = (stat.content_type or "").split(";")[0].strip()
        try:
            check_upload(content_type, stat.size or 0, max_bytes, signatures)
            head = await asyncio.to_thread(self._head, key)
            if not head.startswith(signatures[content_type]):
                raise InvalidArgument("object_key", f"the uploaded file is not a {content_type}")
        except InvalidArgument:
            await asyncio.to_thread(self._client.remove_object, self.bucket, key)
            raise
        return StoredObject(key, stat.size or 0, content_type)

    async def read(self, key: str, max_bytes: int) -> bytes:
        """The whole object, if it is there and not larger than max_bytes."""
        try:
            stat = await asyncio.to_thread(self._client.stat_object, self.bucket, key)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                raise NotFound(f"nothing was uploaded at {key}") from None
            raise
        if (stat.size or 0) > max_bytes:
            raise InvalidArgument("object_key", f"the file is over the limit of {max_bytes} bytes")
        return await asyncio.to_thread(self._get, key)

    def _get(self, key: str) -> bytes:
        response = self._client.get_object(self.bucket, key)
        try:
            data: bytes = response.read()
            return data
        finally:
            response.close()
            response.release_conn()

    def _head(self, key: str) -> bytes:
        response = self._client.get_object(self.bucket, key, offset=0, length=16)
        try:
            data: bytes = response.read()
            return data
        finally:
            response.close()
            response.release_conn()


def _client(settings: Settings, endpoint: str, secure: bool) -> Minio:
    # A fixed region: presigning is then pure computation, with no round trip to the store.
    return Minio(
        endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=secure,
        region="us-east-1",
    )
