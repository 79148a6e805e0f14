"""Conversions every service makes between its documents and its gRPC messages."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

from civic.common.v1 import types_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument

# Days are Vietnam's calendar days (UTC+7, no daylight saving): vital events, receipts, statements.
VIETNAM = timezone(timedelta(hours=7))


# A moment in a request lies in these years: past them it means nothing here, and near the
# calendar's ends adding a day to it would overflow.
YEARS = range(1900, 3000)
# Page tokens carry a moment as whole microseconds since this one.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def local_date(moment: datetime) -> date:
    return moment.astimezone(VIETNAM).date()


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def moment(field: str, stamp: Timestamp) -> datetime:
    """A request's Timestamp as an aware UTC datetime, or INVALID_ARGUMENT naming `field`."""
    try:
        value = stamp.ToDatetime(UTC)
    except (ValueError, OverflowError):
        value = None
    if value is None or value.year not in YEARS:
        raise InvalidArgument(field, f"must lie in the years {YEARS.start}-{YEARS.stop - 1}")
    return value


def span(field: str, value: Duration, *, longest: timedelta) -> timedelta:
    """A request's Duration, at most `longest` either way, or INVALID_ARGUMENT naming `field`."""
    try:
        result = value.ToTimedelta()
    except (ValueError, OverflowError):
        result = None
    if result is None or abs(result) > longest:
        raise InvalidArgument(field, f"must be at most {longest.days} days")
    return result


def duration(value: timedelta) -> Duration:
    span = Duration()
    span.FromTimedelta(value)
    return span


def point_document(field: str, point: types_pb2.GeoPoint) -> dict[str, Any]:
    """A WGS84 point as GeoJSON (longitude first), for 2dsphere indexes; `field` names it in
    errors."""
    if not -90 <= point.latitude <= 90:
        raise InvalidArgument(f"{field}.latitude", "must be between -90 and 90")
    if not -180 <= point.longitude <= 180:
        raise InvalidArgument(f"{field}.longitude", "must be between -180 and 180")
    return {"type": "Point", "coordinates": [point.longitude, point.latitude]}


def point_message(doc: dict[str, Any] | None) -> types_pb2.GeoPoint | None:
    if not doc:
        return None
    longitude, latitude = doc["coordinates"]
    return types_pb2.GeoPoint(latitude=latitude, longitude=longitude)
