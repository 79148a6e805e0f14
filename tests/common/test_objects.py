"""Presigned links name the address their users reach the store at."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
from minio import Minio

from infra.local import free_port
from services.common.config import Settings
from services.common.errors import Unavailable
from services.common.objects import ObjectStore, checked
from tests.objects import get, jpeg_bytes, object_exists, png_bytes, put, put_refused


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


async def test_a_second_upload_to_a_link_still_valid_does_not_replace_what_was_accepted(
    settings: Settings, bucket: Minio
) -> None:
    store = ObjectStore(settings, "civic-statements")
    key = f"receipts/fd-x/{uuid.uuid4().hex}.png"
    url = store.upload_url(key)
    await put(url, png_bytes(), "image/png")
    accepted = await store.accept_image(key, 1_000_000)

    def read(name: str) -> bytes:
        return bytes(bucket.get_object("civic-statements", name).read())

    kept = await asyncio.to_thread(read, accepted.key)
    await put(url, jpeg_bytes(), "image/jpeg")  # the link is valid for minutes more
    again = await store.accept_image(key, 1_000_000)
    assert again == accepted
    assert await asyncio.to_thread(read, checked(key)) == kept
    names = await asyncio.to_thread(
        lambda: [o.object_name for o in bucket.list_objects("civic-statements", recursive=True)]
    )
    assert key not in names  # the second upload is not left lying about


async def test_an_upload_accepted_by_another_call_while_this_one_looked_is_accepted_once(
    settings: Settings, bucket: Minio, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second tap on "attach": one call finds nothing accepted yet, and before it reads the
    upload the other has kept it and removed it. It answers as the other did, not NOT_FOUND."""
    store, other = (
        ObjectStore(settings, "civic-statements"),
        ObjectStore(settings, "civic-statements"),
    )
    key = f"receipts/fd-x/{uuid.uuid4().hex}.png"
    await put(store.upload_url(key), png_bytes(), "image/png")
    first: list[object] = []
    read = store._get

    def after_the_other(name: str, length: int) -> tuple[bytes, str]:
        # The other call runs to its end between this call's look and its read (the race).
        first.append(asyncio.run(other.accept_image(key, 1_000_000)))
        return read(name, length)

    monkeypatch.setattr(store, "_get", after_the_other)
    accepted = await store.accept_image(key, 1_000_000)
    assert [accepted] == first
    assert accepted.key == checked(key)


async def test_an_upload_link_takes_only_the_declared_type_and_size(
    settings: Settings, bucket: Minio
) -> None:
    """The store itself refuses the rest: a link for a small photo stores no gigabytes."""
    store = ObjectStore(settings, "civic-statements")
    body = png_bytes()
    key = f"receipts/fd-x/{uuid.uuid4().hex}.png"
    url = store.upload_url(key, "image/png", len(body))
    for sent, content_type in [
        (body + b"\x00" * 1024, "image/png"),  # larger than declared
        (body[:-1], "image/png"),  # smaller
        (body, "image/jpeg"),  # another type
        (body, "text/html"),
    ]:
        assert b"SignatureDoesNotMatch" in await put_refused(url, sent, content_type)
        assert not await object_exists(bucket, "civic-statements", key)
    await put(url, body, "image/png")
    assert (await store.accept_image(key, 1_000_000)).size == len(body)


class _PathProxy(http.server.BaseHTTPRequestHandler):
    """A city's web server in front of the store: what comes under /files goes to the store
    without that prefix, with the caller's Host (as an nginx `location /files/` does)."""

    store = ""

    def _forward(self) -> None:
        if not self.path.startswith("/files/"):
            self.send_error(404)
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        store = http.client.HTTPConnection(self.store, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        store.request(self.command, self.path.removeprefix("/files"), body, headers)
        answer = store.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        store.close()

    do_GET = do_PUT = _forward

    def log_message(self, *args: object) -> None:
        pass


async def test_links_go_through_a_public_address_with_a_path_and_the_store_takes_them(
    settings: Settings, bucket: Minio
) -> None:
    """A store published under a path of the city's site (https://city.example/files): links
    keep the path, and the store, reached without it, accepts their signature."""
    handler = type("Proxy", (_PathProxy,), {"store": settings.s3_endpoint})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        public = f"http://127.0.0.1:{proxy.server_address[1]}/files/"
        store = ObjectStore(
            settings.model_copy(update={"s3_public_url": public}), "civic-statements"
        )
        key = f"receipts/fd-x/{uuid.uuid4().hex}.png"
        body = png_bytes()
        upload = store.upload_url(key, "image/png", len(body))
        assert urlsplit(upload).path == f"/files/civic-statements/{key}"
        await put(upload, body, "image/png")
        accepted = await store.accept_image(key, 1_000_000)
        assert await get(store.view_url(accepted.key)) == body
    finally:
        proxy.shutdown()
        proxy.server_close()
