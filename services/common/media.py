"""What an uploaded file may be: its declared type, its size, and how its bytes begin (pure
rules; the store checks an upload against them)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from services.common.errors import InvalidArgument

# How each accepted image type's bytes begin: the declared type must match the content.
IMAGE_SIGNATURES: dict[str, re.Pattern[bytes]] = {
    "image/jpeg": re.compile(rb"\xff\xd8\xff"),
    "image/png": re.compile(rb"\x89PNG\r\n\x1a\n"),
    "image/webp": re.compile(rb"RIFF.{4}WEBP", re.DOTALL),  # RIFF alone is WAV and AVI too
}


def check_upload(
    content_type: str, size: int, max_bytes: int, signatures: Mapping[str, re.Pattern[bytes]]
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
