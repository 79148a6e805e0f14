"""Nearest points from memory: a grid of cells over the map.

The hydrant layer is small (thousands of points in a whole city) and read on every fire call, so
the service answers it from a grid kept in memory; MongoDB stays the record (see store.py's
HydrantMirror). Candidates come ring by ring of cells around the point and are ranked by the
geodesic distance, so the answer is the one a $near query gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from services.common.mongo import Document
from services.gis.geometry import metres_per_degree

Position = tuple[float, float]
CELL_DEG = 0.002  # about 220 m north-south
# The local distance is within this factor of the geodesic over a search's few kilometres.
SLACK = 1.005


@dataclass(frozen=True)
class Placed:
    feature_id: str
    unit_id: str
    position: Position
    doc: Document


def _cell(position: Position) -> tuple[int, int]:
    lon, lat = position
    return math.floor(lon / CELL_DEG), math.floor(lat / CELL_DEG)


class PointGrid:
    def __init__(self) -> None:
        self._cells: dict[tuple[int, int], dict[str, Placed]] = {}
        self._placed: dict[str, Placed] = {}

    def __len__(self) -> int:
        return len(self._placed)

    def __contains__(self, feature_id: object) -> bool:
        return feature_id in self._placed

    def put(self, placed: Placed) -> None:
        self.remove(placed.feature_id)
        self._placed[placed.feature_id] = placed
        self._cells.setdefault(_cell(placed.position), {})[placed.feature_id] = placed

    def remove(self, feature_id: str) -> None:
        old = self._placed.pop(feature_id, None)
        if old is not None:
            cell = self._cells[_cell(old.position)]
            del cell[feature_id]
            if not cell:
                del self._cells[_cell(old.position)]

    def replace_unit(self, unit_id: str, placed: list[Placed], keep: Collection[str] = ()) -> None:
        """The unit's points are exactly `placed` from now on, but those `keep` names: as they
        are, whether there or not."""
        for old in [p for p in self._placed.values() if p.unit_id == unit_id]:
            if old.feature_id not in keep:
                self.remove(old.feature_id)
        for point in placed:
            if point.feature_id not in keep:
                self.put(point)

    def nearest(
        self,
        position: Position,
        limit: int,
        max_distance_m: float,
        distance_m: Callable[[Position, Position], float],
    ) -> list[tuple[float, Placed]]:
        """Up to `limit` points within `max_distance_m`, nearest first, with their distance
        by `distance_m` (the geodesic). Cells are searched ring by ring with a cheap local
        distance; only the few that could be among the nearest get the exact one."""
        if not self._cells or limit <= 0:
            return []
        lon0, lat0 = position
        per_lon, per_lat = metres_per_degree(lat0)
        # A cell is at least this many metres across anywhere the search can reach.
        farthest = abs(lat0) + max_distance_m / per_lat + 2 * CELL_DEG
        cell_m = CELL_DEG * min(per_lat, metres_per_degree(min(farthest, 89.0))[0])
        reach = max_distance_m * SLACK
        rings = math.ceil(reach / cell_m) + 1
        x0, y0 = _cell(position)
        near: list[tuple[float, Placed]] = []
        for ring in range(rings + 1):
            if ring >= 2 and len(near) >= limit and (ring - 1) * cell_m > near[limit - 1][0]:
                break
            for x, y in _ring(x0, y0, ring):
                for placed in self._cells.get((x, y), {}).values():
                    lon, lat = placed.position
                    local = math.hypot((lon - lon0) * per_lon, (lat - lat0) * per_lat)
                    if local <= reach:
                        near.append((local, placed))
            near.sort(key=lambda pair: pair[0])
        if len(near) > limit:  # the exact distance for those that could be among the nearest
            cut = near[limit - 1][0] * SLACK * SLACK
            near = [pair for pair in near if pair[0] <= cut]
        exact = [(distance_m(position, placed.position), placed) for _, placed in near]
        exact = [pair for pair in exact if pair[0] <= max_distance_m]
        exact.sort(key=lambda pair: (pair[0], pair[1].feature_id))
        return exact[:limit]


def _ring(x0: int, y0: int, ring: int) -> list[tuple[int, int]]:
    if ring == 0:
        return [(x0, y0)]
    cells = [(x0 + dx, y0 + dy) for dx in range(-ring, ring + 1) for dy in (-ring, ring)]
    cells += [(x0 + dx, y0 + dy) for dx in (-ring, ring) for dy in range(-ring + 1, ring)]
    return cells
