"""An accepted image keeps its picture and loses what the phone wrote beside it: where it was
taken, when, the device (Exif, XMP, text chunks)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

from services.common.media import DOCX, IMAGE_SIGNATURES, is_a, without_metadata
from services.notices.domain import ATTACHMENT_SIGNATURES
from tests.objects import GPS, jpeg_with_exif, png_bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def test_a_jpeg_loses_exif_xmp_and_comments_and_keeps_its_picture() -> None:
    phone, plain = jpeg_with_exif()
    assert GPS in phone
    assert without_metadata("image/jpeg", phone) == plain


def test_a_jpeg_loses_what_a_phone_appended_after_the_picture() -> None:
    """A motion photo's video, or a second image with its own Exif (MPF), follows the end of
    the image, with where it was taken; restart markers and stuffed bytes inside the picture
    and fill bytes before its end are the picture's."""
    phone, plain = jpeg_with_exif()
    end = plain.rindex(b"\xff\xd9")
    scan = plain.rindex(b"\xff\xda")
    scan_data = scan + 2 + int.from_bytes(plain[scan + 2 : scan + 4], "big")
    picture = plain[:scan_data] + b"\xff\x00\xff\xd0" + plain[scan_data:end] + b"\xff\xff\xd9"
    video = b"\x00\x00\x00\x18ftypmp42" + b"\xa9xyz" + GPS
    appended = phone.replace(plain[scan:], picture[scan:]) + video + jpeg_with_exif()[0]
    assert without_metadata("image/jpeg", appended) == picture


def test_a_png_loses_its_text_and_exif_chunks() -> None:
    plain = png_bytes()
    header_end = 8 + 12 + 13  # signature, IHDR
    phone = (
        plain[:header_end]
        + png_chunk(b"eXIf", b"MM\x00*" + GPS)
        + png_chunk(b"tEXt", b"Comment\x00" + GPS)
        + plain[header_end:]
    )
    assert without_metadata("image/png", phone) == plain


def test_a_png_loses_what_follows_its_end() -> None:
    plain = png_bytes()
    header_end = 8 + 12 + 13  # signature, IHDR
    phone = plain[:header_end] + png_chunk(b"eXIf", b"MM\x00*" + GPS) + plain[header_end:]
    assert without_metadata("image/png", phone + b"\x00\x00\x00\x18ftypmp42" + GPS) == plain


def test_a_webp_loses_its_exif_and_xmp_chunks_and_their_flags() -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return kind + len(data).to_bytes(4, "little") + data + b"\x00" * (len(data) % 2)

    def riff(*chunks: bytes) -> bytes:
        body = b"WEBP" + b"".join(chunks)
        return b"RIFF" + len(body).to_bytes(4, "little") + body

    picture = chunk(b"VP8L", b"\x2f\x00\x00\x00\x00\x07")  # any payload: it is kept as it is
    flags = 0x08 | 0x04 | 0x10  # Exif, XMP, alpha
    phone = riff(
        chunk(b"VP8X", bytes((flags, 0, 0, 0)) + b"\x00" * 6),
        picture,
        chunk(b"EXIF", GPS + b"!"),  # odd: padded
        chunk(b"XMP ", GPS),
    )
    cleaned = without_metadata("image/webp", phone)
    assert cleaned == riff(chunk(b"VP8X", bytes((0x10, 0, 0, 0)) + b"\x00" * 6), picture)
    assert IMAGE_SIGNATURES["image/webp"].match(cleaned)
    # What follows the image's RIFF body is no part of it.
    appended = phone + chunk(b"EXIF", GPS) + b"\x00\x00\x00\x18ftypmp42" + GPS
    assert without_metadata("image/webp", appended) == cleaned


def test_an_image_whose_structure_breaks_off_is_kept_as_it_came() -> None:
    phone, _ = jpeg_with_exif()
    cut = phone[:8]  # a segment's length runs past the end
    assert without_metadata("image/jpeg", cut) == cut


def zip_of(*names: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as package:
        for name in names:
            package.writestr(name, "<x/>")
    return out.getvalue()


def test_a_word_document_is_a_zip_of_a_word_documents_parts() -> None:
    docx = zip_of("[Content_Types].xml", "_rels/.rels", "word/document.xml")
    assert is_a(DOCX, docx, ATTACHMENT_SIGNATURES)
    # Any other ZIP begins the same way: a spreadsheet, an archive of anything.
    assert not is_a(DOCX, zip_of("[Content_Types].xml", "xl/workbook.xml"), ATTACHMENT_SIGNATURES)
    assert not is_a(DOCX, zip_of("payload.exe"), ATTACHMENT_SIGNATURES)
    assert not is_a(DOCX, b"PK\x03\x04 and then nothing of a ZIP", ATTACHMENT_SIGNATURES)


def test_a_jpeg_with_stray_bytes_between_its_segments_loses_its_exif_all_the_same() -> None:
    """Decoders skip bytes between segments (some editors leave a few) and show the picture:
    the location it was taken at must not stay in it for that."""
    phone, plain = jpeg_with_exif()
    exif_end = 2 + 2 + int.from_bytes(phone[4:6], "big")
    stray = phone[:exif_end] + b"\x00\x00" + phone[exif_end:]
    assert without_metadata("image/jpeg", stray) == plain
