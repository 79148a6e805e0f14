"""The pilot's demo data is generated but plausible: families whose ages fit together, the
occupation and schooling of each member's age and place, and town addresses on streets of the
group's own ward that the generated map draws, Kiệt 45 Trần Phú of the demo day among them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import date

import pytest
from civic.registry.v1 import registry_pb2
from shapely.geometry import LineString, Point

from services.demo import PILOT, PILOT_DAY, PilotGroup, pilot_rows
from services.demo_day import ALLEY, HOME
from services.demo_map import UnitMap, pilot_maps
from services.gis.geometry import LocalFrame

ROWS = list(pilot_rows(PILOT_DAY))
MAPS = {unit.group.unit_id: unit for unit in pilot_maps()}
TOWNS = [group for group in PILOT if group.urban]

# Streets of each town group's ward.
WARD_STREETS = {
    "dn.hc.hc1.t17": {"Trần Phú", "Bạch Đằng", "Lê Lợi", "Phan Châu Trinh", "Quang Trung"},
    "dn.tk.tg.t51": {"Hà Huy Tập", "Thái Thị Bôi", "Lê Duẩn", "Điện Biên Phủ", "Nguyễn Tri Phương"},
}
NOT_WORKING = {"nghỉ hưu", "ở nhà", "nội trợ"}
SCHOOL_BY_AGE = {
    **dict.fromkeys(range(6, 11), registry_pb2.EDUCATION_LEVEL_PRIMARY),
    **dict.fromkeys(range(11, 15), registry_pb2.EDUCATION_LEVEL_LOWER_SECONDARY),
    **dict.fromkeys(range(15, 18), registry_pb2.EDUCATION_LEVEL_UPPER_SECONDARY),
}


def age(row: registry_pb2.ImportRow) -> int:
    born = date.fromisoformat(row.person.birth_date)
    return PILOT_DAY.year - born.year - ((PILOT_DAY.month, PILOT_DAY.day) < (born.month, born.day))


def households(rows: Sequence[registry_pb2.ImportRow]) -> list[list[registry_pb2.ImportRow]]:
    found: dict[tuple[str, str], list[registry_pb2.ImportRow]] = defaultdict(list)
    for row in rows:
        found[(row.unit_id, row.household_ref)].append(row)
    return list(found.values())


HOUSEHOLDS = households(ROWS)


def test_each_members_age_fits_the_head() -> None:
    """Children a generation younger than the head and the spouse, grandchildren two, parents a
    generation older, spouses a few years apart."""
    for members in HOUSEHOLDS:
        head = members[0]
        assert head.person.relationship == registry_pb2.RELATIONSHIP_HEAD
        by_kind: dict[int, list[int]] = defaultdict(list)
        for row in members[1:]:
            by_kind[row.person.relationship].append(age(row))
        couple = [age(head), *by_kind[registry_pb2.RELATIONSHIP_SPOUSE]]
        assert all(abs(spouse - age(head)) <= 15 for spouse in couple)
        assert all(c <= min(couple) - 16 for c in by_kind[registry_pb2.RELATIONSHIP_CHILD])
        assert all(g <= age(head) - 32 for g in by_kind[registry_pb2.RELATIONSHIP_GRANDCHILD])
        assert all(p >= age(head) + 15 for p in by_kind[registry_pb2.RELATIONSHIP_PARENT])


def test_the_elderly_are_a_plausible_share_and_the_storm_district_has_some() -> None:
    """Few people over 70 (about one in fifteen, as in a city where one in ten is over 65),
    living in a fifth or so of the households; the demo day's storm warns Hải Châu's."""
    elderly = [row for row in ROWS if age(row) >= 71]
    assert 0.04 <= len(elderly) / len(ROWS) <= 0.10
    with_elderly = [m for m in HOUSEHOLDS if any(age(row) >= 71 for row in m)]
    assert 0.15 <= len(with_elderly) / len(HOUSEHOLDS) <= 0.30
    assert any(m[0].unit_id.startswith("dn.hc.") for m in with_elderly)


def test_occupation_and_schooling_fit_the_age() -> None:
    for row in ROWS:
        years, person = age(row), row.person
        if years < 6:
            assert person.occupation == ""
            assert person.education in (
                registry_pb2.EDUCATION_LEVEL_UNSPECIFIED,
                registry_pb2.EDUCATION_LEVEL_NONE,
            )
        elif years < 18:
            assert (person.occupation, person.education) == ("học sinh", SCHOOL_BY_AGE[years])
        else:
            assert person.occupation not in ("", "học sinh")
        if person.occupation == "nghỉ hưu":
            assert years >= 50
        if years > 75:
            assert person.occupation in NOT_WORKING


def test_no_farmers_in_town_and_renters_only_there() -> None:
    towns = {group.unit_id for group in TOWNS}
    farmers = {row.unit_id for row in ROWS if row.person.occupation == "nông dân"}
    renters = {
        row.unit_id for row in ROWS if row.residence_kind == registry_pb2.RESIDENCE_KIND_RENTER
    }
    assert farmers and not farmers & towns
    assert renters and renters <= towns


def frame(group: PilotGroup) -> LocalFrame:
    lat, lon = group.centre
    return LocalFrame(lon, lat)


def ways(unit: UnitMap) -> dict[str, LineString]:
    """The unit's streets and alleys by name, in metres from its centre."""
    local = frame(unit.group)
    return {
        a["properties"]["name"]: LineString(
            [local.metres(tuple(p)) for p in a["geometry"]["coordinates"]]
        )
        for a in unit.alleys
    }


def street_of(way: str) -> str:
    """The street a way's name ends with: 'Kiệt 45 Trần Phú' is off Trần Phú."""
    return way.split(" ", 2)[2] if way.startswith("Kiệt ") else way


@pytest.mark.parametrize("group", TOWNS, ids=[group.unit_id for group in TOWNS])
def test_a_town_groups_addresses_and_map_are_on_streets_of_its_ward(group: PilotGroup) -> None:
    """Each address names a street or alley the map draws, near the household's point, and
    every street the map draws is one of the ward's."""
    drawn = ways(MAPS[group.unit_id])
    assert {street_of(name) for name in drawn} <= WARD_STREETS[group.unit_id]
    local = frame(group)
    for row in ROWS:
        if row.unit_id != group.unit_id:
            continue
        number, way = row.address.split(" ", 1)
        assert number.isdigit() and way in drawn, row.address
        point = Point(local.metres((row.location.longitude, row.location.latitude)))
        assert drawn[way].distance(point) < 30, row.address


def test_the_demo_days_family_lives_on_kiet_45_tran_phu_which_floods() -> None:
    """The family at "27/4 Kiệt 45 Trần Phú" reports the flood in their own alley."""
    unit = MAPS[PILOT[0].unit_id]
    alley = ways(unit).get("Kiệt 45 Trần Phú")
    assert alley is not None
    for point in (ALLEY, HOME):
        assert (
            alley.distance(Point(frame(unit.group).metres((point.longitude, point.latitude)))) < 10
        )
