"""The registry view applies a partition's events as one batch with the same outcome as one
event at a time: households created, updated, moved and merged within the batch, persons who
move and die, and the map changes announced, which leave every unit with the same points.
Persons live as their household does, unless on a temporary stay, whatever order a household's
and its persons' events (on different partitions) arrive in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from civic.common.v1 import types_pb2
from civic.gis.v1 import events_pb2
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message
from pymongo.asynchronous.database import AsyncDatabase

from services.common.config import Settings
from services.common.mongo import Document
from services.common.outbox import Outbox
from services.gis.domain import household_feature_id
from services.gis.events import TOPIC, RegistryProjection
from services.gis.store import GisStore
from tests.batches import deliveries, handle, scratch_databases

WARD, WEST, EAST = "dn.hc.w1", "dn.hc.w1.g1", "dn.hc.w1.g2"
PERMANENT = registry_pb2.RESIDENCE_KIND_PERMANENT
TEMPORARY = registry_pb2.RESIDENCE_KIND_TEMPORARY
RENTER = registry_pb2.RESIDENCE_KIND_RENTER


def unit(unit_id: str, name: str) -> registry_events.UnitCreated:
    return registry_events.UnitCreated(
        unit=registry_pb2.Unit(
            unit_id=unit_id, kind=registry_pb2.UNIT_KIND_GROUP, name=name, parent_id=WARD
        )
    )


def household(
    household_id: str,
    unit_id: str,
    east_m: float,
    updated: str = "",
    kind: registry_pb2.ResidenceKind.ValueType = PERMANENT,
) -> registry_events.HouseholdCreated | registry_events.HouseholdUpdated:
    """The household's creation, or its update of the field `updated`."""
    fields: dict[str, Any] = {
        "household_id": household_id,
        "unit_id": unit_id,
        "address": f"{household_id} Trần Phú",
        "residence_kind": kind,
        "location": types_pb2.GeoPoint(latitude=16.06, longitude=108.22 + east_m / 100_000),
    }
    if updated:
        return registry_events.HouseholdUpdated(updated_fields=[updated], **fields)
    return registry_events.HouseholdCreated(**fields)


def registered(
    person_id: str,
    household_id: str,
    unit_id: str,
    kind: registry_pb2.ResidenceKind.ValueType = PERMANENT,
    stay_end: str = "",
) -> Message:
    return registry_events.PersonRegistered(
        person_id=person_id,
        household_id=household_id,
        unit_id=unit_id,
        birth_date="1950-01-01",
        residence_kind=kind,
        stay_end=stay_end,
    )


def moved(person_id: str, from_household_id: str, to_household_id: str) -> Message:
    return registry_events.PersonMoved(
        person_id=person_id,
        from_household_id=from_household_id,
        to_household_id=to_household_id,
        from_unit_id=WEST,
        to_unit_id=WEST,
    )


# Before the burst, one household stands in the west group: the merge must carry it along with
# the points the burst itself puts there.
BEFORE = [
    unit(WEST, "Tổ 1"),
    unit(EAST, "Tổ 2"),
    household("h0", WEST, 0),
    registered("p0", "h0", WEST),
]
BURST = [
    household("h1", WEST, 10),
    household("h2", WEST, 20),
    registered("p1", "h1", WEST),
    registered("p2", "h1", WEST),
    registered("p3", "h2", WEST),
    household("h1", WEST, 15, updated="location"),
    household("h1", WEST, 15, updated="location"),  # nothing new: no change
    registry_events.HouseholdMoved(household_id="h2", from_unit_id=WEST, to_unit_id=EAST),
    registry_events.PersonMoved(
        person_id="p2",
        from_household_id="h1",
        to_household_id="h2",
        from_unit_id=WEST,
        to_unit_id=EAST,
    ),
    registry_events.PersonDied(
        person_id="p1", household_id="h1", unit_id=WEST, death_date="2026-02-28"
    ),
    # A birth date registered wrong, corrected: the person is counted by the right age.
    registry_events.PersonUpdated(
        person_id="p3",
        household_id="h2",
        unit_id=EAST,
        updated_fields=["birth_date"],
        birth_date="1960-06-06",
    ),
    registry_events.UnitRenamed(unit_id=WEST, old_name="Tổ 1", new_name="Tổ 1 cũ"),
    # The registry names the households it moves: those in the west group then.
    registry_events.GroupsMerged(
        source_unit_id=WEST, target_unit_id=EAST, household_ids=["h0", "h1"]
    ),
    # A move into the west group after its merge (one from before it, arriving late): it goes
    # where the west group went.
    registry_events.HouseholdMoved(household_id="h1", from_unit_id=EAST, to_unit_id=WEST),
    household("h3", EAST, 30),
]


async def contents(db: AsyncDatabase[Document]) -> dict[str, list[Document]]:
    return {
        name: await db[name].find().sort("_id").to_list()
        for name in ("units", "persons", "features")
    }


def replay(events: list[Document], points: dict[str, set[str]]) -> None:
    """What a reader of FeaturesChanged keeps: each unit's household points."""
    for event in events:
        changed = events_pb2.FeaturesChanged.FromString(bytes(event["data"]))
        here = points.setdefault(event["key"], set())
        here |= set(changed.upserted_ids)
        here -= set(changed.removed_ids)


async def test_a_burst_as_one_batch_leaves_the_view_and_the_map_as_one_by_one(
    settings: Settings,
) -> None:
    async with scratch_databases(settings, 2) as (one_by_one, together):
        announced: list[dict[str, set[str]]] = []
        for db, batches in (
            (one_by_one, [[message] for message in BURST]),
            (together, [BURST]),
        ):
            projection = RegistryProjection(GisStore(db), Outbox(db, source="gis", topic=TOPIC))
            points: dict[str, set[str]] = {}
            for message in BEFORE:
                replay(await handle(db, projection.apply, deliveries([message])), points)
            for batch in batches:
                emitted = await handle(db, projection.apply, deliveries(batch))
                if len(batches) == 1:
                    keys = [event["key"] for event in emitted]
                    assert sorted(keys) == sorted(set(keys)), "one map change per unit"
                replay(emitted, points)
            announced.append(points)

        assert await contents(together) == await contents(one_by_one)
        assert announced[0] == announced[1]
        point = household_feature_id
        assert announced[1] == {WEST: set(), EAST: {point(h) for h in ("h0", "h1", "h2", "h3")}}

        view = await contents(together)
        persons = {p["_id"]: p for p in view["persons"]}
        # The dead stay where their household goes, east; the mover went east with h2.
        assert (persons["p1"]["active"], persons["p1"]["unit_id"]) == (False, EAST)
        assert (persons["p2"]["household_id"], persons["p2"]["unit_id"]) == ("h2", EAST)
        assert persons["p0"]["unit_id"] == EAST
        assert persons["p3"]["birth_date"] == "1960-06-06"
        features = {f["_id"]: f for f in view["features"]}
        assert features[point("h1")]["geometry"]["coordinates"][0] == 108.22015
        units = {u["_id"]: u for u in view["units"]}
        assert (units[WEST]["name"], units[WEST]["merged_into_id"]) == ("Tổ 1 cũ", EAST)


async def test_a_person_registered_before_their_households_move_is_counted_where_it_went(
    settings: Settings,
) -> None:
    """A person's events and their household's travel on different partitions: the move (or a
    merge) may be applied before the registration that preceded it. Either way the person is
    counted in the group their household is in now."""
    created = household("h1", WEST, 0)
    person = registered("p1", "h1", WEST)
    merged = registry_events.GroupsMerged(
        source_unit_id=WEST, target_unit_id=EAST, household_ids=["h1"]
    )
    orders = [[created, person, merged], [created, merged, person]]
    async with scratch_databases(settings, len(orders)) as dbs:
        for order, db in zip(orders, dbs, strict=True):
            store = GisStore(db)
            projection = RegistryProjection(store, Outbox(db, source="gis", topic=TOPIC))
            for message in [unit(WEST, "Tổ 1"), unit(EAST, "Tổ 2"), *order]:
                await handle(db, projection.apply, deliveries([message]))
            counts = await store.counts(WARD, "9999-12-31", today="2026-01-01")
            assert counts[EAST].get("population") == 1, order
            assert counts.get(WEST, {}).get("population", 0) == 0, order


async def kinds_after(
    settings: Settings, orders: Sequence[Sequence[Message]], before: list[Document] | None = None
) -> list[dict[str, int]]:
    """Each person's residence kind in the view after each order of the events, one event at a
    time, with the persons `before` already in it."""
    async with scratch_databases(settings, len(orders)) as dbs:
        found = []
        for order, db in zip(orders, dbs, strict=True):
            if before:
                await db["persons"].insert_many([dict(p) for p in before])
            projection = RegistryProjection(GisStore(db), Outbox(db, source="gis", topic=TOPIC))
            for message in [unit(WEST, "Tổ 1"), *order]:
                await handle(db, projection.apply, deliveries([message]))
            found.append({p["_id"]: p["residence_kind"] async for p in db["persons"].find()})
        return found


async def test_members_take_their_households_new_kind_but_a_temporary_stay_keeps_its_own(
    settings: Settings,
) -> None:
    """The household starts renting after both registrations; the view may get the update
    before them, or them before the household itself."""
    created = household("h1", WEST, 0)
    renting = household("h1", WEST, 0, updated="residence_kind", kind=RENTER)
    member = registered("p1", "h1", WEST)
    stay = registered("s1", "h1", WEST, TEMPORARY, stay_end="2027-01-01")
    orders = [
        [created, member, stay, renting],
        [created, renting, member, stay],
        [created, member, renting, stay],
        [member, stay, created, renting],
    ]
    for order, kinds in zip(orders, await kinds_after(settings, orders), strict=True):
        assert kinds == {"p1": RENTER, "s1": TEMPORARY}, order


async def test_a_mover_takes_the_kind_of_the_household_they_join_unless_on_a_stay(
    settings: Settings,
) -> None:
    """Whether the view has the household they join when they move, or gets it after."""
    home = household("h1", WEST, 0)
    rented = household("h2", WEST, 10, kind=RENTER)
    people = [
        registered("p1", "h1", WEST),
        registered("s1", "h1", WEST, TEMPORARY, stay_end="2027-01-01"),
        moved("p1", "h1", "h2"),
        moved("s1", "h1", "h2"),
    ]
    orders = [[home, rented, *people], [home, *people, rented]]
    for order, kinds in zip(orders, await kinds_after(settings, orders), strict=True):
        assert kinds == {"p1": RENTER, "s1": TEMPORARY}, order


async def test_persons_projected_before_stays_were_kept_follow_their_household_unless_temporary(
    settings: Settings,
) -> None:
    """Their documents do not say who is on a stay: every stay is a temporary resident."""
    before = [
        {"_id": "p1", "household_id": "h1", "unit_id": WEST, "residence_kind": PERMANENT},
        {"_id": "s1", "household_id": "h1", "unit_id": WEST, "residence_kind": TEMPORARY},
    ]
    renting = household("h1", WEST, 0, updated="residence_kind", kind=RENTER)
    orders = [[household("h1", WEST, 0), renting]]
    [kinds] = await kinds_after(settings, orders, before)
    assert kinds == {"p1": RENTER, "s1": TEMPORARY}


async def test_household_events_from_before_a_merge_arriving_after_it_go_where_the_group_went(
    settings: Settings,
) -> None:
    """A household's events, its members' and its group's merge travel on different
    partitions: its creation may be applied after the merge that followed it, even after the
    group it went to was merged in turn. One event at a time or in one batch, it lands (with its
    member) where its group went."""
    north = "dn.hc.w1.g3"
    west_east, east_north = [
        registry_events.GroupsMerged(source_unit_id=a, target_unit_id=b, household_ids=["h1"])
        for a, b in ((WEST, EAST), (EAST, north))
    ]
    created, person = household("h1", WEST, 0), registered("p1", "h1", WEST)
    orders = [
        [west_east, east_north, created, person],
        [west_east, east_north, person, created],
        [west_east, created, east_north, person],
    ]
    runs = [(order, batches) for order in orders for batches in ([[m] for m in order], [order])]
    async with scratch_databases(settings, len(runs)) as dbs:
        for (order, batches), db in zip(runs, dbs, strict=True):
            store = GisStore(db)
            projection = RegistryProjection(store, Outbox(db, source="gis", topic=TOPIC))
            units: list[Message] = [unit(WEST, "Tổ 1"), unit(EAST, "Tổ 2"), unit(north, "Tổ 3")]
            await handle(db, projection.apply, deliveries(units))
            for batch in batches:
                await handle(db, projection.apply, deliveries(batch))
            counts = await store.counts(WARD, "9999-12-31", today="2026-01-01")
            assert set(counts) == {north}, (order, len(batches), counts)
            assert (counts[north]["households"], counts[north]["population"]) == (1, 1), order


async def test_a_merge_into_a_group_merged_away_since_carries_the_map_where_that_group_went(
    settings: Settings,
) -> None:
    """West goes into east, then east into north: the two merges travel on different
    partitions (keyed by the group merged away), so the later one may be applied first. The
    west group's household and drawings end in the north group, whose leader keeps them, never
    in the east group nobody may draw in any more."""
    north = "dn.hc.w1.g3"
    west_east, east_north = [
        registry_events.GroupsMerged(source_unit_id=a, target_unit_id=b, household_ids=["h1"])
        for a, b in ((WEST, EAST), (EAST, north))
    ]
    orders: list[list[Message]] = [[west_east, east_north], [east_north, west_east]]
    runs = [(order, batches) for order in orders for batches in ([[m] for m in order], [order])]
    async with scratch_databases(settings, len(runs)) as dbs:
        for (order, batches), db in zip(runs, dbs, strict=True):
            store = GisStore(db)
            projection = RegistryProjection(store, Outbox(db, source="gis", topic=TOPIC))
            before: list[Message] = [
                unit(WEST, "Tổ 1"),
                unit(EAST, "Tổ 2"),
                unit(north, "Tổ 3"),
                household("h1", WEST, 0),
            ]
            await handle(db, projection.apply, deliveries(before))
            await store.features.insert_one(
                {
                    "_id": "building-west",
                    "layer": "building",
                    "unit_id": WEST,
                    "source_unit": WEST,
                    "source_id": "b1",
                    "properties": {"storeys": 2},
                }
            )
            for batch in batches:
                await handle(db, projection.apply, deliveries(batch))
            what = (order[0] is west_east, len(batches))
            point = await store.features.find_one({"_id": household_feature_id("h1")})
            assert point is not None and point["unit_id"] == north, what
            drawn = await store.features.find_one({"_id": "building-west"})
            assert drawn is not None, what
            assert (drawn["unit_id"], drawn["source_unit"]) == (north, north), what
