"""Tickets filed at the same moment commit together and are routed together: each is still
written once, a retry among them still gets its first answer, and reports of one problem filed
together all link to the first of them, as if filed and routed one after the other."""

from __future__ import annotations

import asyncio

from civic.tickets.v1 import tickets_pb2

from services.tickets.main import TicketsService
from tests.tickets.conftest import HOME, Pilot, rid

TOGETHER = 8


def report(request_id: str, category: str = "street-light") -> tickets_pb2.SubmitTicketRequest:
    return tickets_pb2.SubmitTicketRequest(
        request_id=request_id, category=category, description="Đèn đường hỏng", location=HOME
    )


async def test_tickets_filed_at_once_are_each_written_once_and_retries_get_their_first_answer(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    earlier = report(rid(), "noise")
    first = (await pilot.resident.SubmitTicket(earlier)).ticket
    fresh = [report(rid(), "noise") for _ in range(TOGETHER)]
    # Among new reports, a retry of the earlier one and a second copy of a new one: their shared
    # transaction fails on those, and every one of them must still get the right answer.
    answers = await asyncio.gather(
        *(pilot.resident.SubmitTicket(r) for r in [*fresh, earlier, fresh[0]])
    )
    tickets = [answer.ticket for answer in answers]

    assert tickets[TOGETHER].ticket_id == first.ticket_id
    assert tickets[TOGETHER + 1].ticket_id == tickets[0].ticket_id
    new_ids = {ticket.ticket_id for ticket in tickets[:TOGETHER]}
    assert len(new_ids) == TOGETHER and first.ticket_id not in new_ids
    stored = await tickets_service.db["tickets"].distinct(
        "_id", {"_id": {"$in": [*new_ids, first.ticket_id]}}
    )
    assert len(stored) == TOGETHER + 1
    submitted = [
        event["key"]
        async for entry in tickets_service.db["outbox"].find({"events.key": {"$in": stored}})
        for event in entry["events"]
        if event["type"] == "civic.tickets.v1.TicketSubmitted"
    ]
    assert sorted(submitted) == sorted(stored), "one TicketSubmitted per ticket"


async def test_reports_of_one_problem_filed_together_all_link_to_the_first(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    answers = await asyncio.gather(
        *(pilot.resident.SubmitTicket(report(rid(), "flooding")) for _ in range(TOGETHER))
    )
    ids = [answer.ticket.ticket_id for answer in answers]
    routed = [await pilot.routed(ticket_id) for ticket_id in ids]

    stored = tickets_service.db["tickets"].find({"_id": {"$in": ids}})
    in_filing_order = [t["_id"] async for t in stored.sort([("submitted_at", 1), ("_id", 1)])]
    first = in_filing_order[0]
    links = {ticket.ticket_id: ticket.duplicate_of for ticket in routed}
    assert links == {ticket_id: "" if ticket_id == first else first for ticket_id in ids}
    cluster = await pilot.resident.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=first))
    assert sorted(cluster.ticket.duplicates) == sorted(in_filing_order[1:])
