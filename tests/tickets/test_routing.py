"""Routing a submitted ticket to the lowest level with the authority to resolve it."""

from __future__ import annotations

from civic.tickets.v1 import tickets_pb2

from tests.tickets.conftest import Pilot


async def test_street_light_routes_to_the_ward(pilot: Pilot) -> None:
    submitted = await pilot.submit("street-light")
    assert submitted.status == tickets_pb2.TICKET_STATUS_SUBMITTED
    assert submitted.origin_unit_id == pilot.city.group

    routed = await pilot.routed(submitted.ticket_id)

    assert routed.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert routed.assigned_unit_id == pilot.city.ward
    assert routed.assigned_level == tickets_pb2.LEVEL_WARD
    assert routed.department == "urban-order"
    assert routed.rule_version >= 1
