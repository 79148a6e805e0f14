"""The alley network the fire route runs on, built from drawn alleys (pure: no servers)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from ezdxf.document import Drawing

from services.gis.domain import Layer
from services.gis.geometry import distance_m
from services.gis.routing import NoRoute, network, shortest_route
from services.gis.sources import read_dxf


def alley(*points: tuple[float, float], width_m: float = 4.0) -> dict[str, Any]:
    return {
        "geometry": {"type": "LineString", "coordinates": [list(p) for p in points]},
        "properties": {"width_m": width_m},
    }


MAIN = alley((108.000, 16.000), (108.002, 16.000))
# A side alley drawn from the middle of the main one's only segment, sharing no vertex with it.
SIDE = alley((108.001, 16.000), (108.001, 16.002))


def test_a_side_alley_ending_on_another_meets_it_there() -> None:
    graph = network([MAIN, SIDE], 3.5)
    assert graph.has_edge((108.0, 16.0), (108.001, 16.0))
    assert graph.has_edge((108.001, 16.0), (108.002, 16.0))
    assert not graph.has_edge((108.0, 16.0), (108.002, 16.0))

    route = shortest_route([MAIN, SIDE], (108.0, 16.0), (108.001, 16.002), 3.5)
    expected = distance_m((108.0, 16.0), (108.001, 16.0)) + distance_m(
        (108.001, 16.0), (108.001, 16.002)
    )
    assert route.length_m == pytest.approx(expected, rel=1e-6)
    assert (108.001, 16.0) in route.positions


def test_alleys_crossing_between_their_vertices_meet_at_the_crossing() -> None:
    """A crossroads drawn as two long lines, and an alley bending on another's segment."""
    crossing = alley((108.001, 15.999), (108.001, 16.001))
    route = shortest_route([MAIN, crossing], (108.0, 16.0), (108.001, 16.001), 3.5)
    expected = distance_m((108.0, 16.0), (108.001, 16.0)) + distance_m(
        (108.001, 16.0), (108.001, 16.001)
    )
    assert route.length_m == pytest.approx(expected, rel=1e-6)
    assert (108.001, 16.0) in route.positions

    bending = alley((108.0015, 15.999), (108.0015, 16.0), (108.0025, 16.001))
    route = shortest_route([MAIN, bending], (108.0, 16.0), (108.0025, 16.001), 3.5)
    assert (108.0015, 16.0) in route.positions


def test_an_alley_ending_short_of_another_does_not_meet_it() -> None:
    """Ten metres short is a wall between them, not a junction."""
    short = alley((108.001, 16.0001), (108.001, 16.002))
    with pytest.raises(NoRoute, match="cut off"):
        shortest_route([MAIN, short], (108.0, 16.0), (108.001, 16.002), 3.5)


def test_the_engine_stops_on_a_way_it_reaches_though_an_unreachable_one_is_nearer() -> None:
    """A wide lane behind the house that only a narrow alley leads to: the engine stops on the
    main alley, 89 m from the house, not at the lane 11 m from it."""
    lane = alley((108.0015, 16.0009), (108.0025, 16.0009))
    house = (108.002, 16.0008)
    route = shortest_route([MAIN, lane], (108.0, 16.0), house, 3.5)
    assert route.positions == [(108.0, 16.0), (108.002, 16.0), house]
    expected = distance_m((108.0, 16.0), (108.002, 16.0)) + distance_m((108.002, 16.0), house)
    assert route.length_m == pytest.approx(expected, rel=1e-6)


def test_a_narrow_side_alley_is_no_way_in_for_the_engine() -> None:
    narrow = alley((108.001, 16.000), (108.001, 16.002), width_m=2.0)
    with pytest.raises(NoRoute, match="no alley wide enough"):
        shortest_route([MAIN, narrow], (108.0, 16.0), (108.001, 16.002), 3.5)


@pytest.mark.parametrize(
    ("label", "width"),
    [("Kiệt 45 - 3m", 3.0), ("rộng 2,5 m", 2.5), ("4m", 4.0), ("Kiệt 45", None)],
)
def test_an_alleys_width_is_the_number_its_label_gives_in_metres(
    label: str, width: float | None
) -> None:
    """Not the alley's number: "Kiệt 45 - 3m" is alley 45, three metres wide."""
    doc = Drawing.new("R2010")
    msp = doc.modelspace()
    msp.add_lwpolyline([(0, 0), (100, 0)])
    msp.add_text(label, dxfattribs={"insert": (50, 2)})
    out = io.StringIO()
    doc.write(out)
    (alley_drawn,) = read_dxf(out.getvalue().encode(), Layer.ALLEY)
    assert alley_drawn.properties.get("width_m") == width
