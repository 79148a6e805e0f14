"""The in-memory grid behind NearestHydrants gives what a search of every point gives."""

from __future__ import annotations

import random

from services.gis.geometry import distance_m
from services.gis.nearby import Placed, PointGrid


def placed(n: int, lon: float, lat: float, unit: str = "u") -> Placed:
    return Placed(f"h{n}", unit, (lon, lat), {"_id": f"h{n}"})


def brute_force(
    points: list[Placed], at: tuple[float, float], limit: int, within: float
) -> list[tuple[float, str]]:
    ranked = sorted((distance_m(at, p.position), p.feature_id) for p in points)
    return [(metres, fid) for metres, fid in ranked if metres <= within][:limit]


def test_nearest_equals_a_search_of_every_point() -> None:
    rng = random.Random(3)
    points = [placed(n, rng.uniform(108.1, 108.3), rng.uniform(15.95, 16.15)) for n in range(3000)]
    grid = PointGrid()
    for point in points:
        grid.put(point)
    for _ in range(300):
        at = (rng.uniform(108.08, 108.32), rng.uniform(15.93, 16.17))
        limit, within = rng.choice((1, 3, 10)), rng.choice((50.0, 300.0, 1000.0, 5000.0))
        got = [(metres, p.feature_id) for metres, p in grid.nearest(at, limit, within, distance_m)]
        assert got == brute_force(points, at, limit, within)


def test_moved_removed_and_replaced_points_are_searched_where_they_are_now() -> None:
    grid = PointGrid()
    grid.put(placed(1, 108.20, 16.05, "a"))
    grid.put(placed(2, 108.21, 16.05, "a"))
    grid.put(placed(3, 108.22, 16.05, "b"))
    grid.put(placed(1, 108.30, 16.10, "a"))  # moved far away
    at = (108.2, 16.05)
    assert [p.feature_id for _, p in grid.nearest(at, 3, 5000, distance_m)] == ["h2", "h3"]
    grid.remove("h2")
    grid.remove("h9")  # unknown: nothing happens
    assert [p.feature_id for _, p in grid.nearest(at, 3, 5000, distance_m)] == ["h3"]
    grid.replace_unit("b", [placed(4, 108.2001, 16.05, "b")])
    assert [p.feature_id for _, p in grid.nearest(at, 3, 5000, distance_m)] == ["h4"]
    assert len(grid) == 2
