"""The ledger service's gRPC servicer."""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as default
from datetime import datetime, timedelta
from typing import Any

import grpc
from civic.ledger.v1 import events_pb2, ledger_pb2, ledger_pb2_grpc
from google.protobuf.message import Message
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common.auth import Principal, Role, principal, unit_within
from services.common.commands import CommandRunner
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.media import check_image_upload
from services.common.mongo import Document, Session, in_transaction
from services.common.objects import UPLOAD_WINDOW, ObjectStore, checked
from services.common.outbox import Outbox
from services.common.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_size
from services.common.wire import local_date, moment, timestamp
from services.ledger import domain, events, statements
from services.ledger.records import (
    balances_message,
    campaign_message,
    fund_message,
    receivables_message,
    transaction_message,
)
from services.ledger.registry import RegistryReader
from services.ledger.store import LedgerStore, accounts_after, new_id

Context = grpc.aio.ServicerContext[Any, Any]
# What is inserted with a batch of new transactions, in the same MongoDB transaction.
Extra = Callable[[Session, list[Document]], Awaitable[None]]
MAX_BATCH = 1000
MAX_RECEIPT_BYTES = 8 * 1024 * 1024
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
RECEIPT_NAME = re.compile(r"[0-9a-f]{32}\.(?:jpg|png|webp)")
# How long the group a merged-away group went into is taken as known (it may merge in turn).
UNIT_NOW_SECONDS = 300.0
# How long a group is taken as not merged away before the ledger looks again.
NOT_MERGED_SECONDS = 5.0


@dataclass
class Draft:
    """A transaction to post, checked but not yet placed in its fund's chain."""

    field: str  # how errors name it: "" for a single request, "transactions[3]" in a batch
    fund_id: str
    request_id: str
    fingerprint: str
    kind: domain.Kind
    postings: domain.Postings
    memo: str = ""
    details: Document = default(default_factory=dict)
    # The request's field that decides how much moves: a refusal of the postings (an overdraft,
    # a balance past the limit) names it, as a contribution has no `postings` but an `amount`.
    moves: str = "postings"
    # An assessment's share of its campaign (terms and dues), for its event only: the campaign
    # document keeps them, not the transaction's.
    assessment: events_pb2.Assessment | None = None

    def name(self, inner: str) -> str:
        return f"{self.field}.{inner}" if self.field else inner

    @classmethod
    def of(cls, method: str, request: Any, kind: domain.Kind, memo: str, **more: Any) -> Draft:
        """The draft of a single-transaction command; its postings may follow later."""
        return cls(
            field="",
            fund_id=request.fund_id,
            request_id=_check_request_id("request_id", request.request_id),
            fingerprint=fingerprint(method, request),
            kind=kind,
            postings=more.pop("postings", []),
            memo=memo,
            **more,
        )


def fingerprint(method: str, request: Message) -> str:
    return hashlib.sha256(
        method.encode() + b"\0" + request.SerializeToString(deterministic=True)
    ).hexdigest()


def _check_request_id(field_name: str, request_id: str) -> str:
    if not request_id.strip():
        raise InvalidArgument(field_name, "is required (a new UUID for each user action)")
    if len(request_id) > domain.MAX_REQUEST_ID:
        raise InvalidArgument(field_name, f"is longer than {domain.MAX_REQUEST_ID} characters")
    return request_id


def _required(field_name: str, value: str) -> str:
    if not value:
        raise InvalidArgument(field_name, "is required")
    return value


def _duplicate_key(error: DuplicateKeyError | BulkWriteError) -> Document:
    """The index a write collided on ({} if it failed otherwise)."""
    if isinstance(error, DuplicateKeyError):
        return dict((error.details or {}).get("keyPattern") or {})
    for failure in (error.details or {}).get("writeErrors", []):
        if failure.get("code") == 11000:
            return dict(failure.get("keyPattern") or {})
    return {}


def _millis(moment: datetime) -> datetime:
    """MongoDB keeps milliseconds: a transaction's time is cut to them before it is hashed."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(
        self,
        store: LedgerStore,
        client: AsyncMongoClient[Document],
        commands: CommandRunner,
        outbox: Outbox,
        files: ObjectStore,
        registry: RegistryReader,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.client = client
        self.commands = commands
        self.outbox = outbox
        self.files = files
        self.registry = registry
        self.clock = clock
        self._fund_units: dict[str, Document] = {}
        # Groups merged away, the group each went into, and until when that is taken as known.
        self._units_now: dict[str, tuple[str, float]] = {}
        # Each group's merge as the ledger heard of it (None: not merged), and until when.
        self._merges: dict[str, tuple[str | None, float]] = {}

    # ---- helpers -------------------------------------------------------------------------

    async def _fund(
        self, fund_id: str, field_name: str = "fund_id", session: Session | None = None
    ) -> Document:
        _required(field_name, fund_id)
        fund = await self.store.fund(fund_id, session)
        if fund is None:
            raise NotFound(f"fund {fund_id} not found")
        return fund

    async def _readable(self, fund_id: str, session: Session | None = None) -> Document:
        """The fund, once the caller may read it; read in `session` if given (a snapshot, whose
        other reads then see the fund's chain as this read does)."""
        fund = await self._fund(fund_id, session=session)
        await self._permitted(fund["unit_id"], domain.may_read_fund)
        return fund

    async def _permitted(self, unit_id: str, check: Callable[[Principal, str], None]) -> None:
        """`check` of the caller on a fund's unit; refused there, on the group that unit was
        merged into, if it was: that group's leader and treasurer keep a merged-away group's
        funds (the dues its campaigns charged stay payable there), and its residents, the
        households that moved with the merge among them, read them. The registry is asked
        only after a refusal."""
        caller = principal()
        try:
            check(caller, unit_id)
        except PermissionDenied:
            now = await self._unit_now(unit_id)
            if now == unit_id:
                raise
            check(caller, now)

    async def _unit_now(self, unit_id: str) -> str:
        known = self._units_now.get(unit_id)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        now = await self.registry.unit_now(unit_id)
        if now != unit_id:  # a merge is not undone; the group it went into may merge in turn
            self._units_now[unit_id] = (now, time.monotonic() + UNIT_NOW_SECONDS)
        return now

    async def _may_keep_books(self, unit_id: str) -> None:
        """The caller may change the unit's funds: as its leader or treasurer while it stands,
        or as those of the group it was merged into."""
        caller = principal()
        if caller.scope != unit_id:
            await self._permitted(unit_id, domain.may_keep_books)
            return
        domain.may_keep_books_of(caller, unit_id, await self._merged_into(unit_id))

    async def _merged_into(self, unit_id: str) -> str | None:
        known = self._merges.get(unit_id)
        if known is not None and (known[0] is not None or known[1] > time.monotonic()):
            return known[0]
        into = await self.store.merged_into(unit_id)
        if len(self._merges) > 100_000:
            self._merges.clear()
        self._merges[unit_id] = (into, time.monotonic() + NOT_MERGED_SECONDS)
        return into

    async def _writable(self, fund_id: str, field_name: str = "fund_id") -> Document:
        """The fund's id, unit, name and opening (which never change: remembered after the
        first read), once the caller may change it."""
        fund = self._fund_units.get(fund_id)
        if fund is None:
            found = await self._fund(fund_id, field_name)
            fund = {key: found[key] for key in ("_id", "unit_id", "name", "opened_at")}
            if len(self._fund_units) > 100_000:
                self._fund_units.clear()
            self._fund_units[fund_id] = fund
        await self._may_keep_books(fund["unit_id"])
        return fund

    async def _messages(self, docs: list[Document]) -> list[ledger_pb2.Transaction]:
        names = await self.store.household_names(
            doc["contribution"]["household_id"]
            for doc in docs
            if doc.get("contribution", {}).get("household_id")
        )
        return [transaction_message(doc, names, self.files.view_url) for doc in docs]

    async def _message(self, doc: Document) -> ledger_pb2.Transaction:
        return (await self._as_read([doc]))[0]

    async def _as_read(
        self, docs: list[Document], session: Session | None = None
    ) -> list[ledger_pb2.Transaction]:
        """The transactions as read now (or in `session`): each names the reversal that undid
        it, if one has."""
        messages = await self._messages(docs)
        by_fund: dict[str, list[str]] = defaultdict(list)
        for doc in docs:
            by_fund[doc["fund_id"]].append(doc["_id"])
        reversed_by: dict[str, str] = {}
        for fund_id, ids in by_fund.items():
            reversed_by |= await self.store.reversed_ids(fund_id, ids, session)
        for doc, message in zip(docs, messages, strict=True):
            message.reversed_by_transaction_id = reversed_by.get(doc["_id"], "")
        return messages

    @staticmethod
    def _same(draft: Draft, posted: Document) -> Document:
        """A transaction already posted under the draft's key: the original, if it is the same
        request; anything else reusing the key, in this fund or another, is refused."""
        if posted["fingerprint"] != draft.fingerprint or posted["fund_id"] != draft.fund_id:
            where = "this fund" if posted["fund_id"] == draft.fund_id else "another fund"
            raise FailedPrecondition(
                f"{draft.name('request_id')}: {draft.request_id} was already used for a different "
                f"transaction in {where}; use a new request_id"
            )
        return posted

    async def _already_posted(self, drafts: list[Draft]) -> list[Document] | None:
        """The originals when every draft was posted before (a retry): no transaction needed."""
        found = await self.store.by_keys((d.fund_id, d.request_id) for d in drafts)
        if len(found) < len(drafts):
            return None
        return [self._same(d, found[d.request_id]) for d in drafts]

    async def _post(
        self, drafts: list[Draft], extra: Extra | None = None, parts: bool = False
    ) -> list[Document]:
        """Posts the drafts not posted before, all or none, each after the previous one of its
        fund in the fund's hash chain, with their events; returns every draft's transaction.
        (A retry is found inside the transaction, which then writes nothing.) With `parts`, the
        drafts are the parts of one request, the first under its key: once that one is posted,
        none is posted again (a retry may have read a register that changed meanwhile), and
        the answer is that first transaction alone."""
        caller = principal()
        retried = drafts[:1] if parts else drafts

        async def work(session: Session) -> list[Document]:
            found = await self.store.by_keys(((d.fund_id, d.request_id) for d in drafts), session)
            if parts and drafts[0].request_id in found:
                return [self._same(drafts[0], found[drafts[0].request_id])]
            new = [d for d in drafts if d.request_id not in found]
            funds = await self.store.funds_by_id({d.fund_id for d in new}, session)
            # Every touched account's balance: money may not go below zero, and no account (an
            # income or expense line too) past MAX_BALANCE, which the replay checks as well.
            touched = {(d.fund_id, account) for d in new for account, _ in d.postings}
            balances = await self.store.current_balances(touched, session)
            changes: dict[tuple[str, str], int] = defaultdict(int)
            heads: dict[str, tuple[int, int, str, datetime]] = {}
            now = _millis(self.clock())
            docs, staged = [], []
            posted: dict[str, Document] = {}
            for draft in new:
                fund = funds.get(draft.fund_id)
                if fund is None:
                    raise NotFound(f"fund {draft.fund_id} not found")
                # Never before the chain's last posting, whatever this instance's clock says:
                # balances and statements as of a moment select by time.
                posted_at = max(now, fund.get("last_posted_at") or now)
                old, sequence, head, posted_at = heads.get(
                    draft.fund_id,
                    (fund["sequence"], fund["sequence"], fund["head_hash"], posted_at),
                )
                current = {
                    account: balances.get((draft.fund_id, account), 0)
                    + changes[(draft.fund_id, account)]
                    for account, _ in draft.postings
                }
                try:
                    domain.apply_postings(current, draft.postings)
                except FailedPrecondition as error:
                    raise FailedPrecondition(
                        f"{draft.name(draft.moves)}: {error.message}; nothing was posted"
                    ) from None
                for account, amount in draft.postings:
                    changes[(draft.fund_id, account)] += amount
                doc: Document = {
                    "_id": new_id("tx"),
                    "fund_id": draft.fund_id,
                    "sequence": sequence + 1,
                    "kind": int(draft.kind),
                    "memo": draft.memo,
                    "postings": [{"account": a, "amount": n} for a, n in draft.postings],
                    "posted_at": posted_at,
                    "posted_by": caller.subject,
                    "request_id": draft.request_id,
                    "fingerprint": draft.fingerprint,
                    **draft.details,
                }
                event, head = events.transaction_posted(self.outbox, doc, head, draft.assessment)
                doc["hash"] = head
                heads[draft.fund_id] = (old, sequence + 1, head, posted_at)
                docs.append(doc)
                staged.append(event)
                posted[draft.request_id] = doc
            if docs:
                await self.store.insert_transactions(docs, session)
                await self.store.advance_funds(heads, session)
                await self.store.add_to_balances(changes, session)
                if extra is not None:
                    await extra(session, docs)
                await self.outbox.stage(session, staged)
            results = []
            for draft in drafts:
                key = draft.request_id
                results.append(posted[key] if key in posted else self._same(draft, found[key]))
            return results

        try:
            results = await in_transaction(self.client, work)
        except (DuplicateKeyError, BulkWriteError) as error:
            pattern = _duplicate_key(error)
            # The same key committed meanwhile by a concurrent retry: answer as a retry.
            done = await self._already_posted(retried) if "request_id" in pattern else None
            if done is not None:
                return done
            if "reverses" in pattern:
                raise FailedPrecondition(
                    "transaction_id: the transaction was already reversed"
                ) from None
            raise
        self.outbox.committed()
        return results

    def _check_posting_request(
        self, request: ledger_pb2.PostTransactionRequest, field_name: str, method: str
    ) -> Draft:
        def name(inner: str) -> str:
            return f"{field_name}.{inner}" if field_name else inner

        _check_request_id(name("request_id"), request.request_id)
        _required(name("fund_id"), request.fund_id)
        postings = domain.check_postings(
            name("postings"), [(p.account, p.amount) for p in request.postings]
        )
        domain.check_postings_fit(name("postings"), postings)
        return Draft(
            field=field_name,
            fund_id=request.fund_id,
            request_id=request.request_id,
            fingerprint=fingerprint(method, request),
            kind=domain.Kind.GENERAL,
            postings=postings,
            memo=domain.check_text(name("memo"), request.memo),
        )

    # ---- funds ---------------------------------------------------------------------------

    async def OpenFund(
        self, request: ledger_pb2.OpenFundRequest, context: Context
    ) -> ledger_pb2.OpenFundResponse:
        _required("unit_id", request.unit_id)
        # A group merged away gets no new funds: the group it went into opens its own.
        domain.may_keep_books_of(
            principal(), request.unit_id, await self._merged_into(request.unit_id)
        )
        name = domain.check_text("name", request.name, required=True, limit=120)
        description = domain.check_text("description", request.description)

        async def work(session: Session) -> tuple[ledger_pb2.OpenFundResponse, list[Document]]:
            fund: Document = {
                "_id": new_id("fd"),
                "unit_id": request.unit_id,
                "name": name,
                "description": description,
                "opened_at": _millis(self.clock()),
            }
            event, head = events.fund_opened(self.outbox, fund)
            fund |= {"sequence": 0, "head_hash": head}
            await self.store.funds.insert_one(fund, session=session)
            return ledger_pb2.OpenFundResponse(fund=fund_message(fund)), [event]

        return await self.commands.run("OpenFund", request, ledger_pb2.OpenFundResponse, work)

    async def GetFund(
        self, request: ledger_pb2.GetFundRequest, context: Context
    ) -> ledger_pb2.GetFundResponse:
        return ledger_pb2.GetFundResponse(fund=fund_message(await self._readable(request.fund_id)))

    async def ListFunds(
        self, request: ledger_pb2.ListFundsRequest, context: Context
    ) -> ledger_pb2.ListFundsResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        await self._permitted(unit_id, domain.may_read_fund)
        # A unit's own funds and those of the units above it (a resident belongs to them too);
        # officials also see the funds of the units below.
        parts = unit_id.split(".")
        above = [".".join(parts[: i + 1]) for i in range(len(parts))]
        below = unit_id if caller.covers(unit_id) else None
        # A group keeps the funds of the groups merged into it: they are listed as its own.
        merged = await self.store.merged_into_it(unit_id)
        funds = await self.store.funds_of([*above, *merged], below)
        # The unit's own and its merged groups', read by merge: a group merged into the caller's.
        own = {unit_id, *merged}
        visible = [
            f for f in funds if f["unit_id"] in own or domain.can_read_fund(caller, f["unit_id"])
        ]
        return ledger_pb2.ListFundsResponse(funds=[fund_message(f) for f in visible])

    # ---- movements -------------------------------------------------------------------------

    async def PostTransaction(
        self, request: ledger_pb2.PostTransactionRequest, context: Context
    ) -> ledger_pb2.PostTransactionResponse:
        draft = self._check_posting_request(request, "", "PostTransaction")
        await self._writable(request.fund_id)
        (doc,) = await self._post([draft])
        return ledger_pb2.PostTransactionResponse(transaction=await self._message(doc))

    async def PostTransactions(
        self, request: ledger_pb2.PostTransactionsRequest, context: Context
    ) -> ledger_pb2.PostTransactionsResponse:
        if not request.transactions:
            raise InvalidArgument("transactions", "name at least one transaction")
        if len(request.transactions) > MAX_BATCH:
            raise InvalidArgument("transactions", f"at most {MAX_BATCH} in one call")
        drafts = [
            self._check_posting_request(entry, f"transactions[{i}]", "PostTransaction")
            for i, entry in enumerate(request.transactions)
        ]
        keys = [d.request_id for d in drafts]
        if len(set(keys)) < len(keys):
            raise InvalidArgument("transactions", "two transactions share a request_id")
        for fund_id in dict.fromkeys(d.fund_id for d in drafts):
            await self._writable(fund_id)
        docs = await self._post(drafts)
        return ledger_pb2.PostTransactionsResponse(transactions=await self._messages(docs))

    async def _household_in_unit(self, fund: Document, household_id: str) -> None:
        """Makes sure the household lives in the fund's unit, asking the register when the
        ledger has not seen it yet or places it elsewhere: the registry's event of a move (a
        merge of groups) may not have reached the ledger yet."""
        if not await self._known_in(fund["unit_id"], household_id):
            # That household alone: a mistyped id must not read (and log) the whole unit.
            await self._learn_households(fund["unit_id"], [household_id])
            if not await self._known_in(fund["unit_id"], household_id):
                raise NotFound(f"household {household_id} is not registered in {fund['unit_id']}")

    async def _known_in(self, unit_id: str, household_id: str) -> bool:
        known = await self.store.household(household_id)
        return known is not None and unit_within(known["unit_id"], unit_id)

    async def _learn_households(
        self, unit_id: str, only: Sequence[str] = ()
    ) -> list[domain.HouseholdFacts]:
        households = await self.registry.households(unit_id, only)
        await self.store.remember_households(
            [{"_id": h.household_id, "name": h.name, "unit_id": h.unit_id} for h in households]
        )
        return households

    def _held_once(self, fund: Document, path: str, value: str, what: str) -> Extra:
        """A check, made with the posting, that no other transaction of the fund holds `value`
        at `path` unless it was reversed: a receipt backs one expense, a receipt number one
        payment, and the entry correcting a mistaken one takes it again. Two postings of one
        fund serialise on its chain head, so the second sees the first."""

        async def check(session: Session, posted: list[Document]) -> None:
            other = await self.store.standing_with(
                fund["_id"], path, value, posted[0]["_id"], session
            )
            if other is not None:
                raise AlreadyExists(f"{what} backs transaction {other} already")

        return check

    async def _not_declared_yet(
        self, fund: Document, name: str, period: str, session: Session
    ) -> None:
        """A campaign is declared once: the same one again (a second officer, a form sent twice)
        would charge every household twice. Once cancelled, it may be declared anew."""
        declaring = domain.campaign_key(name, period)
        for other in await self.store.campaigns_of_period(fund["_id"], period, session):
            if domain.campaign_key(other["name"], other["period"]) != declaring:
                continue
            if await self.store.reversal_of(fund["_id"], other["transaction_id"], session) is None:
                raise AlreadyExists(
                    f"name: campaign {other['_id']} of this fund is {other['name']!r} for "
                    f"{period} already; cancel it first to declare it anew"
                )

    async def _not_cancelled(self, fund: Document, campaign: Document) -> None:
        """Nothing is owed to a campaign whose assessment was reversed: a payment towards it is
        refused as that, not as an overdraft of the household's receivable."""
        if await self.store.reversal_of(fund["_id"], campaign["transaction_id"]) is not None:
            raise FailedPrecondition(
                f"campaign_id: campaign {campaign['_id']} was cancelled (its assessment was "
                "reversed); nothing is owed to it"
            )

    async def RecordContribution(
        self, request: ledger_pb2.RecordContributionRequest, context: Context
    ) -> ledger_pb2.RecordContributionResponse:
        _check_request_id("request_id", request.request_id)
        fund = await self._writable(request.fund_id)
        amount = domain.check_amount("amount", request.amount)
        into = domain.money_account(request.method)
        receipt = domain.check_receipt_number("receipt_number", request.receipt_number)
        paid_on = domain.check_day("paid_on", request.paid_on, local_date(self.clock()))
        memo = domain.check_text("memo", request.memo)
        draft = Draft.of(
            "RecordContribution", request, domain.Kind.CONTRIBUTION, memo, moves="amount"
        )
        if (done := await self._already_posted([draft])) is not None:
            return ledger_pb2.RecordContributionResponse(transaction=await self._message(done[0]))
        # Past the retry's lookup: a payment recorded before the rule still answers its retry.
        domain.check_in_books("paid_on", paid_on, domain.first_day_of_books(fund["opened_at"]))
        if request.campaign_id:
            campaign = await self.store.campaign(fund["_id"], request.campaign_id, with_dues=False)
            if campaign is None:
                raise NotFound(f"campaign {request.campaign_id} not found in this fund")
            _required("household_id", request.household_id)
            due = await self.store.due(fund["_id"], campaign["_id"], request.household_id)
            if due is None:
                raise FailedPrecondition(
                    f"household_id: {request.household_id} owes nothing to this campaign"
                )
            if due["exempt_because"]:
                raise FailedPrecondition(
                    f"household_id: {request.household_id} is exempt from this campaign"
                )
            await self._not_cancelled(fund, campaign)
            owed_by = domain.receivable(campaign["_id"], request.household_id)
            draft.postings = [(into, amount), (owed_by, -amount)]
        else:
            if request.household_id:
                await self._household_in_unit(fund, request.household_id)
            draft.postings = [(into, amount), (domain.DONATIONS, -amount)]
        draft.details = {
            "campaign_id": request.campaign_id,
            "contribution": {
                "household_id": request.household_id or None,
                "campaign_id": request.campaign_id,
                "method": request.method,
                "receipt_number": receipt,
                "paid_on": paid_on,
            },
        }
        one_payment_a_receipt = self._held_once(
            fund, "contribution.receipt_number", receipt, "receipt_number: the receipt"
        )
        (doc,) = await self._post([draft], one_payment_a_receipt)
        return ledger_pb2.RecordContributionResponse(transaction=await self._message(doc))

    async def CreateReceiptUpload(
        self, request: ledger_pb2.CreateReceiptUploadRequest, context: Context
    ) -> ledger_pb2.CreateReceiptUploadResponse:
        fund = await self._writable(request.fund_id)
        check_image_upload(request.content_type, request.size_bytes, MAX_RECEIPT_BYTES)
        key = f"receipts/{fund['_id']}/{uuid.uuid4().hex}.{EXTENSIONS[request.content_type]}"
        return ledger_pb2.CreateReceiptUploadResponse(
            upload_url=self.files.upload_url(key, request.content_type, request.size_bytes),
            object_key=key,
            expires_at=timestamp(self.clock() + UPLOAD_WINDOW),
        )

    async def RecordExpense(
        self, request: ledger_pb2.RecordExpenseRequest, context: Context
    ) -> ledger_pb2.RecordExpenseResponse:
        _check_request_id("request_id", request.request_id)
        fund = await self._writable(request.fund_id)
        amount = domain.check_amount("amount", request.amount)
        category = domain.check_category("category", request.category)
        payee = domain.check_text("payee", request.payee, required=True, limit=200)
        approved_by = domain.check_text(
            "approved_by", request.approved_by, required=True, limit=200
        )
        out_of = domain.money_account(request.method)
        spent_on = domain.check_day("spent_on", request.spent_on, local_date(self.clock()))
        folder = f"receipts/{fund['_id']}/"
        key = request.receipt_object_key
        if not key:
            raise InvalidArgument("receipt_object_key", "is required: upload the receipt first")
        if not (key.startswith(folder) and RECEIPT_NAME.fullmatch(key.removeprefix(folder))):
            raise InvalidArgument("receipt_object_key", "was not issued for this fund")
        draft = Draft.of(
            "RecordExpense",
            request,
            domain.Kind.EXPENSE,
            domain.check_text("memo", request.memo),
            moves="amount",
            postings=[(f"expense/{category}", amount), (out_of, -amount)],
            details={
                "expense": {
                    "category": category,
                    "payee": payee,
                    "approved_by": approved_by,
                    "method": request.method,
                    # Where the receipt is kept once accepted (below, before posting).
                    "receipt_object_key": checked(key),
                    "spent_on": spent_on,
                }
            },
        )
        one_expense_a_receipt = self._held_once(
            fund, "expense.receipt_object_key", checked(key), "receipt_object_key: the receipt"
        )
        if (done := await self._already_posted([draft])) is None:
            domain.check_in_books(
                "spent_on", spent_on, domain.first_day_of_books(fund["opened_at"])
            )
            try:
                await self.files.accept_image(key, MAX_RECEIPT_BYTES)
            except InvalidArgument as error:  # the store names its own `object_key`
                raise InvalidArgument("receipt_object_key", error.problem) from None
            except NotFound as error:
                raise NotFound(f"receipt_object_key: {error.message}") from None
            done = await self._post([draft], one_expense_a_receipt)
        return ledger_pb2.RecordExpenseResponse(transaction=await self._message(done[0]))

    async def ReverseTransaction(
        self, request: ledger_pb2.ReverseTransactionRequest, context: Context
    ) -> ledger_pb2.ReverseTransactionResponse:
        _check_request_id("request_id", request.request_id)
        fund = await self._writable(request.fund_id)
        _required("transaction_id", request.transaction_id)
        reason = domain.check_text("reason", request.reason, required=True)
        draft = Draft.of(
            "ReverseTransaction",
            request,
            domain.Kind.REVERSAL,
            reason,
            details={"reverses": request.transaction_id},
            moves="transaction_id",
        )
        if (done := await self._already_posted([draft])) is None:
            original = await self.store.transaction(fund["_id"], request.transaction_id)
            if original is None:
                raise NotFound(f"transaction {request.transaction_id} not found in this fund")
            if original["kind"] == domain.Kind.REVERSAL:
                raise FailedPrecondition(
                    "transaction_id: a reversal is not reversed; post the transaction again"
                )
            if await self.store.reversal_of(fund["_id"], original["_id"]) is not None:
                raise FailedPrecondition(
                    f"transaction_id: transaction {original['_id']} was already reversed"
                )
            # A campaign's assessment booked in several transactions is reversed whole (the
            # campaign cancelled): the one named first, under the request's key, then the others.
            others = []
            if original["kind"] == domain.Kind.ASSESSMENT:
                others = await self.store.other_parts(fund["_id"], original)
            drafts = [
                replace(
                    draft,
                    request_id=domain.part_request_id(draft.request_id, number),
                    postings=domain.reversal_of(
                        (p["account"], p["amount"]) for p in part["postings"]
                    ),
                    details={"reverses": part["_id"], "campaign_id": part.get("campaign_id", "")},
                )
                for number, part in enumerate([original, *others], start=1)
            ]
            done = await self._post(drafts, parts=True)
        return ledger_pb2.ReverseTransactionResponse(transaction=await self._message(done[0]))

    async def GetTransaction(
        self, request: ledger_pb2.GetTransactionRequest, context: Context
    ) -> ledger_pb2.GetTransactionResponse:
        fund = await self._readable(request.fund_id)
        _required("transaction_id", request.transaction_id)
        doc = await self.store.transaction(fund["_id"], request.transaction_id)
        if doc is None:
            raise NotFound(f"transaction {request.transaction_id} not found in this fund")
        return ledger_pb2.GetTransactionResponse(transaction=await self._message(doc))

    # ---- dues ------------------------------------------------------------------------------

    async def DeclareCampaign(
        self, request: ledger_pb2.DeclareCampaignRequest, context: Context
    ) -> ledger_pb2.DeclareCampaignResponse:
        _check_request_id("request_id", request.request_id)
        fund = await self._writable(request.fund_id)
        name = domain.check_text("name", request.name, required=True, limit=120)
        period = domain.check_period("period", request.period)
        if request.basis not in (int(domain.Basis.PER_HOUSEHOLD), int(domain.Basis.PER_PERSON)):
            raise InvalidArgument(
                "basis", "must be DUES_BASIS_PER_HOUSEHOLD or DUES_BASIS_PER_PERSON"
            )
        rate = domain.check_amount("rate", request.rate)
        exemptions = []
        for i, value in enumerate(request.exemptions):
            if value not in domain.EXEMPTIONS:
                raise InvalidArgument(f"exemptions[{i}]", "is not a known exemption")
            exemptions.append(domain.Exemption(value))
        # Each once: the terms go into every event of the assessment.
        exemptions = list(dict.fromkeys(exemptions))
        draft = Draft.of("DeclareCampaign", request, domain.Kind.ASSESSMENT, name, moves="rate")
        if (done := await self._already_posted([draft])) is None:
            read_at = _millis(self.clock())
            households = await self._learn_households(fund["unit_id"])
            dues = domain.compute_dues(households, domain.Basis(request.basis), rate, exemptions)
            if len(dues) > domain.MAX_CAMPAIGN_HOUSEHOLDS:
                raise FailedPrecondition(
                    f"fund_id: {fund['unit_id']} has {len(dues):,} households to list; a "
                    f"campaign lists at most {domain.MAX_CAMPAIGN_HOUSEHOLDS:,}: declare it in "
                    "the funds of the units below"
                )
            total = sum(d.amount for d in dues)
            if total == 0:
                # Nothing to book: the field to change is the exemptions, or the fund (its unit).
                if dues:
                    raise FailedPrecondition(
                        f"exemptions: every household of {fund['unit_id']} is exempt; nothing "
                        "would be owed"
                    )
                raise FailedPrecondition(
                    f"fund_id: {fund['unit_id']} has no household anybody lives in; nothing "
                    "would be owed"
                )
            campaign_id = new_id("cp")
            # The assessment: one transaction, or several for a unit with many households.
            assessment = domain.assessment(campaign_id, dues)
            for part in assessment:
                try:  # as the auditors' replay will check each transaction
                    domain.check_postings("postings", part.postings)
                except InvalidArgument as error:
                    raise InvalidArgument(
                        "rate", f"gives dues the ledger cannot post ({error.message})"
                    ) from None
            campaign: Document = {
                "_id": campaign_id,
                "fund_id": fund["_id"],
                "unit_id": fund["unit_id"],
                "name": name,
                "period": period,
                "basis": request.basis,
                "rate": rate,
                "exemptions": [int(e) for e in exemptions],
                "registry_read_at": read_at,
                "dues": [
                    {
                        "household_id": d.household_id,
                        "name": d.name,
                        "residents": d.residents,
                        "amount": d.amount,
                        "exempt_because": int(d.exempt_because or 0),
                    }
                    for d in dues
                ],
                "total_due": total,
            }
            # Each part's event carries the terms and the dues it books, for the auditors.
            draft.details = {"campaign_id": campaign_id}
            drafts = [
                replace(
                    draft,
                    request_id=domain.part_request_id(draft.request_id, number),
                    postings=part.postings,
                    assessment=events.assessment(campaign, number, len(assessment), part.dues),
                )
                for number, part in enumerate(assessment, start=1)
            ]

            async def insert_campaign(session: Session, docs: list[Document]) -> None:
                # In the posting's transaction, which writes the fund: of two declarations at
                # once, the second retries and finds the first.
                await self._not_declared_yet(fund, name, period, session)
                ids = [doc["_id"] for doc in docs]
                await self.store.insert_campaign(
                    campaign | {"transaction_id": ids[0], "transaction_ids": ids}, session
                )

            done = await self._post(drafts, insert_campaign, parts=True)
        stored = await self.store.campaign(fund["_id"], done[0]["campaign_id"])
        assert stored is not None
        return ledger_pb2.DeclareCampaignResponse(campaign=campaign_message(stored))

    async def GetCampaignStatus(
        self, request: ledger_pb2.GetCampaignStatusRequest, context: Context
    ) -> ledger_pb2.GetCampaignStatusResponse:
        # The chain's head, what is owed and what was paid, read at one moment: they add up
        # to the dues. Later pages read as of the head the first one read.
        async with self.store.snapshot() as session:
            fund = await self._readable(request.fund_id, session)
            _required("campaign_id", request.campaign_id)
            paged = request.HasField("page")
            size = page_size(request.page.page_size) if paged else domain.MAX_UNPAGED_HOUSEHOLDS
            through, after = 0, ""
            if request.page.page_token:
                through, after = domain.pinned_position(request.page.page_token, "this status")
            if through > fund["sequence"]:
                raise InvalidArgument("page.page_token", "is not a token this status gave")
            through = through or fund["sequence"]
            campaign = await self.store.campaign(
                fund["_id"], request.campaign_id, session, with_dues=False
            )
            if campaign is None:
                raise NotFound(f"campaign {request.campaign_id} not found in this fund")
            dues = await self.store.campaign_dues(
                fund["_id"], campaign["_id"], after, size + 1, session
            )
            more = len(dues) > size
            if more and not paged:
                # Not a silent first page: a caller that does not page would take it for the
                # whole campaign.
                raise FailedPrecondition(
                    f"page: the campaign lists more than {size} households; ask for its status "
                    "page by page"
                )
            dues = dues[:size]
            standing = await self.store.dues_standing(
                fund["_id"], campaign["_id"], through, session, [d["household_id"] for d in dues]
            )
            totals = await self.store.campaign_totals(
                fund["_id"], campaign["_id"], through, session
            )
        caller = principal()
        response = ledger_pb2.GetCampaignStatusResponse(
            campaign=_as_seen_by(caller, campaign_message(campaign | {"dues": dues})),
            paid=totals.paid,
            unpaid=totals.unpaid,
            collected=totals.collected,
            outstanding=totals.outstanding,
            next_page_token=domain.pinned_token(through, dues[-1]["household_id"]) if more else "",
        )
        for due in dues:
            figures = standing.get(due["household_id"], domain.DueStanding())
            response.households.append(
                ledger_pb2.HouseholdPayment(
                    household_id=due["household_id"],
                    household_name=due["name"],
                    due=due["amount"],
                    paid=figures.paid,
                    outstanding=figures.outstanding,
                    status=domain.payment_status(  # type: ignore[arg-type]
                        due["amount"],
                        figures.paid,
                        figures.outstanding,
                        bool(due["exempt_because"]),
                    ),
                    exempt_because=due["exempt_because"]
                    if domain.sees_why_exempt(caller, due["household_id"])
                    else ledger_pb2.EXEMPTION_UNSPECIFIED,
                )
            )
        return response

    async def _paid(
        self, fund: Document, contributions: list[Document], session: Session
    ) -> dict[tuple[str, str], int]:
        reversed_ids = await self.store.reversed_ids(
            fund["_id"], [doc["_id"] for doc in contributions], session
        )
        return domain.paid_towards_dues(contributions, reversed_ids)

    async def GetHouseholdDues(
        self, request: ledger_pb2.GetHouseholdDuesRequest, context: Context
    ) -> ledger_pb2.GetHouseholdDuesResponse:
        fund = await self._fund(request.fund_id)
        _required("household_id", request.household_id)
        try:
            await self._permitted(
                fund["unit_id"],
                lambda caller, unit_id: domain.may_read_household_dues(
                    caller, unit_id, request.household_id
                ),
            )
        except PermissionDenied:
            # A household that moved out of the fund's unit (its group merged into one of
            # another ward) still owes what the fund's campaigns charged it, and reads that.
            if not await self._charged_here(fund, request.household_id):
                raise
        # What is owed, what was paid and which payments were reversed, read at one moment:
        # the household's own dues and receivables, not every campaign's list of thousands.
        async with self.store.snapshot() as session:
            dues = await self.store.dues_of(fund["_id"], request.household_id, session)
            owed = await self.store.current_balances(
                [
                    (fund["_id"], domain.receivable(due["campaign_id"], request.household_id))
                    for due in dues
                ],
                session,
            )
            contributions = await self.store.contributions_of(
                fund["_id"], request.household_id, session
            )
            paid_by = await self._paid(fund, contributions, session)
            payments = await self._as_read(contributions, session)
        response = ledger_pb2.GetHouseholdDuesResponse(household_id=request.household_id)
        for due in dues:
            response.household_name = due["name"]
            owed_by = domain.receivable(due["campaign_id"], request.household_id)
            outstanding = owed.get((fund["_id"], owed_by), 0)
            paid = paid_by.get((due["campaign_id"], request.household_id), 0)
            response.dues.append(
                ledger_pb2.CampaignDue(
                    campaign_id=due["campaign_id"],
                    campaign_name=due["campaign_name"],
                    period=due["period"],
                    due=due["amount"],
                    paid=paid,
                    outstanding=outstanding,
                    status=domain.payment_status(  # type: ignore[arg-type]
                        due["amount"], paid, outstanding, bool(due["exempt_because"])
                    ),
                )
            )
        response.payments.extend(payments)
        if not response.household_name:
            response.household_name = await self._name_in_unit(fund, request.household_id)
        return response

    async def _charged_here(self, fund: Document, household_id: str) -> bool:
        """The caller is a resident asking about their own household, which the fund's
        campaigns charged."""
        caller = principal()
        if caller.role is not Role.RESIDENT or caller.household_id != household_id:
            return False
        return bool(await self.store.dues_of(fund["_id"], household_id))

    async def _name_in_unit(self, fund: Document, household_id: str) -> str:
        """The household's name as the ledger learned it, when it lives in the fund's unit or is
        the caller's own. The ledger knows households of other units too (their own funds'): a
        reader of this fund is told neither their names nor, by a different answer, that they
        exist."""
        known = await self.store.household(household_id)
        mine = principal().household_id == household_id
        if known is None or not (mine or unit_within(known["unit_id"], fund["unit_id"])):
            return ""
        return str(known["name"])

    # ---- reports ---------------------------------------------------------------------------

    async def GetBalances(
        self, request: ledger_pb2.GetBalancesRequest, context: Context
    ) -> ledger_pb2.GetBalancesResponse:
        # The chain's head and the balances read at one moment: a posting committed meanwhile
        # is in all of them or in none.
        async with self.store.snapshot() as session:
            fund = await self._readable(request.fund_id, session)
            if request.as_of_sequence < 0:
                raise InvalidArgument("as_of_sequence", "must not be negative")
            if request.as_of_sequence and request.HasField("as_of"):
                raise InvalidArgument("as_of_sequence", "give either as_of or as_of_sequence")
            paged = request.HasField("page")
            size = page_size(request.page.page_size) if paged else domain.MAX_UNPAGED_BALANCES
            prefix = request.account_prefix
            if len(prefix) > domain.MAX_ACCOUNT:
                raise InvalidArgument(
                    "account_prefix", f"is longer than {domain.MAX_ACCOUNT} characters"
                )
            through, after = 0, ""
            if request.page.page_token:
                through, after = domain.balances_position(request.page.page_token, prefix)
            head = fund["sequence"]
            if request.page.page_token:
                if through > head:
                    raise InvalidArgument("page.page_token", "is not a token these balances gave")
            elif request.HasField("as_of"):
                # Everything posted at or before the moment asked about.
                end = moment("as_of", request.as_of) + timedelta(milliseconds=1)
                through = await self.store.last_posted_before(fund["_id"], end, session)
            elif request.as_of_sequence:
                through = min(request.as_of_sequence, head)
            else:
                through = head
            balances = await self.store.balances_at(
                fund["_id"], through, head, accounts_after(after, prefix), session, size + 1
            )
            money = await self.store.balances_at(
                fund["_id"], through, head, {"$in": list(domain.MONEY)}, session
            )
        if len(balances) > size and not paged:
            # Not a silent first page: a caller that does not page would take it for the whole.
            raise FailedPrecondition(
                f"page: the fund has more than {size} accounts with a balance; "
                "ask for its balances page by page"
            )
        page = list(balances)[:size]
        return ledger_pb2.GetBalancesResponse(
            fund_id=fund["_id"],
            sequence=through,
            balances=balances_message({account: balances[account] for account in page}),
            available=domain.available(money),
            # The fund as read above holds the head's hash: a lookup only for an earlier point.
            hash=fund["head_hash"]
            if through == head and through
            else await self.store.hash_at(fund["_id"], through),
            head_sequence=head,
            next_page_token=domain.pinned_token(through, page[-1]) if len(balances) > size else "",
        )

    async def _statement(
        self,
        fund: Document,
        request: ledger_pb2.GetStatementRequest | ledger_pb2.ExportStatementRequest,
        session: Session,
        token: str = "",
    ) -> tuple[ledger_pb2.Statement, domain.StatementPeriod, int]:
        """The statement's header (its lines left to `_lines`), its period pinned, and the
        transaction after which the page's lines begin: for a first page the period ends at
        `to` (now, this moment's transactions included, if not given) and is read through the
        chain's head; a later page's token pins both as its first page had them.

        `session`: the snapshot the fund was read in. The chain's head, its balances and the
        period's totals are read at one moment: a posting committed meanwhile is in all of
        them or in none."""
        start = moment("from", getattr(request, "from")) if request.HasField("from") else None
        after, through = 0, None
        if token:
            after, end, through = domain.statement_token(token)
        elif request.HasField("to"):
            end = moment("to", request.to)
        else:
            end = self.clock() + timedelta(milliseconds=1)
        if start is not None and start >= end:
            if not request.HasField("to") and not token:  # `to` is now: `from` is wrong
                raise InvalidArgument("from", "must not be in the future")
            raise InvalidArgument("to", "must be after from")
        if through is not None and through > fund["sequence"]:
            raise InvalidArgument("page.page_token", "is not a token this statement gave")
        period = domain.StatementPeriod(
            start, end, fund["sequence"] if through is None else through
        )
        opening, closing = await self.store.statement_balances(fund["_id"], period, session)
        totals = await self.store.statement_totals(fund["_id"], period, session)
        period = replace(period, first=totals.first)
        if period.through < fund["sequence"]:  # the fund as the statement reads it
            fund = fund | {
                "sequence": period.through,
                "head_hash": await self.store.hash_at(fund["_id"], period.through),
            }
        # The header holds each campaign's receivables summed: its size does not grow with the
        # number of households.
        statement = ledger_pb2.Statement(
            fund=fund_message(fund),
            to=timestamp(end),
            opening_available=domain.available(opening.balances),
            closing_available=domain.available(closing.balances),
            total_in=domain.statement_total("in", totals.money_in),
            total_out=domain.statement_total("out", totals.money_out),
            closing_balances=balances_message(closing.balances),
            line_count=totals.lines,
            closing_receivables=receivables_message(closing.owed),
        )
        getattr(statement, "from").CopyFrom(
            timestamp(start or totals.first_at or fund["opened_at"])
        )
        return statement, period, after

    async def _lines(
        self, fund_id: str, period: domain.StatementPeriod, after: int, size: int
    ) -> tuple[list[ledger_pb2.StatementLine], bool]:
        """Up to `size` lines of the period after transaction `after`, and whether more follow."""
        if not period.first:  # no transaction in the period
            return [], False
        docs = await self.store.statement_lines(fund_id, period, after, size + 1)
        more = len(docs) > size
        docs = docs[:size]
        messages = await self._messages(docs)
        # Only the names of the campaigns the lines name, not the campaigns' dues; the numbers
        # of the transactions the page's reversals undo, wherever they stand in the chain.
        campaigns = await self.store.campaign_names(
            fund_id, {doc["campaign_id"] for doc in docs if doc.get("campaign_id")}
        )
        sequences = await self.store.sequences(
            fund_id, {doc["reverses"] for doc in docs if doc.get("reverses")}
        )
        lines = []
        for doc, message in zip(docs, messages, strict=True):
            moved = sum(p["amount"] for p in doc["postings"] if p["account"] in domain.MONEY)
            lines.append(
                ledger_pb2.StatementLine(
                    sequence=doc["sequence"],
                    posted_at=message.posted_at,
                    kind=message.kind,
                    description=domain.describe(message, campaigns, sequences),
                    receipt_number=message.contribution.receipt_number,
                    money_in=max(moved, 0),
                    money_out=max(-moved, 0),
                    transaction_id=doc["_id"],
                )
            )
        return lines, more

    async def GetStatement(
        self, request: ledger_pb2.GetStatementRequest, context: Context
    ) -> ledger_pb2.GetStatementResponse:
        async with self.store.snapshot() as session:
            fund = await self._readable(request.fund_id, session)
            paged = request.HasField("page")
            size = page_size(request.page.page_size) if paged else domain.MAX_UNPAGED_LINES
            statement, period, after = await self._statement(
                fund, request, session, request.page.page_token
            )
        lines, more = await self._lines(fund["_id"], period, after, size)
        if more and not paged:
            # Not a silent first page: a caller that does not page would take it for the whole.
            raise FailedPrecondition(
                f"page: the period has more than {size} lines; ask for its statement page by "
                "page or for a shorter period"
            )
        statement.lines.extend(lines)
        return ledger_pb2.GetStatementResponse(
            statement=statement, next_page_token=period.token(lines[-1].sequence) if more else ""
        )

    async def ExportStatement(
        self, request: ledger_pb2.ExportStatementRequest, context: Context
    ) -> ledger_pb2.ExportStatementResponse:
        async with self.store.snapshot() as session:
            fund = await self._readable(request.fund_id, session)
            statement, period, after = await self._statement(fund, request, session)
        # The answer is GetStatement's first page; the files take the whole period, read a
        # page at a time after it, each page written to both files as it comes, off the event
        # loop. Neither file is kept in memory: they are uploaded from temporary files.
        lines, more = await self._lines(fund["_id"], period, after, DEFAULT_PAGE_SIZE)
        statement.lines.extend(lines)
        token = period.token(lines[-1].sequence) if more else ""
        stem = f"statements/{fund['_id']}/{uuid.uuid4().hex}"
        csv_key, pdf_key = f"{stem}.csv", f"{stem}.pdf"
        with tempfile.TemporaryFile() as csv_file, tempfile.TemporaryFile() as pdf_file:
            table = statements.CsvStatement(statement, csv_file)
            printed = await asyncio.to_thread(statements.PdfStatement, statement)
            while True:
                await asyncio.to_thread(_write_statement_page, table, printed, lines)
                if not more:
                    break
                lines, more = await self._lines(
                    fund["_id"], period, lines[-1].sequence, MAX_PAGE_SIZE
                )
            await asyncio.to_thread(table.finish)
            await asyncio.to_thread(printed.finish, pdf_file)
            del printed  # its pages, written out, are let go before the uploads
            await self.files.put(csv_key, csv_file, "text/csv; charset=utf-8")
            await self.files.put(pdf_key, pdf_file, "application/pdf")
        return ledger_pb2.ExportStatementResponse(
            statement=statement,
            csv_object_key=csv_key,
            csv_url=self.files.view_url(csv_key),
            pdf_object_key=pdf_key,
            pdf_url=self.files.view_url(pdf_key),
            expires_at=timestamp(self.clock() + timedelta(hours=1)),
            next_page_token=token,
        )


def _write_statement_page(
    table: statements.CsvStatement,
    printed: statements.PdfStatement,
    lines: list[ledger_pb2.StatementLine],
) -> None:
    table.add(lines)
    printed.add(lines)


def _as_seen_by(caller: Principal, campaign: ledger_pb2.Campaign) -> ledger_pb2.Campaign:
    for due in campaign.dues:
        if not domain.sees_why_exempt(caller, due.household_id):
            due.exempt_because = 0  # type: ignore[assignment]
            due.residents = 0
    return campaign
