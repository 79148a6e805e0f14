"""Bulk import through the client stream: per-row errors, nothing half-written, safe twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import date, timedelta

import grpc
import pytest
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
from services.registry.importer import STARTED_HEADER
from services.registry.main import RegistryService
from services.registry.store import BOOK_NUMBER_INDEX
from tests.indexes import index_uses, used_since
from tests.registry_fixtures import City, citizen_id, new_household, numbered, person, rid


def row(
    number: int, unit: str, ref: str, name: str, born: str, **details: object
) -> registry_pb2.ImportRow:
    return registry_pb2.ImportRow(
        row_number=number,
        unit_id=unit,
        household_ref=ref,
        address=f"{number} Lê Duẩn",
        residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
        person=person(name, born, **details),  # type: ignore[arg-type]
    )


async def chunks(
    rows: list[registry_pb2.ImportRow], size: int
) -> AsyncIterator[registry_pb2.ImportPersonsRequest]:
    for start in range(0, len(rows), size):
        yield registry_pb2.ImportPersonsRequest(rows=rows[start : start + size])


async def test_import_reports_bad_rows_and_creates_nothing_for_them(
    city: City, registry: RegistryService
) -> None:
    future = (date.today() + timedelta(days=3)).isoformat()
    rows = [
        row(
            1,
            city.group,
            "HK-1",
            "Trần Văn Một",
            "1970-01-01",
            sex=registry_pb2.SEX_MALE,
            relationship=registry_pb2.RELATIONSHIP_HEAD,
            citizen_id=citizen_id("1970-01-01", registry_pb2.SEX_MALE),
        ),
        row(2, city.group, "HK-1", "Lê Thị Hai", "1972-02-02"),
        # The only row of HK-2 fails: HK-2 must not appear as an empty household.
        row(3, city.group, "HK-2", "Người Tương Lai", future),
        row(4, "nowhere.g1", "HK-3", "Ngoài Phạm Vi", "1980-01-01"),
        row(5, city.group, "", "Không Sổ Hộ", "1980-01-01"),
    ]
    households = registry.db["households"]

    first = await city.leader.ImportPersons(chunks(rows, 2))

    assert (first.rows, first.households_created, first.persons_created) == (5, 1, 2)
    assert sorted((e.row_number, e.field) for e in first.errors) == [
        (3, "person.birth_date"),
        (4, "unit_id"),
        (5, "household_ref"),
    ]
    assert await households.count_documents({"unit_id": city.group}) == 1
    [home] = await households.find({"unit_id": city.group}).to_list()
    assert home["external_ref"] == "HK-1" and home["head_person_id"]

    # The same file again, cut into other chunks: nothing new, the good rows are unchanged.
    again = await city.leader.ImportPersons(chunks(rows, 3))
    assert (again.households_created, again.persons_created, again.persons_unchanged) == (0, 0, 2)
    assert len(again.errors) == 3
    assert await households.count_documents({"unit_id": city.group}) == 1


async def test_two_imports_of_one_file_at_once_register_each_person_once(
    city: City, registry: RegistryService
) -> None:
    """Both find nobody registered and write the same persons: one of the two transactions
    wins, the other reports its rows as conflicts to run again, and neither call fails."""
    rows = [
        row(
            n,
            city.group,
            f"HK-C{n // 4}",
            numbered("Người Thứ", n),
            "1990-01-01",
            citizen_id=citizen_id("1990-01-01", registry_pb2.SEX_FEMALE),
        )
        for n in range(1, 201)
    ]
    first, second = await asyncio.gather(
        city.leader.ImportPersons(chunks(rows, 50)), city.leader.ImportPersons(chunks(rows, 50))
    )

    assert first.persons_created + second.persons_created == len(rows)
    for report in (first, second):
        assert report.persons_created + report.persons_unchanged + len(report.errors) == len(rows)
        assert all("concurrent import" in e.message for e in report.errors)
    persons = registry.db["persons"]
    assert await persons.count_documents({"unit_id": city.group}) == len(rows)
    # Run again, as the conflicts ask: nothing new, nothing refused.
    again = await city.leader.ImportPersons(chunks(rows, 50))
    assert (again.persons_created, again.persons_unchanged, len(again.errors)) == (0, len(rows), 0)


async def test_a_second_run_leaves_alone_who_moved_since_the_first(
    city: City, registry: RegistryService
) -> None:
    """Running a file again changes nothing, even for people who moved house since: someone
    without a citizen ID is known by the row that brought them in, someone with one by it."""
    born_head = "1970-01-01"
    rows = [
        row(
            1,
            city.group,
            "HK-7",
            "Trần Văn Một",
            born_head,
            sex=registry_pb2.SEX_MALE,
            relationship=registry_pb2.RELATIONSHIP_HEAD,
            citizen_id=citizen_id(born_head, registry_pb2.SEX_MALE),
        ),
        row(2, city.group, "HK-7", "Lê Thị Hai", "1972-02-02"),
    ]
    first = await city.leader.ImportPersons(chunks(rows, 10))
    assert first.persons_created == 2
    other = await city.leader.ImportPersons(
        chunks([row(1, city.group, "HK-8", "Phạm Văn Ba", "1980-03-03")], 10)
    )
    assert other.persons_created == 1
    new_home = await registry.db["households"].find_one(
        {"ref_unit_id": city.group, "external_ref": "HK-8"}
    )
    assert new_home is not None
    for name in ("Lê Thị Hai", "Trần Văn Một"):
        mover = await registry.db["persons"].find_one({"unit_id": city.group, "full_name": name})
        assert mover is not None
        await city.leader.MovePerson(
            registry_pb2.MovePersonRequest(
                request_id=rid(),
                person_id=mover["_id"],
                to_household_id=new_home["_id"],
                relationship=registry_pb2.RELATIONSHIP_OTHER_RELATIVE,
            )
        )

    households, persons = registry.db["households"], registry.db["persons"]
    before = await index_uses(households), await index_uses(persons)
    again = await city.leader.ImportPersons(chunks(rows, 10))
    assert (again.persons_created, again.persons_unchanged, list(again.errors)) == (0, 2, [])
    # Each batch finds what it knows by index, not by reading the whole register.
    assert BOOK_NUMBER_INDEX in await used_since(households, before[0])
    assert {"cid_hash_1", "unit_id_1_name_folded_1"} <= await used_since(persons, before[1])
    for name in ("Lê Thị Hai", "Trần Văn Một"):
        assert (
            await registry.db["persons"].count_documents({"full_name": name, "unit_id": city.group})
            == 1
        )


async def test_someone_who_moved_away_is_registered_by_the_file_of_where_they_live_now(
    city: City,
) -> None:
    """Someone who left the area and lives in another group now was counted by that group's
    onboarding file as "already in the register" and left out of it: registered nowhere, and
    the import said every row was in. A household the file brings in takes them back, as the
    same person, as RegisterPerson does; the dead are refused; the file of where they left
    does not bring them back there."""
    male = registry_pb2.SEX_MALE
    head_born, born = "1970-01-01", "1980-03-04"
    cids = {name: citizen_id(born, male) for name in ("Lê Văn Đi", "Lê Văn Mất")}
    left_from = [
        row(
            1,
            city.group,
            "HK-1",
            "Trần Văn Một",
            head_born,
            sex=male,
            citizen_id=citizen_id(head_born, male),
            relationship=registry_pb2.RELATIONSHIP_HEAD,
        ),
        *(
            row(
                n,
                city.group,
                "HK-1",
                name,
                born,
                sex=male,
                citizen_id=cid,
                relationship=registry_pb2.RELATIONSHIP_SIBLING,
            )
            for n, (name, cid) in enumerate(cids.items(), start=2)
        ),
    ]
    assert (await city.ward_officer.ImportPersons(chunks(left_from, 10))).persons_created == 3

    async def found(cid: str) -> registry_pb2.Person:
        response = await city.ward_officer.FindPersonByCitizenId(
            registry_pb2.FindPersonByCitizenIdRequest(citizen_id=cid)
        )
        person: registry_pb2.Person = response.person
        return person

    moved, died = [await found(cid) for cid in cids.values()]
    await city.ward_officer.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=moved.person_id)
    )
    await city.ward_officer.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=rid(), person_id=died.person_id, death_date=date.today().isoformat()
        )
    )

    lives_now = [
        row(
            n,
            city.other_group,
            f"HK-{n}",
            name,
            born,
            sex=male,
            citizen_id=cid,
            relationship=registry_pb2.RELATIONSHIP_HEAD,
        )
        for n, (name, cid) in enumerate(cids.items(), start=1)
    ]
    report = await city.ward_officer.ImportPersons(chunks(lives_now, 10))
    assert (report.persons_created, report.persons_unchanged) == (1, 0)
    assert [(e.row_number, e.field) for e in report.errors] == [(2, "person.citizen_id")]
    back = await found(cids["Lê Văn Đi"])
    assert (back.person_id, back.unit_id, back.status) == (
        moved.person_id,
        city.other_group,
        registry_pb2.PERSON_STATUS_RESIDENT,
    )

    again = await city.ward_officer.ImportPersons(chunks(left_from, 10))
    assert (again.persons_created, again.persons_unchanged, list(again.errors)) == (0, 3, [])
    assert (await found(cids["Lê Văn Đi"])).unit_id == city.other_group


async def test_a_corrected_file_gives_citizen_ids_to_those_imported_without_one(
    city: City, registry: RegistryService
) -> None:
    """Onboarding: a ward imports its households, the children's IDs still missing, then runs
    the file again with them filled in. Each child gets their ID; nobody is registered twice."""
    child_born = "2012-06-01"
    child_id = citizen_id(child_born, registry_pb2.SEX_MALE)
    twin_born = "2012-06-02"
    first_rows = [
        row(1, city.group, "HK-3", "Đỗ Văn Con", child_born, sex=registry_pb2.SEX_MALE),
        row(2, city.group, "HK-3", "Đỗ Thị Út", twin_born),
    ]
    first = await city.leader.ImportPersons(chunks(first_rows, 10))
    assert first.persons_created == 2

    corrected = [
        row(
            1,
            city.group,
            "HK-3",
            "Đỗ Văn Con",
            child_born,
            sex=registry_pb2.SEX_MALE,
            citizen_id=child_id,
        ),
        # An ID whose sex digit is not the sex on record: refused, nothing changed.
        row(
            2,
            city.group,
            "HK-3",
            "Đỗ Thị Út",
            twin_born,
            sex=registry_pb2.SEX_MALE,
            citizen_id=citizen_id(twin_born, registry_pb2.SEX_MALE),
        ),
    ]
    again = await city.leader.ImportPersons(chunks(corrected, 10))
    assert (again.persons_created, again.citizen_ids_added) == (0, 1)
    assert [(e.row_number, e.field) for e in again.errors] == [(2, "person.sex")]
    persons = registry.db["persons"]
    assert await persons.count_documents({"full_name": "Đỗ Văn Con"}) == 1
    assert await persons.count_documents({"full_name": "Đỗ Thị Út"}) == 1
    found = await city.ward_officer.FindPersonByCitizenId(
        registry_pb2.FindPersonByCitizenIdRequest(citizen_id=child_id)
    )
    assert found.person.full_name == "Đỗ Văn Con"
    assert found.person.citizen_id == child_id
    # The change is published as the person's, as UpdatePerson publishes it.
    entries = await registry.db["outbox"].find({"events.key": found.person.person_id}).to_list()
    types = [e["type"] for entry in entries for e in entry["events"]]
    assert types[-1] == "civic.registry.v1.PersonUpdated"

    # A third run changes nothing.
    third = await city.leader.ImportPersons(chunks(corrected[:1], 10))
    assert (third.persons_created, third.citizen_ids_added, third.persons_unchanged) == (0, 0, 1)


async def test_a_second_run_leaves_alone_whose_name_or_birth_date_was_corrected_since(
    city: City, registry: RegistryService
) -> None:
    """A child imported without an ID, their misspelt name and birth date corrected by the
    leader since: the same file run again (to retry its failed rows, say) registers nobody
    twice."""
    rows = [
        row(1, city.group, "HK-5", "Trần Bé Hia", "2015-02-02"),
        row(2, city.group, "HK-5", "Trần Bé Ba", "2016-03-03"),
    ]
    first = await city.leader.ImportPersons(chunks(rows, 10))
    assert first.persons_created == 2
    persons = registry.db["persons"]
    misspelt = await persons.find_one({"full_name": "Trần Bé Hia", "unit_id": city.group})
    late = await persons.find_one({"full_name": "Trần Bé Ba", "unit_id": city.group})
    assert misspelt is not None and late is not None
    for person_id, fields, details in (
        (misspelt["_id"], ["full_name"], registry_pb2.PersonDetails(full_name="Trần Bé Hai")),
        (late["_id"], ["birth_date"], registry_pb2.PersonDetails(birth_date="2016-03-04")),
    ):
        await city.leader.UpdatePerson(
            registry_pb2.UpdatePersonRequest(
                request_id=rid(), person_id=person_id, update_fields=fields, person=details
            )
        )

    again = await city.leader.ImportPersons(chunks(rows, 10))

    assert (again.persons_created, again.persons_unchanged, list(again.errors)) == (0, 2, [])
    household = {"household_id": misspelt["household_id"]}
    assert await persons.count_documents(household) == 2


async def test_a_role_that_keeps_no_register_is_refused_the_whole_import(
    city: City, registry: RegistryService
) -> None:
    """A resident or an integrator may not import at all: PERMISSION_DENIED before any row is
    applied (no started header), not a report of every row as outside their scope."""
    home = await new_household(city.leader, city.group)
    rows = [row(1, city.group, "HK-1", "Đỗ Thị Mới", "2001-03-04")]
    for caller in (
        city.as_role(Role.RESIDENT, city.group, home.household.household_id),
        city.as_role(Role.INTEGRATOR, city.city),
    ):
        call = caller.ImportPersons(chunks(rows, 10))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert STARTED_HEADER not in {key for key, _ in await call.initial_metadata() or ()}
    assert await registry.db["persons"].count_documents({"full_name": "Đỗ Thị Mới"}) == 0


async def test_a_file_written_before_its_group_merged_away_imports_into_the_group_it_joined(
    city: City, registry: RegistryService
) -> None:
    """Book numbers stay those of the group that issued them. The ward's file, run again after
    that group was merged into another, finds its households where they are now and adds nobody
    twice; a household new to it is made in the group the old one joined, whose leader may run
    the file."""
    rows = [
        row(1, city.other_group, "HK-M1", "Đỗ Văn Sáp", "1970-01-01"),
        row(2, city.other_group, "HK-M1", "Đỗ Thị Nhập", "1972-02-02"),
    ]
    first = await city.ward_officer.ImportPersons(chunks(rows, 10))
    assert (first.persons_created, list(first.errors)) == (2, [])
    await city.ward_officer.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.other_group, target_unit_id=city.group
        )
    )

    later = [*rows, row(3, city.other_group, "HK-M2", "Đỗ Văn Mới", "1990-03-03")]
    again = await city.leader.ImportPersons(chunks(later, 10))

    assert (again.persons_created, again.persons_unchanged, list(again.errors)) == (1, 2, [])
    households, persons = registry.db["households"], registry.db["persons"]
    new_home = await households.find_one({"ref_unit_id": city.other_group, "external_ref": "HK-M2"})
    assert new_home is not None and new_home["unit_id"] == city.group
    assert await households.count_documents({"external_ref": "HK-M1"}) == 1
    for name in ("Đỗ Văn Sáp", "Đỗ Thị Nhập", "Đỗ Văn Mới"):
        assert await persons.count_documents({"full_name": name, "unit_id": city.group}) == 1
    # The retired group's own leader holds none of it now.
    refused = await city.other_leader.ImportPersons(chunks(later, 10))
    assert {e.message for e in refused.errors} == {
        f"{city.other_group} was merged into {city.group}, outside your scope"
    }
