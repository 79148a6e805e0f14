"""The synthetic city has the size asked for, in the proportions of the full city, the same for
the same seed whatever day it is made, with people whose ages, occupations and places are
plausible, and every record is one the registry's import reads; `civic city` writes it as
import files."""

from __future__ import annotations

import datetime
import errno
import importlib
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from civic.registry.v1 import registry_pb2

from infra.local import REPO_ROOT, free_port
from services import cli, synthetic_city
from services.gis.geometry import distance_m
from services.population import age_on
from services.registry import csv_rows
from services.synthetic_city import SyntheticCity


def test_the_default_city_is_the_size_of_da_nang() -> None:
    city = SyntheticCity()
    kinds = Counter(unit.kind for unit in city.units())
    assert kinds[registry_pb2.UNIT_KIND_CITY] == 1
    assert kinds[registry_pb2.UNIT_KIND_WARD] == 50
    assert kinds[registry_pb2.UNIT_KIND_GROUP] == 1_000
    assert city.households == 350_000
    assert sum(group.households for group in city.groups) == 350_000
    assert sum(group.residents for group in city.groups) == 1_200_000
    # Every ward has its share of the groups, and every group about the same households.
    per_ward = Counter(group.ward_id for group in city.groups)
    assert set(per_ward.values()) == {20}
    assert {group.households for group in city.groups} == {350}


def test_a_smaller_city_keeps_the_proportions_and_the_tree() -> None:
    city = SyntheticCity(24_000)
    records = list(city.records())
    households = Counter((r["unit_id"], r["household_ref"]) for r in records)
    assert len(records) == 24_000
    assert len(households) == 7_000  # 350,000 : 1,200,000
    assert all(1 <= size <= 9 for size in households.values())
    assert {unit_id for unit_id, _ in households} == {group.unit_id for group in city.groups}
    assert len(city.wards) == 50


def test_units_come_parents_first_with_unique_ids() -> None:
    seen: set[str] = set()
    for unit in SyntheticCity(2_000).units():
        assert unit.parent_id == "" or unit.parent_id in seen
        assert unit.unit_id not in seen
        seen.add(unit.unit_id)


def test_the_same_seed_gives_the_same_city_and_another_seed_another() -> None:
    first = list(SyntheticCity(3_000, seed=4).records())
    assert first == list(SyntheticCity(3_000, seed=4).records())
    assert first != list(SyntheticCity(3_000, seed=5).records())


def test_the_same_seed_gives_the_same_city_whatever_day_it_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made_now = list(SyntheticCity(2_000, seed=3).records())

    class YearsLater(datetime.date):
        @classmethod
        def today(cls) -> YearsLater:
            return cls(2031, 3, 1)

    monkeypatch.setattr(datetime, "date", YearsLater)
    try:
        later = importlib.reload(synthetic_city)
        assert list(later.SyntheticCity(2_000, seed=3).records()) == made_now
    finally:
        monkeypatch.undo()
        importlib.reload(synthetic_city)


def test_members_ages_occupations_and_schooling_are_plausible() -> None:
    """Children a generation younger than the head, nobody under 6 with an occupation or
    schooling, pupils at school, no farmer in town, and in town alone renters."""
    records = list(SyntheticCity(6_000, seed=2).records())
    heads: dict[str, int] = {}
    members: dict[str, list[dict[str, str]]] = defaultdict(list)
    for record in records:
        if record["relationship"] == "head":
            heads[record["household_ref"]] = int(record["birth_date"][:4])
        members[record["household_ref"]].append(record)
    for ref, found in members.items():
        for record in found:
            year = int(record["birth_date"][:4])
            age = 2025 - year  # within a year of the age on the city's reference day
            if record["relationship"] == "child":
                assert year >= heads[ref] + 16
            if record["relationship"] == "parent":
                assert year <= heads[ref] - 15
            if age < 5:
                assert (record["occupation"], record["education"]) == ("", "none")
            if 7 <= age <= 16:
                assert record["occupation"] == "học sinh"
            if not record["unit_id"].startswith("dn.hv."):  # the one rural district
                assert record["occupation"] != "nông dân"
            else:
                assert record["residence_kind"] != "renter"


def test_children_are_a_generation_younger_than_both_parents_and_few_are_over_70() -> None:
    """A mother is not 14 (a child 20 years younger than the head, whose wife is 6 years
    younger than him), spouses are grown up, and about one in fifteen is over 70, in a fifth
    or so of the households, as in the pilot's demo data."""
    city = SyntheticCity(12_000, seed=3)
    households: dict[str, list[dict[str, str]]] = defaultdict(list)
    for record in city.records():
        households[record["household_ref"]].append(record)

    def age(record: dict[str, str]) -> int:
        return age_on(datetime.date.fromisoformat(record["birth_date"]), city.on)

    for members in households.values():
        couple = [r for r in members if r["relationship"] in ("head", "spouse")]
        assert all(age(r) >= 18 for r in couple)
        for child in (r for r in members if r["relationship"] == "child"):
            assert all(age(parent) - age(child) >= 18 for parent in couple), members
    people = [r for members in households.values() for r in members]
    assert 0.04 <= sum(age(r) >= 71 for r in people) / len(people) <= 0.10
    with_elderly = [m for m in households.values() if any(age(r) >= 71 for r in m)]
    assert 0.15 <= len(with_elderly) / len(households) <= 0.30


def test_a_wife_keeps_her_family_name_and_children_carry_their_fathers() -> None:
    """As Vietnamese families are named: spouses of the same family name are the exception."""
    households: dict[str, list[dict[str, str]]] = defaultdict(list)
    for record in SyntheticCity(6_000, seed=5).records():
        households[record["household_ref"]].append(record)
    couples = same_name = 0
    for members in households.values():
        by_kind = defaultdict(list)
        for record in members:
            by_kind[record["relationship"]].append(record)
        [head] = by_kind["head"]
        fathers = [r for r in (head, *by_kind["spouse"]) if r["sex"] == "male"]
        father = (fathers or [head])[0]
        for child in by_kind["child"]:
            assert child["full_name"].split()[0] == father["full_name"].split()[0], members
        for spouse in by_kind["spouse"]:
            couples += 1
            same_name += spouse["full_name"].split()[0] == head["full_name"].split()[0]
    assert couples > 1_000 and same_name / couples < 0.2


def test_children_have_no_phone_or_email_of_their_own() -> None:
    city = SyntheticCity(6_000, seed=6)
    grown = 0
    for record in city.records():
        age = age_on(datetime.date.fromisoformat(record["birth_date"]), city.on)
        if age < 15:
            assert (record["phone"], record["email"]) == ("", ""), record
        else:
            grown += 1
            assert record["phone"].startswith("09")
    assert grown > 3_000


def test_the_rural_communes_lie_kilometres_apart() -> None:
    """Hòa Vang is a rural district of 700 km²: Hòa Bắc lies in the hills north-west, some
    15 km from Hòa Phước in the south."""
    city = SyntheticCity(24_000)

    def where(ward: str) -> tuple[float, float]:
        """(longitude, latitude) of the commune's first thôn."""
        group = next(g for g in city.groups if g.ward_id == f"dn.hv.{ward}")
        return group.centre[1], group.centre[0]

    (bac_lon, bac_lat), (phuoc_lon, phuoc_lat) = where("hoa-bac"), where("hoa-phuoc")
    assert distance_m((bac_lon, bac_lat), (phuoc_lon, phuoc_lat)) > 15_000
    assert bac_lat > phuoc_lat + 0.1 and bac_lon < phuoc_lon - 0.15


def test_a_ward_alone_is_the_same_as_in_the_whole_city() -> None:
    city = SyntheticCity(5_000)
    ward = city.wards[17].unit_id
    alone = list(city.ward_records(ward))
    assert alone
    assert alone == [r for r in city.records() if r["unit_id"].startswith(ward + ".")]


def test_every_record_imports_and_citizen_ids_are_unique() -> None:
    records = list(SyntheticCity(6_000).records())
    rows = [csv_rows.import_row(line, record) for line, record in enumerate(records, 2)]
    ids = [row.person.citizen_id for row in rows if row.person.citizen_id]
    assert len(ids) == len(set(ids)) > len(rows) // 2
    assert sum(row.person.relationship == registry_pb2.RELATIONSHIP_HEAD for row in rows) == 1_750


def test_an_impossible_city_is_refused() -> None:
    with pytest.raises(ValueError, match="households"):
        SyntheticCity(1_000, households=2_000)


def test_a_small_city_still_has_households_in_every_ward() -> None:
    city = SyntheticCity(3_000)
    wards = {record["unit_id"].rsplit(".", 1)[0] for record in city.records()}
    assert wards == {ward.unit_id for ward in city.wards}


def test_civic_city_writes_an_import_file_per_ward(tmp_path: Path) -> None:
    assert cli.main(["city", str(tmp_path), "--residents", "3000", "--seed", "2"]) == 0
    files = sorted(tmp_path.glob("*.csv"))
    assert [path.stem for path in files] == sorted(w.unit_id for w in SyntheticCity(3_000).wards)
    assert sum(csv_rows.count_records(path) for path in files) == 3_000


# A path that is a file, and a path under a file.
UNMAKEABLE = {"a-file": errno.EEXIST, "a-file/wards": errno.ENOTDIR}


@pytest.mark.parametrize("where", list(UNMAKEABLE))
def test_civic_city_into_a_directory_it_cannot_make_is_one_line_and_does_nothing(
    tmp_path: Path, where: str
) -> None:
    """Checked before the units go to the registry: with --token, the error is the
    directory's, not the (unreachable) registry's."""
    (tmp_path / "a-file").write_text("not a directory\n")
    directory = tmp_path / where
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "city", str(directory), "--residents", "200"),
            *("--token", "any", "--target", f"127.0.0.1:{free_port()}"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {directory}: cannot make the directory: {os.strerror(UNMAKEABLE[where])}"
    ]
    assert not done.stdout
