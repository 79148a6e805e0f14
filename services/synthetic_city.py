"""A synthetic city for load tests: districts, wards, residential groups, households and their
Vietnamese families, as onboarding records (no real person's data).

By default the size of Đà Nẵng: 1,200,000 residents in about 350,000 households, 7 districts,
50 wards and 1,000 groups. A smaller city keeps the proportions (residents per household) and
the unit tree. Deterministic: the same seed gives the same city, whatever day it is made (ages
are counted on a reference day, fixed unless given). Rows are made one group at a
time (each group has a random generator of its own, and the serials before it are computed, not
counted), so any ward can be generated on its own and the whole city is never held in memory.

Records have the columns of an import file (services/registry/csv_rows.py): `write_csv` writes
them for `civic import-csv`, `csv_rows.import_row` makes ImportRow messages of them.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cached_property
from pathlib import Path

from civic.registry.v1 import registry_pb2

from services.demo import CITY, HEAD_AGES
from services.population import age_in_bands, age_on, occupation_and_education
from services.registry import csv_rows, domain

DEFAULT_RESIDENTS = 1_200_000
DEFAULT_GROUPS = 1_000
# Residents per household (1,200,000 in about 350,000).
HOUSEHOLDS_PER_RESIDENT = 350_000 / 1_200_000
MOST_IN_HOUSEHOLD = 9

# ---- names -------------------------------------------------------------------------------------

FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi"]
FAMILY += ["Đỗ", "Hồ", "Ngô", "Dương", "Lý", "Trương", "Đinh", "Lương", "Mai"]
MIDDLE = {"male": ["Văn", "Hữu", "Đức", "Minh", "Quốc", "Công"], "female": ["Thị", "Ngọc", "Thu"]}
MIDDLE["female"] += ["Thanh", "Kim", "Mỹ"]
GIVEN = {
    "male": ["An", "Bình", "Cường", "Dũng", "Hùng", "Tuấn", "Khoa", "Long", "Phúc", "Quang"],
    "female": ["Hoa", "Lan", "Mai", "Hương", "Linh", "Trang", "Thảo", "Ngân", "Yến", "Vy"],
}
GIVEN["male"] += ["Sơn", "Thắng", "Trung", "Vinh", "Khôi", "Nam", "Hải", "Đạt", "Bảo", "Tài"]
GIVEN["female"] += ["Nhung", "Hằng", "Phượng", "Loan", "Oanh", "Tâm", "Hạnh", "Nga", "Ly"]
STREETS = ["Trần Phú", "Lê Duẩn", "Hùng Vương", "Bạch Đằng", "Phan Châu Trinh", "Hoàng Diệu"]
STREETS += ["Ông Ích Khiêm", "Nguyễn Văn Linh", "Lê Lợi", "Quang Trung"]
EDUCATION_WORDS = {level: word for word, level in csv_rows.EDUCATION_LEVELS.items()}
PROVINCES = sorted(domain.PROVINCE_CODES)
# The day ages are counted on unless another is given: fixed, so a seed always gives one city.
REFERENCE_DAY = date(2025, 6, 1)
OLDEST = 100  # nobody is born earlier than this many years before the reference day
OTHER_SEX = {"male": "female", "female": "male"}
CONTACT_FROM = 15  # a phone (and perhaps an email) of one's own from upper secondary school

# ---- the unit tree -----------------------------------------------------------------------------


@dataclass(frozen=True)
class District:
    code: str
    name: str
    centre: tuple[float, float]  # latitude, longitude
    # Wards (phường) in the urban districts, communes (xã) in the rural one.
    wards: Sequence[str]
    urban: bool = True
    # Centres of the wards that lie far from the district's centre (latitude, longitude).
    places: Mapping[str, tuple[float, float]] = field(default_factory=dict)


# Đà Nẵng's districts with 50 of their wards and communes.
DISTRICTS = (
    District(
        "hc",
        "Quận Hải Châu",
        (16.060, 108.220),
        (
            "Hải Châu 1|Hải Châu 2|Thạch Thang|Thanh Bình|Thuận Phước|Hòa Thuận Tây|Hòa Thuận Đông|"
            "Nam Dương|Phước Ninh|Bình Thuận|Bình Hiên|Hòa Cường Bắc|Hòa Cường Nam"
        ).split("|"),
    ),
    District(
        "tk",
        "Quận Thanh Khê",
        (16.065, 108.190),
        (
            "Tam Thuận|Thanh Khê Tây|Thanh Khê Đông|Xuân Hà|Tân Chính|Chính Gián|Vĩnh Trung|"
            "Thạc Gián|An Khê|Hòa Khê"
        ).split("|"),
    ),
    District(
        "st",
        "Quận Sơn Trà",
        (16.085, 108.240),
        "Thọ Quang|Nại Hiên Đông|Mân Thái|An Hải Bắc|Phước Mỹ|An Hải Tây|An Hải Đông".split("|"),
    ),
    District("nhs", "Quận Ngũ Hành Sơn", (16.010, 108.250), ("Mỹ An", "Khuê Mỹ", "Hòa Quý")),
    District(
        "lc",
        "Quận Liên Chiểu",
        (16.075, 108.150),
        ("Hòa Hiệp Bắc", "Hòa Hiệp Nam", "Hòa Khánh Bắc", "Hòa Khánh Nam", "Hòa Minh"),
    ),
    District(
        "cl",
        "Quận Cẩm Lệ",
        (16.015, 108.200),
        ("Khuê Trung", "Hòa Phát", "Hòa An", "Hòa Thọ Tây", "Hòa Thọ Đông", "Hòa Xuân"),
    ),
    District(
        "hv",
        "Huyện Hòa Vang",
        (16.000, 108.110),
        ("Hòa Phước", "Hòa Châu", "Hòa Tiến", "Hòa Nhơn", "Hòa Sơn", "Hòa Bắc"),
        urban=False,
        # A rural district of 700 km²: its communes lie kilometres apart, Hòa Bắc in the
        # mountains to the north-west.
        places={
            "Hòa Phước": (15.972, 108.212),
            "Hòa Châu": (15.995, 108.195),
            "Hòa Tiến": (15.965, 108.160),
            "Hòa Nhơn": (15.990, 108.110),
            "Hòa Sơn": (16.050, 108.090),
            "Hòa Bắc": (16.115, 107.990),
        },
    ),
)


@dataclass(frozen=True)
class Unit:
    """A unit as CreateUnit makes it."""

    parent_id: str
    code: str
    name: str
    kind: registry_pb2.UnitKind.ValueType

    @property
    def unit_id(self) -> str:
        return f"{self.parent_id}.{self.code}" if self.parent_id else self.code


@dataclass(frozen=True)
class Group:
    """A residential group and its share of the city: households and residents numbered from
    `first_household` and `first_resident` across the city."""

    unit: Unit
    ward_id: str
    centre: tuple[float, float]
    households: int
    residents: int
    first_household: int
    first_resident: int
    urban: bool = True

    @property
    def unit_id(self) -> str:
        return self.unit.unit_id


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` whole shares that differ by at most one, the larger ones
    spread evenly (a small city still has households in every ward)."""
    return [(index + 1) * total // parts - index * total // parts for index in range(parts)]


class SyntheticCity:
    def __init__(
        self,
        residents: int = DEFAULT_RESIDENTS,
        *,
        groups: int = DEFAULT_GROUPS,
        households: int | None = None,
        seed: int = 1,
        on: date = REFERENCE_DAY,
    ) -> None:
        self.residents = residents
        self.on = on
        self.households = households or max(1, round(residents * HOUSEHOLDS_PER_RESIDENT))
        self.group_count = groups
        self.seed = seed
        if not 0 < self.households <= residents <= MOST_IN_HOUSEHOLD * self.households:
            raise ValueError(f"need households <= residents <= {MOST_IN_HOUSEHOLD} x households")
        if groups < len(self.wards):
            raise ValueError(f"need at least one group in each of the {len(self.wards)} wards")

    @cached_property
    def city(self) -> Unit:
        return Unit("", CITY[0], CITY[1], registry_pb2.UNIT_KIND_CITY)

    @cached_property
    def districts(self) -> list[Unit]:
        return [
            Unit(self.city.unit_id, d.code, d.name, registry_pb2.UNIT_KIND_DISTRICT)
            for d in DISTRICTS
        ]

    @cached_property
    def _ward_places(self) -> list[tuple[Unit, District, tuple[float, float]]]:
        """Each ward, its district and where it lies (its own place, else the district's)."""
        return [
            (
                Unit(
                    f"{CITY[0]}.{district.code}",
                    "-".join(domain.fold(name).split()),
                    f"{'Phường' if district.urban else 'Xã'} {name}",
                    registry_pb2.UNIT_KIND_WARD,
                ),
                district,
                district.places.get(name, district.centre),
            )
            for district in DISTRICTS
            for name in district.wards
        ]

    @cached_property
    def wards(self) -> list[Unit]:
        return [ward for ward, _, _ in self._ward_places]

    @cached_property
    def groups(self) -> list[Group]:
        """The wards' groups: groups shared out evenly among the wards, households evenly among
        the groups, residents in proportion to the households."""
        rng = random.Random(f"{self.seed}:places")
        households = shares(self.households, self.group_count)
        found: list[Group] = []
        before, number = 0, 0
        for (ward, district, place), count in zip(
            self._ward_places, shares(self.group_count, len(self.wards)), strict=True
        ):
            ward_centre = near(rng, place, 0.015)
            for index in range(1, count + 1):
                homes = households[number]
                first, after = before * self.residents, (before + homes) * self.residents
                first_resident = first // self.households
                found.append(
                    Group(
                        unit=Unit(
                            ward.unit_id,
                            f"t{index}",
                            f"{'Tổ dân phố' if district.urban else 'Thôn'} {index}",
                            registry_pb2.UNIT_KIND_GROUP,
                        ),
                        ward_id=ward.unit_id,
                        centre=near(rng, ward_centre, 0.004),
                        households=homes,
                        residents=after // self.households - first_resident,
                        first_household=before,
                        first_resident=first_resident,
                        urban=district.urban,
                    )
                )
                before += homes
                number += 1
        return found

    def units(self) -> Iterator[Unit]:
        """Every unit, parents before their children."""
        yield self.city
        yield from self.districts
        yield from self.wards
        yield from (group.unit for group in self.groups)

    def records(self, groups: Iterable[Group] | None = None) -> Iterator[dict[str, str]]:
        """The import records of these groups' households (every group's by default)."""
        for group in self.groups if groups is None else groups:
            yield from self.group_records(group)

    def ward_records(self, ward_id: str) -> Iterator[dict[str, str]]:
        return self.records(group for group in self.groups if group.ward_id == ward_id)

    def group_records(self, group: Group) -> Iterator[dict[str, str]]:
        rng = random.Random(f"{self.seed}:{group.unit_id}")
        serial = group.first_resident
        sizes = household_sizes(rng, group.households, group.residents) if group.households else []
        for number, size in enumerate(sizes, start=group.first_household):
            home = household_record(
                rng, group.unit_id, f"HK{self.seed}-{number:07d}", urban=group.urban
            )
            home |= located(rng, group.centre, (0.0015, 0.0015))
            yield from family(rng, home, size, serial, on=self.on, urban=group.urban)
            serial += size


def near(rng: random.Random, centre: tuple[float, float], spread: float) -> tuple[float, float]:
    return centre[0] + rng.uniform(-spread, spread), centre[1] + rng.uniform(-spread, spread)


# ---- households and persons ------------------------------------------------------------------


def household_sizes(rng: random.Random, households: int, persons: int) -> list[int]:
    """`persons` spread over `households`: each has a head, the rest land at random (at most 9)."""
    if not 0 < households <= persons <= MOST_IN_HOUSEHOLD * households:
        raise ValueError(f"need households <= persons <= {MOST_IN_HOUSEHOLD} x households")
    sizes = [1] * households
    for _ in range(persons - households):
        home = rng.randrange(households)
        while sizes[home] == MOST_IN_HOUSEHOLD:
            home = rng.randrange(households)
        sizes[home] += 1
    return sizes


# Where households are when no group places them: central Đà Nẵng.
CENTRAL = (16.06, 108.215)
CENTRAL_SPREAD = (0.03, 0.025)


def synthetic_records(
    groups: Sequence[str],
    households: int,
    persons: int,
    *,
    seed: int,
    first_serial: int = 0,
    on: date = REFERENCE_DAY,
) -> Iterator[dict[str, str]]:
    """Records of households of Vietnamese families in central Đà Nẵng, dealt out to `groups`
    in turn, with valid citizen IDs unique by serial from `first_serial`."""
    rng = random.Random(seed)
    serial = first_serial
    for number, size in enumerate(household_sizes(rng, households, persons)):
        home = household_record(rng, groups[number % len(groups)], f"HK{seed}-{number:07d}")
        home |= located(rng, CENTRAL, CENTRAL_SPREAD)
        yield from family(rng, home, size, serial, on=on, urban=True)
        serial += size


def family(
    rng: random.Random,
    home: dict[str, str],
    size: int,
    first_serial: int,
    *,
    on: date = REFERENCE_DAY,
    urban: bool = True,
) -> Iterator[dict[str, str]]:
    """The household's `size` members, head first, each a record with the household's cells,
    with the occupation and schooling of their age and place on the day `on`."""
    # Heads of every age, as the pilot's owners: most of working age, a few over 70.
    head_year, head_sex = on.year - age_in_bands(rng, HEAD_AGES), rng.choice(("male", "female"))
    surnames = {"head": rng.choice(FAMILY)}  # by relationship; the children's is the father's
    couple = [head_year]  # birth years of the head and the spouse
    for member in range(size):
        serial = first_serial + member
        relationship, year = member_of(rng, member, couple, on.year)
        if relationship == "spouse":
            couple.append(year)
        sex = {"head": head_sex, "spouse": OTHER_SEX[head_sex]}.get(relationship)
        sex = sex or rng.choice(("male", "female"))
        surname = family_name(rng, relationship, sex, surnames)
        born = date(year, rng.randint(1, 12), rng.randint(1, 28))
        age = age_on(born, on)
        occupation, education = occupation_and_education(rng, age, male=sex == "male", urban=urban)
        # Children under 14 rarely have a card yet: those rows are matched by name and birth.
        cid = citizen_id(serial, born.isoformat(), sex) if age >= 14 else ""
        reachable = age >= CONTACT_FROM
        yield home | {
            "full_name": f"{surname} {rng.choice(MIDDLE[sex])} {rng.choice(GIVEN[sex])}",
            "birth_date": born.isoformat(),
            "sex": sex,
            "citizen_id": cid,
            "relationship": relationship,
            "education": EDUCATION_WORDS[education],
            "occupation": occupation,
            "phone": f"09{rng.randrange(10**8):08d}" if reachable else "",
            "email": f"nguoidan{serial + 1}@example.vn" if reachable and rng.random() < 0.2 else "",
        }


def family_name(rng: random.Random, relationship: str, sex: str, surnames: dict[str, str]) -> str:
    """A member's family name: a spouse, or a mother of the head, keeps their own family's; a
    child or grandchild carries the father's (the head's, or a woman head's husband's); anyone
    else the head's."""
    head = surnames["head"]
    if relationship == "spouse" or (relationship == "parent" and sex == "female"):
        own = rng.choice(FAMILY)
        if relationship == "spouse" and sex == "male":
            surnames["child"] = own
        return own
    if relationship in ("child", "grandchild"):
        return surnames.get("child", head)
    return head


def household_record(
    rng: random.Random, group: str, ref: str, *, urban: bool = True
) -> dict[str, str]:
    """A household's cells: in town a house in an alley off a street, renters among them; in a
    village a house in one of the thôn's tổ."""
    street = f"{rng.randint(1, 300)} Kiệt {rng.randint(1, 120)} {rng.choice(STREETS)}"
    kinds = rng.choices(("permanent", "temporary", "renter"), (85, 5, 10))[0]
    return {
        "unit_id": group,
        "household_ref": ref,
        "address": street if urban else f"Tổ {rng.randint(1, 6)}",
        "floor_area_m2": f"{rng.uniform(25, 250):.1f}",
        "storeys": str(rng.randint(1, 5) if urban else rng.randint(1, 2)),
        "sub_households": str(rng.choice((0, 0, 1, 1, 2))),
        "residence_kind": kinds if urban or kinds != "renter" else "permanent",
    }


def located(
    rng: random.Random, centre: tuple[float, float], spread: tuple[float, float]
) -> dict[str, str]:
    return {
        "latitude": f"{centre[0] + rng.uniform(-spread[0], spread[0]):.5f}",
        "longitude": f"{centre[1] + rng.uniform(-spread[1], spread[1]):.5f}",
    }


# A member's birth year less the head's, by relationship (a child's less the younger of the
# couple's: a mother is 20 at the youngest).
OFFSETS = {"child": (20, 40), "parent": (-35, -18), "grandchild": (42, 60)}
RELATIVE = (-15, 15)


def member_of(rng: random.Random, member: int, couple: list[int], year: int) -> tuple[str, int]:
    """(relationship, birth year) of the household's member-th person, counted in `year`, given
    the birth years of the head and (once there) the spouse: born before it and at most OLDEST
    years earlier (a head too young for grandchildren or too old for a living parent has
    another relative instead)."""
    head_year = couple[0]
    if member == 0:
        return "head", head_year
    if member == 1:
        # A few years apart, and grown up: born at least 19 years before, so 18 on the day.
        return "spouse", max(year - OLDEST, min(year - 19, head_year + rng.randint(-6, 6)))
    kind = rng.choices(("child", "parent", "grandchild", "other_relative"), (70, 10, 15, 5))[0]
    low, high = _born_within(kind, max(couple) if kind == "child" else head_year, year)
    if low > high:
        kind, (low, high) = "other_relative", _born_within("other_relative", head_year, year)
    return kind, rng.randint(low, high)


def _born_within(kind: str, counted_from: int, year: int) -> tuple[int, int]:
    """The first and last birth year for a member of this kind, born before `year` and at most
    OLDEST years earlier."""
    low, high = OFFSETS.get(kind, RELATIVE)
    return max(counted_from + low, year - OLDEST), min(counted_from + high, year - 1)


def citizen_id(serial: int, born: str, sex: str) -> str:
    """Province, century-and-sex digit, birth year, six-digit serial: unique per serial."""
    year = int(born[:4])
    century_sex = 2 * ((year - 1900) // 100) + (1 if sex == "female" else 0)
    province = PROVINCES[serial // 1_000_000 % len(PROVINCES)]
    return f"{province}{century_sex}{year % 100:02d}{serial % 1_000_000:06d}"


def write_csv(path: Path, records: Iterable[dict[str, str]]) -> int:
    """The records as an import file; returns how many were written."""
    count = 0
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=csv_rows.COLUMNS)
        writer.writeheader()
        for record in records:
            writer.writerow(record)
            count += 1
    return count
