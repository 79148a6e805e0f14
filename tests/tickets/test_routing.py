"""Routing a submitted ticket to the lowest level with the authority to resolve it, by the routing
rules in force when the routing consumer handles the ticket.

Routing rules are global to the session's tickets database: a test that changes them restores the
previous rules afterwards and keeps every default category at its default level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta

import grpc
import pytest
from civic.tickets.v1 import tickets_pb2
from google.protobuf.duration_pb2 import Duration

from services.common.auth import Role
from services.tickets import domain
from tests.conftest import Clock
from tests.tickets.conftest import Pilot, TicketCaller, eventually, point_near, rid

Rules = list[tickets_pb2.RoutingRule]


def rule(
    category: str, level: tickets_pb2.Level.ValueType, department: str, ack_hours: int
) -> tickets_pb2.RoutingRule:
    """A rule whose deadlines are the same at every level."""
    return tickets_pb2.RoutingRule(
        category=category,
        title=f"Test: {category}",
        level=level,
        department=department,
        slas=[
            tickets_pb2.LevelSla(
                level=tickets_pb2.LEVEL_GROUP,
                acknowledge_within=Duration(seconds=ack_hours * 3600),
                resolve_within=Duration(seconds=10 * 86400),
            )
        ],
    )


def replacing(extra: Rules) -> Callable[[Rules], Rules]:
    """The rules in force, with `extra` added or, for a category already there, replacing it."""
    names = {r.category for r in extra}
    return lambda current: [r for r in current if r.category not in names] + extra


async def set_rules(admin: TicketCaller, rules: Rules, reopen_within: Duration) -> int:
    response = await admin.SetRoutingRules(
        tickets_pb2.SetRoutingRulesRequest(
            request_id=rid(), rules=rules, reopen_within=reopen_within
        )
    )
    return int(response.rules.version)


@asynccontextmanager
async def rules_changed(
    admin: TicketCaller, change: Callable[[Rules], Rules]
) -> AsyncIterator[int]:
    """Rules changed for the duration of the block (the new version), then restored."""
    before = (await admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
    changed = change(list(before.rules))
    defaults = {r.category: int(r.level) for r in domain.DEFAULT_RULES}
    assert defaults.items() <= {r.category: int(r.level) for r in changed}.items()
    version = await set_rules(admin, changed, before.reopen_within)
    try:
        yield version
    finally:
        await set_rules(admin, list(before.rules), before.reopen_within)


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


async def test_each_level_gets_the_categories_it_has_authority_for(pilot: Pilot) -> None:
    city = pilot.city
    extra = [
        rule("test-group-level", tickets_pb2.LEVEL_GROUP, "", 6),
        rule("test-district-level", tickets_pb2.LEVEL_DISTRICT, "construction", 36),
        rule("test-city-level", tickets_pb2.LEVEL_CITY, "transport", 48),
    ]
    expected = {
        # category: (assigned unit, level, department, hours to acknowledge)
        "sanitation": (city.group, tickets_pb2.LEVEL_GROUP, "", 24),
        "test-group-level": (city.group, tickets_pb2.LEVEL_GROUP, "", 6),
        "noise": (city.ward, tickets_pb2.LEVEL_WARD, "ward-police", 12),
        "test-district-level": (city.district, tickets_pb2.LEVEL_DISTRICT, "construction", 36),
        "test-city-level": (city.city, tickets_pb2.LEVEL_CITY, "transport", 48),
    }
    async with rules_changed(pilot.admin, replacing(extra)) as version:
        # Different categories at the same place: none is a duplicate of another.
        submitted = {category: await pilot.submit(category) for category in expected}
        routed = {c: await pilot.routed(t.ticket_id) for c, t in submitted.items()}

    for category, (unit, level, department, ack_hours) in expected.items():
        ticket = routed[category]
        assert ticket.status == tickets_pb2.TICKET_STATUS_ROUTED, category
        assert (ticket.assigned_unit_id, ticket.assigned_level) == (unit, level), category
        assert ticket.department == department, category
        assert ticket.rule_version == version, category
        assert ticket.duplicate_of == "", category
        # Deadlines start when the ticket reaches the level, moments after it was filed.
        late = ticket.acknowledge_by.ToDatetime() - ticket.submitted_at.ToDatetime()
        assert timedelta(hours=ack_hours) <= late < timedelta(hours=ack_hours, seconds=10)

    # Each level's officials find their ticket in their own queue, and only there.
    queues = {
        city.group: pilot.leader,
        city.ward: pilot.ward_officer,
        city.district: pilot.district_officer,
        city.city: pilot.admin,
    }
    for unit, official in queues.items():
        queue = await official.ListQueue(tickets_pb2.ListQueueRequest())
        mine = {t.ticket_id for t in queue.tickets}
        for category, (assigned, *_) in expected.items():
            assert (routed[category].ticket_id in mine) == (assigned == unit), (unit, category)


async def test_a_rule_change_applies_to_tickets_routed_after_it(pilot: Pilot, clock: Clock) -> None:
    """Routing runs in the routing consumer moments after SubmitTicket returns, and uses the rules
    in force at that moment; so the test waits for the first ticket to be routed before changing
    the rules. A routed ticket keeps its rule version, level and deadlines; later tickets follow
    the new version."""
    city = pilot.city
    at_ward = rule("test-moving", tickets_pb2.LEVEL_WARD, "urban-order", 24)
    at_district = rule("test-moving", tickets_pb2.LEVEL_DISTRICT, "construction", 2)

    async with rules_changed(pilot.admin, replacing([at_ward])) as first:
        before = await pilot.routed((await pilot.submit("test-moving")).ticket_id)
        assert (before.rule_version, before.assigned_unit_id) == (first, city.ward)

        async with rules_changed(pilot.admin, replacing([at_district])) as second:
            assert second == first + 1
            current = await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())
            assert current.rules.version == second
            # Far enough from the first ticket not to be linked to it as a duplicate.
            after = await pilot.routed(
                (await pilot.submit("test-moving", location=point_near(1_000))).ticket_id
            )
            kept = (
                await pilot.resident.GetTicket(
                    tickets_pb2.GetTicketRequest(ticket_id=before.ticket_id)
                )
            ).ticket

            assert (after.rule_version, after.assigned_unit_id) == (second, city.district)
            assert after.assigned_level == tickets_pb2.LEVEL_DISTRICT
            assert after.department == "construction"
            assert kept.rule_version == first
            assert (kept.assigned_unit_id, kept.assigned_level) == (
                city.ward,
                tickets_pb2.LEVEL_WARD,
            )
            assert kept.department == "urban-order"
            assert kept.acknowledge_by == before.acknowledge_by

            # Deadlines too follow each ticket's own version: three hours on, the new ticket
            # (2 h to acknowledge) has gone up to the city, the old one (24 h) has not moved.
            clock.advance(hours=3)

            async def escalated() -> tickets_pb2.Ticket | None:
                got = await pilot.resident.GetTicket(
                    tickets_pb2.GetTicketRequest(ticket_id=after.ticket_id)
                )
                return got.ticket if got.ticket.escalations else None

            moved = await eventually(escalated)
            assert moved.assigned_unit_id == city.city
            still = await pilot.resident.GetTicket(
                tickets_pb2.GetTicketRequest(ticket_id=before.ticket_id)
            )
            assert still.ticket.escalations == 0
            assert still.ticket.assigned_unit_id == city.ward

    restored = await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())
    assert "test-moving" not in {r.category for r in restored.rules.rules}


async def test_rules_set_without_a_reopen_period_keep_the_one_in_force(pilot: Pilot) -> None:
    """An admin changing only the categories leaves the reopen period as it was, not reset to
    the default."""
    three_days = Duration(seconds=3 * 86400)
    async with rules_changed(pilot.admin, lambda current: current):
        current = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
        await set_rules(pilot.admin, list(current.rules), three_days)

        changed = await pilot.admin.SetRoutingRules(
            tickets_pb2.SetRoutingRulesRequest(request_id=rid(), rules=current.rules)
        )

        assert changed.rules.reopen_within == three_days


async def test_an_edit_of_rules_changed_meanwhile_by_another_admin_is_aborted(
    pilot: Pilot,
) -> None:
    """Two admins edit the rules they read: the second to save does not silently undo the
    first's change, it is told to read them again."""
    other_admin = pilot.caller(Role.CITY_ADMIN, pilot.city.city, subject="admin-2")
    async with rules_changed(pilot.admin, lambda current: current):
        read = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
        added = rule("stray-dogs", tickets_pb2.LEVEL_WARD, "urban-order", 24)
        first = await other_admin.SetRoutingRules(
            tickets_pb2.SetRoutingRulesRequest(
                request_id=rid(), rules=[*read.rules, added], based_on_version=read.version
            )
        )
        assert first.rules.version == read.version + 1

        stale = tickets_pb2.SetRoutingRulesRequest(
            request_id=rid(), rules=read.rules, based_on_version=read.version
        )
        with pytest.raises(grpc.aio.AioRpcError) as aborted:
            await pilot.admin.SetRoutingRules(stale)
        assert aborted.value.code() == grpc.StatusCode.ABORTED
        assert (aborted.value.details() or "").startswith("based_on_version: ")
        now = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
        assert now.version == first.rules.version
        assert "stray-dogs" in {r.category for r in now.rules}

        # Read again, the edit goes through; a retry of it gets its answer, not ABORTED.
        redo = tickets_pb2.SetRoutingRulesRequest(
            request_id=rid(), rules=now.rules, based_on_version=now.version
        )
        saved = await pilot.admin.SetRoutingRules(redo)
        assert saved.rules.version == now.version + 1
        assert (await pilot.admin.SetRoutingRules(redo)).rules.version == saved.rules.version


@pytest.mark.parametrize("offset", [1, 1000])
async def test_an_edit_based_on_a_version_never_made_is_refused_not_aborted(
    pilot: Pilot, offset: int
) -> None:
    """ABORTED tells an admin someone else saved meanwhile; an edit naming a version that does
    not exist (yet) is a mistake of its own, named as one, and saves nothing."""
    read = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
    for based_on in (read.version + offset, -offset):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pilot.admin.SetRoutingRules(
                tickets_pb2.SetRoutingRulesRequest(
                    request_id=rid(), rules=read.rules, based_on_version=based_on
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert (refused.value.details() or "").startswith("based_on_version: ")
    after = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
    assert after.version == read.version
