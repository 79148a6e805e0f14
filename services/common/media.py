"""What an uploaded file may be: its declared type, its size, and how its bytes begin (pure
rules; the store checks an upload against them)."""

from __future__ import annotations

import io
import re
import zipfile
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


DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def is_a(content_type: str, data: bytes, signatures: Mapping[str, re.Pattern[bytes]]) -> bool:
    """Whether the file's bytes are of the declared type: they begin as that type's do, and a
    Word document is a ZIP holding a Word document's parts (any ZIP begins as it does)."""
    if not signatures[content_type].match(data):
        return False
    if content_type == DOCX:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as package:
                names = set(package.namelist())
        except (zipfile.BadZipFile, ValueError):
            return False
        return {"[Content_Types].xml", "word/document.xml"} <= names
    return True


def without_metadata(content_type: str, data: bytes) -> bytes:
    """The image without what a phone writes beside the picture: where it was taken (GPS),
    when, the device and its owner (Exif, XMP, IPTC, text chunks). The picture's own bytes are
    kept as they are. An image whose structure cannot be followed is returned unchanged."""
    strip = _STRIPPERS.get(content_type)
    if strip is None:
        return data
    try:
        return strip(data)
    except (IndexError, ValueError):
        return data


# JPEG segments kept: JFIF (APP0), the colour profile (APP2), Adobe's colour transform (APP14),
# and everything that is not an application segment or a comment.
_JPEG_DROPPED = {0xE1, *range(0xE3, 0xEE), 0xEF, 0xFE}


def _jpeg(data: bytes) -> bytes:
    kept, at = [data[:2]], 2
    while at < len(data):
        if data[at] != 0xFF:
            # Stray bytes between segments, which some editors leave: decoders skip them to
            # the next marker and show the picture, so its metadata must go all the same.
            if (at := data.find(b"\xff", at)) == -1:
                raise ValueError("no marker after stray bytes")
            continue
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0xDA:  # start of scan: the picture itself, to the end of the image
            kept.append(data[at : _end_of_image(data, at)])
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            kept.append(data[at : at + 2])
            at += 2
            continue
        end = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        if end > len(data):
            raise ValueError("segment past the end")
        if marker not in _JPEG_DROPPED:
            kept.append(data[at:end])
        at = end
    return b"".join(kept)


def _end_of_image(data: bytes, at: int) -> int:
    """Just past the end-of-image marker of the image whose scan starts at `at` (or the end of
    `data`). What a phone appends after it is no part of the picture, and carries what it was
    taken with: a motion photo's video (where it was shot), further images with Exif (MPF)."""
    while at + 1 < len(data):
        if data[at + 1] == 0xD9:
            return at + 2
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")  # a scan's header, tables
        at = _next_marker(data, at)
    return len(data)


def _next_marker(data: bytes, at: int) -> int:
    """Past entropy-coded data: the next 0xFF that begins a marker, not a stuffed 0xFF00, a
    restart marker or a fill byte."""
    while (at := data.find(b"\xff", at)) != -1 and at + 1 < len(data):
        follower = data[at + 1]
        if follower not in (0x00, 0xFF) and not 0xD0 <= follower <= 0xD7:
            return at
        at += 1
    return len(data)


_PNG_DROPPED = {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}


def _png(data: bytes) -> bytes:
    kept, at = [data[:8]], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        end = at + 12 + length  # length, type, data, CRC
        if end > len(data):
            raise ValueError("chunk past the end")
        kind = data[at + 4 : at + 8]
        if kind not in _PNG_DROPPED:
            kept.append(data[at:end])
        if kind == b"IEND":  # what follows is no part of the image (an appended video, say)
            break
        at = end
    return b"".join(kept)


_VP8X_EXIF, _VP8X_XMP = 0x08, 0x04


def _webp(data: bytes) -> bytes:
    # The image ends where its RIFF header says: what follows is no part of it.
    kept, at, image_end = [], 12, min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    while at < image_end:
        kind = data[at : at + 4]
        size = int.from_bytes(data[at + 4 : at + 8], "little")
        if at + 8 + size > image_end:
            raise ValueError("chunk past the end")
        end = at + 8 + size + size % 2  # a chunk is padded to an even length
        chunk = data[at:end]
        if kind == b"VP8X":  # the flags say which extra chunks follow
            chunk = chunk[:8] + bytes((chunk[8] & ~(_VP8X_EXIF | _VP8X_XMP),)) + chunk[9:]
        if kind not in (b"EXIF", b"XMP "):
            kept.append(chunk)
        at = end
    body = b"WEBP" + b"".join(kept)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


_STRIPPERS = {"image/jpeg": _jpeg, "image/png": _png, "image/webp": _webp}
