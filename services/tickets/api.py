"""The tickets service's gRPC servicer."""

from __future__ import annotations

import logging
import re
import statistics
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from civic.common.v1 import types_pb2
from civic.tickets.v1 import events_pb2, tickets_pb2, tickets_pb2_grpc
from google.protobuf.message import Message
from pymongo import AsyncMongoClient
from pymongo.asynchronous.cursor import AsyncCursor

from services.common.auth import OFFICIALS, Principal, Role, principal
from services.common.cloudevents import type_name
from services.common.commands import CommandRunner, check_request_id
from services.common.errors import (
    Aborted,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.media import check_image_upload
from services.common.mongo import Document, Session, check_unit_id
from services.common.objects import ObjectStore, checked
from services.common.outbox import Outbox
from services.common.paging import PageWithin, message_bytes, page_size
from services.common.registry_view import group_now
from services.common.telemetry import current_trace_headers
from services.common.text import plain_text
from services.common.wire import duration, point_document, span, timestamp
from services.tickets import domain
from services.tickets.clusters import release, unlink
from services.tickets.escalation import escalate
from services.tickets.events import ticket_event
from services.tickets.gis import VIETNAM, GisLocator
from services.tickets.records import (
    new_ticket,
    rule_for,
    rule_from_message,
    rules_document,
    rules_message,
    submitter_of,
    ticket_message,
)
from services.tickets.store import DISTANCE, TICKET_ID, TicketStore, new_ticket_id

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R", bound=Message)
# A change to one ticket inside the command's transaction: the new document and its events.
Mutation = Callable[[Document, Session], Awaitable[tuple[Document, list[Document]]]]
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
# The name CreatePhotoUpload gives an upload inside its ticket's folder; nothing else attaches.
PHOTO_NAME = re.compile(r"[0-9a-f]{32}\.(?:jpg|png|webp)")


class TicketsServicer(tickets_pb2_grpc.TicketsServiceServicer):
    def __init__(
        self,
        store: TicketStore,
        client: AsyncMongoClient[Document],
        commands: CommandRunner,
        outbox: Outbox,
        photos: ObjectStore,
        submitter_key: bytes,
        clock: Callable[[], datetime],
        duplicate_meters: float,
        locator: GisLocator,
    ) -> None:
        self.store = store
        self.client = client
        self.commands = commands
        self.outbox = outbox
        self.photos = photos
        self.submitter_key = submitter_key
        self.clock = clock
        self.duplicate_meters = duplicate_meters
        self.locator = locator

    # ---- helpers -------------------------------------------------------------------------

    def _message(self, ticket: Document) -> tickets_pb2.Ticket:
        message = ticket_message(ticket, self.clock(), self.photos.view_url)
        # Who filed it is shown only to the submitter and officials (in scope, or they would not
        # see the ticket at all); not to integrators or auditors. Nor who wrote a comment, unless
        # an official did: the submitter's own comments would name them.
        # Nor which household filed it, nor the household's place when the ticket took it for
        # want of one of its own: either would name the submitter as well.
        caller = principal()
        own = submitter_of(ticket).includes(caller)
        if not (caller.is_official or own):
            message.submitter = ""
            message.household_id = ""
            # Tickets filed before the flag was kept: any with a household may be at its door.
            if ticket.get("located_at_home", bool(ticket.get("household_id"))):
                message.ClearField("location")
            for comment in message.comments:
                if comment.author_role not in OFFICIALS:
                    comment.author = ""
        if caller.role is Role.RESIDENT and not own:
            # A neighbour who "+1"s it (SupportTicket answers with the ticket) may not see it
            # otherwise: they learn what the problem is and how it stands, not what another
            # household wrote, photographed or was told.
            message.description = ""
            del message.photos[:]
            del message.comments[:]
        return message

    async def _page(
        self, found: AsyncCursor[Document], size: int
    ) -> tuple[list[tickets_pb2.Ticket], str]:
        """A listing's page of up to `size` tickets, as the caller sees them, and the token of the
        next page. Each ticket comes with its comments (up to MAX_COMMENTS of MAX_COMMENT
        characters), so a page of long discussions ends early, within one answer; the next
        page goes on from its last ticket."""
        page = PageWithin[tickets_pb2.Ticket]()
        try:
            async for ticket in found:
                message = self._message(ticket)
                if not page.add(message, message_bytes(message)):
                    return page.items, page.items[-1].ticket_id
        finally:
            await found.close()
        return page.items, page.items[-1].ticket_id if len(page.items) == size else ""

    async def _ticket(self, ticket_id: str, session: Session | None = None) -> Document:
        if not ticket_id:
            raise InvalidArgument("ticket_id", "is required")
        ticket = await self.store.get(ticket_id, session)
        if ticket is None:
            raise NotFound(f"ticket {ticket_id} not found")
        return ticket

    async def _visible(self, ticket_id: str, caller: Principal) -> Document:
        ticket = await self._ticket(ticket_id)
        _check_visible(caller, ticket)
        return ticket

    async def _act(
        self,
        method: str,
        request: Any,
        response_type: type[R],
        action: str,
        mutate: Mutation,
        allowed: Callable[[Principal, Document], None],
    ) -> R:
        """One ticket command: load, check who and when, change, emit, answer."""
        caller = principal()

        async def work(session: Session) -> tuple[R, list[Document]]:
            ticket = await self._ticket(request.ticket_id, session)
            _check_may(caller, ticket, action, allowed)
            updated, emitted = await mutate(ticket, session)
            return response_type(ticket=self._message(updated)), emitted

        return await self.commands.run(method, request, response_type, work)

    @staticmethod
    def _handler(caller: Principal, ticket: Document) -> None:
        # Not routed yet: its group's officials pass here and are refused by the transition check.
        domain.may_handle(caller, ticket.get("assigned_unit_id") or ticket["origin_unit_id"])

    @staticmethod
    def _submitter(caller: Principal, ticket: Document) -> None:
        if not submitter_of(ticket).includes(caller):
            raise PermissionDenied("only the submitter may do this")

    @classmethod
    def _submitter_or_handler(cls, caller: Principal, ticket: Document) -> None:
        """The submitter's side (domain.Submitter), or an official who may handle the ticket."""
        if not submitter_of(ticket).includes(caller):
            cls._handler(caller, ticket)

    async def _rules(self, session: Session | None = None) -> Document:
        rules = await (self.store.current_rules(session) if session else self.store.recent_rules())
        assert rules is not None, "rules are seeded at start-up"
        return rules

    async def _known_category(self, category: str) -> None:
        rules = await self._rules()
        if category not in {rule["category"] for rule in rules["rules"]}:
            raise InvalidArgument("category", f"{category!r} is not a known category")

    async def _category_nearby(self, caller: Principal, category: str) -> None:
        """A category to list nearby tickets of: one the rules name, or one withdrawn from them
        since that open tickets in the caller's scope still have (residents "+1" those)."""
        try:
            await self._known_category(category)
        except InvalidArgument:
            if not (
                domain.CATEGORY.fullmatch(category)
                and await self.store.open_of_category(category, caller.scope)
            ):
                raise

    async def _origin(
        self, caller: Principal, request: tickets_pb2.SubmitTicketRequest
    ) -> tuple[str, str, Document | None, str]:
        """The group, household and location a new ticket concerns, and how the group was
        found (records.new_ticket's `origin_from`). A place given with the ticket sends it to
        the group whose boundary holds the place, wherever the household is: a resident reports
        the broken street light or flooded alley of the neighbouring group to the leader with
        authority there, and keeps the ticket among their own. Scope is checked on the household
        or unit filed for, as without a place: an official files for a household or group they
        hold, about the place the problem is at."""
        domain.may_file(caller)  # before any look-up, so the refusal tells nothing of what exists
        household_id = request.household_id
        if caller.role is Role.RESIDENT:
            household_id = household_id or caller.household_id
            if household_id != caller.household_id:
                raise PermissionDenied("residents file tickets for their own household")
        household = await self.store.household(household_id) if household_id else None
        # For an official, one outside their scope looks the same as one that does not exist.
        out_of_sight = household is None or not caller.covers(household["unit_id"])
        if caller.role is not Role.RESIDENT and household_id and out_of_sight:
            raise NotFound(f"household {household_id} not found")
        if household is not None:
            unit_id = household["unit_id"]
        elif caller.role is Role.RESIDENT:
            unit_id = caller.scope
        else:
            if not request.unit_id:
                raise InvalidArgument("unit_id", "name the group (or the household) concerned")
            # Misspelt, it is said to be, not taken for a unit beyond the caller's scope.
            unit_id = check_unit_id(request.unit_id)
        domain.may_submit_for(caller, unit_id)
        placed = request.HasField("location")
        location = _reported_place(request.location) if placed else None
        if household is not None:
            # The view keeps a household's group current through merges: no second read.
            location = location or household.get("location")
            found_by = "household"
        else:
            unit = await self.store.unit(unit_id)
            if unit is None:
                raise NotFound(f"unit {unit_id} is not known to the tickets service")
            # A group merged into one since merged in turn: to the group that is there now,
            # which the caller must hold as well (a merge may cross wards).
            unit_id, _ = await group_now(unit_id, unit, self.store.unit)
            domain.may_submit_for(caller, unit_id)
            if domain.level_of(unit_id) is not domain.Level.GROUP:
                raise InvalidArgument(
                    "unit_id", "tickets are filed for a residential group or village"
                )
            found_by = "unit"
        if placed and (located := await self._located_group(request.location, unit_id)):
            return located, household_id, location, "location"
        return unit_id, household_id, location, found_by

    async def _located_group(self, point: types_pb2.GeoPoint, near: str) -> str:
        """The group whose boundary holds the point, if the map has one this service knows;
        otherwise "" (no boundary there, GIS out of reach), and the ticket keeps the group
        `near` it would have had without a place."""
        located = await self.locator.unit_at(point, near)
        if not located:
            return ""
        unit_id, unit = await group_now(located, await self.store.unit(located), self.store.unit)
        if unit is None or not unit.get("active", True):
            log.warning(
                "GIS places a reported point in %s, which the tickets service does not know; "
                "the ticket goes to %s",
                unit_id,
                near,
            )
            return ""
        # Inside a ward's boundary but no group's: the ward alone cannot say which group.
        return unit_id if domain.level_of(unit_id) is domain.Level.GROUP else ""

    # ---- submitting ------------------------------------------------------------------------

    async def SubmitTicket(
        self, request: tickets_pb2.SubmitTicketRequest, context: Context
    ) -> tickets_pb2.SubmitTicketResponse:
        try:
            ticket, event = await self._filing(principal(), request)
        except DomainError:
            # A retry gets its first answer though the category was withdrawn, or the household
            # moved, since. Looked up only once refused: a first filing pays no extra read (a
            # retry that passes the checks is answered by the command runner).
            stored = await self.commands.answered(
                "SubmitTicket", request, tickets_pb2.SubmitTicketResponse
            )
            if stored is None:
                raise
            return stored
        return await self.commands.insert(
            "SubmitTicket",
            request,
            tickets_pb2.SubmitTicketResponse(ticket=self._message(ticket)),
            documents=[(self.store.tickets.name, ticket)],
            events=[event],
        )

    async def _filing(
        self, caller: Principal, request: tickets_pb2.SubmitTicketRequest
    ) -> tuple[Document, Document]:
        """The new ticket and its TicketSubmitted, if today's rules accept the request."""
        description = plain_text("description", request.description, domain.MAX_DESCRIPTION)
        await self._known_category(request.category)
        unit_id, household_id, location, found_by = await self._origin(caller, request)

        ticket = new_ticket(
            new_ticket_id(),
            category=request.category,
            description=description,
            unit_id=unit_id,
            household_id=household_id,
            location=location,
            located_at_home=location is not None and not request.HasField("location"),
            origin_from=found_by,
            submitter=caller.subject,
            submitter_role=caller.role.value,
            now=self.clock(),
            trace=current_trace_headers(),
        )
        event = ticket_event(
            self.outbox,
            events_pb2.TicketSubmitted(
                ticket_id=ticket["_id"],
                category=request.category,
                origin_unit_id=unit_id,
                location=request.location if request.HasField("location") else None,
                submitter_ref=domain.submitter_ref(self.submitter_key, caller.subject),
            ),
            ticket["_id"],
        )
        return ticket, event

    async def SupportTicket(
        self, request: tickets_pb2.SupportTicketRequest, context: Context
    ) -> tickets_pb2.SupportTicketResponse:
        def allowed(caller: Principal, ticket: Document) -> None:
            domain.may_support(caller, ticket["origin_unit_id"], submitter_of(ticket))

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            supporter = principal().subject
            if supporter in ticket.get("supporters", []):
                return ticket, []  # supported already: nothing changes, nothing to tell
            supporters = {*ticket.get("supporters", []), supporter}
            updated = await self.store.update(
                ticket["_id"],
                {
                    "supporters": sorted(supporters),
                    "last_change": type_name(events_pb2.TicketSupported()),
                },
                session,
            )
            event = events_pb2.TicketSupported(ticket_id=ticket["_id"], supporters=len(supporters))
            return updated, [ticket_event(self.outbox, event, ticket["_id"])]

        return await self._act(
            "SupportTicket", request, tickets_pb2.SupportTicketResponse, "support", mutate, allowed
        )

    async def GetTicket(
        self, request: tickets_pb2.GetTicketRequest, context: Context
    ) -> tickets_pb2.GetTicketResponse:
        caller = principal()
        ticket = await self._visible(request.ticket_id, caller)
        # A cluster spans the ward; each linked ticket is shown only to who may see it alone.
        # Without their comments, and so many at most, so that a cluster of many much-discussed
        # reports still fits one answer (a gRPC message is at most 4 MB).
        linked = [
            t for t in await self.store.linked(ticket, domain.MAX_LINKED_SHOWN) if _sees(caller, t)
        ]
        return tickets_pb2.GetTicketResponse(
            ticket=self._message(ticket), linked=[self._message(t) for t in linked]
        )

    # ---- photos ----------------------------------------------------------------------------

    async def CreatePhotoUpload(
        self, request: tickets_pb2.CreatePhotoUploadRequest, context: Context
    ) -> tickets_pb2.CreatePhotoUploadResponse:
        caller = principal()
        ticket = await self._visible(request.ticket_id, caller)
        self._submitter_or_handler(caller, ticket)
        domain.check_transition("attach", domain.Status(ticket["status"]))
        domain.require_room_for_photo(_photo_keys(ticket))  # no upload that cannot be attached
        check_image_upload(request.content_type, request.size_bytes, domain.MAX_PHOTO_BYTES)
        key = f"tickets/{ticket['_id']}/{uuid.uuid4().hex}.{EXTENSIONS[request.content_type]}"
        return tickets_pb2.CreatePhotoUploadResponse(
            upload_url=self.photos.upload_url(key, request.content_type, request.size_bytes),
            object_key=key,
            expires_at=timestamp(self.clock() + timedelta(minutes=15)),
        )

    async def AttachPhoto(
        self, request: tickets_pb2.AttachPhotoRequest, context: Context
    ) -> tickets_pb2.AttachPhotoResponse:
        check_request_id(request)
        folder = f"tickets/{request.ticket_id}/"
        if not (
            request.object_key.startswith(folder)
            and PHOTO_NAME.fullmatch(request.object_key.removeprefix(folder))
        ):
            raise InvalidArgument("object_key", "was not issued for this ticket")
        caller = principal()

        # Settled before the upload is accepted: a refused one stays where the upload sweep
        # removes it, not copied to checked/ with nothing to refer to it.
        try:
            ticket = await self._ticket(request.ticket_id)
            _check_may(caller, ticket, "attach", self._submitter_or_handler)
            domain.attached_already(_photo_keys(ticket), checked(request.object_key))
        except DomainError:
            # A retry of an attach made before the ticket was decided or filled up.
            answer = await self.commands.answered(
                "AttachPhoto", request, tickets_pb2.AttachPhotoResponse
            )
            if answer is None:
                raise
            return answer
        stored = await self.photos.accept_image(request.object_key, domain.MAX_PHOTO_BYTES)

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            # Checked again in the command's transaction: attaches at once cannot pass the limit
            # together, and a retry of the one that reached it gets its stored answer.
            if domain.attached_already(_photo_keys(ticket), stored.key):
                return ticket, []  # a second tap on the same upload: attached once
            photo = {"key": stored.key, "content_type": stored.content_type, "size": stored.size}
            updated = await self.store.update(
                ticket["_id"],
                {"last_change": type_name(events_pb2.PhotoAttached())},
                session,
                push={"photos": photo},
            )
            event = events_pb2.PhotoAttached(ticket_id=ticket["_id"], object_key=stored.key)
            return updated, [ticket_event(self.outbox, event, ticket["_id"])]

        return await self._act(
            "AttachPhoto",
            request,
            tickets_pb2.AttachPhotoResponse,
            "attach",
            mutate,
            self._submitter_or_handler,
        )

    # ---- the lifecycle ---------------------------------------------------------------------

    async def _set_status(
        self,
        ticket: Document,
        session: Session,
        changes: Document,
        message: Message,
        comment: Document | None = None,
    ) -> tuple[Document, list[Document]]:
        """One update per change, so a queue watcher sees each change once, whole."""
        changes["last_change"] = type_name(message)
        push = {"comments": comment} if comment else None
        updated = await self.store.update(ticket["_id"], changes, session, push=push)
        return updated, [ticket_event(self.outbox, message, ticket["_id"])]

    async def AcknowledgeTicket(
        self, request: tickets_pb2.AcknowledgeTicketRequest, context: Context
    ) -> tickets_pb2.AcknowledgeTicketResponse:
        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            return await self._set_status(
                ticket,
                session,
                {
                    "status": int(domain.Status.ACKNOWLEDGED),
                    "acknowledge_by": None,
                    "next_deadline": ticket["resolve_by"],
                },
                events_pb2.TicketAcknowledged(
                    ticket_id=ticket["_id"], assigned_unit_id=ticket["assigned_unit_id"]
                ),
            )

        return await self._act(
            "AcknowledgeTicket",
            request,
            tickets_pb2.AcknowledgeTicketResponse,
            "acknowledge",
            mutate,
            self._handler,
        )

    async def StartWork(
        self, request: tickets_pb2.StartWorkRequest, context: Context
    ) -> tickets_pb2.StartWorkResponse:
        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            return await self._set_status(
                ticket,
                session,
                {"status": int(domain.Status.IN_PROGRESS)},
                events_pb2.TicketWorkStarted(
                    ticket_id=ticket["_id"], assigned_unit_id=ticket["assigned_unit_id"]
                ),
            )

        return await self._act(
            "StartWork", request, tickets_pb2.StartWorkResponse, "start", mutate, self._handler
        )

    async def ResolveTicket(
        self, request: tickets_pb2.ResolveTicketRequest, context: Context
    ) -> tickets_pb2.ResolveTicketResponse:
        resolution = plain_text("resolution", request.resolution, domain.MAX_COMMENT)
        caller = principal()
        unit_id, level = _deciding(caller)

        async def resolve(
            member: Document, now: datetime, session: Session
        ) -> tuple[Document, list[Document]]:
            return await self._set_status(
                member,
                session,
                {
                    "status": int(domain.Status.RESOLVED),
                    "resolution": resolution,
                    "resolved_at": now,
                    "resolved_by": caller.subject,
                    "decided_by_unit_id": unit_id,
                    "decided_level": int(level),
                    "rejected": False,
                    "next_deadline": None,
                },
                events_pb2.TicketResolved(
                    ticket_id=member["_id"],
                    resolved_by_unit_id=unit_id,
                    level=int(level),  # type: ignore[arg-type]
                ),
            )

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            now = self.clock()
            ticket, emitted = await self._apart(ticket, session)
            # The cluster is resolved together: its duplicates describe the same problem. One
            # assigned beyond the caller's reach is not theirs to resolve: it leaves the cluster,
            # open where it is. Duplicates first, so the answer shows the primary as they left it.
            for duplicate in await self.store.open_duplicates(ticket, session):
                if caller.covers(duplicate["assigned_unit_id"]):
                    _, events = await resolve(duplicate, now, session)
                else:
                    _, events = await release(self.store, self.outbox, duplicate, now, session)
                emitted += events
            updated, events = await resolve(ticket, now, session)
            return updated, emitted + events

        return await self._act(
            "ResolveTicket",
            request,
            tickets_pb2.ResolveTicketResponse,
            "resolve",
            mutate,
            self._handler,
        )

    async def RejectTicket(
        self, request: tickets_pb2.RejectTicketRequest, context: Context
    ) -> tickets_pb2.RejectTicketResponse:
        reason = plain_text("reason", request.reason, domain.MAX_COMMENT)
        unit_id, level = _deciding(principal())

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            now = self.clock()
            ticket, emitted = await self._apart(ticket, session)
            # A rejection decides this ticket alone: its open duplicates stay to be handled,
            # each a ticket of its own again. First, so the answer shows the primary without them.
            for duplicate in await self.store.open_duplicates(ticket, session):
                _, events = await release(self.store, self.outbox, duplicate, now, session)
                emitted += events
            updated, events = await self._set_status(
                ticket,
                session,
                {
                    "status": int(domain.Status.REJECTED),
                    "rejection_reason": reason,
                    # Decided, but not resolved: statistics tell the two apart by this.
                    "rejected": True,
                    "resolved_at": now,
                    "decided_by_unit_id": unit_id,
                    "decided_level": int(level),
                    "next_deadline": None,
                },
                events_pb2.TicketRejected(
                    ticket_id=ticket["_id"],
                    rejected_by_unit_id=unit_id,
                    level=int(level),  # type: ignore[arg-type]
                ),
            )
            return updated, emitted + events

        return await self._act(
            "RejectTicket",
            request,
            tickets_pb2.RejectTicketResponse,
            "reject",
            mutate,
            self._handler,
        )

    async def EscalateTicket(
        self, request: tickets_pb2.EscalateTicketRequest, context: Context
    ) -> tickets_pb2.EscalateTicketResponse:
        reason = plain_text("reason", request.reason, domain.MAX_COMMENT)
        caller = principal()

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            if domain.escalation_target(ticket["assigned_unit_id"]) is None:
                raise FailedPrecondition("the city is the highest level; nobody is above it")
            ticket, unlinked = await self._apart(ticket, session)
            updated, escalated = await escalate(
                self.store,
                self.outbox,
                ticket,
                self.clock(),
                events_pb2.ESCALATION_CAUSE_BY_OFFICIAL,
                session,
                comment=self._comment(caller, reason),
            )
            return updated, unlinked + escalated

        return await self._act(
            "EscalateTicket",
            request,
            tickets_pb2.EscalateTicketResponse,
            "escalate",
            mutate,
            self._handler,
        )

    async def ReopenTicket(
        self, request: tickets_pb2.ReopenTicketRequest, context: Context
    ) -> tickets_pb2.ReopenTicketResponse:
        reason = plain_text("reason", request.reason, domain.MAX_COMMENT)
        caller = principal()

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            rules = await self._rules_that_routed(ticket, session)
            now = self.clock()
            if now > _reopen_until(ticket, rules):
                raise FailedPrecondition("the period for reopening this ticket has passed")
            domain.check_room_for_comment(ticket, "file a new ticket")
            level = domain.Level(ticket["assigned_level"])
            due = domain.deadlines(
                rule_for(rules, ticket["category"]), level, now, acknowledged=False
            )
            ticket, unlinked = await self._apart(ticket, session)
            # Its duplicates were decided with it, and their submitters did not reopen them:
            # they leave the cluster keeping that outcome, counted as their own, whatever this
            # ticket comes to now (a rejection would otherwise take their resolution away).
            for duplicate in await self.store.decided_duplicates(ticket, session):
                unlinked += (await unlink(self.store, self.outbox, duplicate, session))[1]
            updated, reopened = await self._set_status(
                ticket,
                session,
                {
                    "status": int(domain.Status.ROUTED),
                    "resolved_at": None,
                    # The outcome reopened is no longer the ticket's; its events keep it.
                    "resolution": "",
                    "rejected": False,
                    "rejection_reason": "",
                    "decided_by_unit_id": None,
                    "decided_level": None,
                    "rating": 0,
                    "level_since": now,
                    "acknowledge_by": due.acknowledge_by,
                    "resolve_by": due.resolve_by,
                    "next_deadline": domain.next_deadline(
                        domain.Status.ROUTED, due.acknowledge_by, due.resolve_by
                    ),
                },
                events_pb2.TicketReopened(
                    ticket_id=ticket["_id"], assigned_unit_id=ticket["assigned_unit_id"]
                ),
                comment=self._comment(caller, reason),
            )
            return updated, unlinked + reopened

        return await self._act(
            "ReopenTicket",
            request,
            tickets_pb2.ReopenTicketResponse,
            "reopen",
            mutate,
            self._submitter,
        )

    async def CloseTicket(
        self, request: tickets_pb2.CloseTicketRequest, context: Context
    ) -> tickets_pb2.CloseTicketResponse:
        caller = principal()

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            now = self.clock()
            if not submitter_of(ticket).includes(caller):
                # Closing ends the submitter's right to reopen: officials wait for its end.
                until = _reopen_until(ticket, await self._rules_that_routed(ticket, session))
                if now <= until:
                    raise FailedPrecondition(
                        f"the submitter may reopen it until {domain.local_time(until)}; "
                        "close it after that"
                    )
            return await self._set_status(
                ticket,
                session,
                {"status": int(domain.Status.CLOSED), "closed_at": now},
                events_pb2.TicketClosed(ticket_id=ticket["_id"]),
            )

        return await self._act(
            "CloseTicket",
            request,
            tickets_pb2.CloseTicketResponse,
            "close",
            mutate,
            self._submitter_or_handler,
        )

    async def WithdrawTicket(
        self, request: tickets_pb2.WithdrawTicketRequest, context: Context
    ) -> tickets_pb2.WithdrawTicketResponse:
        reason = request.reason.strip()
        if reason:
            reason = plain_text("reason", reason, domain.MAX_COMMENT)
        caller = principal()

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            if supporters := len(ticket.get("supporters", [])):
                raise FailedPrecondition(
                    f"{supporters} other resident(s) support this ticket: it stays open for "
                    "them; add a comment instead"
                )
            if reason:
                domain.check_room_for_comment(ticket, "withdraw it without a reason")
            now = self.clock()
            # Its duplicates are others' reports of a problem they may still have: released,
            # they go on on their own.
            released: list[Document] = []
            for duplicate in await self.store.open_duplicates(ticket, session):
                released += (await release(self.store, self.outbox, duplicate, now, session))[1]
            ticket, unlinked = await self._apart(ticket, session)
            updated, withdrawn = await self._set_status(
                ticket,
                session,
                {
                    "status": int(domain.Status.CLOSED),
                    "withdrawn": True,
                    "closed_at": now,
                    "next_deadline": None,
                },
                events_pb2.TicketWithdrawn(
                    ticket_id=ticket["_id"], assigned_unit_id=ticket.get("assigned_unit_id") or ""
                ),
                comment=self._comment(caller, reason) if reason else None,
            )
            return updated, released + unlinked + withdrawn

        return await self._act(
            "WithdrawTicket",
            request,
            tickets_pb2.WithdrawTicketResponse,
            "withdraw",
            mutate,
            self._submitter,
        )

    async def _apart(self, ticket: Document, session: Session) -> tuple[Document, list[Document]]:
        """A duplicate escalated, decided, reopened or withdrawn apart from its primary leaves the
        cluster: from then on it goes up on its own deadlines, is decided and counted on its own,
        and its primary's outcome is no longer taken for its own."""
        if not ticket.get("duplicate_of"):
            return ticket, []
        return await unlink(self.store, self.outbox, ticket, session)

    async def _rules_that_routed(self, ticket: Document, session: Session) -> Document:
        """The rules version that routed the ticket (the current one, if it is gone)."""
        return await self.store.rules_version(ticket["rule_version"], session) or await self._rules(
            session
        )

    def _comment(self, caller: Principal, text: str) -> Document:
        return {
            "author": caller.subject,
            "role": caller.role.value,
            "text": text,
            "at": self.clock(),
        }

    async def AddComment(
        self, request: tickets_pb2.AddCommentRequest, context: Context
    ) -> tickets_pb2.AddCommentResponse:
        text = plain_text("text", request.text, domain.MAX_COMMENT)
        caller = principal()

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            message = events_pb2.TicketCommented(
                ticket_id=ticket["_id"], author_role=caller.role.value
            )
            updated = await self.store.update(
                ticket["_id"],
                {"last_change": type_name(message)},
                session,
                push={"comments": self._comment(caller, text)},
            )
            return updated, [ticket_event(self.outbox, message, ticket["_id"])]

        # Comments are allowed in every state, so the "transition" is a no-op check.
        async def run(session: Session) -> tuple[tickets_pb2.AddCommentResponse, list[Document]]:
            ticket = await self._ticket(request.ticket_id, session)
            _check_visible(caller, ticket)  # one the caller may not see is not there for them
            # The submitter's side, and every official who sees the ticket: not only those who
            # may handle it now, but the group's leader and the ward it was escalated from, who
            # answer what the unit handling it asks.
            if not (caller.is_official or submitter_of(ticket).includes(caller)):
                raise PermissionDenied(f"role {caller.role.value} does not comment on tickets")
            domain.check_room_for_comment(ticket)
            updated, emitted = await mutate(ticket, session)
            return tickets_pb2.AddCommentResponse(ticket=self._message(updated)), emitted

        return await self.commands.run("AddComment", request, tickets_pb2.AddCommentResponse, run)

    async def RateResolution(
        self, request: tickets_pb2.RateResolutionRequest, context: Context
    ) -> tickets_pb2.RateResolutionResponse:
        if not 1 <= request.rating <= 5:
            raise InvalidArgument("rating", "must be from 1 to 5")

        async def mutate(ticket: Document, session: Session) -> tuple[Document, list[Document]]:
            if ticket.get("rejected"):
                raise FailedPrecondition("a rejected ticket has no resolution to rate")
            if ticket.get("withdrawn"):
                raise FailedPrecondition("a withdrawn ticket has no resolution to rate")
            if ticket.get("rating") == request.rating:
                # Rated so already (a second tap, the screen opened again): one rating, told
                # once, so an integrator counting ratings counts it once.
                return ticket, []
            return await self._set_status(
                ticket,
                session,
                {"rating": request.rating},
                events_pb2.TicketRated(ticket_id=ticket["_id"], rating=request.rating),
            )

        return await self._act(
            "RateResolution",
            request,
            tickets_pb2.RateResolutionResponse,
            "rate",
            mutate,
            self._submitter,
        )

    # ---- queries ---------------------------------------------------------------------------

    async def ListMyTickets(
        self, request: tickets_pb2.ListMyTicketsRequest, context: Context
    ) -> tickets_pb2.ListMyTicketsResponse:
        caller = principal()
        size = page_size(request.page.page_size)
        # A resident's own, and those officials filed on their household's behalf; an
        # official's, as far as they may see them.
        household_id = caller.household_id if caller.role is Role.RESIDENT else ""
        found = self.store.of_submitter(
            caller.subject,
            household_id,
            _page_token(request.page.page_token),
            size,
            scope=caller.scope if caller.is_official else "",
        )
        tickets, token = await self._page(found, size)
        return tickets_pb2.ListMyTicketsResponse(tickets=tickets, next_page_token=token)

    async def ListNearbyTickets(
        self, request: tickets_pb2.ListNearbyTicketsRequest, context: Context
    ) -> tickets_pb2.ListNearbyTicketsResponse:
        caller = principal()
        domain.may_list_nearby(caller)
        meters = domain.nearby_radius(request.radius_m, self.duplicate_meters)
        limit = domain.nearby_limit(request.limit)
        if request.category:
            await self._category_nearby(caller, request.category)
        resident = caller.role is Role.RESIDENT
        if request.HasField("location"):
            point = point_document("location", request.location)
        else:
            household = await self.store.household(caller.household_id) if resident else None
            if household is None or not household.get("location"):
                raise InvalidArgument(
                    "location",
                    "is required (your household has no location on the register)"
                    if resident
                    else "is required",
                )
            point = household["location"]
        found = await self.store.open_near(
            point,
            meters=meters,
            within=caller.scope,
            category=request.category,
            limit=limit,
            # Only officials see tickets at a household's door: to anyone else a ticket's
            # distance from a few points would tell where its submitter lives.
            doors_of=None if caller.is_official else caller,
        )
        return tickets_pb2.ListNearbyTicketsResponse(
            tickets=[
                tickets_pb2.NearbyTicket(
                    distance_m=ticket.pop(DISTANCE), ticket=self._message(ticket)
                )
                for ticket in found
            ]
        )

    async def _unit_asked(self, caller: Principal, unit_id: str) -> str:
        """The unit a queue or statistics are asked for, the caller's own when none is named. A
        mistyped unit is said to be one, not answered with an empty queue (a watch that never
        tells anything, figures of nothing); a group merged away has its tickets where it went."""
        own = not unit_id
        if own:
            # The caller's own, as their token names it: a leader of a group merged away is
            # told so, not shown an empty queue that reads as "nothing to do".
            unit_id = caller.scope
        else:
            caller.require_unit(check_unit_id(unit_id))
        unit = await self.store.unit(unit_id)
        if unit is None:
            if own:
                return unit_id
            raise NotFound(f"unit {unit_id} not found")
        if not unit.get("active", True):
            raise FailedPrecondition(
                f"group {unit_id} was merged into {unit.get('merged_into_id')}: its tickets "
                "are that group's"
            )
        return unit_id

    async def _queue_query(self, caller: Principal, unit_id: str, department: str) -> Document:
        if not caller.is_official:
            raise PermissionDenied(f"role {caller.role.value} has no queue")
        query: Document = {"assigned_unit_id": await self._unit_asked(caller, unit_id)}
        if department:
            domain.check_name("department", department, domain.DEPARTMENT)
            query["department"] = department
        return query

    async def ListQueue(
        self, request: tickets_pb2.ListQueueRequest, context: Context
    ) -> tickets_pb2.ListQueueResponse:
        caller = principal()
        domain.check_statuses("statuses", request.statuses)
        query = await self._queue_query(caller, request.unit_id, request.department)
        if request.statuses:
            query["status"] = {"$in": list(request.statuses)}
        if request.category:
            domain.check_name("category", request.category, domain.CATEGORY)
            query["category"] = request.category
        if request.overdue_only:  # of the statuses asked for, those with a deadline to miss
            wanted = set(request.statuses or domain.OPEN) & {int(s) for s in domain.OPEN}
            query["status"] = {"$in": sorted(wanted)}
            query["next_deadline"] = {"$lt": self.clock()}  # passed, as domain.missed counts
            query["duplicate_of"] = None  # late with its primary, not alone: records.overdue
        size = page_size(request.page.page_size)
        tickets, token = await self._page(
            self.store.queue(query, _page_token(request.page.page_token), size), size
        )
        return tickets_pb2.ListQueueResponse(tickets=tickets, next_page_token=token)

    async def WatchQueue(
        self, request: tickets_pb2.WatchQueueRequest, context: Context
    ) -> AsyncIterator[tickets_pb2.WatchQueueResponse]:
        caller = principal()
        query = await self._queue_query(caller, request.unit_id, request.department)

        def in_queue(image: str) -> Document:
            return {f"{image}.{key}": value for key, value in query.items()}

        # Tickets entering, changing in, or leaving the queue (escalated elsewhere, say), each as
        # its change left it. A change stream sees every instance's writes, not only this one's.
        pipeline = [
            {"$match": {"$or": [in_queue("fullDocument"), in_queue("fullDocumentBeforeChange")]}}
        ]
        async with await self.store.tickets.watch(
            pipeline, full_document="whenAvailable", full_document_before_change="whenAvailable"
        ) as stream:
            async for change in stream:
                ticket = change.get("fullDocument")
                if ticket is None:
                    continue
                # One that left for a unit beyond the caller's scope (a group merged into one of
                # another's) is told as having left, not shown as GetTicket no longer shows it.
                message = self._message(ticket) if _sees(caller, ticket) else _gone(ticket)
                yield tickets_pb2.WatchQueueResponse(
                    ticket=message, change=ticket.get("last_change", "")
                )

    async def GetStatistics(
        self, request: tickets_pb2.GetStatisticsRequest, context: Context
    ) -> tickets_pb2.GetStatisticsResponse:
        caller = principal()
        if caller.role is Role.RESIDENT:
            raise PermissionDenied("residents may not read statistics")
        unit_id = await self._unit_asked(caller, request.unit_id)
        rows = await self.store.statistics(unit_id, self.clock())
        return tickets_pb2.GetStatisticsResponse(
            statistics=[
                tickets_pb2.CategoryStatistics(
                    unit_id=row["_id"]["unit"],
                    category=row["_id"]["category"],
                    total=row["total"],
                    open=row["open"],
                    resolved=row["resolved"],
                    overdue=row["overdue"],
                    median_resolution_time=duration(
                        timedelta(milliseconds=statistics.median(row["resolution_ms"]))
                    )
                    if row["resolution_ms"]
                    else None,
                )
                for row in rows
            ]
        )

    # ---- routing rules -------------------------------------------------------------------

    async def GetRoutingRules(
        self, request: tickets_pb2.GetRoutingRulesRequest, context: Context
    ) -> tickets_pb2.GetRoutingRulesResponse:
        principal()
        return tickets_pb2.GetRoutingRulesResponse(rules=rules_message(await self._rules()))

    async def SetRoutingRules(
        self, request: tickets_pb2.SetRoutingRulesRequest, context: Context
    ) -> tickets_pb2.SetRoutingRulesResponse:
        caller = principal()
        caller.require_role(Role.CITY_ADMIN)
        rules = [rule_from_message(i, rule) for i, rule in enumerate(request.rules)]
        reopen_within = (
            span("reopen_within", request.reopen_within, longest=domain.LONGEST_DEADLINE)
            if request.HasField("reopen_within")
            else None  # not set: the period in force stays
        )
        domain.check_rules(rules, reopen_within)

        async def work(
            session: Session,
        ) -> tuple[tickets_pb2.SetRoutingRulesResponse, list[Document]]:
            current = await self._rules(session)
            # A version never made is no edit of what another admin saved: ABORTED would send
            # the caller to read the rules again for a change nobody made.
            if not 0 <= request.based_on_version <= current["version"]:
                raise InvalidArgument(
                    "based_on_version",
                    f"there is no version {request.based_on_version}: the rules are at "
                    f"version {current['version']}",
                )
            if request.based_on_version and request.based_on_version != current["version"]:
                raise Aborted(
                    f"based_on_version: the rules were changed since version "
                    f"{request.based_on_version} (now {current['version']}, by "
                    f"{current.get('changed_by') or 'the service'}): read them again"
                )
            within = (
                timedelta(seconds=current["reopen_within_s"])
                if reopen_within is None
                else reopen_within
            )
            doc = rules_document(
                current["version"] + 1, rules, within, self.clock(), caller.subject
            )
            await self.store.insert_rules(doc, session)
            event = self.outbox.event(
                events_pb2.RoutingRulesChanged(
                    version=doc["version"], categories=[r.category for r in rules]
                ),
                key="routing-rules",
            )
            return tickets_pb2.SetRoutingRulesResponse(rules=rules_message(doc)), [event]

        response = await self.commands.run(
            "SetRoutingRules", request, tickets_pb2.SetRoutingRulesResponse, work
        )
        self.store.forget_rules()
        return response


def _sees(caller: Principal, ticket: Document) -> bool:
    try:
        _check_visible(caller, ticket)
    except NotFound:
        return False
    return True


def _gone(ticket: Document) -> tickets_pb2.Ticket:
    """A ticket as its events tell anyone of it: what it is and where it stands now, not what
    was written, photographed or said about it, nor by whom."""
    return tickets_pb2.Ticket(
        ticket_id=ticket["_id"],
        category=ticket["category"],
        status=ticket["status"],
        origin_unit_id=ticket["origin_unit_id"],
        assigned_unit_id=ticket.get("assigned_unit_id") or "",
        assigned_level=ticket.get("assigned_level") or 0,  # type: ignore[arg-type]
        department=ticket.get("department") or "",
    )


def _reported_place(point: types_pb2.GeoPoint) -> Document:
    """Where a problem is reported, which lies in the country: a point far off it is a phone
    that had no fix (0, 0 most often). Taken as given, any two such reports of a category in
    one ward would lie together and be linked as one problem, and each would be marked there."""
    place = point_document("location", point)
    if not (
        VIETNAM.south <= point.latitude <= VIETNAM.north
        and VIETNAM.west <= point.longitude <= VIETNAM.east
    ):
        raise InvalidArgument(
            "location", "is not in Vietnam: leave it out to report at your household"
        )
    return place


def _page_token(token: str) -> str:
    """A listing's page token: the id of the last ticket on the page before. Any other string
    would still sort somewhere among the ids and answer a page that follows no page."""
    if token and not TICKET_ID.fullmatch(token):
        raise InvalidArgument("page.page_token", "is not a token this listing gave")
    return token


def _deciding(caller: Principal) -> tuple[str, domain.Level]:
    """The unit and level a ticket is resolved or rejected at: the caller's, who may be above
    the unit it is assigned to (it is decided there, not forwarded)."""
    return caller.scope, domain.level_of(caller.scope)


def _reopen_until(ticket: Document, rules: Document) -> datetime:
    """Until when the submitter may reopen a resolved or rejected ticket."""
    return ticket["resolved_at"] + timedelta(seconds=rules["reopen_within_s"])  # type: ignore[no-any-return]


def _check_may(
    caller: Principal,
    ticket: Document,
    action: str,
    allowed: Callable[[Principal, Document], None],
) -> None:
    """Whether the caller may take `action` on the ticket as it stands."""
    try:
        allowed(caller, ticket)
    except PermissionDenied:
        _check_visible(caller, ticket)  # one the caller may not see is not there for them
        raise
    domain.check_transition(action, domain.Status(ticket["status"]))


def _photo_keys(ticket: Document) -> list[str]:
    return [photo["key"] for photo in ticket.get("photos", [])]


def _check_visible(caller: Principal, ticket: Document) -> None:
    """Outside the caller's scope a ticket looks the same as one that does not exist."""
    try:
        domain.may_see(
            caller,
            ticket["origin_unit_id"],
            ticket.get("assigned_unit_id") or "",
            submitter_of(ticket),
        )
    except PermissionDenied:
        raise NotFound(f"ticket {ticket['_id']} not found") from None
