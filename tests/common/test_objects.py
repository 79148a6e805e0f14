"""Presigned links name the address their users reach the store at."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest

from infra.local import free_port
from services.common.config import Settings
from services.common.errors import Unavailable
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


async def test_a_store_that_cannot_be_reached_is_unavailable_within_seconds() -> None:
    """Not INTERNAL after the client's own five minutes: the caller may try again."""
    away = ObjectStore(
        Settings(s3_endpoint=f"127.0.0.1:{free_port()}", s3_secure=False), "civic-photos"
    )
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await away.accept_image("tickets/t/0.png", 1024)
    assert time.monotonic() - started < 10
