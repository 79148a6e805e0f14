"""What a generated person does and has studied, by age and place (no real person's data).

One set of rules for the pilot's demo data and the synthetic city: nobody under school age has an
occupation or schooling, pupils attend the school of their age, people of working age do what a
town or a village offers them with the schooling their generation had, and most people past
sixty have stopped working.
"""

from __future__ import annotations

import random
from datetime import date
from typing import TypeAlias

from civic.registry.v1 import registry_pb2

Level: TypeAlias = registry_pb2.EducationLevel.ValueType
# Ages in bands (first, last, weight), as the heads of households are drawn.
Bands: TypeAlias = tuple[tuple[int, int, int], ...]

SCHOOL_AGE = 6
ADULT_AGE = 18
PUPIL = "học sinh"
STUDENT = "sinh viên"
RETIRED = "nghỉ hưu"
AT_HOME = "ở nhà"
HOMEMAKER = "nội trợ"
FARMER = "nông dân"

NONE = registry_pb2.EDUCATION_LEVEL_NONE
PRIMARY = registry_pb2.EDUCATION_LEVEL_PRIMARY
LOWER = registry_pb2.EDUCATION_LEVEL_LOWER_SECONDARY
UPPER = registry_pb2.EDUCATION_LEVEL_UPPER_SECONDARY
VOCATIONAL = registry_pb2.EDUCATION_LEVEL_VOCATIONAL
COLLEGE = registry_pb2.EDUCATION_LEVEL_COLLEGE
UNIVERSITY = registry_pb2.EDUCATION_LEVEL_UNIVERSITY
POSTGRADUATE = registry_pb2.EDUCATION_LEVEL_POSTGRADUATE
LEVELS = (NONE, PRIMARY, LOWER, UPPER, VOCATIONAL, COLLEGE, UNIVERSITY, POSTGRADUATE)

# The school a pupil attends from each age: primary from 6, lower secondary 11, upper 15.
SCHOOLS = ((15, UPPER), (11, LOWER), (SCHOOL_AGE, PRIMARY))

# An adult's schooling, weighted over LEVELS, by place and from which age: the older
# generations went to school for fewer years, villages more so.
ADULT_LEVELS: dict[bool, tuple[tuple[int, tuple[int, ...]], ...]] = {
    True: (
        (60, (3, 20, 30, 28, 5, 4, 10, 0)),
        (40, (0, 4, 16, 40, 10, 10, 18, 2)),
        (ADULT_AGE, (0, 1, 4, 38, 10, 14, 30, 3)),
    ),
    False: (
        (60, (10, 42, 33, 12, 1, 1, 1, 0)),
        (40, (1, 12, 42, 33, 6, 3, 3, 0)),
        (ADULT_AGE, (0, 2, 20, 45, 13, 10, 10, 0)),
    ),
}

# Work: (occupation, least schooling it asks, weight in town, weight in a village).
WORK: tuple[tuple[str, Level, int, int], ...] = (
    ("buôn bán", NONE, 14, 8),
    ("lao động tự do", NONE, 6, 10),
    ("thợ xây", NONE, 2, 10),
    (HOMEMAKER, NONE, 5, 6),
    (FARMER, NONE, 0, 30),
    ("công nhân", PRIMARY, 9, 18),
    ("lái xe", PRIMARY, 5, 4),
    ("thợ may", PRIMARY, 3, 4),
    ("kinh doanh", LOWER, 6, 2),
    ("nhân viên khách sạn", UPPER, 6, 2),
    ("thợ điện", VOCATIONAL, 3, 2),
    ("nhân viên văn phòng", COLLEGE, 12, 2),
    ("giáo viên", COLLEGE, 4, 2),
    ("kế toán", COLLEGE, 4, 1),
    ("y tá", COLLEGE, 2, 1),
    ("công chức", UNIVERSITY, 5, 1),
    ("kỹ sư", UNIVERSITY, 4, 1),
    ("bác sĩ", UNIVERSITY, 1, 0),
)

# How many have stopped working from each age, once of pension age (55 for women, 60 for men):
# in town most draw a pension; in a village many work the fields into their sixties.
STOPPED: dict[bool, tuple[tuple[int, float], ...]] = {
    True: ((75, 1.0), (70, 0.95), (65, 0.85), (60, 0.7), (55, 0.35)),
    False: ((75, 1.0), (70, 0.85), (65, 0.6), (60, 0.35), (55, 0.1)),
}
# Of those who stopped, the share with a pension (the rest are at home).
PENSIONED = {True: 0.8, False: 0.3}
# Of the 18 to 22-year-olds, the share at college or university.
STUDYING = {True: 0.5, False: 0.3}


def age_on(born: date, on: date) -> int:
    """Age in whole years on the day `on`."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def age_in_bands(rng: random.Random, bands: Bands) -> int:
    """An age from one of the bands, chosen by their weights."""
    first, last, _ = rng.choices(bands, [weight for *_, weight in bands])[0]
    return rng.randint(first, last)


def occupation_and_education(
    rng: random.Random, age: int, *, male: bool, urban: bool
) -> tuple[str, Level]:
    """What a person of this age does, in a town or a village, and their schooling: the level
    they attend while at school, else the highest they finished. No occupation under 6."""
    if age < SCHOOL_AGE:
        return "", NONE
    if age < ADULT_AGE:
        return PUPIL, next(level for start, level in SCHOOLS if age >= start)
    if age < 23 and rng.random() < STUDYING[urban]:
        return STUDENT, UPPER
    level = _adult_level(rng, age, urban)
    if _stopped(rng, age, male, urban):
        return (RETIRED if rng.random() < PENSIONED[urban] else AT_HOME), level
    return _work(rng, level, male, urban), level


def _adult_level(rng: random.Random, age: int, urban: bool) -> Level:
    weights = next(w for start, w in ADULT_LEVELS[urban] if age >= start)
    return rng.choices(LEVELS, weights)[0]


def _stopped(rng: random.Random, age: int, male: bool, urban: bool) -> bool:
    if age < (60 if male else 55):
        return False
    share = next(share for start, share in STOPPED[urban] if age >= start)
    return rng.random() < share


def _work(rng: random.Random, level: Level, male: bool, urban: bool) -> str:
    """Work open to this schooling, weighted by how common it is in town or village (keeping
    house, as a main occupation, is a woman's in the registers)."""
    fitting = [
        (name, town if urban else village)
        for name, least, town, village in WORK
        if least <= level and not (male and name == HOMEMAKER)
    ]
    return rng.choices([name for name, _ in fitting], [weight for _, weight in fitting])[0]
