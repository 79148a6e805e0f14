"""Generated demo data for the four pilot units of Đà Nẵng (no real person's data).

Households are families of two or three generations whose ages fit each other (a child at
least 18 years younger than its parents, a spouse a few years apart), each member with the
occupation and schooling of their age and place (services/population.py). A town household's
address is the street or alley it lies on in the unit's layout, the one the map draws
(services/demo_map.py): a middle street with a street along each side, joined by alleys (kiệt)
named after the house number where they leave the middle street.

Deterministic: the same seed gives the same households, so loading twice changes nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TypeAlias

from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2

from services.gis.geometry import LocalFrame
from services.population import Bands, age_in_bands, age_on, occupation_and_education

CITY = ("dn", "Thành phố Đà Nẵng")
# The day the demo's ages are counted on: a fixed day, so the same people are generated.
PILOT_DAY = date(2025, 6, 1)


@dataclass(frozen=True)
class PilotGroup:
    district: tuple[str, str]
    ward: tuple[str, str]
    group: tuple[str, str]
    centre: tuple[float, float]  # latitude, longitude
    households: int
    urban: bool
    # The south, middle and north streets of the unit's layout: in town, streets of its ward.
    streets: tuple[str, str, str]

    @property
    def unit_id(self) -> str:
        return ".".join((CITY[0], self.district[0], self.ward[0], self.group[0]))

    @property
    def frame(self) -> LocalFrame:
        """Metres east and north of the unit's centre."""
        lat, lon = self.centre
        return LocalFrame(lon, lat)


VILLAGE_LANES = ("Đường thôn phía nam", "Đường liên thôn", "Đường thôn phía bắc")
PILOT = (
    PilotGroup(
        ("hc", "Quận Hải Châu"),
        ("hc1", "Phường Hải Châu 1"),
        ("t17", "Tổ dân phố 17"),
        (16.0747, 108.2230),
        260,
        True,
        ("Bạch Đằng", "Trần Phú", "Phan Châu Trinh"),
    ),
    PilotGroup(
        ("tk", "Quận Thanh Khê"),
        ("tg", "Phường Thạc Gián"),
        ("t51", "Tổ dân phố 51"),
        (16.0641, 108.2052),
        240,
        True,
        ("Điện Biên Phủ", "Thái Thị Bôi", "Hà Huy Tập"),
    ),
    PilotGroup(
        ("hv", "Huyện Hòa Vang"),
        ("hp", "Xã Hòa Phước"),
        ("tra-kiem", "Thôn Trà Kiểm"),
        (15.9718, 108.2117),
        320,
        False,
        VILLAGE_LANES,
    ),
    PilotGroup(
        ("hv", "Huyện Hòa Vang"),
        ("hb", "Xã Hòa Bắc"),
        ("loc-my", "Thôn Lộc Mỹ"),
        (16.1152, 107.9903),
        180,
        False,
        VILLAGE_LANES,
    ),
)

# ---- the layout the addresses and the map share ---------------------------------------------

# The side streets run this far north and south of the middle one, and the unit as far east
# and west of its centre; the households lie a little inside (east-west, within reach of the
# outermost lanes).
REACH_M = 360.0
HOMES_WITHIN_M = (320.0, 330.0)  # east-west, north-south
TOWN_ALLEY_SPACING_M = 45.0
# A street's houses are numbered from the unit's west end, odd on the north side and even on
# the south, a number about every 19 m of each side (shops, offices and alley mouths as much
# as houses); an alley's from the street, odd on its east side, a number every 4 m.
STREET_FRONT_M = 19.0
ALLEY_FRONT_M = 4.0
VILLAGE_HAMLETS = 6  # tổ of a thôn, west to east


def alley_x(index: int, spacing_m: float) -> float:
    """Where the index-th alley (from the west) would run without the map's jitter."""
    return -REACH_M + spacing_m * (index + 0.5)


def alley_count(spacing_m: float) -> int:
    return int(2 * REACH_M / spacing_m)


def house_number(along_m: float, odd_side: bool, front_m: float) -> int:
    """The number of a house `along_m` from the start of its way."""
    count = max(1, math.ceil(along_m / front_m))
    return 2 * count - 1 if odd_side else 2 * count


def alley_index(east: float) -> int:
    """The town alley whose strip between its neighbours holds a point `east` metres east."""
    strip = int((east + REACH_M) // TOWN_ALLEY_SPACING_M)
    return min(alley_count(TOWN_ALLEY_SPACING_M) - 1, max(0, strip))


def kiet_number(index: int, north: bool) -> int:
    """A town alley's number: the house number on the middle street where it leaves it."""
    return house_number(alley_x(index, TOWN_ALLEY_SPACING_M) + REACH_M, north, STREET_FRONT_M)


def kiet_name(index: int, north: bool, street: str) -> str:
    return f"Kiệt {kiet_number(index, north)} {street}"


def town_address(east: float, north: float, streets: tuple[str, str, str]) -> str:
    """The address of a house at (east, north) metres: on the nearest way, a street or an alley
    from the middle street."""
    index = alley_index(east)
    x = alley_x(index, TOWN_ALLEY_SPACING_M)
    street_y = min((-REACH_M, 0.0, REACH_M), key=lambda y: abs(north - y))
    if abs(north - street_y) <= abs(east - x):
        street = streets[(-REACH_M, 0.0, REACH_M).index(street_y)]
        return f"{house_number(east + REACH_M, north > street_y, STREET_FRONT_M)} {street}"
    number = house_number(abs(north), east > x, ALLEY_FRONT_M)
    return f"{number} {kiet_name(index, north > 0, streets[1])}"


def village_address(east: float, group: PilotGroup) -> str:
    hamlet = int((east + REACH_M) * VILLAGE_HAMLETS // (2 * REACH_M)) + 1
    return f"Tổ {min(VILLAGE_HAMLETS, max(1, hamlet))}, {group.group[1]}"


# ---- families ------------------------------------------------------------------------------

FAMILY = (
    "Nguyễn Trần Lê Phạm Hoàng Huỳnh Phan Vũ Võ Đặng Bùi Đỗ Hồ Ngô Dương Lý Trương Đoàn".split()
)
MIDDLE_MALE = "Văn Hữu Đức Minh Quốc Công Thanh Xuân".split()
MIDDLE_FEMALE = "Thị Ngọc Thu Thanh Mỹ Kim Hồng Diệu".split()
GIVEN_MALE = "An Bình Cường Dũng Hải Hùng Khang Long Nam Phúc Quang Sơn Tài Tuấn Việt".split()
GIVEN_FEMALE = "Anh Bích Chi Dung Hà Hoa Hương Lan Linh Mai Ngân Nhung Thảo Trang Yến".split()

# Heads' ages (first, last, weight): owners of every age, renters mostly young.
HEAD_AGES: Bands = (
    (22, 29, 5),
    (30, 39, 20),
    (40, 49, 24),
    (50, 59, 22),
    (60, 69, 14),
    (70, 79, 8),
    (80, 90, 3),
)
RENTER_HEAD_AGES: Bands = ((20, 29, 40), (30, 39, 45), (40, 54, 15))
# A husband's age less his wife's.
HUSBAND_OLDER_BY = (-2, -1, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 9)
CHILDREN = (0, 1, 1, 2, 2, 2, 3)
# A mother's age when her child was born.
MOTHER_AT_BIRTH = (20, 38)
# Grown children mostly leave home; a married son often stays with his parents, and with his
# wife and children makes a household of three generations.
GROWN_UP_AT = 28
GROWN_STAY = 0.25
THREE_GENERATIONS_FROM = 55
THREE_GENERATIONS = 0.35
# A head's widowed or old parent living with them.
PARENT_WITH_HEAD = 0.28
PARENT_HEADS_UP_TO = 62
OLDEST = 96
RENTERS = 0.15

Relationship: TypeAlias = registry_pb2.Relationship.ValueType


@dataclass(frozen=True)
class Member:
    name: str
    age: int
    male: bool
    relationship: Relationship


def _name(rng: random.Random, family: str, male: bool) -> str:
    middle = rng.choice(MIDDLE_MALE if male else MIDDLE_FEMALE)
    given = rng.choice(GIVEN_MALE if male else GIVEN_FEMALE)
    return f"{family} {middle} {given}"


def _person(
    rng: random.Random, family: str, age: int, male: bool, relationship: Relationship
) -> Member:
    return Member(_name(rng, family, male), age, male, relationship)


def _couple(
    rng: random.Random, family: str, age: int, male: bool, relationship: Relationship
) -> list[Member]:
    """A person and, if married, their spouse (of another family, a few years apart)."""
    first = _person(rng, family, age, male, relationship)
    married = 0.88 if age < 60 else 0.72 if age < 75 else 0.45
    if age < 20 or rng.random() >= married:
        return [first]
    older_by = rng.choice(HUSBAND_OLDER_BY)
    spouse_age = max(18, age - older_by if male else age + older_by)
    kind = registry_pb2.RELATIONSHIP_SPOUSE
    if relationship != registry_pb2.RELATIONSHIP_HEAD:
        kind = registry_pb2.RELATIONSHIP_OTHER_RELATIVE  # a child's spouse: con dâu, con rể
    return [first, _person(rng, rng.choice(FAMILY), spouse_age, not male, kind)]


def _children(
    rng: random.Random, parents: list[Member], relationship: Relationship
) -> list[Member]:
    """The couple's (or lone parent's) children still at home, eldest first."""
    mother, family = _mother_and_family(parents)
    ages = [mother.age - rng.randint(*MOTHER_AT_BIRTH) for _ in range(rng.choice(CHILDREN))]
    home = [a for a in ages if a >= 0 and (a < GROWN_UP_AT or rng.random() < GROWN_STAY)]
    return [
        _person(rng, family, age, rng.random() < 0.5, relationship)
        for age in sorted(home, reverse=True)
    ]


def _mother_and_family(parents: list[Member]) -> tuple[Member, str]:
    """Whose age the children's follow (the mother's, else the lone parent's) and the family
    name they carry (the father's, else the lone parent's)."""
    mother = next((p for p in parents if not p.male), parents[0])
    father = next((p for p in parents if p.male), parents[0])
    return mother, father.name.split(" ", 1)[0]


def _married_son(rng: random.Random, parents: list[Member]) -> list[Member]:
    """A grown son living with his parents, with his wife and their children."""
    mother, family = _mother_and_family(parents)
    age = mother.age - rng.randint(MOTHER_AT_BIRTH[0] + 2, MOTHER_AT_BIRTH[1] - 4)
    if age < 24:
        return []
    son = _couple(rng, family, age, True, registry_pb2.RELATIONSHIP_CHILD)
    return [*son, *_children(rng, son, registry_pb2.RELATIONSHIP_GRANDCHILD)]


def _head_parent(rng: random.Random, head: Member) -> list[Member]:
    """The head's father (of the head's family) or mother (of her own)."""
    age = head.age + rng.randint(22, 36)
    if head.age > PARENT_HEADS_UP_TO or age > OLDEST or rng.random() >= PARENT_WITH_HEAD:
        return []
    male = rng.random() < 0.35
    family = head.name.split(" ", 1)[0] if male else rng.choice(FAMILY)
    return [_person(rng, family, age, male, registry_pb2.RELATIONSHIP_PARENT)]


def household(rng: random.Random, renter: bool) -> list[Member]:
    """A household's members, head first: the head's family, and perhaps a parent of the head
    or (with an older head) a married son's family."""
    age = age_in_bands(rng, RENTER_HEAD_AGES if renter else HEAD_AGES)
    male = rng.random() < (0.7 if age < 70 else 0.5)
    parents = _couple(rng, rng.choice(FAMILY), age, male, registry_pb2.RELATIONSHIP_HEAD)
    members = [*parents, *_children(rng, parents, registry_pb2.RELATIONSHIP_CHILD)]
    if renter:
        return members
    if age >= THREE_GENERATIONS_FROM and rng.random() < THREE_GENERATIONS:
        members += _married_son(rng, parents)
    return members + _head_parent(rng, parents[0])


def _born(rng: random.Random, today: date, age: int) -> date:
    """A birthday that makes the person `age` today."""
    anniversary = date(today.year - age, today.month, min(today.day, 28))
    return anniversary - timedelta(days=rng.randint(0, 364))


def _citizen_id(born: date, male: bool, serial: int) -> str:
    century_sex = 2 * ((born.year - 1900) // 100) + (0 if male else 1)
    return f"048{century_sex}{born.year % 100:02d}{serial:06d}"


def _place(rng: random.Random, group: PilotGroup) -> tuple[types_pb2.GeoPoint, str]:
    """A household's point and the address it has there."""
    east, north = (rng.uniform(-within, within) for within in HOMES_WITHIN_M)
    lon, lat = group.frame.degrees((east, north))
    point = types_pb2.GeoPoint(latitude=round(lat, 6), longitude=round(lon, 6))
    if group.urban:
        return point, town_address(east, north, group.streets)
    return point, village_address(east, group)


def pilot_rows(today: date, seed: int = 2025) -> Iterator[registry_pb2.ImportRow]:
    """Every person of every pilot household as an import row."""
    rng = random.Random(seed)
    row = 0
    for number, group in enumerate(PILOT):
        for index in range(group.households):
            ref = f"{group.group[0].upper()}-{index + 1:04d}"
            renter = group.urban and rng.random() < RENTERS
            location, address = _place(rng, group)
            housing = registry_pb2.Housing(
                floor_area_m2=round(rng.uniform(30, 180), 1),
                storeys=rng.randint(1, 4) if group.urban else 1,
                sub_households=1 + (rng.random() < 0.1),
            )
            kind = (
                registry_pb2.RESIDENCE_KIND_RENTER
                if renter
                else registry_pb2.RESIDENCE_KIND_PERMANENT
            )
            for member in household(rng, renter):
                row += 1
                born = _born(rng, today, member.age)
                occupation, education = occupation_and_education(
                    rng, member.age, male=member.male, urban=group.urban
                )
                yield registry_pb2.ImportRow(
                    row_number=row,
                    unit_id=group.unit_id,
                    household_ref=ref,
                    address=address,
                    housing=housing,
                    residence_kind=kind,
                    location=location,
                    person=registry_pb2.PersonDetails(
                        full_name=member.name,
                        birth_date=born.isoformat(),
                        sex=registry_pb2.SEX_MALE if member.male else registry_pb2.SEX_FEMALE,
                        # A citizen's card from 14 (younger ones rarely have one yet).
                        citizen_id=_citizen_id(born, member.male, number * 100_000 + row)
                        if age_on(born, today) >= 14
                        else "",
                        relationship=member.relationship,
                        education=education,
                        occupation=occupation,
                    ),
                )
