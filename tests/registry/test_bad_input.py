"""Bad input gets the right status code, names the field, and writes nothing."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2

from services.common.wire import local_date
from services.registry.main import RegistryService
from tests.registry_fixtures import City, citizen_id, new_household, person, rid

# The service's today is Vietnam's: past 17:00 UTC it is already the next day there.
TOMORROW = (local_date(datetime.now(UTC)) + timedelta(days=1)).isoformat()


async def footprint(registry: RegistryService) -> tuple[int, ...]:
    db = registry.db
    return tuple(
        [
            await db[name].count_documents({})
            for name in ("households", "persons", "outbox", "units")
        ]
    )


def register(
    household_id: str, details: registry_pb2.PersonDetails
) -> registry_pb2.RegisterPersonRequest:
    return registry_pb2.RegisterPersonRequest(
        request_id=rid(), household_id=household_id, person=details
    )


BAD_PERSONS: list[tuple[str, Callable[[], registry_pb2.PersonDetails], grpc.StatusCode, str]] = [
    (
        "empty name",
        lambda: person(name="   "),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.full_name",
    ),
    (
        # A shifted column of an import file puts a phone number or a date in the name.
        "a phone number for a name",
        lambda: person(name="0905 123 456"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.full_name",
    ),
    (
        "a digit in a name",
        lambda: person(name="Nguyễn Văn 2"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.full_name",
    ),
    (
        "signs for a name",
        lambda: person(name="<b>Bê</b>"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.full_name",
    ),
    (
        "citizen id letters",
        lambda: person(citizen_id="04819012345A"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.citizen_id",
    ),
    (
        "citizen id short",
        lambda: person(citizen_id="0481901234"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.citizen_id",
    ),
    (
        "citizen id province",
        lambda: person(citizen_id="999190123456"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.citizen_id",
    ),
    (
        "citizen id year mismatch",
        lambda: person(
            born="1990-05-17", citizen_id=citizen_id("1985-01-01", registry_pb2.SEX_FEMALE)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.citizen_id",
    ),
    (
        "birth date in future",
        lambda: person(born=TOMORROW),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.birth_date",
    ),
    (
        "birth date malformed",
        lambda: person(born="17/05/1990"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.birth_date",
    ),
    (
        "no sex",
        lambda: person(sex=registry_pb2.SEX_UNSPECIFIED),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.sex",
    ),
    (
        # Fullwidth digits are digits to \d: the same ID again, past the unique check.
        "citizen id in other digits",
        lambda: person(citizen_id="048１９０１２３４５６"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.citizen_id",
    ),
    (
        "unknown relationship",
        lambda: person(relationship=999),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.relationship",
    ),
    (
        "unknown education",
        lambda: registry_pb2.PersonDetails(
            full_name="Nguyễn Thị Bê",
            birth_date="1990-05-17",
            sex=registry_pb2.SEX_FEMALE,
            relationship=registry_pb2.RELATIONSHIP_SPOUSE,
            education=777,  # type: ignore[arg-type]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.education",
    ),
    (
        "phone that is no number",
        lambda: with_contact(phone="gọi sau"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.contact.phone",
    ),
    (
        # Not stored for ever in every copy of the person, nor shown to whoever reads them.
        "phone of a megabyte",
        lambda: with_contact(phone="0" * 1_000_000),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.contact.phone",
    ),
    (
        "email that is no address",
        lambda: with_contact(email="not an email"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "person.contact.email",
    ),
]


def with_contact(phone: str = "", email: str = "") -> registry_pb2.PersonDetails:
    details = person()
    details.contact.phone, details.contact.email = phone, email
    return details


@pytest.mark.parametrize(
    ("case", "details", "status", "field"), BAD_PERSONS, ids=[c[0] for c in BAD_PERSONS]
)
async def test_bad_person_is_refused_and_nothing_written(
    city: City,
    registry: RegistryService,
    case: str,
    details: Callable[[], registry_pb2.PersonDetails],
    status: grpc.StatusCode,
    field: str,
) -> None:
    home = await new_household(city.leader, city.group)
    before = await footprint(registry)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.RegisterPerson(register(home.household.household_id, details()))

    assert error.value.code() == status
    assert (error.value.details() or "").startswith(field + ":"), error.value.details()
    assert await footprint(registry) == before


async def test_unknown_household_and_duplicate_citizen_id(
    city: City, registry: RegistryService
) -> None:
    home = await new_household(city.leader, city.group)
    head = await city.ward_officer.GetPerson(
        registry_pb2.GetPersonRequest(person_id=home.head.person_id)
    )
    before = await footprint(registry)

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await city.leader.RegisterPerson(register("hh-000000000000000000000000", person()))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    same_id = person(
        "Người Khác", head.person.birth_date, registry_pb2.SEX_MALE, head.person.citizen_id
    )
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await city.leader.RegisterPerson(register(home.household.household_id, same_id))
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS

    same_head = person(
        "Người Khác",
        head.person.birth_date,
        registry_pb2.SEX_MALE,
        head.person.citizen_id,
        registry_pb2.RELATIONSHIP_HEAD,
    )
    with pytest.raises(grpc.aio.AioRpcError) as duplicate_head:
        await new_household(city.leader, city.group, head=same_head)
    assert duplicate_head.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert await footprint(registry) == before


async def test_a_book_number_used_in_the_group_is_refused_naming_it(
    city: City, registry: RegistryService
) -> None:
    await new_household(city.leader, city.group, external_ref="HK-7")
    before = await footprint(registry)
    with pytest.raises(grpc.aio.AioRpcError) as duplicate:
        await new_household(city.leader, city.group, head_name="Lê Văn Hai", external_ref="HK-7")
    assert duplicate.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (duplicate.value.details() or "").startswith("external_ref: "), duplicate.value.details()
    assert await footprint(registry) == before
    # Another group issues its own HK-7.
    await new_household(city.other_leader, city.other_group, external_ref="HK-7")


BAD_HOUSEHOLDS: list[tuple[str, dict[str, Any], grpc.StatusCode, str]] = [
    ("no address", {"address": " "}, grpc.StatusCode.INVALID_ARGUMENT, "address"),
    (
        "no residence kind",
        {"residence_kind": 0},
        grpc.StatusCode.INVALID_ARGUMENT,
        "residence_kind",
    ),
    (
        "negative area",
        {"housing": registry_pb2.Housing(floor_area_m2=-1)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "housing.floor_area_m2",
    ),
    (
        "area not a number",
        {"housing": registry_pb2.Housing(floor_area_m2=float("nan"))},
        grpc.StatusCode.INVALID_ARGUMENT,
        "housing.floor_area_m2",
    ),
    (
        "latitude",
        {"location": types_pb2.GeoPoint(latitude=100, longitude=108)},
        grpc.StatusCode.INVALID_ARGUMENT,
        "location.latitude",
    ),
    ("no request id", {"request_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    ("unknown group", {"unit_id": "nowhere.g1"}, grpc.StatusCode.PERMISSION_DENIED, ""),
]


@pytest.mark.parametrize(
    ("case", "fields", "status", "field"), BAD_HOUSEHOLDS, ids=[c[0] for c in BAD_HOUSEHOLDS]
)
async def test_bad_household_is_refused_and_nothing_written(
    city: City,
    registry: RegistryService,
    case: str,
    fields: dict[str, Any],
    status: grpc.StatusCode,
    field: str,
) -> None:
    before = await footprint(registry)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await new_household(city.leader, city.group, **fields)
    assert error.value.code() == status
    assert (error.value.details() or "").startswith(field), error.value.details()
    assert await footprint(registry) == before


@pytest.mark.parametrize("field", ["housing", "location"])
async def test_an_update_naming_a_field_it_does_not_send_is_refused_and_nothing_written(
    city: City, registry: RegistryService, field: str
) -> None:
    """A form that names housing (or location) but fails to send it: refused, not taken for
    all zeros that wipe the floor area and storeys on record."""
    home = await new_household(
        city.leader, city.group, location=types_pb2.GeoPoint(latitude=16.07, longitude=108.22)
    )
    hid = home.household.household_id
    before = await footprint(registry)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.UpdateHousehold(
            registry_pb2.UpdateHouseholdRequest(
                request_id=rid(), household_id=hid, update_fields=[field]
            )
        )

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(f"{field}:"), error.value.details()
    assert await footprint(registry) == before
    got = await city.leader.GetHousehold(registry_pb2.GetHouseholdRequest(household_id=hid))
    assert (got.household.housing, got.household.location) == (
        home.household.housing,
        home.household.location,
    )


async def test_retry_with_same_request_id_changes_nothing(
    city: City, registry: RegistryService
) -> None:
    home = await new_household(city.leader, city.group)
    request = register(home.household.household_id, person("Đoàn Thị Yến"))
    first = await city.leader.RegisterPerson(request)
    after_first = await footprint(registry)

    again = await city.leader.RegisterPerson(request)

    assert again == first
    assert await footprint(registry) == after_first
    # The same request_id for a different request is refused rather than silently replayed.
    request.person.full_name = "Đoàn Thị Khác"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.RegisterPerson(request)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_missing_or_bad_token(city: City) -> None:
    from tests.registry_fixtures import Caller

    for bearer in ("", "not-a-jwt"):
        caller = Caller(city.target, bearer)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await caller.GetUnit(registry_pb2.GetUnitRequest(unit_id=city.group))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "relationship",
    # A newborn is nobody's head of household, even of one whose head has left.
    [999, registry_pb2.RELATIONSHIP_HEAD],
    ids=["unknown", "head"],
)
async def test_a_birth_with_an_unknown_or_impossible_relationship_is_refused(
    city: City, registry: RegistryService, relationship: int
) -> None:
    home = await new_household(city.leader, city.group)
    await city.leader.MoveOut(
        registry_pb2.MoveOutRequest(request_id=rid(), person_id=home.head.person_id)
    )
    before = await footprint(registry)
    child = person("Bé Mới", "2024-01-01", relationship=relationship)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.RegisterBirth(
            registry_pb2.RegisterBirthRequest(
                request_id=rid(), household_id=home.household.household_id, child=child
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("child.relationship:"), error.value.details()
    assert await footprint(registry) == before


BAD_QUERIES: list[tuple[str, Any, str]] = [
    ("age past any life", registry_pb2.SearchPersonsRequest(max_age=100_000), "max_age"),
    ("negative age", registry_pb2.SearchPersonsRequest(min_age=-1), "min_age"),
    (
        "ages before year one",
        registry_pb2.SearchPersonsRequest(as_of="0001-01-01", min_age=3),
        "as_of",
    ),
    (
        "overdue by a million years",
        registry_pb2.ListOverdueVerificationsRequest(max_age_days=365_000_000),
        "max_age_days",
    ),
    ("a NUL in a name", registry_pb2.SearchPersonsRequest(name="a\x00b"), "name"),
    ("a name of 80,000 characters", registry_pb2.SearchPersonsRequest(name="a " * 40_000), "name"),
]


@pytest.mark.parametrize(
    ("case", "request_", "field"), BAD_QUERIES, ids=[c[0] for c in BAD_QUERIES]
)
async def test_a_query_out_of_range_is_invalid_not_internal(
    city: City, case: str, request_: Any, field: str
) -> None:
    request_.unit_id = city.group
    method = (
        city.leader.SearchPersons
        if isinstance(request_, registry_pb2.SearchPersonsRequest)
        else city.leader.ListOverdueVerifications
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await method(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(field + ":"), error.value.details()


@pytest.mark.parametrize("method", ["SearchPersons", "ListOverdueVerifications"])
async def test_a_unit_id_that_is_no_unit_is_invalid_not_internal(city: City, method: str) -> None:
    """Within the caller's scope by its prefix, but no id a unit can have (a NUL byte)."""
    requests = {
        "SearchPersons": registry_pb2.SearchPersonsRequest(unit_id=city.group + ".\x00"),
        "ListOverdueVerifications": registry_pb2.ListOverdueVerificationsRequest(
            unit_id=city.group + ".\x00"
        ),
    }
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await getattr(city.leader, method)(requests[method])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("unit_id:"), error.value.details()


TODAY = local_date(datetime.now(UTC))
BAD_STAYS: list[tuple[str, str, str, str, str]] = [
    # (case, birth date, stay start, stay end, field named)
    (
        # Registered as living here now, then at once a suspect whose stay expired.
        "a stay that has ended",
        "1990-05-17",
        (TODAY - timedelta(days=200)).isoformat(),
        (TODAY - timedelta(days=10)).isoformat(),
        "stay_end",
    ),
    (
        "a stay begun before the guest was born",
        (TODAY - timedelta(days=30)).isoformat(),
        (TODAY - timedelta(days=60)).isoformat(),
        (TODAY + timedelta(days=60)).isoformat(),
        "stay_start",
    ),
]


@pytest.mark.parametrize(
    ("case", "born", "start", "end", "field"), BAD_STAYS, ids=[c[0] for c in BAD_STAYS]
)
async def test_a_stay_out_of_its_dates_is_refused_and_nothing_written(
    city: City, registry: RegistryService, case: str, born: str, start: str, end: str, field: str
) -> None:
    home = await new_household(city.leader, city.group)
    before = await footprint(registry)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.RegisterTemporaryStay(
            registry_pb2.RegisterTemporaryStayRequest(
                request_id=rid(),
                household_id=home.household.household_id,
                person=person(
                    "Khách Trọ", born, relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE
                ),
                stay_start=start,
                stay_end=end,
            )
        )

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(field + ":"), error.value.details()
    assert await footprint(registry) == before


# (case, the stay's start and end from today, the new end from today or as written, field)
BAD_EXTENSIONS: list[tuple[str, tuple[int, int], int | str, str]] = [
    ("no request id", (0, 30), 60, "request_id"),
    ("no person", (0, 30), 60, "person_id"),
    ("no end", (0, 30), "", "stay_end"),
    ("an end that is no date", (0, 30), "2026-02-30", "stay_end"),
    ("an end already past", (0, 30), -1, "stay_end"),
    ("an end before a stay yet to begin", (10, 40), 5, "stay_end"),
    # A renewal is for two years at most, as a registration is.
    ("a renewal longer than two years", (0, 30), 2 * 366 + 1, "stay_end"),
    ("a renewal of a stay yet to begin longer than two years", (10, 40), 2 * 366 + 11, "stay_end"),
]


@pytest.mark.parametrize(
    ("case", "stay", "new_end", "field"), BAD_EXTENSIONS, ids=[c[0] for c in BAD_EXTENSIONS]
)
async def test_a_stay_extended_out_of_its_dates_is_refused_and_nothing_written(
    city: City,
    registry: RegistryService,
    case: str,
    stay: tuple[int, int],
    new_end: int | str,
    field: str,
) -> None:
    home = await new_household(city.leader, city.group)
    guest = await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=home.household.household_id,
            person=person("Khách Trọ", relationship=registry_pb2.RELATIONSHIP_NON_RELATIVE),
            stay_start=(TODAY + timedelta(days=stay[0])).isoformat(),
            stay_end=(TODAY + timedelta(days=stay[1])).isoformat(),
        )
    )
    request = registry_pb2.ExtendTemporaryStayRequest(
        request_id=rid(),
        person_id=guest.person.person_id,
        stay_end=(TODAY + timedelta(days=new_end)).isoformat()
        if isinstance(new_end, int)
        else new_end,
    )
    if field in ("request_id", "person_id"):
        setattr(request, field, "")
    before = await footprint(registry)

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await city.leader.ExtendTemporaryStay(request)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(field + ":"), error.value.details()
    assert await footprint(registry) == before
    stored = await registry.db["persons"].find_one({"_id": guest.person.person_id}) or {}
    assert stored["stay_end"] == guest.person.stay_end
