"""Household points kept current from the registry's events; evacuation lists inside a drawn
polygon with names from the registry under the caller's own scope; counts per group, with ages
on Vietnam's calendar and renters as the registry's changes of residence kind leave them."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import grpc
from civic.common.v1 import types_pb2
from civic.gis.v1 import events_pb2, gis_pb2
from civic.registry.v1 import registry_pb2

from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.wire import local_date
from services.gis.domain import ELDERLY_AGE, born_on_or_before_age
from tests.conftest import Clock
from tests.gis.conftest import Ward, rid
from tests.gis.test_imports import refused
from tests.kafka_reader import TopicReader, eventually, of_type, with_key
from tests.registry_fixtures import new_household, person


async def household_at(ward: Ward, household_id: str) -> list[float] | None:
    collection = await ward.features(unit_id=ward.city.ward, layers=[gis_pb2.LAYER_HOUSEHOLD])
    for feature in collection["features"]:
        if feature["properties"]["household_id"] == household_id:
            coordinates: list[float] = feature["geometry"]["coordinates"]
            return coordinates
    return None


async def located(ward: Ward, household_id: str, at: list[float]) -> None:
    async def there() -> bool:
        return await household_at(ward, household_id) == at

    await eventually(there, what=f"household {household_id} at {at} on the map")


async def test_a_new_and_a_moved_household_appear_on_the_map(ward: Ward, settings: Any) -> None:
    city = ward.city
    home = await new_household(city.leader, city.group, location=ward.point(-200, 30))
    household_id = home.household.household_id
    await located(ward, household_id, ward.at(-200, 30))

    # The family moves house within the ward: the registry's update moves the point.
    await city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household_id,
            update_fields=["location"],
            location=ward.point(-350, -120),
        )
    )
    await located(ward, household_id, ward.at(-350, -120))
    located_in = await ward.officer.LocateUnit(
        gis_pb2.LocateUnitRequest(point=ward.point(-350, -120))
    )
    assert located_in.unit_id == city.group

    async with TopicReader(settings.kafka_bootstrap_servers, "civic.gis.v1") as reader:
        feature_id = f"household-{household_id}"

        def announced(records: list[Any]) -> bool:
            changes = [
                events_pb2.FeaturesChanged.FromString(r.value)
                for r in of_type(
                    with_key(records, city.group), type_name(events_pb2.FeaturesChanged())
                )
            ]
            return sum(feature_id in c.upserted_ids for c in changes) >= 2

        records = await reader.collect(announced, what="the household's two map changes")
    change = events_pb2.FeaturesChanged.FromString(
        of_type(with_key(records, city.group), type_name(events_pb2.FeaturesChanged()))[-1].value
    )
    assert change.layer == gis_pb2.LAYER_HOUSEHOLD
    assert change.origin == events_pb2.CHANGE_ORIGIN_REGISTRY


async def evacuation(caller: Any, ring: list[list[float]]) -> list[gis_pb2.HouseholdInArea]:
    response = await caller.ListResidentsInArea(
        gis_pb2.ListResidentsInAreaRequest(
            ring=[types_pb2.GeoPoint(longitude=lon, latitude=lat) for lon, lat in ring[:-1]]
        )
    )
    return list(response.households)


async def test_an_evacuation_list_respects_scope_and_privacy(ward: Ward) -> None:
    city = ward.city
    west = await new_household(
        city.leader, city.group, "Lê Văn Tám", "1950-01-01", location=ward.point(-50, 20)
    )
    await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=west.household.household_id, person=person()
        )
    )
    east = await new_household(
        city.other_leader, city.other_group, "Phạm Thị Hoa", location=ward.point(60, -20)
    )
    far = await new_household(city.leader, city.group, location=ward.point(-500, 300))
    for home, at in ((west, (-50, 20)), (east, (60, -20)), (far, (-500, 300))):
        await located(ward, home.household.household_id, ward.at(*at))
    area = ward.box(-100, -50, 100, 50)  # across both groups, not the far household

    everyone = await evacuation(ward.officer, area)
    assert {h.household_id for h in everyone} == {
        west.household.household_id,
        east.household.household_id,
    }
    by_id = {h.household_id: h for h in everyone}
    residents = {r.full_name: r.age for r in by_id[west.household.household_id].residents}
    assert set(residents) == {"Lê Văn Tám", "Nguyễn Thị Bê"}
    assert residents["Lê Văn Tám"] >= 75
    assert by_id[west.household.household_id].address == "12 Kiệt 45 Trần Phú"

    # A household the map still shows but the registry no longer answers for (gone, or moved
    # out of reach before the map heard of it) is left out, its address and place too.
    features = ward.service.store.features
    shown = await features.find_one({"properties.household_id": west.household.household_id})
    assert shown is not None
    ghost = "hh-" + "0" * 24
    await features.insert_one(
        shown
        | {"_id": f"household-{ghost}", "properties": shown["properties"] | {"household_id": ghost}}
    )
    try:
        listed = {h.household_id for h in await evacuation(ward.officer, area)}
    finally:
        await features.delete_one({"_id": f"household-{ghost}"})
    assert listed == {west.household.household_id, east.household.household_id}

    # A group leader's list holds only their own group's households, whatever they draw.
    own = await evacuation(ward.leader, area)
    assert [h.household_id for h in own] == [west.household.household_id]
    assert {r.full_name for r in own[0].residents} == {"Lê Văn Tám", "Nguyễn Thị Bê"}

    # The registry logged the read, with the purpose the leader gave, as for any official.
    family = city.as_role(Role.RESIDENT, city.group, west.household.household_id)
    log = await family.ListAccessLog(
        registry_pb2.ListAccessLogRequest(household_id=west.household.household_id)
    )
    assert "evacuation list" in {entry.purpose for entry in log.entries}

    # An official who does not say why is refused, as the registry refuses them.
    details = await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        evacuation(ward.caller(Role.WARD_OFFICER, city.ward), area),
    )
    assert details.startswith("x-civic-purpose")

    for outsider in (
        ward.caller(Role.RESIDENT, city.group, west.household.household_id),
        ward.caller(Role.INTEGRATOR, city.city),
        ward.caller(Role.AUDITOR, city.city),
    ):
        await refused(grpc.StatusCode.PERMISSION_DENIED, evacuation(outsider, area))
    bowtie = [ward.at(0, 0), ward.at(50, 50), ward.at(50, 0), ward.at(0, 50), ward.at(0, 0)]
    details = await refused(grpc.StatusCode.INVALID_ARGUMENT, evacuation(ward.officer, bowtie))
    assert details.startswith("ring")
    details = await refused(
        grpc.StatusCode.INVALID_ARGUMENT, evacuation(ward.officer, area[:2] + area[-1:])
    )
    assert details.startswith("ring")


async def stay(leader: Any, household_id: str) -> registry_pb2.Person:
    """A temporary resident registered in the household."""
    response = await leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=household_id,
            person=person("Võ Văn Thuê", "2001-02-02"),
            # A stay the registry takes on any day: under way, not ended.
            stay_start=(date.today() - timedelta(days=30)).isoformat(),
            stay_end=(date.today() + timedelta(days=300)).isoformat(),
        )
    )
    registered: registry_pb2.Person = response.person
    return registered


async def test_counts_per_group_for_a_choropleth(ward: Ward) -> None:
    city = ward.city
    elder = await new_household(
        city.leader, city.group, "Lê Văn Tám", "1940-03-03", location=ward.point(-50, 20)
    )
    await stay(city.leader, elder.household.household_id)
    await new_household(city.other_leader, city.other_group, location=ward.point(60, -20))

    async def counted() -> dict[str, gis_pb2.GroupCount] | None:
        response = await ward.officer.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward))
        counts = {c.unit_id: c for c in response.counts}
        west, east = counts.get(city.group), counts.get(city.other_group)
        if west and east and (west.population, east.population) == (2, 1):
            choropleth = json.loads(response.geojson)
            by_unit = {f["properties"]["unit_id"]: f["properties"] for f in choropleth["features"]}
            assert by_unit[city.group]["population"] == 2
            return counts
        return None

    found = await eventually(counted, what="both groups counted")
    assert found is not None
    counts = found
    west = counts[city.group]
    assert (west.households, west.population, west.elderly, west.renters) == (1, 2, 1, 1)
    east = counts[city.other_group]
    assert (east.households, east.population, east.elderly, east.renters) == (1, 1, 0, 0)

    resident = ward.caller(Role.RESIDENT, city.group, elder.household.household_id)
    treasurer = ward.caller(Role.TREASURER, city.ward)
    for outsider in (resident, treasurer):
        await refused(
            grpc.StatusCode.PERMISSION_DENIED,
            outsider.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward)),
        )
    integrator = ward.caller(Role.INTEGRATOR, city.ward)
    shared = await integrator.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward))
    assert {c.unit_id for c in shared.counts} == {city.group, city.other_group}
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        ward.leader.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward)),
    )
    # Whether a unit exists is told only to a caller who may count it.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        ward.leader.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward + ".nowhere")),
    )
    await refused(
        grpc.StatusCode.NOT_FOUND,
        ward.officer.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward + ".nowhere")),
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT, ward.officer.CountByGroup(gis_pb2.CountByGroupRequest())
    )


async def test_a_guest_is_counted_until_their_stay_ends_and_again_once_it_is_extended(
    ward: Ward, clock: Clock
) -> None:
    """As the registry's census counts: a guest whose stay has ended lives here no longer,
    though nothing happened on the day (no event says so); extended, they are back."""
    city = ward.city
    home = await new_household(city.leader, city.group, location=ward.point(-70, 10))
    guest = await stay(city.leader, home.household.household_id)

    async def group_counted() -> tuple[int, int]:
        response = await ward.officer.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward))
        (group,) = [c for c in response.counts if c.unit_id == city.group]
        return group.population, group.renters

    async def counted(expected: tuple[int, int]) -> bool:
        return await group_counted() == expected

    await eventually(lambda: counted((2, 1)), what="the head and the guest counted")
    clock.advance(days=301)  # a day after the stay's last
    assert await group_counted() == (1, 0)

    await city.leader.ExtendTemporaryStay(
        registry_pb2.ExtendTemporaryStayRequest(
            request_id=rid(),
            person_id=guest.person_id,
            stay_end=(local_date(clock()) + timedelta(days=60)).isoformat(),
        )
    )
    await eventually(lambda: counted((2, 1)), what="the extended guest counted again")


async def test_a_guest_registered_ahead_of_arriving_is_counted_from_the_stays_first_day(
    ward: Ward, clock: Clock
) -> None:
    """As the registry's census counts: a lodger whose stay begins next week lives here from
    then, though nothing happens on that day (no event says so)."""
    city = ward.city
    home = await new_household(city.leader, city.group, location=ward.point(-70, 30))
    first_day = local_date(clock()) + timedelta(days=7)
    await city.leader.RegisterTemporaryStay(
        registry_pb2.RegisterTemporaryStayRequest(
            request_id=rid(),
            household_id=home.household.household_id,
            person=person("Võ Văn Đến", "2001-02-02"),
            stay_start=first_day.isoformat(),
            stay_end=(first_day + timedelta(days=90)).isoformat(),
        )
    )

    async def group_counted() -> tuple[int, int]:
        response = await ward.officer.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.ward))
        (group,) = [c for c in response.counts if c.unit_id == city.group]
        return group.population, group.renters

    async def guest_known() -> bool:
        return (
            await ward.service.store.persons.count_documents(
                {"household_id": home.household.household_id}
            )
            == 2
        )

    await eventually(guest_known, what="the guest on the map's register")
    assert await group_counted() == (1, 0)
    clock.advance(days=7)
    assert await group_counted() == (2, 1)


def before_dawn_in_vietnam(clock: Clock) -> date:
    """Moves the clock to 01:30 in Vietnam (18:30 UTC), when the UTC date is still the day
    before; returns Vietnam's date, never a 29 February (which a birthday may lack)."""
    now = clock()
    moment = datetime.combine(now.date() + timedelta(days=1), time(18, 30), UTC)
    if local_date(moment).strftime("%m-%d") == "02-29":
        moment += timedelta(days=1)
    clock.advance(seconds=(moment - now).total_seconds())
    today = local_date(clock())
    assert today != clock().date()
    return today


async def group_count(ward: Ward, group: str, population: int) -> gis_pb2.GroupCount:
    """The group's count, once its population is as given."""

    async def counted() -> gis_pb2.GroupCount | None:
        response = await ward.officer.CountByGroup(
            gis_pb2.CountByGroupRequest(unit_id=ward.city.ward)
        )
        found = {c.unit_id: c for c in response.counts}.get(group)
        return found if found is not None and found.population == population else None

    found = await eventually(counted, what=f"{population} counted in {group}")
    assert found is not None
    return found


async def test_someone_turning_60_today_in_vietnam_is_elderly_there_before_dawn(
    ward: Ward, clock: Clock
) -> None:
    born = born_on_or_before_age(ELDERLY_AGE, before_dawn_in_vietnam(clock))
    city = ward.city
    await new_household(city.leader, city.group, "Lê Văn Sáu", born, location=ward.point(-50, 20))
    found = await group_count(ward, city.group, 1)
    assert found.elderly == 1, f"born {born}"


async def test_an_evacuation_list_gives_ages_on_vietnams_calendar(ward: Ward, clock: Clock) -> None:
    born = born_on_or_before_age(ELDERLY_AGE, before_dawn_in_vietnam(clock))
    city = ward.city
    home = await new_household(
        city.leader, city.group, "Lê Văn Sáu", born, location=ward.point(-50, 20)
    )
    await located(ward, home.household.household_id, ward.at(-50, 20))
    listed = await evacuation(ward.officer, ward.box(-100, -50, 100, 50))
    assert [r.age for h in listed for r in h.residents] == [ELDERLY_AGE], f"born {born}"


async def set_kind(
    ward: Ward, household_id: str, kind: registry_pb2.ResidenceKind.ValueType
) -> None:
    """The registry changes the household's residence kind; returns once the map has it."""
    await ward.city.leader.UpdateHousehold(
        registry_pb2.UpdateHouseholdRequest(
            request_id=rid(),
            household_id=household_id,
            update_fields=["residence_kind"],
            residence_kind=kind,
        )
    )

    async def on_the_map() -> bool:
        # The household's persons are written with its point, in one transaction.
        point = await ward.service.store.household(household_id)
        return point is not None and point["properties"]["residence_kind"] == kind

    await eventually(on_the_map, what=f"household {household_id} of kind {kind} on the map")


async def test_renters_follow_their_household_to_renting_and_back_but_a_stay_keeps_its_kind(
    ward: Ward,
) -> None:
    city = ward.city
    home = await new_household(city.leader, city.group, location=ward.point(-50, 20))
    household_id = home.household.household_id
    await stay(city.leader, household_id)
    assert (await group_count(ward, city.group, 2)).renters == 1  # the temporary resident

    await set_kind(ward, household_id, registry_pb2.RESIDENCE_KIND_RENTER)
    registry = await city.leader.CountByUnit(registry_pb2.CountByUnitRequest(unit_id=city.group))
    assert registry.total.renters == 2
    assert (await group_count(ward, city.group, 2)).renters == 2

    # Back to permanent: the head is no longer a renter, the temporary resident still is one.
    await set_kind(ward, household_id, registry_pb2.RESIDENCE_KIND_PERMANENT)
    registry = await city.leader.CountByUnit(registry_pb2.CountByUnitRequest(unit_id=city.group))
    assert (registry.total.renters, registry.total.temporary_residents) == (0, 1)
    assert (await group_count(ward, city.group, 2)).renters == 1


async def test_a_person_moving_into_a_renting_household_is_counted_a_renter(ward: Ward) -> None:
    city = ward.city
    home = await new_household(city.leader, city.group, location=ward.point(-50, 20))
    member = await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=home.household.household_id, person=person()
        )
    )
    rented = await new_household(
        city.other_leader,
        city.other_group,
        "Phạm Văn Bình",
        location=ward.point(60, -20),
        residence_kind=registry_pb2.RESIDENCE_KIND_RENTER,
    )
    assert (await group_count(ward, city.group, 2)).renters == 0
    await city.ward_officer.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=member.person.person_id,
            to_household_id=rented.household.household_id,
            relationship=registry_pb2.RELATIONSHIP_SPOUSE,
        )
    )
    assert (await group_count(ward, city.other_group, 2)).renters == 2

    # Someone on a temporary stay moving into a permanent household stays a temporary resident.
    lodger = await stay(city.other_leader, rented.household.household_id)
    await group_count(ward, city.other_group, 3)
    await city.ward_officer.MovePerson(
        registry_pb2.MovePersonRequest(
            request_id=rid(),
            person_id=lodger.person_id,
            to_household_id=home.household.household_id,
            relationship=registry_pb2.RELATIONSHIP_OTHER_RELATIVE,
        )
    )
    assert (await group_count(ward, city.group, 2)).renters == 1


async def test_counts_of_a_group_merged_away_say_where_its_people_went(ward: Ward) -> None:
    """Its old leader's token still names it: an empty answer would read as nobody living
    there, when they are all counted in the group it joined."""
    city = ward.city
    await new_household(city.other_leader, city.other_group, location=ward.point(60, -20))
    await ward.merge_other_group()
    for caller in (ward.other_leader, ward.officer):
        details = await refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            caller.CountByGroup(gis_pb2.CountByGroupRequest(unit_id=city.other_group)),
        )
        assert details.startswith("unit_id") and city.group in details, details


async def test_an_evacuation_list_for_a_group_merged_away_says_where_its_households_went(
    ward: Ward,
) -> None:
    """Its old leader's token still names it: an empty list would read as nobody to evacuate,
    when its households stand in the area still, listed under the group it joined."""
    city = ward.city
    home = await new_household(city.other_leader, city.other_group, location=ward.point(60, -20))
    await located(ward, home.household.household_id, ward.at(60, -20))
    await ward.merge_other_group()
    old_leader = ward.caller(Role.GROUP_LEADER, city.other_group, purpose="evacuation list")
    details = await refused(
        grpc.StatusCode.FAILED_PRECONDITION, evacuation(old_leader, ward.box(0, -50, 100, 50))
    )
    assert city.group in details, details
