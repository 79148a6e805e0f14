"""Reading what wards have: GeoJSON files and AutoCAD DXF drawings, into raw features in the
file's own coordinates. No I/O beyond the bytes given; no checks of the geometry yet."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ezdxf.document import Drawing
from ezdxf.entities.dxfgfx import DXFGraphic
from ezdxf.lldxf.const import DXFError
from ezdxf.recover import read as read_dxf_stream
from shapely import STRtree
from shapely.geometry import Point, shape

from services.gis.domain import Layer, kind_of


class SourceError(ValueError):
    """The file as a whole cannot be read (not a per-feature problem); `field` names the
    request's field at fault, when it is not the file itself."""

    def __init__(self, problem: str, field: str = "") -> None:
        super().__init__(problem)
        self.field = field


@dataclass
class RawFeature:
    index: int
    source_id: str
    # GeoJSON geometry in the file's coordinates; None when `error` says why there is none.
    geometry: dict[str, Any] | None
    properties: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    # The drawing a DXF entity comes from (its $FINGERPRINTGUID, kept through every save):
    # handles are unique only within one drawing. "" for GeoJSON, or a drawing without one.
    drawing: str = ""


# ---- GeoJSON ---------------------------------------------------------------------------------


def read_geojson(content: bytes) -> tuple[list[RawFeature], str]:
    """The file's features, and the CRS its positions are in if it says ("" if not): a file
    not in WGS84 names it in a crs member, as GeoJSON did before RFC 7946 (and GDAL writes)."""
    try:
        document = json.loads(content.decode("utf-8-sig"))
    # Not only malformed JSON: an integer of more digits than Python converts (ValueError), or
    # arrays nested deeper than the parser recurses, are the file's fault too.
    except (ValueError, RecursionError) as error:
        raise SourceError(f"is not valid GeoJSON ({error})") from None
    if not isinstance(document, dict) or "type" not in document:
        raise SourceError("is not a GeoJSON object (no type)")
    if document["type"] == "FeatureCollection":
        features = document.get("features")
        if not isinstance(features, list):
            raise SourceError("is a FeatureCollection without a features array")
    elif document["type"] == "Feature":
        features = [document]
    else:
        features = [{"type": "Feature", "geometry": document, "properties": {}}]
    return [_geojson_feature(index, item) for index, item in enumerate(features)], _crs(document)


def _crs(document: dict[str, Any]) -> str:
    """The name a crs member gives ({"type": "name", "properties": {"name": ...}}), or ""."""
    crs = document.get("crs")
    if not isinstance(crs, dict) or crs.get("type") != "name":
        return ""
    properties = crs.get("properties")
    name = properties.get("name") if isinstance(properties, dict) else None
    return name.strip() if isinstance(name, str) else ""


def _geojson_feature(index: int, item: Any) -> RawFeature:
    if not isinstance(item, dict) or item.get("type") != "Feature":
        return RawFeature(index, "", None, error="is not a GeoJSON Feature")
    properties = item.get("properties") or {}
    if not isinstance(properties, dict):
        properties = {}
    source_id = item.get("id", properties.get("id", properties.get("ref", "")))
    geometry = item.get("geometry")
    raw = RawFeature(index, str(source_id) if source_id is not None else "", None, properties)
    if not isinstance(geometry, dict) or "coordinates" not in geometry or "type" not in geometry:
        raw.error = "has no geometry"
        return raw
    if not isinstance(geometry["type"], str):  # a list or object is no type's name
        raw.error = "geometry: type must name a GeoJSON geometry type, such as Polygon"
        return raw
    raw.geometry = {"type": geometry["type"], "coordinates": geometry["coordinates"]}
    return raw


# ---- DXF ---------------------------------------------------------------------------------------

NUMBER = re.compile(r"(\d+(?:[.,]\d+)?)")
# An alley's width in its label: the number the metres follow ("Kiệt 45 - 3m", "rộng 2,5 m").
WIDTH = re.compile(r"(\d+(?:[.,]\d+)?)\s*m\b", re.IGNORECASE)
# How far a label may stand from the line or point it names, in drawing units (metres).
LABEL_REACH = 10.0
FINGERPRINT = "$FINGERPRINTGUID"


@dataclass(frozen=True)
class _Label:
    x: float
    y: float
    text: str


def read_dxf(content: bytes, layer: Layer, dxf_layer: str = "") -> list[RawFeature]:
    """Entities of model space that can be features of `layer`: closed polylines as polygons,
    polylines and lines as lines, points, circles and block references as points. Text labels
    give properties: a number inside a building is its storeys, inside a boundary its unit
    code (a label belongs to the smallest outline around it: a group's code lies inside its
    ward's outline too); a width such as "3.5m" next to an alley is its width; a label by a
    hydrant its name."""
    try:
        document, auditor = read_dxf_stream(io.BytesIO(content))
    except (DXFError, OSError, UnicodeDecodeError, ValueError) as error:
        raise SourceError(f"is not a readable DXF drawing ({error})") from None
    if auditor.has_errors:
        raise SourceError(f"is a damaged DXF drawing ({len(auditor.errors)} errors)")
    wanted = kind_of(layer)
    # Layer names in a drawing are case-insensitive; a layer the drawing lacks is a mistake,
    # not an empty import (which, replacing, would remove the layer's features).
    if dxf_layer and not document.layers.has_entry(dxf_layer):
        raise SourceError(f"has no drawing layer {dxf_layer!r}", "dxf_layer")
    labels: list[_Label] = []
    entities: list[DXFGraphic] = []
    for entity in document.modelspace():
        if dxf_layer and entity.dxf.get("layer", "").casefold() != dxf_layer.casefold():
            continue
        if entity.dxftype() == "MTEXT":
            insert = entity.dxf.insert  # WCS already
            text = entity.plain_text()  # type: ignore[attr-defined]
            labels.append(_Label(float(insert.x), float(insert.y), str(text).strip()))
        elif entity.dxftype() == "TEXT":
            # Stored in the text's own coordinate system, as a circle's centre is: a mirrored
            # export's label stands by what it names only in world coordinates.
            insert = entity.ocs().to_wcs(entity.dxf.insert)
            labels.append(_Label(float(insert.x), float(insert.y), str(entity.dxf.text).strip()))
        else:
            entities.append(entity)
    drawing = _fingerprint(content, document)
    features = []
    for index, entity in enumerate(entities):
        feature = _dxf_feature(index, entity, wanted)
        if feature.geometry is None and not dxf_layer:
            continue  # the whole drawing: its other kinds of entity are not for this layer
        feature.drawing = drawing
        features.append(feature)
    if wanted == "polygon":
        inside = _labels_inside(features, labels)
        for feature in features:
            _label_polygon(feature, inside.get(feature.index, []), layer)
    else:
        for feature in features:
            _label_nearby(feature, labels, layer)
    return features


def _fingerprint(content: bytes, document: Drawing) -> str:
    """The drawing's own id, if its file has one: ezdxf makes up a new one for a file without
    (R12 has none), which would give the same file other ids on every import."""
    if FINGERPRINT.encode() not in content:
        return ""
    guid = str(document.header.get(FINGERPRINT, "")).strip("{}").lower()
    return "" if not guid.strip("0-") else guid


def _dxf_feature(index: int, entity: DXFGraphic, wanted: str) -> RawFeature:
    """The entity as a feature of the layer's kind, in drawing (world) coordinates; one this
    layer cannot take is refused by its handle, so a replace never removes on its account."""
    kind = entity.dxftype()
    handle = str(entity.dxf.handle)
    if wanted == "point":
        if kind == "POINT":
            at = entity.dxf.location  # WCS already
        elif kind in ("CIRCLE", "INSERT"):
            # Stored in the entity's own coordinate system (a mirrored export flips it).
            at = entity.ocs().to_wcs(entity.dxf.center if kind == "CIRCLE" else entity.dxf.insert)
        else:
            return RawFeature(index, handle, None, error=f"a {kind} cannot be a point feature")
        return RawFeature(index, handle, {"type": "Point", "coordinates": [at.x, at.y]})
    if kind == "LWPOLYLINE":
        points = [[float(p.x), float(p.y)] for p in entity.vertices_in_wcs()]  # type: ignore[attr-defined]
        closed = bool(entity.closed)  # type: ignore[attr-defined]
        width = float(entity.dxf.get("const_width", 0.0) or 0.0)
    elif kind == "POLYLINE":
        points = [[float(p.x), float(p.y)] for p in entity.points_in_wcs()]  # type: ignore[attr-defined]
        closed = bool(entity.is_closed)  # type: ignore[attr-defined]
        width = float(entity.dxf.get("default_start_width", 0.0) or 0.0)
    elif kind == "LINE" and wanted == "line":
        start, end = entity.dxf.start, entity.dxf.end
        points, closed, width = [[start.x, start.y], [end.x, end.y]], False, 0.0
    else:
        return RawFeature(index, handle, None, error=f"a {kind} cannot be a {wanted} feature")
    if closed and points and points[0] != points[-1]:  # a loop road, or a ring
        points = [*points, points[0]]
    if wanted == "line":
        properties = {"width_m": width} if width > 0 else {}
        return RawFeature(index, handle, {"type": "LineString", "coordinates": points}, properties)
    return RawFeature(index, handle, {"type": "Polygon", "coordinates": [points]})


def _labels_inside(features: list[RawFeature], labels: list[_Label]) -> dict[int, list[_Label]]:
    """Each label inside an outline, given to the smallest outline around it, by the feature's
    index; in drawing order."""
    outlines: list[tuple[float, int, Any]] = []
    for feature in features:
        if feature.geometry is None:
            continue
        try:
            polygon = shape(feature.geometry).buffer(0)  # a self-crossing ring still has an inside
        except (ValueError, TypeError, AttributeError):
            continue
        outlines.append((polygon.area, feature.index, polygon))
    outlines.sort(key=lambda outline: outline[0])
    inside: dict[int, list[_Label]] = {}
    if not outlines or not labels:
        return inside
    tree = STRtree([polygon for _, _, polygon in outlines])
    points = [Point(label.x, label.y) for label in labels]
    # Indexes into `outlines` (smallest first) of the outlines around each label.
    around: dict[int, int] = {}
    for label_at, outline_at in zip(*tree.query(points, predicate="within"), strict=True):
        around[int(label_at)] = min(around.get(int(label_at), len(outlines)), int(outline_at))
    for label_at, label in enumerate(labels):
        if label_at in around:
            inside.setdefault(outlines[around[label_at]][1], []).append(label)
    return inside


def _label_polygon(feature: RawFeature, labels: list[_Label], layer: Layer) -> None:
    """Properties from the labels inside the outline (and in no smaller one)."""
    for label in labels:
        if layer is Layer.BUILDING and (number := NUMBER.search(label.text)):
            storeys = float(number.group(1).replace(",", "."))
            # 309 digits or more read as infinite, which no int takes: left as it is, the
            # checks refuse this building alone, as they refuse any impossible storeys.
            feature.properties.setdefault(
                "storeys", int(storeys) if math.isfinite(storeys) else storeys
            )
        elif layer is Layer.BOUNDARY:
            feature.properties.setdefault("unit_code", label.text)


def _label_nearby(feature: RawFeature, labels: list[_Label], layer: Layer) -> None:
    """Properties from the labels within reach of the line or point."""
    if feature.geometry is None:
        return
    try:
        geometry = shape(feature.geometry)
    except (ValueError, TypeError, AttributeError):
        return
    near = sorted(
        (geometry.distance(Point(label.x, label.y)), label.text)
        for label in labels
        if geometry.distance(Point(label.x, label.y)) <= LABEL_REACH
    )
    for _, text in near:
        if layer is Layer.ALLEY and "width_m" not in feature.properties:
            widths = WIDTH.findall(text) if text.rstrip().lower().endswith("m") else []
            if widths:
                width = float(widths[-1].replace(",", "."))
                if math.isfinite(width):
                    feature.properties["width_m"] = width
        elif layer is Layer.HYDRANT:
            feature.properties.setdefault("name", text)
