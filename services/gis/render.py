"""A picture of a group's map: the boundary, alleys, buildings shaded by storeys, hydrants and
optionally a fire route. One scene in pixels, written out as SVG (by hand) or PNG (Pillow)."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape

import font_roboto
from PIL import Image, ImageDraw, ImageFont

from services.gis.geometry import LocalFrame, Position

MAX_WIDTH_PX = 4000
DEFAULT_WIDTH_PX = 1200
MARGIN = 0.05
# Storeys 1, 2, ... 6 and more: light to dark.
STOREY_COLOURS = ("#fde7d3", "#fbc9a0", "#f6a36d", "#ec7a43", "#d4532a", "#a6361a")
BOUNDARY = "#2b4c7e"
ALLEY = "#9aa0a6"
HYDRANT = "#d7191c"
ROUTE = "#1a73e8"
BACKGROUND = "#ffffff"

Pixel = tuple[float, float]


def storey_colour(storeys: int) -> str:
    return STOREY_COLOURS[max(1, min(storeys, len(STOREY_COLOURS))) - 1]


@dataclass
class Scene:
    width: int
    height: int
    boundaries: list[list[Pixel]] = field(default_factory=list)
    alleys: list[tuple[list[Pixel], float]] = field(default_factory=list)
    buildings: list[tuple[list[Pixel], int]] = field(default_factory=list)
    hydrants: list[Pixel] = field(default_factory=list)
    route: list[Pixel] = field(default_factory=list)
    title: str = ""


def _outer_rings(geometry: dict[str, Any]) -> list[list[Sequence[float]]]:
    if geometry["type"] == "Polygon":
        return [geometry["coordinates"][0]]
    if geometry["type"] == "MultiPolygon":
        return [polygon[0] for polygon in geometry["coordinates"]]
    return []


def scene(
    title: str,
    features: list[dict[str, Any]],
    route: list[Position],
    width_px: int,
    framed: list[dict[str, Any]] | None = None,
) -> Scene:
    """Lays the features out on a canvas width_px wide, north up, at one scale both ways,
    framing `framed` (the boundaries, when None) and the route: a street running on beyond the
    group is cut at the picture's edge rather than shrinking the group to a corner of it."""
    if framed is None:
        framed = [f for f in features if f.get("layer") == "boundary"] or features
    positions: list[Sequence[float]] = [p for p in route]
    for feature in framed:
        geometry = feature["geometry"]
        if geometry["type"] == "Point":
            positions.append(geometry["coordinates"])
        elif geometry["type"] == "LineString":
            positions.extend(geometry["coordinates"])
        else:
            positions.extend(p for ring in _outer_rings(geometry) for p in ring)
    if not positions:
        return Scene(width_px, width_px // 2, title=title)
    west = min(p[0] for p in positions)
    east = max(p[0] for p in positions)
    south = min(p[1] for p in positions)
    north = max(p[1] for p in positions)
    frame = LocalFrame((west + east) / 2, (south + north) / 2)
    (x0, y0), (x1, y1) = frame.metres((west, south)), frame.metres((east, north))
    span_x, span_y = max(x1 - x0, 1.0), max(y1 - y0, 1.0)
    scale = width_px * (1 - 2 * MARGIN) / max(span_x, span_y * 0.5)
    height = max(int(span_y * scale + 2 * MARGIN * width_px), 100)
    offset_x = (width_px - span_x * scale) / 2
    offset_y = (height - span_y * scale) / 2

    def px(p: Sequence[float]) -> Pixel:
        x, y = frame.metres((p[0], p[1]))
        return (
            round(offset_x + (x - x0) * scale, 1),
            round(height - offset_y - (y - y0) * scale, 1),
        )

    out = Scene(width_px, height, title=title)
    for feature in features:
        geometry, properties = feature["geometry"], feature.get("properties", {})
        layer = feature.get("layer")
        if layer == "boundary":
            out.boundaries.extend([px(p) for p in ring] for ring in _outer_rings(geometry))
        elif layer == "building":
            for ring in _outer_rings(geometry):
                out.buildings.append(([px(p) for p in ring], int(properties.get("storeys", 1))))
        elif layer == "alley":
            width = max(1.5, float(properties.get("width_m", 2.0)) * scale)
            out.alleys.append(([px(p) for p in geometry["coordinates"]], width))
        elif layer == "hydrant":
            out.hydrants.append(px(geometry["coordinates"]))
    out.route = [px(p) for p in route]
    return out


def _points(pixels: list[Pixel]) -> str:
    return " ".join(f"{x:g},{y:g}" for x, y in pixels)


def to_svg(s: Scene) -> bytes:
    radius = max(4.0, s.width / 200)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{s.width}" height="{s.height}" '
        f'viewBox="0 0 {s.width} {s.height}">',
        f"<title>{escape(s.title)}</title>",
        f'<rect width="{s.width}" height="{s.height}" fill="{BACKGROUND}"/>',
        '<g id="alleys" fill="none" stroke-linecap="round" stroke-linejoin="round">',
        *(
            f'<polyline points="{_points(line)}" stroke="{ALLEY}" stroke-width="{width:.1f}"/>'
            for line, width in s.alleys
        ),
        "</g>",
        '<g id="buildings" stroke="#5f4b3a" stroke-width="0.8">',
        *(
            f'<polygon points="{_points(ring)}" fill="{storey_colour(storeys)}" '
            f'data-storeys="{storeys}"/>'
            for ring, storeys in s.buildings
        ),
        "</g>",
        f'<g id="boundaries" fill="none" stroke="{BOUNDARY}" stroke-width="2.5" '
        'stroke-dasharray="10 5">',
        *(f'<polygon points="{_points(ring)}"/>' for ring in s.boundaries),
        "</g>",
    ]
    if s.route:
        parts += [
            f'<polyline id="route" points="{_points(s.route)}" fill="none" stroke="{ROUTE}" '
            'stroke-width="5" stroke-linejoin="round" stroke-linecap="round" opacity="0.85"/>'
        ]
    parts += [
        f'<g id="hydrants" fill="{HYDRANT}" stroke="#ffffff" stroke-width="1.5">',
        *(f'<circle cx="{x:g}" cy="{y:g}" r="{radius:.1f}"/>' for x, y in s.hydrants),
        "</g>",
        _svg_legend(s),
        "</svg>",
    ]
    return "\n".join(parts).encode()


def _svg_legend(s: Scene) -> str:
    rows = ['<g id="legend" font-family="sans-serif" font-size="12" transform="translate(10,10)">']
    rows.append(f'<text x="0" y="12" font-weight="bold">{escape(s.title)}</text>')
    for number, colour in enumerate(STOREY_COLOURS, start=1):
        y = 14 + number * 16
        label = f"{number}+ tầng" if number == len(STOREY_COLOURS) else f"{number} tầng"
        rows.append(
            f'<rect x="0" y="{y}" width="14" height="12" fill="{colour}" stroke="#5f4b3a"/>'
        )
        rows.append(f'<text x="20" y="{y + 10}">{label}</text>')
    rows.append("</g>")
    return "".join(rows)


@functools.cache
def _font(bold: bool, size: int) -> ImageFont.FreeTypeFont:
    """Roboto: every Vietnamese letter (Pillow's built-in font has none of the diacritics)."""
    return ImageFont.truetype(font_roboto.RobotoBold if bold else font_roboto.Roboto, size)


def to_png(s: Scene) -> bytes:
    image = Image.new("RGB", (s.width, s.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for line, width in s.alleys:
        draw.line(line, fill=ALLEY, width=max(1, round(width)), joint="curve")
    for ring, storeys in s.buildings:
        draw.polygon(ring, fill=storey_colour(storeys), outline="#5f4b3a")
    for ring in s.boundaries:
        draw.line([*ring, ring[0]], fill=BOUNDARY, width=3)
    if s.route:
        draw.line(s.route, fill=ROUTE, width=5, joint="curve")
    radius = max(4.0, s.width / 200)
    for x, y in s.hydrants:
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), fill=HYDRANT, outline="#ffffff"
        )
    draw.text((10, 8), s.title, fill="#000000", font=_font(True, 14))
    for number, colour in enumerate(STOREY_COLOURS, start=1):
        y = 14 + number * 16
        draw.rectangle((10, y, 24, y + 12), fill=colour, outline="#5f4b3a")
        label = f"{number}{'+' if number == len(STOREY_COLOURS) else ''}"
        draw.text((30, y), label, fill="#000", font=_font(False, 12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
