"""Commands run once per caller-chosen request_id.

The state change, its events (into the outbox) and the response are written in one transaction;
a retry with the same request_id gets the stored response and changes nothing: its own
transaction fails on the stored record (or on the state the first run left) and is rolled back.

A command whose whole change is new documents (filing a ticket) commits together with the other
such commands in flight: one transaction, and one wait for the journal, for all of them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf.message import Message
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common.auth import principal
from services.common.batching import Coalescer
from services.common.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
)
from services.common.mongo import Document, Session, in_transaction
from services.common.outbox import Outbox

log = logging.getLogger(__name__)

COMMANDS = "commands"
DUPLICATE_KEY = 11000  # MongoDB's error code
REMEMBERED_FOR = timedelta(days=7)

R = TypeVar("R", bound=Message)
# The command's work inside the transaction: its response and the events it emits.
Work = Callable[[Session], Awaitable[tuple[R, list[Document]]]]


async def ensure_command_indexes(db: AsyncDatabase[Document]) -> None:
    await db[COMMANDS].create_index("at", expireAfterSeconds=int(REMEMBERED_FOR.total_seconds()))


class CommandRunner:
    def __init__(
        self, client: AsyncMongoClient[Document], db: AsyncDatabase[Document], outbox: Outbox
    ) -> None:
        self._client = client
        self._db = db
        self._commands = db[COMMANDS]
        self._outbox = outbox
        self._insertions = Coalescer(self._insert_together)

    async def run(self, method: str, request: Message, response_type: type[R], work: Work[R]) -> R:
        key, fingerprint = _identify(method, request)

        async def transaction(session: Session) -> R:
            response, events = await work(session)
            await self._commands.insert_one(_record(key, fingerprint, response), session=session)
            await self._outbox.stage(session, events)
            return response

        try:
            response = await in_transaction(self._client, transaction)
        except (DomainError, DuplicateKeyError, BulkWriteError) as error:
            # insert_many and bulk_write report a duplicate key as a BulkWriteError; any other
            # error of theirs is no sign of an earlier run.
            duplicate = _duplicate_key(error)
            if duplicate is None and not isinstance(error, DomainError):
                raise
            # Only now look for an earlier run: a retry fails (its record exists, or the state
            # it changed no longer allows it), and the common first run pays no extra read.
            stored = await self._stored_response(key, fingerprint, response_type)
            if stored is not None:
                return stored
            if duplicate is None:
                raise
            # The index's fields are the store's names, not the request's: logged, not told.
            fields = ", ".join(duplicate.get("keyPattern", {}) or ["key"])
            log.info("%s: duplicate key (%s)", method, fields)
            raise AlreadyExists("what this request would create exists already") from error
        self._outbox.committed()
        return response

    async def insert(
        self,
        method: str,
        request: Message,
        response: R,
        *,
        documents: list[tuple[str, Document]],
        events: list[Document],
    ) -> R:
        """A command whose change is only `documents` (collection name, document), with its
        events: committed with whatever other insertions are in flight."""
        key, fingerprint = _identify(method, request)
        record = _record(key, fingerprint, response)
        if await self._insertions.submit(Insertion([*documents, (COMMANDS, record)], events)):
            self._outbox.committed()
            return response

        # Something in the shared transaction already existed (this request's record, when it
        # is a retry, or another's): nothing of it was written. Alone now, as any command.
        async def work(session: Session) -> tuple[R, list[Document]]:
            for collection, document in documents:
                await self._db[collection].insert_one(document, session=session)
            return response, events

        return await self.run(method, request, type(response), work)

    async def _insert_together(self, insertions: list[Insertion]) -> list[bool]:
        by_collection: dict[str, list[Document]] = {}
        for insertion in insertions:
            for collection, document in insertion.documents:
                by_collection.setdefault(collection, []).append(document)

        async def transaction(session: Session) -> None:
            for collection, documents in by_collection.items():
                await self._db[collection].insert_many(documents, session=session)
            await self._outbox.stage(session, [e for i in insertions for e in i.events])

        try:
            await in_transaction(self._client, transaction)
        except (DuplicateKeyError, BulkWriteError):
            return [False] * len(insertions)
        return [True] * len(insertions)

    async def answered(self, method: str, request: Message, response_type: type[R]) -> R | None:
        """The stored response if this request already ran: for a command that does its work in
        several transactions first and records itself with `run` at the end."""
        return await self._stored_response(*_identify(method, request), response_type)

    async def _stored_response(
        self, key: str, fingerprint: str, response_type: type[R]
    ) -> R | None:
        stored = await self._commands.find_one({"_id": key})
        if stored is None:
            return None
        if stored["fingerprint"] != fingerprint:
            raise FailedPrecondition(
                "request_id was already used for a different request; use a new request_id"
            )
        return response_type.FromString(stored["response"])


@dataclass(frozen=True)
class Insertion:
    documents: list[tuple[str, Document]]
    events: list[Document]


def _duplicate_key(error: Exception) -> Mapping[str, Any] | None:
    """The details of the duplicate key `error` reports, if that is what it reports."""
    if isinstance(error, DuplicateKeyError):
        return error.details or {}
    if isinstance(error, BulkWriteError):
        errors: list[Document] = (error.details or {}).get("writeErrors", [])
        if errors and all(e.get("code") == DUPLICATE_KEY for e in errors):
            return errors[0]
    return None


def _record(key: str, fingerprint: str, response: Message) -> Document:
    """What a retry of the command is answered from."""
    return {
        "_id": key,
        "fingerprint": fingerprint,
        "response": response.SerializeToString(),
        "at": datetime.now(UTC),
    }


def check_request_id(request: Message) -> str:
    """The request's request_id, checked: for a command that does work before it runs (an
    upload accepted), so bad input is refused before anything is done."""
    request_id: str = getattr(request, "request_id", "")
    if not request_id.strip():
        raise InvalidArgument("request_id", "is required (a new UUID for each user action)")
    if len(request_id) > 100:
        raise InvalidArgument("request_id", "is longer than 100 characters")
    return request_id


def _identify(method: str, request: Message) -> tuple[str, str]:
    """The command's key (method, caller, request_id) and the request's fingerprint."""
    request_id = check_request_id(request)
    # Escaped so no two (caller, request_id) pairs share a key ("a", "b:r" and "a:b", "r");
    # the usual subjects and ids, without ':' or '%', keep the key they always had.
    key = ":".join(
        part.replace("%", "%25").replace(":", "%3A")
        for part in (method, principal().subject, request_id)
    )
    fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    return key, fingerprint
