"""The notices service's gRPC servicer."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, TypeGuard

import grpc
from civic.notices.v1 import events_pb2, notices_pb2, notices_pb2_grpc
from google.protobuf.message import Message
from pymongo.asynchronous.collection import AsyncCollection

from services.common.auth import Principal, Role, principal
from services.common.commands import CommandRunner
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.media import check_upload
from services.common.mongo import Document, Session, check_unit_id
from services.common.objects import UPLOAD_WINDOW, ObjectStore
from services.common.outbox import Outbox
from services.common.paging import page_size
from services.common.runtime import BackgroundTask
from services.common.wire import moment, span, timestamp
from services.notices import domain
from services.notices.delivery import START, Deliverer, publication
from services.notices.domain import State
from services.notices.events import notice_event
from services.notices.records import (
    as_sent,
    audience_document,
    audience_from_message,
    household_notice,
    without_withdrawn_files,
)
from services.notices.records import notice_message as notice_record
from services.notices.store import NoticeStore, new_notice_id

Context = grpc.aio.ServicerContext[Any, Any]
# How many changes a watching app may fall behind before its stream ends (it lists again).
WATCH_BACKLOG = 1000
# Put in a watching app's queue when its stream ends.
_CLOSED: Document = {}
log = logging.getLogger(__name__)


class FeedHub:
    """One change stream per instance on the feed, shared by every app watching through it: a
    resident's app waits on its own queue, and each feed entry goes to the queues of the
    households it names. A change stream sees every instance's writes."""

    def __init__(self, feed: AsyncCollection[Document]) -> None:
        self._feed = feed
        self._queues: dict[str, set[asyncio.Queue[Document]]] = {}
        self._stream = BackgroundTask("notice-feed", self._run)
        self._open = asyncio.Event()

    def watching(self, household_id: str) -> bool:
        return self._open.is_set() and bool(self._queues.get(household_id))

    async def subscribe(self, household_id: str) -> AsyncIterator[Document]:
        """The feed's entries for the household until the stream ends (the app then lists its
        notices and watches again)."""
        if not self._stream.running:
            self._open.clear()
            self._stream.start()
        await self._open.wait()
        if not self._stream.running:
            return  # the change stream could not be opened
        queue: asyncio.Queue[Document] = asyncio.Queue(WATCH_BACKLOG)
        self._queues.setdefault(household_id, set()).add(queue)
        try:
            while (entry := await queue.get()) is not _CLOSED:
                yield entry
        finally:
            queues = self._queues.get(household_id, set())
            queues.discard(queue)
            if not queues:
                self._queues.pop(household_id, None)

    async def stop(self) -> None:
        await self._stream.stop()

    async def _run(self) -> None:
        try:
            async with await self._feed.watch([{"$match": {"operationType": "insert"}}]) as stream:
                self._open.set()
                async for change in stream:
                    self._dispatch(change["fullDocument"])
        except Exception:
            log.exception("the notice feed's change stream failed")
        finally:
            # Every app's stream ends with this one; each watches again.
            for queues in self._queues.values():
                for queue in queues:
                    _close(queue)
            self._open.set()

    def _dispatch(self, entry: Document) -> None:
        named = entry["households"]
        if named is None:
            households = list(self._queues)
        elif len(named) > len(self._queues):
            wanted = set(named)
            households = [h for h in self._queues if h in wanted]
        else:
            households = [h for h in named if h in self._queues]
        for household_id in households:
            for queue in self._queues.get(household_id, ()):
                try:
                    queue.put_nowait(entry)
                except asyncio.QueueFull:
                    _close(queue)  # fell too far behind: its stream ends


def _delivered(record: Document | None) -> TypeGuard[Document]:
    """The household has the notice: its record is announced (not pending: a resident neither
    sees nor opens a notice before its delivery is counted and announced) and not withdrawn."""
    return record is not None and not record.get("pending") and record.get("withdrawn_at") is None


def _asked_unit(unit_id: str) -> str:
    """A unit id a request names, if any: a malformed one is bad input, not taken for a unit
    outside the caller's scope."""
    return check_unit_id(unit_id) if unit_id else ""


def _close(queue: asyncio.Queue[Document]) -> None:
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(_CLOSED)


class NoticesServicer(notices_pb2_grpc.NoticesServiceServicer):
    def __init__(
        self,
        store: NoticeStore,
        commands: CommandRunner,
        outbox: Outbox,
        files: ObjectStore,
        deliverer: Deliverer,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.commands = commands
        self.outbox = outbox
        self.files = files
        self.deliverer = deliverer
        self.clock = clock
        self.hub = FeedHub(store.feed)

    # ---- helpers ---------------------------------------------------------------------------

    def _notice(self, doc: Document) -> notices_pb2.Notice:
        return notice_record(doc, self.clock(), self.files.view_url)

    def _notice_for(self, caller: Principal, doc: Document) -> notices_pb2.Notice:
        """The notice as the caller may read it: a household as it was sent; the files withdrawn
        from it only for its publisher and the officials above, who may still change it."""
        message = self._notice(doc)
        if caller.role is Role.RESIDENT:
            return as_sent(message)
        if not (caller.is_official and caller.covers(doc["publisher"]["unit_id"])):
            without_withdrawn_files(message)
        return message

    async def _get(self, notice_id: str, session: Session | None = None) -> Document:
        if not notice_id:
            raise InvalidArgument("notice_id", "is required")
        notice = await self.store.get(notice_id, session)
        if notice is None:
            raise NotFound(f"notice {notice_id} not found")
        return notice

    async def _visible(self, notice_id: str, caller: Principal) -> Document:
        """Outside the caller's reach a notice looks the same as one that does not exist."""
        notice = await self._get(notice_id)
        if caller.role is Role.RESIDENT:
            record = await self.store.delivery(notice_id, caller.household_id)
            if not _delivered(record):
                raise NotFound(f"notice {notice_id} not found")
        elif not domain.may_see_as_official(caller, notice["unit_id"]):
            # Into the caller's scope, if at all, through groups merged away: rare, so the
            # merges are looked up only then.
            merged = await self.store.merged_away(notice["unit_id"])
            if not domain.may_see_as_official(caller, notice["unit_id"], merged.into):
                raise NotFound(f"notice {notice_id} not found")
        return notice

    async def _reach_area(
        self, caller: Principal, notice: Document, requested: str
    ) -> tuple[str, list[str] | None]:
        """The unit whose reach the caller counts, and the groups to count for it: every
        record of the notice for its own unit (households from its groups merged away are
        counted in the group they are in now, outside it); for another, its groups and those
        its own groups merged away went into, where the caller's scope holds them (not to
        show one group's households to the leader of a group merged into it)."""
        merged = await self.store.merged_away(notice["unit_id"])
        area = domain.reach_area(caller, notice["unit_id"], _asked_unit(requested), merged.into)
        if area == notice["unit_id"]:
            return area, None
        went = (await self.store.merged_away(area)).into
        return area, [area, *(group for group in went if caller.covers(group))]

    async def _managed(self, notice_id: str, caller: Principal) -> Document:
        """A notice the caller would revise or retract: one outside their sight is not there
        for them (not a refusal naming who published it); one they see is theirs to change
        only if their scope covers its publisher's unit."""
        caller.require_role(*domain.PUBLISHERS)
        notice = await self._visible(notice_id, caller)
        domain.may_manage(caller, notice["publisher"]["unit_id"])
        return notice

    async def _attachments(
        self,
        uploads: list[notices_pb2.AttachmentUpload],
        caller: Principal,
        kept: list[Document],
    ) -> list[Document]:
        """The attachments named, each checked: an earlier revision's as it was (`kept`, the
        latest revision's last), a new upload by its bytes in the store (a bad one is refused
        and deleted)."""
        if len(uploads) > domain.MAX_ATTACHMENTS:
            raise InvalidArgument("attachments", f"at most {domain.MAX_ATTACHMENTS} per notice")
        known = {a["key"]: a for a in kept}
        names = []
        for i, upload in enumerate(uploads):
            name = domain.check_file_name(f"attachments[{i}].file_name", upload.file_name)
            if upload.object_key not in known:
                domain.check_upload_key(
                    f"attachments[{i}].object_key", caller.scope, upload.object_key
                )
            if upload.object_key in [u.object_key for u in uploads[:i]]:
                raise InvalidArgument(f"attachments[{i}].object_key", "is attached twice")
            names.append(name)
        accepted = []
        for i, (upload, name) in enumerate(zip(uploads, names, strict=True)):
            if upload.object_key in known:
                accepted.append(known[upload.object_key] | {"name": name})
                continue
            try:
                stored = await self.files.accept(
                    upload.object_key, domain.MAX_ATTACHMENT_BYTES, domain.ATTACHMENT_SIGNATURES
                )
            except InvalidArgument as error:
                raise InvalidArgument(f"attachments[{i}].{error.field}", error.problem) from None
            except NotFound as error:
                raise NotFound(f"attachments[{i}].object_key: {error.message}") from None
            accepted.append(
                {
                    "key": stored.key,
                    "name": name,
                    "content_type": stored.content_type,
                    "size": stored.size,
                }
            )
        return accepted

    # ---- attachments -----------------------------------------------------------------------

    async def CreateAttachmentUpload(
        self, request: notices_pb2.CreateAttachmentUploadRequest, context: Context
    ) -> notices_pb2.CreateAttachmentUploadResponse:
        caller = principal()
        caller.require_role(*domain.PUBLISHERS)
        check_upload(
            request.content_type,
            request.size_bytes,
            domain.MAX_ATTACHMENT_BYTES,
            domain.ATTACHMENT_SIGNATURES,
        )
        extension = domain.EXTENSIONS[request.content_type]
        key = f"{domain.upload_folder(caller.scope)}{uuid.uuid4().hex}.{extension}"
        return notices_pb2.CreateAttachmentUploadResponse(
            upload_url=self.files.upload_url(key, request.content_type, request.size_bytes),
            object_key=key,
            expires_at=timestamp(self.clock() + UPLOAD_WINDOW),
        )

    # ---- publishing ------------------------------------------------------------------------

    async def PublishNotice(
        self, request: notices_pb2.PublishNoticeRequest, context: Context
    ) -> notices_pb2.PublishNoticeResponse:
        caller = principal()
        if not request.unit_id:
            raise InvalidArgument("unit_id", "is required")
        check_unit_id(request.unit_id)
        domain.may_publish(caller, request.unit_id)
        # A retry gets its first answer, though the unit was merged or the expiry has passed since.
        stored = await self.commands.answered(
            "PublishNotice", request, notices_pb2.PublishNoticeResponse
        )
        if stored is not None:
            return stored
        title = domain.check_title(request.title)
        body = domain.check_body(request.body)
        priority = domain.check_priority(request.priority)
        audience = audience_from_message(request.audience)
        now = self.clock()
        timing = domain.check_timing(
            now,
            moment("publish_at", request.publish_at) if request.HasField("publish_at") else None,
            moment("expires_at", request.expires_at) if request.HasField("expires_at") else None,
            priority,
            span("resend_after", request.resend_after, longest=domain.MAX_RESEND_AFTER)
            if request.HasField("resend_after")
            else None,
        )
        unit = await self.store.view.unit(request.unit_id)
        if unit is None:
            raise NotFound(f"unit {request.unit_id} not found")
        if not unit.get("active", True):
            raise FailedPrecondition(
                f"unit {request.unit_id} was merged into {unit.get('merged_into_id')}"
            )
        attachments = await self._attachments(list(request.attachments), caller, [])

        async def work(
            session: Session,
        ) -> tuple[notices_pb2.PublishNoticeResponse, list[Document]]:
            notice: Document = {
                "_id": new_notice_id(),
                "priority": int(priority),
                "publisher": {
                    "unit_id": caller.scope,
                    "role": caller.role.value,
                    "subject": caller.subject,
                },
                "unit_id": request.unit_id,
                "audience": audience_document(audience),
                "publish_at": timing.publish_at,
                "expires_at": timing.expires_at,
                "published_at": None,
                "state": int(State.SCHEDULED),
                "requires_ack": request.requires_acknowledgement,
                "revisions": [
                    {
                        "revision": 1,
                        "title": title,
                        "body": body,
                        "attachments": attachments,
                        "at": now,
                        "by": caller.subject,
                        "note": "",
                    }
                ],
                "resend_after_s": (
                    timing.resend_after.total_seconds() if timing.resend_after else None
                ),
                "fanout": {
                    "after": dict(START),
                    "delivered": 0,
                    "complete": False,
                },
                "created_at": now,
            }
            if timing.publish_at is None:
                merged = await self.store.merged_away(request.unit_id, session)
                changes, published = publication(notice, merged, now)
                notice |= changes
                event = notice_event(self.outbox, published, notice["_id"])
            else:
                scheduled = events_pb2.NoticeScheduled(
                    notice_id=notice["_id"],
                    unit_id=notice["unit_id"],
                    priority=notice["priority"],
                    publish_at=timestamp(timing.publish_at),
                )
                event = notice_event(self.outbox, scheduled, notice["_id"])
            await self.store.notices.insert_one(notice, session=session)
            return notices_pb2.PublishNoticeResponse(notice=self._notice(notice)), [event]

        response = await self.commands.run(
            "PublishNotice", request, notices_pb2.PublishNoticeResponse, work
        )
        self.deliverer.wake()
        return response

    async def ReviseNotice(
        self, request: notices_pb2.ReviseNoticeRequest, context: Context
    ) -> notices_pb2.ReviseNoticeResponse:
        caller = principal()
        notice = await self._managed(request.notice_id, caller)
        # A retry gets its first answer, though the notice was revised (its attachments
        # dropped) or retracted since.
        stored = await self.commands.answered(
            "ReviseNotice", request, notices_pb2.ReviseNoticeResponse
        )
        if stored is not None:
            return stored
        title = domain.check_title(request.title)
        body = domain.check_body(request.body)
        note = domain.check_reason("note", request.note) if request.note.strip() else ""
        # Any revision's file may be named again: one dropped by a revision can come back.
        issued = [a for kept in notice["revisions"] for a in kept.get("attachments", [])]
        attachments = await self._attachments(list(request.attachments), caller, issued)

        def revision(current: Document, now: datetime) -> tuple[Document, int, Message]:
            number = current["revisions"][-1]["revision"] + 1
            added = {
                "revision": number,
                "title": title,
                "body": body,
                "attachments": attachments,
                "at": now,
                "by": caller.subject,
                "note": note,
            }
            message = events_pb2.NoticeRevised(notice_id=current["_id"], revision=number, note=note)
            return {"$push": {"revisions": added}}, notices_pb2.NOTICE_CHANGE_REVISED, message

        response: notices_pb2.ReviseNoticeResponse = await self._manage(
            "ReviseNotice", request, notices_pb2.ReviseNoticeResponse, "revised", revision
        )
        return response

    async def RetractNotice(
        self, request: notices_pb2.RetractNoticeRequest, context: Context
    ) -> notices_pb2.RetractNoticeResponse:
        caller = principal()
        await self._managed(request.notice_id, caller)
        reason = domain.check_reason("reason", request.reason)

        def retraction(current: Document, now: datetime) -> tuple[Document, int, Message]:
            update = {
                # A first delivery still running is ended by the deliverer, which withdraws
                # what it wrote and has not announced yet.
                "$set": {
                    "state": int(State.RETRACTED),
                    "retracted_at": now,
                    "retraction_reason": reason,
                },
            }
            message = events_pb2.NoticeRetracted(notice_id=current["_id"], reason=reason)
            return update, notices_pb2.NOTICE_CHANGE_RETRACTED, message

        response: notices_pb2.RetractNoticeResponse = await self._manage(
            "RetractNotice",
            request,
            notices_pb2.RetractNoticeResponse,
            "retracted",
            retraction,
            require=domain.require_retractable,
        )
        return response

    async def _manage(
        self,
        method: str,
        request: Any,
        response_type: Any,
        what: str,
        change: Callable[[Document, datetime], tuple[Document, int, Message]],
        require: Callable[[State, str], None] = domain.require_live,
    ) -> Any:
        """A publisher's change to a notice that is still live (or as `require` allows), as one
        command: the update, the watching apps told (once it is published), its event."""

        async def work(session: Session) -> tuple[Any, list[Document]]:
            now = self.clock()
            current = await self._get(request.notice_id, session)
            state = domain.state_at(State(current["state"]), current["expires_at"], now)
            require(state, what)
            update, told, message = change(current, now)
            updated = await self.store.update(current["_id"], update, session)
            # Households have it once it went out, expired too: they list expired notices, so
            # one retracted then (sent in error) must leave the apps showing it as well.
            if current.get("published_at") is not None:
                await self.store.announce(told, current["_id"], None, now, session)
            event = notice_event(self.outbox, message, current["_id"])
            return response_type(notice=self._notice(updated)), [event]

        return await self.commands.run(method, request, response_type, work)

    # ---- officials' queries ----------------------------------------------------------------

    async def GetNotice(
        self, request: notices_pb2.GetNoticeRequest, context: Context
    ) -> notices_pb2.GetNoticeResponse:
        caller = principal()
        notice = await self._visible(request.notice_id, caller)
        return notices_pb2.GetNoticeResponse(notice=self._notice_for(caller, notice))

    async def ListNotices(
        self, request: notices_pb2.ListNoticesRequest, context: Context
    ) -> notices_pb2.ListNoticesResponse:
        caller = principal()
        if caller.role is Role.RESIDENT:
            raise PermissionDenied("residents list their own notices with ListMyNotices")
        unit_id = _asked_unit(request.unit_id) or caller.scope
        caller.require_unit(unit_id)
        size = page_size(request.page.page_size)
        # The notices of groups merged into the unit too: their households are its residents
        # now, and the caller sees each of those notices (read only) as `GetNotice` does.
        merged_in = await self.store.merged_in(unit_id)
        items, token = await self.store.in_unit(
            unit_id, request.page.page_token, size, merged_in, from_above=request.from_above
        )
        return notices_pb2.ListNoticesResponse(
            notices=[self._notice_for(caller, n) for n in items], next_page_token=token
        )

    async def GetReach(
        self, request: notices_pb2.GetReachRequest, context: Context
    ) -> notices_pb2.GetReachResponse:
        caller = principal()
        notice = await self._visible(request.notice_id, caller)
        area, counted = await self._reach_area(caller, notice, request.unit_id)
        rows = await self.store.reach(notice["_id"], counted)
        groups = [
            notices_pb2.Reach(
                unit_id=row["unit_id"],
                delivered=row.get("delivered", 0),
                opened=row.get("opened", 0),
                acknowledged=row.get("acknowledged", 0),
            )
            for row in rows
        ]
        total = notices_pb2.Reach(
            unit_id=area,
            delivered=sum(g.delivered for g in groups),
            opened=sum(g.opened for g in groups),
            acknowledged=sum(g.acknowledged for g in groups),
        )
        return notices_pb2.GetReachResponse(
            total=total, groups=groups, delivery_complete=notice["fanout"]["complete"]
        )

    async def ListNotReached(
        self, request: notices_pb2.ListNotReachedRequest, context: Context
    ) -> notices_pb2.ListNotReachedResponse:
        caller = principal()
        # Counts are for anyone who reads reach; the households' addresses, to knock on their
        # doors, only for officials.
        if not caller.is_official:
            raise PermissionDenied(f"role {caller.role.value} may not list households")
        notice = await self._visible(request.notice_id, caller)
        _, counted = await self._reach_area(caller, notice, request.unit_id)
        size = page_size(request.page.page_size)
        items, token = await self.store.not_reached(
            notice["_id"], counted, request.page.page_token, size
        )
        addresses = {
            h["_id"]: h.get("address", "")
            async for h in self.store.view.households.find(
                {"_id": {"$in": [d["household_id"] for d in items]}}, {"address": 1}
            )
        }
        return notices_pb2.ListNotReachedResponse(
            households=[
                notices_pb2.NotReachedHousehold(
                    household_id=d["household_id"],
                    unit_id=d["unit_id"],
                    address=addresses.get(d["household_id"], ""),
                    delivered_at=timestamp(d["delivered_at"]),
                    resent_count=d.get("resent", 0),
                )
                for d in items
            ],
            next_page_token=token,
        )

    # ---- residents -------------------------------------------------------------------------

    @staticmethod
    def _household() -> str:
        caller = principal()
        if caller.role is not Role.RESIDENT:
            raise PermissionDenied("only a resident's household has notices")
        return caller.household_id

    def _household_notice(self, record: Document, notice: Document) -> notices_pb2.HouseholdNotice:
        return household_notice(record, notice, self.clock(), self.files.view_url)

    async def ListMyNotices(
        self, request: notices_pb2.ListMyNoticesRequest, context: Context
    ) -> notices_pb2.ListMyNoticesResponse:
        household_id = self._household()
        size = page_size(request.page.page_size)
        records, token = await self.store.of_household(
            household_id, self.clock(), request.include_expired, request.page.page_token, size
        )
        notices = {
            n["_id"]: n
            async for n in self.store.notices.find(
                {"_id": {"$in": [r["notice_id"] for r in records]}}
            )
        }
        return notices_pb2.ListMyNoticesResponse(
            notices=[self._household_notice(r, notices[r["notice_id"]]) for r in records],
            next_page_token=token,
        )

    async def _receipt(
        self, method: str, request: Any, response_type: Any, acknowledge: bool
    ) -> Any:
        """Opening (and acknowledging, which opens too) a notice: the household's receipt."""
        household_id = self._household()
        if not request.notice_id:
            raise InvalidArgument("notice_id", "is required")

        async def work(session: Session) -> tuple[Any, list[Document]]:
            now = self.clock()
            record = await self.store.delivery(request.notice_id, household_id, session)
            if not _delivered(record):
                raise NotFound(f"notice {request.notice_id} not found")
            notice = await self._get(request.notice_id, session)
            revision = notice["revisions"][-1]["revision"]
            changes: Document = {}
            events: list[Message] = []
            if acknowledge:
                if not notice["requires_ack"]:
                    raise FailedPrecondition("this notice does not ask for acknowledgement")
                # A household that acknowledged it is answered as before, though it has ended.
                if not record["acked"]:
                    state = domain.state_at(State(notice["state"]), notice["expires_at"], now)
                    domain.require_live(state, "acknowledged")
                    changes |= {"acked": True, "acked_at": now}
                    acknowledged = events_pb2.NoticeAcknowledged(
                        notice_id=notice["_id"], household_id=household_id
                    )
                    events.append(acknowledged)
            if not record["read"] or record.get("opened_revision", 0) < revision:
                domain.require_open_to_reads(State(notice["state"]))
                changes |= {"read": True, "opened_revision": revision}
                if not record["read"]:
                    changes["opened_at"] = now
                read = events_pb2.NoticeRead(
                    notice_id=notice["_id"], household_id=household_id, revision=revision
                )
                events.insert(0, read)
            if changes:
                counted = {
                    "opened": int("opened_at" in changes),
                    "acknowledged": int("acked" in changes),
                }
                await self.store.count(notice["_id"], {record["unit_id"]: counted}, session)
                record = await self.store.update_delivery(
                    record["_id"], {"$set": changes, "$unset": {"resend_due": ""}}, session
                )
            staged = [notice_event(self.outbox, e, notice["_id"]) for e in events]
            return response_type(notice=self._household_notice(record, notice)), staged

        return await self.commands.run(method, request, response_type, work)

    async def OpenNotice(
        self, request: notices_pb2.OpenNoticeRequest, context: Context
    ) -> notices_pb2.OpenNoticeResponse:
        response: notices_pb2.OpenNoticeResponse = await self._receipt(
            "OpenNotice", request, notices_pb2.OpenNoticeResponse, acknowledge=False
        )
        return response

    async def AcknowledgeNotice(
        self, request: notices_pb2.AcknowledgeNoticeRequest, context: Context
    ) -> notices_pb2.AcknowledgeNoticeResponse:
        response: notices_pb2.AcknowledgeNoticeResponse = await self._receipt(
            "AcknowledgeNotice", request, notices_pb2.AcknowledgeNoticeResponse, acknowledge=True
        )
        return response

    async def WatchMyNotices(
        self, request: notices_pb2.WatchMyNoticesRequest, context: Context
    ) -> AsyncIterator[notices_pb2.WatchMyNoticesResponse]:
        household_id = self._household()
        async for entry in self.hub.subscribe(household_id):
            record = await self.store.delivery(entry["notice_id"], household_id)
            notice = await self.store.get(entry["notice_id"])
            if record is None or notice is None or record.get("pending"):
                continue  # a change to a notice this household does not have (or not yet)
            withdrawn = record.get("withdrawn_at") is not None
            if withdrawn and entry["change"] != notices_pb2.NOTICE_CHANGE_WITHDRAWN:
                continue  # the household moved away: the notice's news is no longer its own
            yield notices_pb2.WatchMyNoticesResponse(
                change=entry["change"], notice=self._household_notice(record, notice)
            )
