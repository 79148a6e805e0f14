"""Feature documents to GeoJSON (RFC 7946) and to gRPC messages; request fields to values."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2

from services.common.errors import InvalidArgument
from services.common.mongo import Document
from services.common.wire import point_document, point_message
from services.gis.domain import Layer
from services.gis.geometry import Position


def geojson_feature(doc: Document) -> dict[str, Any]:
    """A Feature with its id, its WGS84 geometry and its properties, layer and unit among
    them (RFC 7946: no crs member, longitude first)."""
    return {
        "type": "Feature",
        "id": doc["_id"],
        "geometry": doc.get("geometry"),
        "properties": {"layer": doc["layer"], "unit_id": doc["unit_id"], **doc["properties"]},
    }


def feature_text(doc: Document) -> str:
    """The feature's GeoJSON text, stored with it at write time so that a listing of thousands
    of features is assembled from ready strings rather than decoded and encoded again."""
    return json.dumps(geojson_feature(doc), ensure_ascii=False, separators=(",", ":"))


def collection_text(texts: Iterable[str]) -> str:
    return '{"type":"FeatureCollection","features":[' + ",".join(texts) + "]}"


def feature_collection(features: Iterable[dict[str, Any]]) -> str:
    return json.dumps(
        {"type": "FeatureCollection", "features": list(features)},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def hydrant_message(doc: Document) -> gis_pb2.Hydrant:
    return gis_pb2.Hydrant(
        feature_id=doc["_id"],
        location=point_message(doc["geometry"]),
        distance_m=round(doc.get("distance_m", 0.0), 2),
        kind=doc["properties"].get("kind", "hydrant"),
        name=doc["properties"].get("name", ""),
    )


def layer_of(field: str, value: int, allowed: Iterable[Layer] = tuple(Layer)) -> Layer:
    allowed = tuple(allowed)
    if value not in [int(layer) for layer in allowed]:
        names = ", ".join(f"LAYER_{layer.name}" for layer in allowed)
        raise InvalidArgument(field, f"must be one of {names}")
    return Layer(value)


def position(field: str, point: types_pb2.GeoPoint) -> Position:
    lon, lat = point_document(field, point)["coordinates"]
    return (lon, lat)


def required_point(field: str, owner: Any, name: str) -> Position:
    if not owner.HasField(name):
        raise InvalidArgument(field, "is required")
    return position(field, getattr(owner, name))


def bbox_of(box: gis_pb2.BoundingBox) -> tuple[float, float, float, float]:
    for name, value, low, high in (
        ("west", box.west, -180, 180),
        ("east", box.east, -180, 180),
        ("south", box.south, -90, 90),
        ("north", box.north, -90, 90),
    ):
        if not low <= value <= high:
            raise InvalidArgument(f"bbox.{name}", f"must be between {low} and {high}")
    if box.west >= box.east:
        raise InvalidArgument("bbox.east", "must be east of bbox.west")
    if box.south >= box.north:
        raise InvalidArgument("bbox.north", "must be north of bbox.south")
    return box.west, box.south, box.east, box.north
