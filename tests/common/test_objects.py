"""Presigned links name the address their users reach the store at."""

from __future__ import annotations

from urllib.parse import urlsplit

from services.common.config import Settings
from services.common.objects import ObjectStore


def test_links_are_signed_for_the_stores_public_address_when_it_has_one() -> None:
    inside = Settings(s3_endpoint="minio:9000", s3_secure=False)
    private = ObjectStore(inside, "civic-photos")
    assert urlsplit(private.upload_url("a.jpg")).netloc == "minio:9000"

    public = ObjectStore(
        inside.model_copy(update={"s3_public_url": "https://files.danang.example"}), "civic-photos"
    )
    for url in (public.upload_url("a.jpg"), public.view_url("a.jpg")):
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("https", "files.danang.example")
        assert parts.path == "/civic-photos/a.jpg" and "X-Amz-Signature=" in parts.query
