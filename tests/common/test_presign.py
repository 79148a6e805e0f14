"""Presigned links bind the headers they are signed with (AWS Signature Version 4)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

from services.common.presign import presigned_url

# AWS's published example of a presigned GET ("Authenticating Requests: Using Query
# Parameters", Amazon S3 API Reference), with the signature it gives.
EXAMPLE_ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
EXAMPLE_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EXAMPLE_SIGNATURE = "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"


def sign(method: str, url: str, headers: dict[str, str] | None = None) -> str:
    return presigned_url(
        method,
        url,
        access_key=EXAMPLE_ACCESS_KEY,
        secret_key=EXAMPLE_SECRET_KEY,
        region="us-east-1",
        now=datetime(2013, 5, 24, tzinfo=UTC),
        expires=timedelta(days=1),
        headers=headers,
    )


def query(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def test_the_signature_is_awss_own_for_its_published_example() -> None:
    signed = query(sign("GET", "https://examplebucket.s3.amazonaws.com/test.txt"))
    assert signed["X-Amz-Signature"] == EXAMPLE_SIGNATURE
    assert signed["X-Amz-Credential"] == "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"
    assert (signed["X-Amz-Date"], signed["X-Amz-Expires"]) == ("20130524T000000Z", "86400")
    assert signed["X-Amz-SignedHeaders"] == "host"


def test_declared_headers_are_signed_and_change_the_signature() -> None:
    url = "https://examplebucket.s3.amazonaws.com/photos/a b.png"
    plain = query(sign("PUT", url))
    bound = query(sign("PUT", url, {"Content-Type": "image/png", "Content-Length": "2048"}))
    other_size = query(sign("PUT", url, {"Content-Type": "image/png", "Content-Length": "2049"}))
    assert bound["X-Amz-SignedHeaders"] == "content-length;content-type;host"
    signatures = {plain["X-Amz-Signature"], bound["X-Amz-Signature"]}
    assert len(signatures | {other_size["X-Amz-Signature"]}) == 3
    # The key's path is encoded once, as the store encodes it when it checks the signature.
    assert urlsplit(sign("PUT", url)).path == "/photos/a%20b.png"
