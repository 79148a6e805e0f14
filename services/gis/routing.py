"""The fire access route: the shortest way along the alley network, using only alleys at least
a given width, from where the engine leaves the street to a household. Pure: the alleys and
hydrants come in as GeoJSON features, the route goes out as positions."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
from shapely import STRtree
from shapely.geometry import LineString, Point

from services.gis.geometry import (
    LocalFrame,
    Position,
    along_and_offset_m,
    distance_m,
    line_length_m,
)

# The entry and the destination join the network at its nearest point within this distance.
MAX_SNAP_M = 150.0
# An alley ending this close to another's segment meets it there.
JOIN_M = 1.0
# An alley's bend this close to another's segment lies on it (stored positions are rounded to
# about a centimetre): they meet there.
ON_M = 0.05
NODE_DIGITS = 7


class NoRoute(Exception):
    """Why no route exists, in words for the caller."""


@dataclass(frozen=True)
class Route:
    positions: list[Position]
    length_m: float


@dataclass(frozen=True)
class RouteHydrant:
    feature: dict[str, Any]
    along_m: float
    offset_m: float


def _node(p: Sequence[float]) -> Position:
    return (round(float(p[0]), NODE_DIGITS), round(float(p[1]), NODE_DIGITS))


def network(alleys: Iterable[dict[str, Any]], min_width_m: float) -> nx.Graph[Position]:
    """Alleys as a graph: vertices are nodes, segments are edges weighted by their length in
    metres; alleys narrower than min_width_m are left out. Alleys meet where they share a
    vertex, where one ends on another's segment (a side alley's T-junction, as drawings have
    it, within JOIN_M) or bends on it, and where two cross (a crossroads drawn as two long
    lines): the segments are split there."""
    graph: nx.Graph[Position] = nx.Graph()
    ends: set[Position] = set()
    for alley in alleys:
        if float(alley["properties"].get("width_m", 0)) < min_width_m:
            continue
        points = [_node(p) for p in alley["geometry"]["coordinates"]]
        ends.update((points[0], points[-1]))
        for a, b in itertools.pairwise(points):
            if a != b:
                graph.add_edge(a, b, length=distance_m(a, b))
    _join_junctions(graph, ends)
    return graph


def _join_junctions(graph: nx.Graph[Position], ends: set[Position]) -> None:
    if graph.number_of_edges() == 0:
        return
    nodes: list[Position] = list(graph.nodes)
    frame = LocalFrame(*nodes[0])
    edges = list(graph.edges())
    segments = [LineString([frame.metres(a), frame.metres(b)]) for a, b in edges]
    tree = STRtree(segments)
    splits: dict[tuple[Position, Position], list[Position]] = {}
    spots = [Point(frame.metres(node)) for node in nodes]
    for n, i in zip(*tree.query(spots, predicate="dwithin", distance=JOIN_M), strict=True):
        node, (a, b) = nodes[int(n)], edges[int(i)]
        # An alley's end within JOIN_M of another's segment; a bend only on it.
        near = node in ends or segments[int(i)].distance(spots[int(n)]) <= ON_M
        if near and node not in (a, b):
            splits.setdefault((a, b), []).append(node)
    # Segments crossing between their vertices (one meeting at a vertex is joined above).
    for i, j in zip(*tree.query(segments, predicate="crosses"), strict=True):
        crossing = segments[int(i)].intersection(segments[int(j)])
        if i < j and isinstance(crossing, Point):
            node = _node(frame.degrees((crossing.x, crossing.y)))
            for a, b in (edges[int(i)], edges[int(j)]):
                if node not in (a, b):
                    splits.setdefault((a, b), []).append(node)
    for (a, b), on_it in splits.items():
        # The junctions on one segment, in order along it.
        segment = LineString([frame.metres(a), frame.metres(b)])
        order = sorted(on_it, key=lambda p: segment.project(Point(frame.metres(p))))
        graph.remove_edge(a, b)
        for u, v in itertools.pairwise([a, *order, b]):
            if u != v:
                graph.add_edge(u, v, length=distance_m(u, v))


Spot = tuple[float, Position, Position, float]  # distance, the edge's ends, how far along it


def _nearest(
    graph: nx.Graph[Position], point: Position, frame: LocalFrame, among: set[Position] | None
) -> Spot | None:
    """The network's nearest spot to `point`, on an edge between nodes `among` (any: None)."""
    local = Point(frame.metres(point))
    best: Spot | None = None
    for a, b in graph.edges():
        if among is not None and a not in among:
            continue
        segment = LineString([frame.metres(a), frame.metres(b)])
        distance = segment.distance(local)
        if best is None or distance < best[0]:
            best = (distance, a, b, segment.project(local))
    return best


def _join(graph: nx.Graph[Position], spot: Spot, frame: LocalFrame) -> Position:
    """Adds the spot as a node (splitting its edge) and returns it."""
    _, a, b, along = spot
    segment = LineString([frame.metres(a), frame.metres(b)])
    at = segment.interpolate(along)
    node = _node(frame.degrees((at.x, at.y)))
    if node in (a, b):
        return node
    graph.remove_edge(a, b)
    graph.add_edge(a, node, length=distance_m(a, node))
    graph.add_edge(node, b, length=distance_m(node, b))
    return node


def shortest_route(
    alleys: Iterable[dict[str, Any]], entry: Position, destination: Position, min_width_m: float
) -> Route:
    """From the entry to the destination along alleys at least min_width_m wide. The route
    starts and ends with the short walk from each point to its nearest spot on the network;
    the destination's on the alleys the engine can reach (a wide lane nearer to it that only
    a narrow alley leads to is no way in)."""
    graph = network(alleys, min_width_m)
    if graph.number_of_edges() == 0:
        raise NoRoute(f"no alley at least {min_width_m:g} m wide in the area")
    frame = LocalFrame(*entry)
    at_entry = _nearest(graph, entry, frame, None)
    if at_entry is None or at_entry[0] > MAX_SNAP_M:
        raise NoRoute(f"entry: no alley wide enough within {MAX_SNAP_M:g} m")
    start = _join(graph, at_entry, frame)
    reachable: set[Position] = nx.node_connected_component(graph, start)
    at_destination = _nearest(graph, destination, frame, reachable)
    if at_destination is None or at_destination[0] > MAX_SNAP_M:
        anywhere = _nearest(graph, destination, frame, None)
        if anywhere is None or anywhere[0] > MAX_SNAP_M:
            raise NoRoute(f"destination: no alley wide enough within {MAX_SNAP_M:g} m")
        raise NoRoute(
            f"no way in along alleys at least {min_width_m:g} m wide: the destination is cut off"
        )
    end = _join(graph, at_destination, frame)
    path: list[Position] = nx.shortest_path(graph, start, end, weight="length")
    positions = [entry, *path, destination]
    positions = [p for i, p in enumerate(positions) if i == 0 or p != positions[i - 1]]
    length = line_length_m(positions)
    return Route(positions, length)


def hydrants_along(
    route: Route, hydrants: Iterable[dict[str, Any]], radius_m: float
) -> list[RouteHydrant]:
    """Hydrants within radius_m of the route, in the order the engine passes them."""
    found = []
    for hydrant in hydrants:
        point = tuple(hydrant["geometry"]["coordinates"])
        along, offset = along_and_offset_m(route.positions, (point[0], point[1]))
        if offset <= radius_m:
            found.append(RouteHydrant(hydrant, along, offset))
    return sorted(found, key=lambda h: (h.along_m, h.offset_m))
