"""Files as a phone or a browser sends them to object storage: real image bytes made here (no
imaging library needed), plain HTTP for presigned URLs, and a look straight into a bucket."""

from __future__ import annotations

import asyncio
import struct
import urllib.error
import urllib.request
import zlib

from minio import Minio
from minio.error import S3Error


def png_bytes(width: int = 24, height: int = 16) -> bytes:
    """A valid RGB PNG (pngcheck: no errors) with a gradient, so each size differs in content."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 16 % 256, y * 16 % 256, 128)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def jpeg_bytes(blocks: int = 4) -> bytes:
    """A valid baseline JPEG (djpeg decodes it): a grey strip of `blocks` 8x8 blocks, each a flat
    mid-grey coded as DC difference 0 and end-of-block, with one-code Huffman tables."""
    bits = "00" * blocks
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    one_code = b"\x01" + b"\x00" * 15 + b"\x00"
    return (
        b"\xff\xd8"
        + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + _segment(0xDB, b"\x00" + b"\x01" * 64)
        + _segment(0xC0, struct.pack(">BHHB", 8, 8, 8 * blocks, 1) + b"\x01\x11\x00")
        + _segment(0xC4, b"\x00" + one_code)
        + _segment(0xC4, b"\x10" + one_code)
        + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
        + scan.replace(b"\xff", b"\xff\x00")
        + b"\xff\xd9"
    )


# What a phone writes beside the picture, and no service should keep.
GPS = b"GPSLatitude 16.0544 N GPSLongitude 108.2022 E Pixel 7 serial 1A2B3C"


def jpeg_with_exif() -> tuple[bytes, bytes]:
    """A JPEG as a phone writes it (Exif in APP1, XMP too, a comment), and the same without."""
    plain = jpeg_bytes()
    exif = b"\xff\xe1" + struct.pack(">H", len(b"Exif\x00\x00" + GPS) + 2) + b"Exif\x00\x00" + GPS
    xmp = b"\xff\xe1" + struct.pack(">H", len(b"http://ns.adobe.com/xap/1.0/\x00" + GPS) + 2)
    xmp += b"http://ns.adobe.com/xap/1.0/\x00" + GPS
    comment = b"\xff\xfe" + struct.pack(">H", len(GPS) + 2) + GPS
    jfif_end = 2 + 2 + int.from_bytes(plain[4:6], "big")
    return plain[:2] + exif + plain[2:jfif_end] + xmp + comment + plain[jfif_end:], plain


def _http(method: str, url: str, body: bytes | None, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def put(url: str, body: bytes, content_type: str) -> None:
    status, answer = await asyncio.to_thread(_http, "PUT", url, body, content_type)
    assert status == 200, answer


async def put_refused(url: str, body: bytes, content_type: str) -> bytes:
    """The store's answer to a PUT it refuses (403: the link was not signed for it)."""
    status, answer = await asyncio.to_thread(_http, "PUT", url, body, content_type)
    assert status == 403, (status, answer)
    return answer


async def get(url: str) -> bytes:
    status, body = await asyncio.to_thread(_http, "GET", url, None, "")
    assert status == 200
    return body


async def object_exists(bucket: Minio, name: str, key: str) -> bool:
    """Whether the object is in the bucket (asked of the store directly, not a service)."""
    try:
        await asyncio.to_thread(bucket.stat_object, name, key)
    except S3Error as error:
        assert error.code == "NoSuchKey", error
        return False
    return True
