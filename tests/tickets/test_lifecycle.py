"""A ticket's life after routing: acknowledged, worked on, resolved or rejected at the level it is
at, rated and reopened by its submitter, closed; comments; illegal steps refused; the queries of
residents (ListMyTickets) and officials (ListQueue)."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2
from google.protobuf.message import Message

from services.common.auth import Role
from services.tickets import domain
from services.tickets.main import TicketsService
from tests.conftest import Clock
from tests.indexes import index_uses, used_since
from tests.registry_fixtures import new_household
from tests.tickets.conftest import HOME, Pilot, TicketCaller, rid
from tests.tickets.test_routing import replacing, rule, rules_changed

RESOLUTION = "Đã thay bóng đèn mới"


async def refused(code: grpc.StatusCode, call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()


async def get(caller: TicketCaller, ticket_id: str) -> tickets_pb2.Ticket:
    response = await caller.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
    ticket: tickets_pb2.Ticket = response.ticket
    return ticket


async def events_of(service: TicketsService, ticket_id: str) -> list[Message]:
    """The ticket's events, in order, as the outbox holds them for the broker."""
    entries = await service.db["outbox"].find({"events.key": ticket_id}).sort("_id").to_list()
    found: list[Message] = []
    for entry in entries:
        for event in entry["events"]:
            if event["key"] == ticket_id:
                message = getattr(events_pb2, event["type"].rsplit(".", 1)[1])()
                message.ParseFromString(bytes(event["data"]))
                found.append(message)
    return found


def near(stamp: Any, expected: datetime, slack: timedelta = timedelta(seconds=10)) -> bool:
    return bool(abs(stamp.ToDatetime(tzinfo=UTC) - expected) < slack)


async def test_the_ward_acknowledges_works_on_and_resolves_a_ticket_at_its_level(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ticket = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    officer = pilot.ward_officer
    request = {"ticket_id": ticket.ticket_id}

    acknowledged = await officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), **request)
    )
    assert acknowledged.ticket.status == tickets_pb2.TICKET_STATUS_ACKNOWLEDGED
    assert not acknowledged.ticket.HasField("acknowledge_by")
    assert acknowledged.ticket.resolve_by == ticket.resolve_by

    started = await officer.StartWork(tickets_pb2.StartWorkRequest(request_id=rid(), **request))
    assert started.ticket.status == tickets_pb2.TICKET_STATUS_IN_PROGRESS

    resolved = await officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), resolution=RESOLUTION, **request)
    )
    done = resolved.ticket
    assert done.status == tickets_pb2.TICKET_STATUS_RESOLVED
    assert done.resolution == RESOLUTION
    # Resolved where it was, without forwarding.
    assert (done.assigned_unit_id, done.assigned_level) == (pilot.city.ward, ticket.assigned_level)
    assert done.escalations == 0
    assert near(done.resolved_at, datetime.now(UTC))
    assert not done.overdue

    # The submitter rates the resolution, and closes the ticket; a rating may be revised.
    rated = await pilot.resident.RateResolution(
        tickets_pb2.RateResolutionRequest(request_id=rid(), rating=4, **request)
    )
    assert rated.ticket.rating == 4
    closed = await pilot.resident.CloseTicket(
        tickets_pb2.CloseTicketRequest(request_id=rid(), **request)
    )
    assert closed.ticket.status == tickets_pb2.TICKET_STATUS_CLOSED
    revised = await pilot.resident.RateResolution(
        tickets_pb2.RateResolutionRequest(request_id=rid(), rating=5, **request)
    )
    assert revised.ticket.rating == 5
    assert (await get(pilot.resident, ticket.ticket_id)).rating == 5

    # Only the submitter rates.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        officer.RateResolution(
            tickets_pb2.RateResolutionRequest(request_id=rid(), rating=1, **request)
        ),
    )
    # Another resident may not see it at all: to them it is not there.
    await refused(
        grpc.StatusCode.NOT_FOUND,
        pilot.neighbour.RateResolution(
            tickets_pb2.RateResolutionRequest(request_id=rid(), rating=1, **request)
        ),
    )

    events = await events_of(tickets_service, ticket.ticket_id)
    assert [type(e).__name__ for e in events] == [
        "TicketSubmitted",
        "TicketRouted",
        "TicketAcknowledged",
        "TicketWorkStarted",
        "TicketResolved",
        "TicketRated",
        "TicketClosed",
        "TicketRated",
    ]
    resolved_event = events[4]
    assert isinstance(resolved_event, events_pb2.TicketResolved)
    assert resolved_event.resolved_by_unit_id == pilot.city.ward
    assert resolved_event.level == tickets_pb2.LEVEL_WARD


async def test_a_retried_step_gets_its_first_answer_though_the_state_has_moved_on(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ticket = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    acknowledge = tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
    first = await pilot.ward_officer.AcknowledgeTicket(acknowledge)
    # Acknowledging again would be an illegal transition; the same request is a retry instead.
    again = await pilot.ward_officer.AcknowledgeTicket(acknowledge)

    assert again == first
    events = await events_of(tickets_service, ticket.ticket_id)
    assert [type(event).__name__ for event in events].count("TicketAcknowledged") == 1
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.ward_officer.AcknowledgeTicket(
            tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
        ),
    )


async def test_a_retried_filing_gets_its_first_answer_though_its_category_was_withdrawn(
    pilot: Pilot,
) -> None:
    """The app retries a filing whose answer it lost after the category was withdrawn: the
    retry is answered with the ticket filed, while a new filing in that category is refused."""
    filing = tickets_pb2.SubmitTicketRequest(
        request_id=rid(), category="test-withdrawn", description="Cây đổ chắn đường"
    )
    withdrawn = rule("test-withdrawn", tickets_pb2.LEVEL_WARD, "", 24)
    async with rules_changed(pilot.admin, replacing([withdrawn])):
        first = await pilot.resident.SubmitTicket(filing)

    again = await pilot.resident.SubmitTicket(filing)

    assert again == first
    filing.request_id = rid()
    await refused(grpc.StatusCode.INVALID_ARGUMENT, pilot.resident.SubmitTicket(filing))


async def test_an_official_above_the_assigned_unit_decides_at_their_own_level(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A district officer resolving or rejecting a ward's ticket decides it as the district, in
    the ticket's record and in the event; the ticket stays assigned to the ward."""
    city = pilot.city
    street_light, noise = [
        (await pilot.routed((await pilot.submit(category)).ticket_id)).ticket_id
        for category in ("street-light", "noise")
    ]
    resolved = await pilot.district_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=street_light, resolution="Quận đã thay bóng"
        )
    )
    await pilot.district_officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(
            request_id=rid(), ticket_id=noise, reason="Không thuộc thẩm quyền"
        )
    )

    assert resolved.ticket.assigned_unit_id == city.ward
    *_, resolved_event = await events_of(tickets_service, street_light)
    *_, rejected_event = await events_of(tickets_service, noise)
    assert isinstance(resolved_event, events_pb2.TicketResolved)
    assert isinstance(rejected_event, events_pb2.TicketRejected)
    at_district = (city.district, tickets_pb2.LEVEL_DISTRICT)
    assert (resolved_event.resolved_by_unit_id, resolved_event.level) == at_district
    assert (rejected_event.rejected_by_unit_id, rejected_event.level) == at_district
    stored = {
        ticket["_id"]: ticket
        async for ticket in tickets_service.db["tickets"].find(
            {"_id": {"$in": [street_light, noise]}}
        )
    }
    for ticket in stored.values():
        assert (ticket["decided_by_unit_id"], ticket["decided_level"]) == at_district


async def test_a_ticket_can_be_rejected_with_a_reason(pilot: Pilot) -> None:
    ticket = await pilot.routed((await pilot.submit("noise")).ticket_id)
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.ward_officer.RejectTicket(
            tickets_pb2.RejectTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
        ),
    )
    rejected = await pilot.ward_officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(
            request_id=rid(), ticket_id=ticket.ticket_id, reason="Không thuộc thẩm quyền"
        )
    )
    assert rejected.ticket.status == tickets_pb2.TICKET_STATUS_REJECTED
    assert rejected.ticket.rejection_reason == "Không thuộc thẩm quyền"
    assert rejected.ticket.resolution == ""


ILLEGAL: dict[str, list[str]] = {
    # The state the ticket is in: the actions refused there.
    "routed": ["start", "reopen", "close", "rate"],
    "acknowledged": ["acknowledge", "reopen", "close", "rate"],
    "resolved": ["acknowledge", "start", "resolve", "reject", "escalate", "support", "withdraw"],
    "closed": ["acknowledge", "resolve", "reopen", "close", "support", "withdraw"],
}


def action(pilot: Pilot, name: str, ticket_id: str) -> Awaitable[Any]:
    """The call for an action, by someone allowed to take it in the right state."""
    officer, resident = pilot.ward_officer, pilot.resident
    common = {"request_id": rid(), "ticket_id": ticket_id}
    calls = {
        "acknowledge": lambda: officer.AcknowledgeTicket(
            tickets_pb2.AcknowledgeTicketRequest(**common)
        ),
        "start": lambda: officer.StartWork(tickets_pb2.StartWorkRequest(**common)),
        "resolve": lambda: officer.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(resolution=RESOLUTION, **common)
        ),
        "reject": lambda: officer.RejectTicket(
            tickets_pb2.RejectTicketRequest(reason="trùng lặp", **common)
        ),
        "escalate": lambda: officer.EscalateTicket(
            tickets_pb2.EscalateTicketRequest(reason="cần cấp trên", **common)
        ),
        "reopen": lambda: resident.ReopenTicket(
            tickets_pb2.ReopenTicketRequest(reason="vẫn hỏng", **common)
        ),
        "close": lambda: resident.CloseTicket(tickets_pb2.CloseTicketRequest(**common)),
        "withdraw": lambda: resident.WithdrawTicket(tickets_pb2.WithdrawTicketRequest(**common)),
        "rate": lambda: resident.RateResolution(
            tickets_pb2.RateResolutionRequest(rating=3, **common)
        ),
        "support": lambda: pilot.neighbour.SupportTicket(
            tickets_pb2.SupportTicketRequest(**common)
        ),
    }
    result: Awaitable[Any] = calls[name]()
    return result


async def test_illegal_transitions_fail_the_precondition_and_change_nothing(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("flooding")).ticket_id)).ticket_id
    # Each state, and the legal step to the next one.
    path = [("routed", "acknowledge"), ("acknowledged", "resolve"), ("resolved", "close")]
    for state, step in [*path, ("closed", "")]:
        stored = await tickets_service.store.get(ticket_id)
        events = len(await events_of(tickets_service, ticket_id))
        for name in ILLEGAL[state]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await action(pilot, name, ticket_id)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (state, name)
            assert f"cannot {name}" in (caught.value.details() or ""), (state, name)
        assert await tickets_service.store.get(ticket_id) == stored, state
        assert len(await events_of(tickets_service, ticket_id)) == events, state
        if step:
            await action(pilot, step, ticket_id)
    assert (await get(pilot.resident, ticket_id)).status == tickets_pb2.TICKET_STATUS_CLOSED


async def test_the_submitter_withdraws_an_open_ticket(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    request = {"request_id": rid(), "ticket_id": ticket_id, "reason": "Hàng xóm đã tắt loa"}
    # Only the submitter: not the official handling it, and to a neighbour it is not there.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.ward_officer.WithdrawTicket(tickets_pb2.WithdrawTicketRequest(**request)),
    )
    await refused(
        grpc.StatusCode.NOT_FOUND,
        pilot.neighbour.WithdrawTicket(tickets_pb2.WithdrawTicketRequest(**request)),
    )
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.resident.WithdrawTicket(
            tickets_pb2.WithdrawTicketRequest(
                request_id=rid(), ticket_id=ticket_id, reason="x" * 5000
            )
        ),
    )

    withdrawn = (
        await pilot.resident.WithdrawTicket(tickets_pb2.WithdrawTicketRequest(**request))
    ).ticket
    assert withdrawn.status == tickets_pb2.TICKET_STATUS_CLOSED and withdrawn.withdrawn
    assert withdrawn.comments[-1].text == "Hàng xóm đã tắt loa"
    assert not withdrawn.overdue and withdrawn.resolution == ""
    # A retry answers as the first time, and writes nothing more.
    again = await pilot.resident.WithdrawTicket(tickets_pb2.WithdrawTicketRequest(**request))
    assert again.ticket == withdrawn
    events = await events_of(tickets_service, ticket_id)
    assert [type(e).__name__ for e in events][-1] == "TicketWithdrawn"
    assert [type(e).__name__ for e in events].count("TicketWithdrawn") == 1
    # Nothing was decided: nothing to rate, nothing to reopen.
    for name in ("rate", "reopen"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await action(pilot, name, ticket_id)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name


async def test_a_ticket_other_residents_support_is_not_withdrawn(pilot: Pilot) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    await pilot.neighbour.SupportTicket(
        tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pilot.resident.WithdrawTicket(
            tickets_pb2.WithdrawTicketRequest(request_id=rid(), ticket_id=ticket_id)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "support" in (caught.value.details() or "")
    assert (await get(pilot.resident, ticket_id)).status == tickets_pb2.TICKET_STATUS_ROUTED


async def test_officials_and_the_submitter_comment_others_may_not(pilot: Pilot) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("health")).ticket_id)).ticket_id

    async def comment(caller: TicketCaller, text: str) -> tickets_pb2.Ticket:
        response = await caller.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=text)
        )
        ticket: tickets_pb2.Ticket = response.ticket
        return ticket

    await comment(pilot.resident, "Tối nào cũng tắt")
    await comment(pilot.ward_officer, "Đã giao trạm y tế")
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket_id, resolution="Đã xử lý"
        )
    )
    # Comments go on after resolution, and officials above the assigned unit may comment too.
    last = await comment(pilot.district_officer, "Quận đã kiểm tra")

    assert [(c.author_role, c.text) for c in last.comments] == [
        ("resident", "Tối nào cũng tắt"),
        ("ward_officer", "Đã giao trạm y tế"),
        ("district_officer", "Quận đã kiểm tra"),
    ]
    assert last.comments[0].author == "resident-1"
    assert all(near(c.at, datetime.now(UTC)) for c in last.comments)

    for outsider in (
        pilot.neighbour,
        pilot.caller(Role.WARD_OFFICER, f"{pilot.city.district}.other"),
    ):
        # Neither may see it: to them it is not there.
        await refused(grpc.StatusCode.NOT_FOUND, comment(outsider, "xin chào"))
    await refused(grpc.StatusCode.INVALID_ARGUMENT, comment(pilot.resident, "   "))
    assert len((await get(pilot.resident, ticket_id)).comments) == 3


async def test_the_submitter_reopens_within_the_reopen_period(pilot: Pilot, clock: Clock) -> None:
    first = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    second = await pilot.routed((await pilot.submit("noise")).ticket_id)
    for ticket in (first, second):
        await pilot.ward_officer.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(
                request_id=rid(), ticket_id=ticket.ticket_id, resolution=RESOLUTION
            )
        )
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.ward_officer.ReopenTicket(
            tickets_pb2.ReopenTicketRequest(
                request_id=rid(), ticket_id=first.ticket_id, reason="vẫn hỏng"
            )
        ),
    )

    clock.advance(days=2)
    reopened = (
        await pilot.resident.ReopenTicket(
            tickets_pb2.ReopenTicketRequest(
                request_id=rid(), ticket_id=first.ticket_id, reason="Đèn lại tắt"
            )
        )
    ).ticket
    assert reopened.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert reopened.assigned_unit_id == pilot.city.ward
    assert not reopened.HasField("resolved_at")
    # Fresh deadlines at the same level, from the reopening.
    assert near(reopened.acknowledge_by, clock() + timedelta(hours=24))
    assert near(reopened.resolve_by, clock() + timedelta(days=5))
    assert [(c.author, c.text) for c in reopened.comments] == [("resident-1", "Đèn lại tắt")]
    # In the ward's queue again, to be acknowledged anew.
    queue = await pilot.ward_officer.ListQueue(
        tickets_pb2.ListQueueRequest(statuses=[tickets_pb2.TICKET_STATUS_ROUTED])
    )
    assert first.ticket_id in {t.ticket_id for t in queue.tickets}

    # The reopen period (7 days by default) has passed for the second ticket.
    clock.advance(days=6)
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.resident.ReopenTicket(
            tickets_pb2.ReopenTicketRequest(
                request_id=rid(), ticket_id=second.ticket_id, reason="vẫn ồn"
            )
        ),
    )
    assert (await get(pilot.resident, second.ticket_id)).status == (
        tickets_pb2.TICKET_STATUS_RESOLVED
    )


async def test_an_official_files_on_behalf_of_a_resident(pilot: Pilot) -> None:
    city = pilot.city
    by_household = await pilot.submit(
        "citizen-id-at-home", caller=pilot.ward_officer, household_id=pilot.household_id
    )
    by_group = await pilot.submit("sanitation", caller=pilot.leader, unit_id=city.group)

    assert by_household.origin_unit_id == city.group
    assert by_household.household_id == pilot.household_id
    assert by_household.location == HOME  # the household's, from the registry
    assert by_household.submitter == f"ward_officer@{city.ward}"
    assert by_group.origin_unit_id == city.group
    assert by_group.household_id == ""
    assert by_group.submitter == f"group_leader@{city.group}"

    routed = await pilot.routed(by_household.ticket_id, pilot.ward_officer)
    assert (routed.assigned_unit_id, routed.department) == (city.ward, "ward-police")
    routed = await pilot.routed(by_group.ticket_id, pilot.leader)
    assert routed.assigned_unit_id == city.group


async def test_a_household_has_a_ticket_filed_on_its_behalf_as_its_own(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Filed by the ward for a household, a ticket is that household's: its residents list, read,
    comment on, rate and reopen it, and close it when they like; the filing official has what
    the ward's officials have. Its events name none of the household's residents."""
    city = pilot.city
    filed = await pilot.submit("noise", caller=pilot.ward_officer, household_id=pilot.household_id)
    ticket_id = (await pilot.routed(filed.ticket_id, pilot.ward_officer)).ticket_id
    elsewhere = await new_household(city.leader, city.group)
    next_door = pilot.caller(
        Role.RESIDENT, city.group, elsewhere.household.household_id, f"next-door-{city.city}"
    )

    mine = await pilot.resident.ListMyTickets(tickets_pb2.ListMyTicketsRequest())
    assert ticket_id in {t.ticket_id for t in mine.tickets}
    seen = await get(pilot.resident, ticket_id)
    assert (seen.description, seen.household_id) == (filed.description, pilot.household_id)
    theirs = await next_door.ListMyTickets(tickets_pb2.ListMyTicketsRequest())
    assert ticket_id not in {t.ticket_id for t in theirs.tickets}
    await refused(grpc.StatusCode.NOT_FOUND, get(next_door, ticket_id))

    commented = await pilot.resident.AddComment(
        tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text="Ồn cả đêm")
    )
    assert [(c.author, c.text) for c in commented.ticket.comments] == [("resident-1", "Ồn cả đêm")]
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.neighbour.SupportTicket(
            tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=ticket_id)
        ),
    )
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket_id, resolution="Đã nhắc"
        )
    )
    # Rating and closing at once are the household's: the ward waits for the reopening period.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.ward_officer.RateResolution(
            tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket_id, rating=5)
        ),
    )
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.ward_officer.CloseTicket(
            tickets_pb2.CloseTicketRequest(request_id=rid(), ticket_id=ticket_id)
        ),
    )
    rated = await pilot.neighbour.RateResolution(
        tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket_id, rating=2)
    )
    assert rated.ticket.rating == 2
    reopened = await pilot.resident.ReopenTicket(
        tickets_pb2.ReopenTicketRequest(request_id=rid(), ticket_id=ticket_id, reason="Vẫn ồn")
    )
    assert reopened.ticket.status == tickets_pb2.TICKET_STATUS_ROUTED

    entries = await tickets_service.db["outbox"].find({"events.key": ticket_id}).to_list()
    published = [event for entry in entries for event in entry["events"]]
    assert len(published) >= 6
    for event in published:
        told = bytes(event["data"]) + str(event.get("actor", "")).encode()
        for resident in ("resident-1", "resident-2", pilot.household_id):
            assert resident.encode() not in told


async def test_a_resident_lists_their_own_tickets_newest_first(pilot: Pilot) -> None:
    city = pilot.city
    me = pilot.caller(Role.RESIDENT, city.group, pilot.household_id, f"me-{city.city}")
    other = pilot.caller(Role.RESIDENT, city.group, pilot.household_id, f"other-{city.city}")
    mine = [(await pilot.submit(c, caller=me)).ticket_id for c in ("noise", "health", "flooding")]
    theirs = (await pilot.submit("sanitation", caller=other)).ticket_id

    first = await me.ListMyTickets(
        tickets_pb2.ListMyTicketsRequest(page=types_pb2.PageRequest(page_size=2))
    )
    assert [t.ticket_id for t in first.tickets] == mine[:0:-1]
    assert first.next_page_token
    rest = await me.ListMyTickets(
        tickets_pb2.ListMyTicketsRequest(
            page=types_pb2.PageRequest(page_size=2, page_token=first.next_page_token)
        )
    )
    assert [t.ticket_id for t in rest.tickets] == mine[:1]
    assert not rest.next_page_token

    listed = await other.ListMyTickets(tickets_pb2.ListMyTicketsRequest())
    assert [t.ticket_id for t in listed.tickets] == [theirs]
    for ticket_id in [*mine, theirs]:
        await pilot.routed(ticket_id, pilot.ward_officer)


async def test_the_queue_filters_by_department_status_category_and_deadline(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    ids = {}
    for category in ("street-light", "flooding", "noise", "health"):
        ids[category] = (await pilot.routed((await pilot.submit(category)).ticket_id)).ticket_id
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ids["noise"])
    )

    async def queue(**filters: Any) -> set[str]:
        response = await pilot.ward_officer.ListQueue(tickets_pb2.ListQueueRequest(**filters))
        by_id = {v: k for k, v in ids.items()}
        return {by_id[t.ticket_id] for t in response.tickets}

    tickets = tickets_service.store.tickets
    before = await index_uses(tickets)
    assert await queue() == set(ids)
    # Page by page in the index's order: not every ticket the unit ever had, sorted each time.
    assert "assigned_unit_id_1__id_1" in await used_since(tickets, before)
    assert await queue(unit_id=pilot.city.ward) == set(ids)
    assert await queue(department="urban-order") == {"street-light", "flooding"}
    assert await queue(category="health") == {"health"}
    assert await queue(statuses=[tickets_pb2.TICKET_STATUS_ACKNOWLEDGED]) == {"noise"}
    routed_or_acknowledged = [
        tickets_pb2.TICKET_STATUS_ROUTED,
        tickets_pb2.TICKET_STATUS_ACKNOWLEDGED,
    ]
    assert await queue(statuses=routed_or_acknowledged) == set(ids)
    assert await queue(department="ward-police", statuses=[tickets_pb2.TICKET_STATUS_ROUTED]) == (
        set()
    )
    assert await queue(department="urban-order", category="flooding") == {"flooding"}
    # Nothing is late yet (the city's overdue queue is in test_escalation).
    assert await queue(overdue_only=True) == set()
    # A ward's tickets are not in the queue of the level above.
    district = await pilot.district_officer.ListQueue(tickets_pb2.ListQueueRequest())
    assert not {t.ticket_id for t in district.tickets} & set(ids.values())


async def test_a_ticket_keeps_a_bounded_number_of_comments(
    pilot: Pilot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every answer carries the whole ticket: unbounded comments would outgrow gRPC's answer and
    then MongoDB's document, with the comment written but its answer lost."""
    monkeypatch.setattr(domain, "MAX_COMMENTS", 3)
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id

    async def comment(text: str) -> None:
        await pilot.resident.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=text)
        )

    for n in range(3):
        await comment(f"lần {n}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await comment("lần nữa")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "3 comments" in (caught.value.details() or "")
    got = await pilot.resident.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
    assert [c.text for c in got.ticket.comments] == ["lần 0", "lần 1", "lần 2"]


async def test_an_official_closing_too_early_is_told_until_when_in_the_citys_time(
    pilot: Pilot,
) -> None:
    """Officials read the city's clock (UTC+7): the end of the reopening period is told so, not
    in UTC, where an evening's end falls on the day before."""
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    resolved = await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=ticket_id, resolution="Xong")
    )
    rules = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
    until = resolved.ticket.resolved_at.ToDatetime(tzinfo=UTC) + rules.reopen_within.ToTimedelta()
    local = until.astimezone(domain.LOCAL_TIME)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await pilot.ward_officer.CloseTicket(
            tickets_pb2.CloseTicketRequest(request_id=rid(), ticket_id=ticket_id)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    assert f"{local:%Y-%m-%d %H:%M}" in details, details
    assert "Asia/Ho_Chi_Minh" in details, details


async def test_officials_a_ticket_came_from_still_comment_on_it(pilot: Pilot) -> None:
    """The group's leader, and the ward a ticket was escalated from, see it: they answer in its
    comments what the unit handling it asks, in every state, as before it was routed."""
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    await pilot.ward_officer.EscalateTicket(
        tickets_pb2.EscalateTicketRequest(
            request_id=rid(), ticket_id=ticket_id, reason="Cần quận cấp kinh phí"
        )
    )
    await pilot.district_officer.AddComment(
        tickets_pb2.AddCommentRequest(
            request_id=rid(), ticket_id=ticket_id, text="Cột đèn nào, ở đâu?"
        )
    )
    for caller, text in (
        (pilot.ward_officer, "Cột số 12, kiệt 45"),
        (pilot.leader, "Tổ đã kiểm tra: vẫn tắt"),
    ):
        answered = await caller.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=text)
        )
        assert answered.ticket.comments[-1].text == text
    # Seeing is still the condition: an auditor sees it and does not comment.
    auditor = pilot.caller(Role.AUDITOR, pilot.city.ward)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await auditor.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text="?")
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_same_rating_given_again_is_one_rating_told_once(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A resident who opens the rating screen again and taps the same stars changes nothing:
    integrators counting TicketRated count one rating, not two. Another rating revises it."""
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=ticket_id, resolution="Xong")
    )
    for rating in (4, 4, 5, 5):
        rated = await pilot.resident.RateResolution(
            tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket_id, rating=rating)
        )
        assert rated.ticket.rating == rating
    told = [
        e.rating
        for e in await events_of(tickets_service, ticket_id)
        if isinstance(e, events_pb2.TicketRated)
    ]
    assert told == [4, 5]
