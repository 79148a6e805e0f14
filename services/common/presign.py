"""Presigned S3 links that bind request headers (AWS Signature Version 4, query string form).

The `minio` client signs a presigned link for the host alone. An upload link made for a file the
client declared (its type and size) signs `Content-Type` and `Content-Length` too: the store then
refuses, with 403 SignatureDoesNotMatch, a PUT of any other size or type, so a link for a 2 MB
photo cannot be used to store gigabytes. S3, MinIO and SeaweedFS all check signed headers.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timedelta
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
# The body is not known when the link is made; S3's name for that.
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def presigned_url(
    method: str,
    object_url: str,
    *,
    access_key: str,
    secret_key: str,
    region: str,
    now: datetime,
    expires: timedelta,
    headers: Mapping[str, str] | None = None,
) -> str:
    """`object_url` (scheme, host, path; no query) signed for `method` with `headers`, which the
    request must then carry with exactly these values. `now` is timezone-aware."""
    parts = urlsplit(object_url)
    signed_headers = {name.lower(): value.strip() for name, value in (headers or {}).items()}
    signed_headers["host"] = parts.netloc
    names = ";".join(sorted(signed_headers))
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    query = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": f"{access_key}/{scope}",
        "X-Amz-Date": stamp,
        "X-Amz-Expires": str(int(expires.total_seconds())),
        "X-Amz-SignedHeaders": names,
    }
    canonical_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(query.items()))
    path = _encode(parts.path or "/", keep="/")
    canonical_request = "\n".join(
        (
            method,
            path,
            canonical_query,
            "".join(f"{name}:{signed_headers[name]}\n" for name in sorted(signed_headers)),
            names,
            UNSIGNED_PAYLOAD,
        )
    )
    string_to_sign = "\n".join(
        (ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest())
    )
    key = ("AWS4" + secret_key).encode()
    for part in (stamp[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{parts.netloc}{path}?{canonical_query}&X-Amz-Signature={signature}"


def _encode(text: str, keep: str = "") -> str:
    # SigV4's URI encoding: every byte but the unreserved characters, and `keep`.
    return quote(text, safe="-_.~" + keep)
