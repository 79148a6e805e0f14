"""The same problem reported twice: a nearby open ticket of the same category links the new one
as its duplicate, residents "+1" a ticket instead of filing again, officials see the cluster,
resolving the primary resolves the duplicates the resolver may handle, and a duplicate handled
apart from its primary leaves the cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from bson import ObjectId
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2

from services.common.auth import Role
from services.common.cloudevents import CloudEvent
from services.common.config import Settings
from services.common.consumer import Delivery
from services.common.mongo import Document, Session, in_transaction
from services.tickets import domain
from services.tickets.clusters import part_decided_orphans, release_orphans
from services.tickets.events import Router
from services.tickets.main import TicketsService
from tests.conftest import Clock
from tests.objects import png_bytes, put
from tests.registry_fixtures import create_unit, new_household
from tests.tickets.conftest import HOME, Pilot, TicketCaller, eventually, point_near, rid
from tests.tickets.test_lifecycle import events_of
from tests.tickets.test_outcomes_and_counts import routed_to_ward, ticket_doc, untraced
from tests.tickets.test_routing import replacing, rule, rules_changed


async def refused(code: grpc.StatusCode, call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()


async def cluster(caller: TicketCaller, ticket_id: str) -> tickets_pb2.GetTicketResponse:
    response: tickets_pb2.GetTicketResponse = await caller.GetTicket(
        tickets_pb2.GetTicketRequest(ticket_id=ticket_id)
    )
    return response


async def test_a_nearby_report_of_the_same_problem_is_linked_to_the_first(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    # 60 m away, by another resident: the same broken light.
    again = await pilot.submit("street-light", caller=pilot.neighbour, location=point_near(60))
    duplicate = await pilot.routed(again.ticket_id, pilot.neighbour)
    # 400 m away, or another category at the same spot: other problems.
    far = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(400))).ticket_id
    )
    other = await pilot.routed((await pilot.submit("flooding", location=HOME)).ticket_id)

    assert primary.duplicate_of == ""
    assert duplicate.duplicate_of == primary.ticket_id
    # A duplicate is routed like any ticket, to the same unit as its primary.
    assert duplicate.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert duplicate.assigned_unit_id == primary.assigned_unit_id
    assert (far.duplicate_of, other.duplicate_of) == ("", "")

    seen = await cluster(pilot.ward_officer, primary.ticket_id)
    assert list(seen.ticket.duplicates) == [duplicate.ticket_id]
    assert [t.ticket_id for t in seen.linked] == [duplicate.ticket_id]
    assert seen.linked[0].submitter == "resident-2"
    assert not (await cluster(pilot.ward_officer, far.ticket_id)).linked

    linked = [
        events_pb2.TicketLinked.FromString(bytes(event["data"]))
        async for entry in tickets_service.db["outbox"].find(
            {"events.type": "civic.tickets.v1.TicketLinked"}
        )
        for event in entry["events"]
        if event["type"] == "civic.tickets.v1.TicketLinked"
        and event["key"] in (duplicate.ticket_id, far.ticket_id, other.ticket_id)
    ]
    assert [(e.ticket_id, e.duplicate_of) for e in linked] == [
        (duplicate.ticket_id, primary.ticket_id)
    ]


async def test_residents_support_a_ticket_instead_of_filing_it_again(pilot: Pilot) -> None:
    city = pilot.city
    ticket_id = (await pilot.routed((await pilot.submit("flooding")).ticket_id)).ticket_id
    third = pilot.caller(Role.RESIDENT, city.group, pilot.household_id, f"third-{city.city}")

    async def support(caller: TicketCaller, request_id: str = "") -> tickets_pb2.Ticket:
        response = await caller.SupportTicket(
            tickets_pb2.SupportTicketRequest(request_id=request_id or rid(), ticket_id=ticket_id)
        )
        ticket: tickets_pb2.Ticket = response.ticket
        return ticket

    assert (await support(pilot.neighbour)).supporters == 1
    # Once per resident, however often they press "+1".
    assert (await support(pilot.neighbour)).supporters == 1
    again = rid()
    assert (await support(third, again)).supporters == 2
    assert (await support(third, again)).supporters == 2
    assert (await cluster(pilot.ward_officer, ticket_id)).ticket.supporters == 2

    elsewhere = pilot.caller(Role.RESIDENT, city.other_group, "hh-elsewhere", "resident-far")
    # A resident of another group does not see the ticket at all; the ward's officer does, and
    # handles it rather than supports it.
    await refused(grpc.StatusCode.NOT_FOUND, support(elsewhere))
    await refused(grpc.StatusCode.PERMISSION_DENIED, support(pilot.ward_officer))

    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=ticket_id, resolution="Đã hút nước"
        )
    )
    await refused(grpc.StatusCode.FAILED_PRECONDITION, support(pilot.neighbour))
    assert (await cluster(pilot.ward_officer, ticket_id)).ticket.supporters == 2


async def test_the_submitter_does_not_plus_one_their_own_ticket(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A "+1" counts another resident with the same problem: the submitter counts already, and
    pressing it on their own ticket would pass for a neighbour's support."""
    ticket_id = (await pilot.routed((await pilot.submit("flooding")).ticket_id)).ticket_id
    before = await tickets_service.store.get(ticket_id)

    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.resident.SupportTicket(
            tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=ticket_id)
        ),
    )

    assert await tickets_service.store.get(ticket_id) == before
    assert not [
        event
        for event in await events_of(tickets_service, ticket_id)
        if isinstance(event, events_pb2.TicketSupported)
    ]


async def test_a_supporter_is_not_shown_what_another_household_wrote_or_photographed(
    pilot: Pilot,
) -> None:
    """A neighbour who "+1"s a ticket may not see it (GetTicket: NOT_FOUND); the answer to the
    "+1" tells them what it is and how it stands, not its description, photos or comments."""
    ticket_id = (await pilot.submit("flooding")).ticket_id
    body = png_bytes()
    slot = await pilot.resident.CreatePhotoUpload(
        tickets_pb2.CreatePhotoUploadRequest(
            ticket_id=ticket_id, content_type="image/png", size_bytes=len(body)
        )
    )
    await put(slot.upload_url, body, "image/png")
    await pilot.resident.AttachPhoto(
        tickets_pb2.AttachPhotoRequest(
            request_id=rid(), ticket_id=ticket_id, object_key=slot.object_key
        )
    )
    await pilot.resident.AddComment(
        tickets_pb2.AddCommentRequest(
            request_id=rid(), ticket_id=ticket_id, text="Nhà tôi ở số 12, mẹ tôi 82 tuổi"
        )
    )
    await pilot.routed(ticket_id)

    supported = (
        await pilot.neighbour.SupportTicket(
            tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=ticket_id)
        )
    ).ticket
    assert (supported.ticket_id, supported.category, supported.supporters) == (
        ticket_id,
        "flooding",
        1,
    )
    assert supported.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert (supported.description, list(supported.photos), list(supported.comments)) == ("", [], [])
    assert (supported.submitter, supported.household_id) == ("", "")
    await refused(grpc.StatusCode.NOT_FOUND, cluster(pilot.neighbour, ticket_id))
    # Its submitter and the ward still see all of it.
    for caller in (pilot.resident, pilot.ward_officer):
        seen = (await cluster(caller, ticket_id)).ticket
        assert seen.description
        assert (len(seen.photos), len(seen.comments)) == (1, 1)


async def test_a_repeated_plus_one_changes_nothing_and_emits_nothing(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A resident who already supports the ticket presses "+1" again (a new request, not a
    retry): the answer is the ticket as it is, with no second TicketSupported nor any update a
    queue watcher would be told of."""
    ticket_id = (await pilot.routed((await pilot.submit("flooding")).ticket_id)).ticket_id
    answers = [
        (
            await pilot.neighbour.SupportTicket(
                tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=ticket_id)
            )
        ).ticket
        for _ in range(2)
    ]
    assert answers[1] == answers[0]
    assert answers[1].supporters == 1
    supported = [
        event
        for event in await events_of(tickets_service, ticket_id)
        if isinstance(event, events_pb2.TicketSupported)
    ]
    assert [event.supporters for event in supported] == [1]


async def test_resolving_the_primary_resolves_its_duplicates(pilot: Pilot) -> None:
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    duplicates = [
        await pilot.routed(
            (await pilot.submit("street-light", location=point_near(meters))).ticket_id
        )
        for meters in (30, 90)
    ]
    unrelated = await pilot.routed(
        (await pilot.submit("street-light", location=point_near(900))).ticket_id
    )
    assert {d.duplicate_of for d in duplicates} == {primary.ticket_id}
    # One duplicate has been taken up separately already.
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=duplicates[1].ticket_id)
    )

    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=primary.ticket_id, resolution="Đã thay bóng"
        )
    )

    seen = await cluster(pilot.ward_officer, primary.ticket_id)
    assert seen.ticket.status == tickets_pb2.TICKET_STATUS_RESOLVED
    assert {t.ticket_id for t in seen.linked} == {d.ticket_id for d in duplicates}
    for ticket in seen.linked:
        assert ticket.status == tickets_pb2.TICKET_STATUS_RESOLVED
        assert ticket.resolution == "Đã thay bóng"
    still = (await cluster(pilot.ward_officer, unrelated.ticket_id)).ticket
    assert still.status == tickets_pb2.TICKET_STATUS_ROUTED
    # Each duplicate's submitter may rate the resolution of their own ticket.
    rated = await pilot.resident.RateResolution(
        tickets_pb2.RateResolutionRequest(
            request_id=rid(), ticket_id=duplicates[0].ticket_id, rating=5
        )
    )
    assert rated.ticket.rating == 5


async def test_a_duplicate_beyond_the_resolvers_reach_leaves_the_cluster_unresolved(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A duplicate routed to the district (its category moved there after the primary was
    routed) is not the ward's to resolve: the ward resolving the primary resolves the rest of
    the cluster, and that one leaves it, open at the district."""
    city = pilot.city
    at_ward = rule("test-cluster", tickets_pb2.LEVEL_WARD, "", 24)
    at_district = rule("test-cluster", tickets_pb2.LEVEL_DISTRICT, "", 24)
    async with rules_changed(pilot.admin, replacing([at_ward])):
        primary = await pilot.routed((await pilot.submit("test-cluster")).ticket_id)
        near = await pilot.submit("test-cluster", location=point_near(20))
        beside = await pilot.routed(near.ticket_id)
        async with rules_changed(pilot.admin, replacing([at_district])):
            far = await pilot.submit(
                "test-cluster", caller=pilot.neighbour, location=point_near(40)
            )
            above = await pilot.routed(far.ticket_id, pilot.neighbour)
    assert {beside.duplicate_of, above.duplicate_of} == {primary.ticket_id}
    assert above.assigned_unit_id == city.district

    resolved = await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=primary.ticket_id, resolution="Đã xử lý"
        )
    )

    assert list(resolved.ticket.duplicates) == [beside.ticket_id]
    beside_now = (await cluster(pilot.ward_officer, beside.ticket_id)).ticket
    assert beside_now.status == tickets_pb2.TICKET_STATUS_RESOLVED
    left = (await cluster(pilot.district_officer, above.ticket_id)).ticket
    assert (left.status, left.assigned_unit_id, left.duplicate_of) == (
        tickets_pb2.TICKET_STATUS_ROUTED,
        city.district,
        "",
    )
    *_, unlinked = await events_of(tickets_service, above.ticket_id)
    assert unlinked == events_pb2.TicketUnlinked(
        ticket_id=above.ticket_id, duplicate_of=primary.ticket_id
    )


async def neighbours_repeats(pilot: Pilot, *meters: int) -> list[str]:
    """The neighbour's reports of the street light, each `meters` from it, once routed."""
    return [
        (
            await pilot.routed(
                (
                    await pilot.submit(
                        "street-light", caller=pilot.neighbour, location=point_near(distance)
                    )
                ).ticket_id,
                pilot.neighbour,
            )
        ).ticket_id
        for distance in meters
    ]


async def unlinked_from(tickets_service: TicketsService, ticket_id: str) -> list[str]:
    """The primaries the ticket's TicketUnlinked events name, in order."""
    return [
        event.duplicate_of
        for event in await events_of(tickets_service, ticket_id)
        if isinstance(event, events_pb2.TicketUnlinked)
    ]


async def test_a_duplicate_handled_apart_from_its_primary_leaves_the_cluster(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Escalated by hand, or reopened by its submitter after the cluster was resolved, a
    duplicate is handled on its own from then on: it leaves the cluster."""
    city = pilot.city
    primary = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    escalated, reopened = await neighbours_repeats(pilot, 30, 60)
    await pilot.ward_officer.EscalateTicket(
        tickets_pb2.EscalateTicketRequest(
            request_id=rid(), ticket_id=escalated, reason="Cột điện riêng, cần quận xem"
        )
    )
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(
            request_id=rid(), ticket_id=primary, resolution="Đã thay bóng"
        )
    )
    await pilot.neighbour.ReopenTicket(
        tickets_pb2.ReopenTicketRequest(request_id=rid(), ticket_id=reopened, reason="Vẫn tối")
    )

    assert not (await cluster(pilot.ward_officer, primary)).linked
    on_its_own = {
        ticket_id: (await cluster(pilot.district_officer, ticket_id)).ticket
        for ticket_id in (escalated, reopened)
    }
    assert {t.ticket_id: (t.status, t.assigned_unit_id) for t in on_its_own.values()} == {
        escalated: (tickets_pb2.TICKET_STATUS_ROUTED, city.district),
        reopened: (tickets_pb2.TICKET_STATUS_ROUTED, city.ward),
    }
    for ticket_id, ticket in on_its_own.items():
        assert ticket.duplicate_of == ""
        assert await unlinked_from(tickets_service, ticket_id) == [primary]


async def test_a_duplicate_decided_apart_from_its_primary_leaves_the_cluster(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """The ward resolves one repeat (another light after all) and rejects another by itself:
    each is decided on its own, so it leaves the cluster and counts as a ticket of its own,
    not through a first ticket whose outcome is not its own (here rejected)."""
    officer = pilot.ward_officer
    primary = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    resolved, rejected = await neighbours_repeats(pilot, 30, 60)
    assert (await cluster(officer, primary)).ticket.duplicates == [resolved, rejected]

    decided = await officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=resolved, resolution="Đã sửa")
    )
    assert decided.ticket.duplicate_of == ""
    decided = await officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(request_id=rid(), ticket_id=rejected, reason="Trùng lặp")
    )
    assert decided.ticket.duplicate_of == ""
    await officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(request_id=rid(), ticket_id=primary, reason="Không rõ")
    )

    assert not (await cluster(officer, primary)).linked
    for ticket_id in (resolved, rejected):
        assert await unlinked_from(tickets_service, ticket_id) == [primary]
    figures = await officer.GetStatistics(
        tickets_pb2.GetStatisticsRequest(unit_id=pilot.city.group)
    )
    lights = {row.category: row for row in figures.statistics}["street-light"]
    assert (lights.total, lights.open, lights.resolved) == (3, 0, 1)


async def test_a_reopened_primarys_duplicates_keep_the_resolution_they_were_given(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """The ward resolves the light and its repeat with it; the first reporter disagrees and
    reopens theirs, which the ward then rejects. The repeat's reporter was told it was resolved
    and did not reopen: it leaves the cluster at the reopening, still resolved, and counts so."""
    officer = pilot.ward_officer
    primary = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    (repeat,) = await neighbours_repeats(pilot, 30)
    await officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=primary, resolution="Đã sửa")
    )
    reopened = await pilot.resident.ReopenTicket(
        tickets_pb2.ReopenTicketRequest(request_id=rid(), ticket_id=primary, reason="Vẫn tối")
    )
    assert list(reopened.ticket.duplicates) == []
    await officer.RejectTicket(
        tickets_pb2.RejectTicketRequest(request_id=rid(), ticket_id=primary, reason="Không rõ")
    )

    alone = (await cluster(pilot.neighbour, repeat)).ticket
    assert (alone.status, alone.resolution, alone.duplicate_of) == (
        tickets_pb2.TICKET_STATUS_RESOLVED,
        "Đã sửa",
        "",
    )
    assert await unlinked_from(tickets_service, repeat) == [primary]
    figures = await officer.GetStatistics(
        tickets_pb2.GetStatisticsRequest(unit_id=pilot.city.group)
    )
    lights = {row.category: row for row in figures.statistics}["street-light"]
    assert (lights.total, lights.open, lights.resolved) == (2, 0, 1)
    assert lights.HasField("median_resolution_time")


async def test_a_report_from_another_ward_is_not_linked_across_the_boundary(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """The same spot, reported in a group of a neighbouring ward: that ward handles its own
    ticket; linking it would hand it, and its submitter's words, to the first ward."""
    city = pilot.city
    ward2 = await create_unit(
        city.admin, city.district, "hc2", "Hải Châu 2", registry_pb2.UNIT_KIND_WARD
    )
    group2 = await create_unit(city.admin, ward2, "g01", "Tổ 1", registry_pb2.UNIT_KIND_GROUP)

    async def known() -> bool:
        return await tickets_service.store.unit(group2) is not None

    await eventually(known)
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    leader2 = pilot.caller(Role.GROUP_LEADER, group2)
    across = await pilot.routed(
        (
            await pilot.submit("street-light", caller=leader2, unit_id=group2, location=HOME)
        ).ticket_id,
        leader2,
    )

    assert across.assigned_unit_id == ward2
    assert across.duplicate_of == ""
    seen = await cluster(pilot.ward_officer, primary.ticket_id)
    assert not seen.linked
    assert not seen.ticket.duplicates


async def test_the_cluster_shows_a_linked_ticket_only_to_who_may_see_it_alone(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Duplicates are linked across a ward's groups, but a group leader sees only their group's
    tickets and a resident only their own: the cluster must not hand them the others."""
    city = pilot.city
    home = await new_household(city.other_leader, city.other_group, location=point_near(50))
    other_household = home.household.household_id

    async def known() -> bool:
        return await tickets_service.store.household(other_household) is not None

    await eventually(known)
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    other_resident = pilot.caller(Role.RESIDENT, city.other_group, other_household, "resident-g")
    filed = await pilot.submit("street-light", caller=other_resident, location=point_near(40))
    duplicate = await pilot.routed(filed.ticket_id, other_resident)
    assert duplicate.duplicate_of == primary.ticket_id

    seen_by_ward = await cluster(pilot.ward_officer, primary.ticket_id)
    assert [t.ticket_id for t in seen_by_ward.linked] == [duplicate.ticket_id]
    for caller in (pilot.leader, pilot.resident):
        seen = await cluster(caller, primary.ticket_id)
        assert list(seen.ticket.duplicates) == [duplicate.ticket_id]  # the ids, not the tickets
        assert not seen.linked
    # Whoever may see a duplicate alone sees it in the cluster too.
    other_leader = pilot.caller(Role.GROUP_LEADER, city.other_group)
    await refused(grpc.StatusCode.NOT_FOUND, cluster(other_leader, primary.ticket_id))
    assert (await cluster(other_leader, duplicate.ticket_id)).ticket.submitter == "resident-g"


async def test_a_duplicate_its_primarys_decision_left_linked_is_released_at_start(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A primary decided before decisions released their duplicates left them linked, open, and
    now never swept on their own: a start of the service releases them, each with fresh
    deadlines and TicketUnlinked, once."""
    service = tickets_service
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    again = await pilot.submit("street-light", caller=pilot.neighbour, location=point_near(60))
    duplicate = await pilot.routed(again.ticket_id, pilot.neighbour)
    assert duplicate.duplicate_of == primary.ticket_id
    # As such a decision left it: the primary rejected, its duplicate still in its cluster.
    await service.store.tickets.update_one(
        {"_id": primary.ticket_id}, {"$set": {"status": tickets_pb2.TICKET_STATUS_REJECTED}}
    )

    async def start() -> None:
        await release_orphans(service.client, service.store, service.host.outbox, service.clock())

    await start()
    left = (await cluster(pilot.ward_officer, duplicate.ticket_id)).ticket
    assert (left.status, left.duplicate_of) == (tickets_pb2.TICKET_STATUS_ROUTED, "")
    assert left.acknowledge_by.ToDatetime() > service.clock().replace(tzinfo=None)
    was_primary = (await cluster(pilot.ward_officer, primary.ticket_id)).ticket
    assert duplicate.ticket_id not in was_primary.duplicates
    after_first = await events_of(service, duplicate.ticket_id)
    assert after_first[-1] == events_pb2.TicketUnlinked(
        ticket_id=duplicate.ticket_id, duplicate_of=primary.ticket_id
    )
    await start()  # started again: nothing more to release
    assert await events_of(service, duplicate.ticket_id) == after_first


async def test_a_resolved_duplicate_its_reopened_primary_left_linked_is_let_go_at_start(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Reopened before a reopening let its duplicates go, then rejected, a primary kept its
    repeat linked, resolved, counted nowhere: a start of the service lets it go, once."""
    service = tickets_service
    primary = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    (repeat,) = await neighbours_repeats(pilot, 30)
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=primary, resolution="Đã sửa")
    )
    untouched = (await cluster(pilot.ward_officer, repeat)).ticket  # resolved with its primary
    await part_decided_orphans(service.client, service.store, service.host.outbox)
    assert (await cluster(pilot.ward_officer, repeat)).ticket == untouched
    # As the reopening and the rejection left them: the repeat still in the cluster.
    await service.store.tickets.update_one(
        {"_id": primary},
        {
            "$set": {
                "status": tickets_pb2.TICKET_STATUS_REJECTED,
                "rejected": True,
                "resolved_at": service.clock() + timedelta(hours=1),
            }
        },
    )

    await part_decided_orphans(service.client, service.store, service.host.outbox)
    alone = (await cluster(pilot.ward_officer, repeat)).ticket
    assert (alone.status, alone.duplicate_of) == (tickets_pb2.TICKET_STATUS_RESOLVED, "")
    assert repeat not in (await cluster(pilot.ward_officer, primary)).ticket.duplicates
    after_first = await events_of(service, repeat)
    assert after_first[-1] == events_pb2.TicketUnlinked(ticket_id=repeat, duplicate_of=primary)
    await part_decided_orphans(service.client, service.store, service.host.outbox)
    assert await events_of(service, repeat) == after_first


async def test_how_near_and_how_recent_a_duplicate_is_are_configured(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A deployment sets the distance and the time within which a new ticket repeats an open
    one (CIVIC_TICKETS_DUPLICATE_METERS, CIVIC_TICKETS_DUPLICATE_HOURS): the same two reports,
    30 m and two hours apart, are one problem or two by that setting."""
    settings = Settings(tickets_duplicate_meters=20, tickets_duplicate_hours=1)
    assert (settings.tickets_duplicate_meters, settings.tickets_duplicate_hours) == (20, 1)
    now = tickets_service.clock()

    def point(metres: float) -> Document:  # a spot far from the other tests'
        return {
            "type": "Point",
            "coordinates": [HOME.longitude + 0.3, HOME.latitude + metres / 111_320],
        }

    async def linked(meters: float, window: timedelta) -> bool:
        primary = routed_to_ward(
            pilot,
            now - timedelta(hours=2),
            location=point(0),
            next_deadline=now + timedelta(hours=5),
        )
        again = ticket_doc(pilot, now, location=point(30))
        await tickets_service.db["tickets"].insert_many([primary, again])
        router = Router(
            tickets_service.store, tickets_service.host.outbox, lambda: now, meters, window
        )
        message = events_pb2.TicketSubmitted(ticket_id=again["_id"])
        event = CloudEvent(
            id=str(ObjectId()), type="", source="", time=now, data=message.SerializeToString()
        )

        async def route(session: Session) -> list[Document]:
            return await router.route([Delivery(event, message, untraced)], session)

        await in_transaction(tickets_service.client, route)
        routed = await tickets_service.store.get(again["_id"])
        # Closed again, so the next case finds no open ticket here but its own.
        await tickets_service.db["tickets"].update_many(
            {"_id": {"$in": [primary["_id"], again["_id"]]}},
            {"$set": {"status": int(domain.Status.CLOSED)}},
        )
        assert routed is not None
        return bool(routed["duplicate_of"] == primary["_id"])

    assert await linked(100, timedelta(hours=3))
    assert not await linked(20, timedelta(hours=3))  # 30 m is too far
    assert not await linked(100, timedelta(hours=1))  # two hours is too long ago


async def test_a_linked_duplicate_is_not_overdue_on_its_own_deadlines(
    pilot: Pilot, clock: Clock, tickets_service: TicketsService
) -> None:
    """The sweep leaves a linked duplicate to its primary, so its own deadlines hold nobody: it
    is neither flagged nor listed overdue, and the queue agrees with the dashboard's count."""
    city = pilot.city
    primary = (await pilot.routed((await pilot.submit()).ticket_id)).ticket_id
    filed = await pilot.submit(caller=pilot.neighbour, location=point_near(30))
    duplicate = (await pilot.routed(filed.ticket_id, pilot.neighbour)).ticket_id
    await pilot.ward_officer.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=primary)
    )
    clock.advance(hours=25)  # past the duplicate's own 24 h to acknowledge, not the primary's
    await asyncio.sleep(0.6)  # three sweeps: none moves the duplicate

    linked = (await cluster(pilot.ward_officer, duplicate)).ticket
    assert (linked.duplicate_of, linked.assigned_unit_id) == (primary, city.ward)
    assert not linked.overdue
    overdue = await pilot.ward_officer.ListQueue(
        tickets_pb2.ListQueueRequest(unit_id=city.ward, overdue_only=True)
    )
    assert not {t.ticket_id for t in overdue.tickets} & {primary, duplicate}
    stats = await pilot.ward_officer.GetStatistics(
        tickets_pb2.GetStatisticsRequest(unit_id=city.ward)
    )
    [row] = [r for r in stats.statistics if r.category == "street-light"]
    assert (row.open, row.overdue) == (1, 0)


async def test_a_withdrawn_primary_leaves_its_duplicates_open_on_their_own(pilot: Pilot) -> None:
    """The first reporter's light was fixed, say; the neighbour's report of theirs stands."""
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    again = await pilot.submit("street-light", caller=pilot.neighbour, location=point_near(60))
    duplicate = await pilot.routed(again.ticket_id, pilot.neighbour)
    assert duplicate.duplicate_of == primary.ticket_id

    await pilot.resident.WithdrawTicket(
        tickets_pb2.WithdrawTicketRequest(request_id=rid(), ticket_id=primary.ticket_id)
    )
    left = (await cluster(pilot.neighbour, duplicate.ticket_id)).ticket
    assert left.duplicate_of == ""
    assert left.status == tickets_pb2.TICKET_STATUS_ROUTED
    assert left.resolve_by.seconds > 0  # held to its own deadlines again
    withdrawn = (await cluster(pilot.resident, primary.ticket_id)).ticket
    assert withdrawn.withdrawn and list(withdrawn.duplicates) == []


async def test_a_large_much_discussed_cluster_still_fits_one_answer(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Each duplicate may hold 200 comments of 2,000 characters: shown with their comments, a
    handful of them would pass gRPC's 4 MB, and the first ticket could no longer be opened."""
    primary = await pilot.routed((await pilot.submit("street-light")).ticket_id)
    again = await pilot.submit("street-light", caller=pilot.neighbour, location=point_near(30))
    assert (await pilot.routed(again.ticket_id, pilot.neighbour)).duplicate_of == primary.ticket_id
    tickets = tickets_service.db["tickets"]
    # Arranged in the database: 120 more duplicates, the first five with 200 much-written
    # comments each (6 MB together).
    template = await tickets.find_one({"_id": again.ticket_id})
    assert template is not None
    comments = [
        {"author": "resident-2", "role": "resident", "text": "ệ" * domain.MAX_COMMENT, "at": when}
        for when in [template["submitted_at"]] * domain.MAX_COMMENTS
    ]
    more = [
        template
        | {
            "_id": f"tk-{ObjectId()}",
            "comments": comments if n < 5 else [],
            "submitted_at": template["submitted_at"] + timedelta(seconds=n + 1),
        }
        for n in range(120)
    ]
    await tickets.insert_many(more)
    await tickets.update_one(
        {"_id": primary.ticket_id},
        {"$push": {"duplicates": {"$each": [doc["_id"] for doc in more]}}},
    )

    seen = await cluster(pilot.ward_officer, primary.ticket_id)

    assert len(seen.ticket.duplicates) == 121
    # The first filed, in the order they were filed, without their comments.
    assert [t.ticket_id for t in seen.linked] == [
        again.ticket_id,
        *[doc["_id"] for doc in more[: domain.MAX_LINKED_SHOWN - 1]],
    ]
    assert not any(t.comments for t in seen.linked)
    # Each shows its own comments when opened alone.
    alone = await cluster(pilot.ward_officer, more[0]["_id"])
    assert len(alone.ticket.comments) == domain.MAX_COMMENTS
