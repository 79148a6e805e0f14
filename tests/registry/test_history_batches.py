"""The household history takes a partition's events as one batch: every event's lines once, in
the order the events happened, the same as one event at a time."""

from __future__ import annotations

from civic.registry.v1 import events_pb2
from pymongo.asynchronous.database import AsyncDatabase

from services.common.config import Settings
from services.common.mongo import Document
from services.registry.events import history_projection
from services.registry.store import RegistryStore
from tests.batches import deliveries, handle, scratch_databases

GROUP, OTHER = "dn.hc.w1.g1", "dn.hc.w1.g2"

BURST = [
    events_pb2.HouseholdCreated(
        household_id="h1", unit_id=GROUP, address="1 Trần Phú", head_person_id="p1"
    ),
    events_pb2.PersonRegistered(person_id="p1", household_id="h1", unit_id=GROUP),
    events_pb2.HouseholdCreated(household_id="h2", unit_id=GROUP, address="2 Trần Phú"),
    events_pb2.PersonRegistered(person_id="p2", household_id="h1", unit_id=GROUP),
    events_pb2.PersonMoved(
        person_id="p2", from_household_id="h1", to_household_id="h2", to_unit_id=GROUP
    ),
    events_pb2.HouseholdMoved(household_id="h1", from_unit_id=GROUP, to_unit_id=OTHER),
    events_pb2.UnitRenamed(unit_id=GROUP, new_name="Tổ 1"),  # no household's history
    events_pb2.PersonDied(person_id="p1", household_id="h1", death_date="2026-02-28"),
    # A reason added by a newer registry than this build: still a line, not a stuck consumer.
    events_pb2.PersonRegistered(person_id="p3", household_id="h2", unit_id=GROUP, reason=42),  # type: ignore[arg-type]
    # Moved on paper only: its group merged into another.
    events_pb2.HouseholdMoved(
        household_id="h2", from_unit_id=GROUP, to_unit_id=OTHER, by_merge=True
    ),
]

EXPECTED = {
    "h1": [
        ("p1", "household created at 1 Trần Phú"),
        ("p1", "person registered (unspecified)"),
        ("p2", "person registered (unspecified)"),
        ("p2", "person moved to h2"),
        ("", f"moved from {GROUP} to {OTHER}"),
        ("p1", "person died on 2026-02-28"),
    ],
    "h2": [
        ("", "household created at 2 Trần Phú"),
        ("p2", "person moved in from h1"),
        ("p3", "person registered (reason 42)"),
        ("", f"group {GROUP} merged into {OTHER}"),
    ],
}


async def histories(db: AsyncDatabase[Document]) -> dict[str, list[Document]]:
    store = RegistryStore(db)
    return {
        household_id: [
            {k: v for k, v in entry.items() if k != "_id"}
            for entry in await store.history_of(household_id)
        ]
        for household_id in EXPECTED
    }


async def test_a_burst_as_one_batch_writes_each_line_once_in_order(settings: Settings) -> None:
    async with scratch_databases(settings, 2) as (one_by_one, together):
        batch = deliveries(BURST)
        for delivery in batch:
            await handle(one_by_one, history_projection(RegistryStore(one_by_one)), [delivery])
        await handle(together, history_projection(RegistryStore(together)), batch)

        found = await histories(together)
        assert found == await histories(one_by_one)
        assert {
            household_id: [(e["person_id"], e["summary"]) for e in entries]
            for household_id, entries in found.items()
        } == EXPECTED
        # Each line names the event it came from, which happened in the order published.
        times = [e["occurred_at"] for e in found["h1"]]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert all(e["actor"] == "official-1" for e in found["h1"])
