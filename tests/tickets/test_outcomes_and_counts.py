"""What a ticket's outcome allows afterwards, and how tickets are counted: a rejection is not
rated, the submitter's right to reopen outlasts an official's wish to close, a reopened ticket
carries no old outcome, a rejected primary's duplicates stand (and count) on their own, a cluster
is never a chain, and only a ticket with a deadline is overdue."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
from bson import ObjectId
from civic.tickets.v1 import events_pb2, tickets_pb2

from services.common.cloudevents import CloudEvent, type_name
from services.common.consumer import Delivery
from services.common.mongo import Document, Session, in_transaction
from services.tickets import domain
from services.tickets.main import TicketsService
from services.tickets.records import new_ticket
from tests.conftest import Clock
from tests.tickets.conftest import HOME, Pilot, point_near, rid
from tests.tickets.test_lifecycle import events_of, get, near, refused

RESOLUTION = "Đã thay bóng đèn"


def routed_to_ward(pilot: Pilot, filed: datetime, **fields: Any) -> Document:
    """A ticket the rules' first version routed to the pilot's ward, as stored."""
    return ticket_doc(
        pilot,
        filed,
        status=int(domain.Status.ROUTED),
        assigned_unit_id=pilot.city.ward,
        assigned_level=int(domain.Level.WARD),
        rule_version=1,
        **fields,
    )


def untraced() -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def ticket_doc(pilot: Pilot, filed: datetime, **fields: Any) -> Document:
    """A ticket as SubmitTicket stores it, written straight to the service's database."""
    return (
        new_ticket(
            f"tk-{ObjectId()}",
            category="flooding",
            description="Ngập nước",
            unit_id=pilot.city.group,
            household_id="",
            location=None,
            located_at_home=False,
            origin_from="unit",
            submitter="resident-x",
            submitter_role="resident",
            now=filed,
            trace={},
        )
        | fields
    )


async def resolved(pilot: Pilot, category: str = "street-light") -> tickets_pb2.Ticket:
    ticket = await pilot.routed((await pilot.submit(category)).ticket_id)
    done = await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket.ticket_id, resolution=RESOLUTION
        )
    )
    result: tickets_pb2.Ticket = done.ticket
    return result


async def test_a_rejected_ticket_is_not_rated_even_once_closed(pilot: Pilot) -> None:
    ticket = await pilot.routed((await pilot.submit("noise")).ticket_id)
    await pilot.ward_officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(
            request_id=rid(), ticket_id=ticket.ticket_id, reason="không thuộc thẩm quyền"
        )
    )
    await pilot.resident.CloseTicket(
        tickets_pb2.CloseTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
    )
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.resident.RateResolution(
            tickets_pb2.RateResolutionRequest(
                request_id=rid(), ticket_id=ticket.ticket_id, rating=1
            )
        ),
    )


async def test_an_official_closes_only_once_the_submitter_may_no_longer_reopen(
    pilot: Pilot, clock: Clock
) -> None:
    ticket = await resolved(pilot)

    def close() -> Any:
        return pilot.ward_officer.CloseTicket(
            tickets_pb2.CloseTicketRequest(request_id=rid(), ticket_id=ticket.ticket_id)
        )

    await refused(grpc.StatusCode.FAILED_PRECONDITION, close())
    clock.advance(days=domain.DEFAULT_REOPEN_WITHIN.days + 1)
    closed = await close()
    assert closed.ticket.status == tickets_pb2.TICKET_STATUS_CLOSED


async def test_a_reopened_ticket_carries_no_old_outcome(pilot: Pilot) -> None:
    ticket = await resolved(pilot)
    await pilot.resident.RateResolution(
        tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket.ticket_id, rating=2)
    )
    reopened = await pilot.resident.ReopenTicket(
        tickets_pb2.ReopenTicketRequest(
            request_id=rid(), ticket_id=ticket.ticket_id, reason="vẫn hỏng"
        )
    )
    assert (reopened.ticket.resolution, reopened.ticket.rating) == ("", 0)


async def test_a_reopen_past_the_comment_limit_is_refused(
    pilot: Pilot, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticket = await resolved(pilot)
    await pilot.resident.AddComment(
        tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket.ticket_id, text="1")
    )
    monkeypatch.setattr(domain, "MAX_COMMENTS", 1)
    await refused(
        grpc.StatusCode.FAILED_PRECONDITION,
        pilot.resident.ReopenTicket(
            tickets_pb2.ReopenTicketRequest(
                request_id=rid(), ticket_id=ticket.ticket_id, reason="vẫn hỏng"
            )
        ),
    )


async def test_a_rejected_primarys_open_duplicates_stand_on_their_own(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    """A rejection decides only the ticket rejected: its open duplicates leave the cluster and
    stay in the ward's queue as tickets of their own, counted open, with fresh deadlines (while
    linked their own were not watched, so the ward gets a full period for them)."""
    city = pilot.city
    primary = (await pilot.routed((await pilot.submit()).ticket_id)).ticket_id
    filed = await pilot.submit(caller=pilot.neighbour, location=point_near(30))
    duplicate = (await pilot.routed(filed.ticket_id, pilot.neighbour)).ticket_id
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=primary)
    )
    clock.advance(hours=25)  # the duplicate's own 24 h to acknowledge have passed

    rejected = await pilot.ward_officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(
            request_id=rid(), ticket_id=primary, reason="Đèn trong khuôn viên tư nhân"
        )
    )

    assert not rejected.ticket.duplicates
    await asyncio.sleep(0.6)  # three sweeps: nothing of it is due
    alone = await get(pilot.ward_officer, duplicate)
    assert (alone.status, alone.assigned_unit_id, alone.duplicate_of) == (
        tickets_pb2.TICKET_STATUS_ROUTED,
        city.ward,
        "",
    )
    assert not alone.overdue
    assert near(alone.acknowledge_by, clock() + timedelta(hours=24))
    queue = await pilot.ward_officer.ListQueue(tickets_pb2.ListQueueRequest(unit_id=city.ward))
    assert duplicate in {t.ticket_id for t in queue.tickets}
    stats = await pilot.ward_officer.GetStatistics(
        tickets_pb2.GetStatisticsRequest(unit_id=city.ward)
    )
    [row] = [r for r in stats.statistics if r.category == "street-light"]
    assert (row.total, row.open) == (2, 1)
    *_, unlinked = await events_of(tickets_service, duplicate)
    assert unlinked == events_pb2.TicketUnlinked(ticket_id=duplicate, duplicate_of=primary)


async def test_a_ticket_not_yet_routed_is_open_but_not_overdue(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    category = f"probe-{ObjectId()}"
    filed = ticket_doc(pilot, tickets_service.clock(), category=category)
    await tickets_service.db["tickets"].insert_one(filed)
    try:
        stats = await pilot.ward_officer.GetStatistics(
            tickets_pb2.GetStatisticsRequest(unit_id=pilot.city.ward)
        )
    finally:  # no event routes it: other tests wait for every ticket to be routed
        await tickets_service.db["tickets"].delete_one({"_id": filed["_id"]})
    [row] = [r for r in stats.statistics if r.category == category]
    assert (row.open, row.overdue) == (1, 0)


async def test_overdue_only_keeps_to_the_statuses_asked_for(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    now = tickets_service.clock()
    category = f"probe-{ObjectId()}"
    overdue = {
        "category": category,
        "assigned_unit_id": pilot.city.city,
        "assigned_level": int(domain.Level.CITY),
        "department": "",
        "rule_version": 1,
        "next_deadline": now - timedelta(hours=1),
    }
    routed = ticket_doc(pilot, now, status=int(domain.Status.ROUTED), **overdue)
    acknowledged = ticket_doc(pilot, now, status=int(domain.Status.ACKNOWLEDGED), **overdue)
    await tickets_service.db["tickets"].insert_many([routed, acknowledged])
    queue = await pilot.admin.ListQueue(
        tickets_pb2.ListQueueRequest(
            category=category,
            statuses=[tickets_pb2.TICKET_STATUS_ACKNOWLEDGED],
            overdue_only=True,
        )
    )
    assert [t.ticket_id for t in queue.tickets] == [acknowledged["_id"]]


async def test_tickets_routed_out_of_order_form_one_cluster_not_a_chain(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """C is open; A (100 m from C) and then B (100 m from A) are filed; B's partition is
    routed first and links B to A, still unrouted; then A links to C, and takes B with it."""
    now = tickets_service.clock()

    def point(metres: float) -> Document:  # north of a spot far from the other tests'
        return {
            "type": "Point",
            "coordinates": [HOME.longitude, HOME.latitude + 0.2 + metres / 111_320],
        }

    primary = routed_to_ward(
        pilot, now - timedelta(hours=2), location=point(0), next_deadline=now + timedelta(hours=5)
    )
    a = ticket_doc(pilot, now - timedelta(minutes=2), location=point(100))
    b = ticket_doc(pilot, now - timedelta(minutes=1), location=point(200))
    tickets = tickets_service.db["tickets"]
    await tickets.insert_many([primary, a, b])

    for ticket in (b, a):
        message = events_pb2.TicketSubmitted(ticket_id=ticket["_id"])
        event = CloudEvent(
            id=str(ObjectId()), type="", source="", time=now, data=message.SerializeToString()
        )
        delivery = Delivery(event, message, untraced)

        async def route(session: Session, delivery: Delivery = delivery) -> list[Document]:
            return await tickets_service.router.route([delivery], session)

        await in_transaction(tickets_service.client, route)

    found = {
        t["_id"]: t
        async for t in tickets.find({"_id": {"$in": [primary["_id"], a["_id"], b["_id"]]}})
    }
    assert found[a["_id"]]["duplicate_of"] == found[b["_id"]]["duplicate_of"] == primary["_id"]
    assert set(found[primary["_id"]]["duplicates"]) == {a["_id"], b["_id"]}
    assert found[a["_id"]]["duplicates"] == []
    # Each ticket the last link changed says so to a queue watcher: B moved, C gained two.
    linked = type_name(events_pb2.TicketLinked())
    assert found[b["_id"]]["last_change"] == found[primary["_id"]]["last_change"] == linked
