"""Scale-out: two tickets instances side by side in one routing group split the routing of
submitted tickets between them; one is killed mid-load and restarted as the same instance, and
every ticket is still routed exactly once — nothing twice, nothing lost. The same holds for the
registry-view group: every new household is in the service's view, where residents file from."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from civic.common.v1 import types_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2

from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.tickets import domain
from services.tickets.main import NAME
from tests.conftest import token
from tests.registry_fixtures import new_city
from tests.scale_out import Deployment, committed_events, households_through_the_registry_view
from tests.tickets.conftest import TicketCaller, rid

TICKETS = 90
HOUSEHOLDS = 60
RESIDENTS = 5
SUBMITTED = type_name(events_pb2.TicketSubmitted())
ROUTED = type_name(events_pb2.TicketRouted())


async def test_two_instances_split_the_routing_and_a_killed_one_routes_each_ticket_once(
    settings: Settings, tmp_path: Path
) -> None:
    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.start("registry", "registry-0")
        tickets = await deployment.side_by_side(NAME)
        city = await new_city(registry.target, "c" + uuid.uuid4().hex[:8])
        await deployment.knows_units(NAME, city.group)
        # Residents not in the registry file for their group: no household events to wait for.
        residents = [
            TicketCaller(tickets.first.target, token(Role.RESIDENT, city.group, f"hh-{n}"))
            for n in range(RESIDENTS)
        ]
        categories = [rule.category for rule in domain.DEFAULT_RULES]

        async def submit(number: int) -> None:
            await residents[number % RESIDENTS].SubmitTicket(
                tickets_pb2.SubmitTicketRequest(
                    request_id=rid(),
                    category=categories[number % len(categories)],
                    description=f"Phản ánh số {number}",
                )
            )

        await tickets.under_load(TICKETS, submit)
        for resident in residents:
            await resident.channel.close()

        committed = await committed_events(deployment.db(NAME))
        submitted = [event["_id"] for event in committed if event["type"] == SUBMITTED]
        assert len(submitted) == TICKETS
        # Only TicketSubmitted is marked: the routing consumer passes over the rest unrecorded.
        by_instance = await tickets.handled(deployment.group(NAME, "routing"), submitted)

        # Routing stages TicketRouted in the transaction that marks the submission handled.
        committed = await committed_events(deployment.db(NAME))
        routed = Counter(event["key"] for event in committed if event["type"] == ROUTED)
        filed = deployment.db(NAME)["tickets"]
        ids = await filed.distinct("_id", {"status": int(domain.Status.ROUTED)})
        assert len(ids) == TICKETS
        assert routed == Counter(ids), "a ticket routed twice or not at all"
        assert set(by_instance) == set(tickets.instances), by_instance


async def test_two_instances_split_the_registry_events_and_a_killed_one_loses_no_household(
    settings: Settings, tmp_path: Path
) -> None:
    def doorstep(number: int) -> types_pb2.GeoPoint:
        return types_pb2.GeoPoint(latitude=16.07 + number * 0.0001, longitude=108.22)

    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.start("registry", "registry-0")
        tickets = await deployment.side_by_side(NAME)
        city = await new_city(registry.target, "c" + uuid.uuid4().hex[:8])
        households = await households_through_the_registry_view(tickets, city, HOUSEHOLDS, doorstep)
        view = deployment.db(NAME)["households"]
        seen = {h["_id"]: h async for h in view.find({"_id": {"$in": households}})}
        assert {h["unit_id"] for h in seen.values()} == {city.group}
        assert sorted(seen) == sorted(households), "a household lost on the way"
        # Each where the registry put it: the point a resident's ticket is filed at by default.
        assert {tuple(h["location"]["coordinates"]) for h in seen.values()} == {
            (108.22, 16.07 + n * 0.0001) for n in range(HOUSEHOLDS)
        }
