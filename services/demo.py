"""Generated demo data for the four pilot units of Đà Nẵng (no real person's data).

Deterministic: the same seed gives the same households, so loading twice changes nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2

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

    @property
    def unit_id(self) -> str:
        return ".".join((CITY[0], self.district[0], self.ward[0], self.group[0]))


PILOT = (
    PilotGroup(
        ("hc", "Quận Hải Châu"),
        ("hc1", "Phường Hải Châu 1"),
        ("t17", "Tổ dân phố 17"),
        (16.0747, 108.2230),
        260,
        True,
    ),
    PilotGroup(
        ("tk", "Quận Thanh Khê"),
        ("tg", "Phường Thạc Gián"),
        ("t51", "Tổ dân phố 51"),
        (16.0641, 108.2052),
        240,
        True,
    ),
    PilotGroup(
        ("hv", "Huyện Hòa Vang"),
        ("hp", "Xã Hòa Phước"),
        ("tra-kiem", "Thôn Trà Kiểm"),
        (15.9718, 108.2117),
        320,
        False,
    ),
    PilotGroup(
        ("hv", "Huyện Hòa Vang"),
        ("hb", "Xã Hòa Bắc"),
        ("loc-my", "Thôn Lộc Mỹ"),
        (16.1152, 107.9903),
        180,
        False,
    ),
)

FAMILY = (
    "Nguyễn Trần Lê Phạm Hoàng Huỳnh Phan Vũ Võ Đặng Bùi Đỗ Hồ Ngô Dương Lý Trương Đoàn".split()
)
MIDDLE_MALE = "Văn Hữu Đức Minh Quốc Công Thanh Xuân".split()
MIDDLE_FEMALE = "Thị Ngọc Thu Thanh Mỹ Kim Hồng Diệu".split()
GIVEN_MALE = "An Bình Cường Dũng Hải Hùng Khang Long Nam Phúc Quang Sơn Tài Tuấn Việt".split()
GIVEN_FEMALE = "Anh Bích Chi Dung Hà Hoa Hương Lan Linh Mai Ngân Nhung Thảo Trang Yến".split()
STREETS_URBAN = "Trần Phú|Bạch Đằng|Lê Duẩn|Hải Phòng|Hà Huy Tập|Thái Thị Bôi".split("|")
OCCUPATIONS = (
    "công nhân|buôn bán|giáo viên|nông dân|lái xe|thợ may|nhân viên văn phòng|hưu trí".split("|")
)


def _name(rng: random.Random, family: str, male: bool) -> str:
    middle = rng.choice(MIDDLE_MALE if male else MIDDLE_FEMALE)
    given = rng.choice(GIVEN_MALE if male else GIVEN_FEMALE)
    return f"{family} {middle} {given}"


def _birth(rng: random.Random, today: date, min_age: int, max_age: int) -> date:
    return date(today.year - rng.randint(min_age, max_age), rng.randint(1, 12), rng.randint(1, 28))


def _citizen_id(born: date, male: bool, serial: int) -> str:
    century_sex = 2 * ((born.year - 1900) // 100) + (0 if male else 1)
    return f"048{century_sex}{born.year % 100:02d}{serial:06d}"


def pilot_rows(today: date, seed: int = 2025) -> Iterator[registry_pb2.ImportRow]:
    """Every person of every pilot household as an import row."""
    rng = random.Random(seed)
    row = 0
    for number, group in enumerate(PILOT):
        for index in range(group.households):
            ref = f"{group.group[0].upper()}-{index + 1:04d}"
            renter = group.urban and rng.random() < 0.15
            if group.urban:
                address = f"{rng.randint(1, 300)} {rng.choice(STREETS_URBAN)}"
            else:
                address = f"Tổ {rng.randint(1, 6)}, {group.group[1]}"
            lat, lon = group.centre
            location = types_pb2.GeoPoint(
                latitude=round(lat + rng.uniform(-0.003, 0.003), 6),
                longitude=round(lon + rng.uniform(-0.003, 0.003), 6),
            )
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
            family = rng.choice(FAMILY)
            members: list[tuple[str, date, bool, registry_pb2.Relationship.ValueType]] = []
            head_male = rng.random() < 0.7
            members.append(
                (
                    _name(rng, family, head_male),
                    _birth(rng, today, 28, 85),
                    head_male,
                    registry_pb2.RELATIONSHIP_HEAD,
                )
            )
            if rng.random() < 0.8:
                members.append(
                    (
                        _name(rng, rng.choice(FAMILY), not head_male),
                        _birth(rng, today, 25, 80),
                        not head_male,
                        registry_pb2.RELATIONSHIP_SPOUSE,
                    )
                )
            for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
                male = rng.random() < 0.5
                members.append(
                    (
                        _name(rng, family, male),
                        _birth(rng, today, 0, 30),
                        male,
                        registry_pb2.RELATIONSHIP_CHILD,
                    )
                )
            if rng.random() < 0.15:
                male = rng.random() < 0.4
                members.append(
                    (
                        _name(rng, family, male),
                        _birth(rng, today, 70, 95),
                        male,
                        registry_pb2.RELATIONSHIP_PARENT,
                    )
                )
            for name, born, male, relationship in members:
                row += 1
                age = today.year - born.year
                yield registry_pb2.ImportRow(
                    row_number=row,
                    unit_id=group.unit_id,
                    household_ref=ref,
                    address=address,
                    housing=housing,
                    residence_kind=kind,
                    location=location,
                    person=registry_pb2.PersonDetails(
                        full_name=name,
                        birth_date=born.isoformat(),
                        sex=registry_pb2.SEX_MALE if male else registry_pb2.SEX_FEMALE,
                        citizen_id=_citizen_id(born, male, number * 100_000 + row)
                        if age >= 14
                        else "",
                        relationship=relationship,
                        education=registry_pb2.EDUCATION_LEVEL_UPPER_SECONDARY
                        if age >= 18
                        else registry_pb2.EDUCATION_LEVEL_PRIMARY,
                        occupation=rng.choice(OCCUPATIONS) if age >= 18 else "học sinh",
                    ),
                )
