"""The shared view of the registry follows a person's corrected details."""

from __future__ import annotations

from civic.registry.v1 import events_pb2, registry_pb2

from services.common.config import Settings
from services.common.registry_view import RegistryView, households_touched
from tests.batches import deliveries, handle, scratch_databases


async def test_a_corrected_birth_date_and_sex_reach_the_view_and_its_household(
    settings: Settings,
) -> None:
    registered = events_pb2.PersonRegistered(
        person_id="p1",
        household_id="h1",
        unit_id="dn.hc.w1.g1",
        birth_date="1950-01-01",
        sex=registry_pb2.SEX_MALE,
    )
    corrected = events_pb2.PersonUpdated(
        person_id="p1",
        household_id="h1",
        unit_id="dn.hc.w1.g1",
        updated_fields=["birth_date", "sex"],
        birth_date="1940-01-01",
        sex=registry_pb2.SEX_FEMALE,
    )
    async with scratch_databases(settings, 1) as [db]:
        view = RegistryView(db, people=True)
        await handle(db, view.apply_batch, deliveries([registered, corrected]))
        person = await db["persons"].find_one({"_id": "p1"}) or {}
    assert (person["birth_date"], person["sex"]) == ("1940-01-01", registry_pb2.SEX_FEMALE)
    # Whom a notice reaches by age may change: the household is looked at again.
    assert households_touched(corrected) == ["h1"]
