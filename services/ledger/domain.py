"""The ledger's rules, without I/O: accounts, balanced postings, no overdrafts, dues, and the hash
chain that lets an auditor check a fund's history from its events alone.

Money is int đồng throughout (VND has no minor unit). A posting's amount debits its account when
positive and credits it when negative; a transaction's postings sum to zero.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import IntEnum
from typing import Any

from civic.ledger.v1 import ledger_pb2
from google.protobuf.message import Message

from services.common.auth import OFFICIALS, Principal, Role, unit_within
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.wire import EPOCH, MICROSECOND, YEARS, local_date

# A quadrillion đồng: far above any neighbourhood fund.
MAX_AMOUNT = 10**15
# An account's balance stays within this, so balances and their sums (cash plus bank) stay far
# inside int64. A statement's totals are sums over its period, which grow with every posting
# however the balances stand: they are held to it too (`statement_total`).
MAX_BALANCE = 10**17
# The most postings in one transaction. An assessment posts one receivable per household: a
# campaign with more households is booked in several transactions (`assessment`), each also
# held to MAX_ASSESSMENT_BYTES with the dues its event carries.
MAX_POSTINGS = 5000
# A transaction is one event, which must stay under the outbox's largest (1,000,000 bytes),
# its memo and the rest included.
MAX_POSTINGS_BYTES = 980_000
# An assessment's event also carries the dues it books (`Assessment` in the events): its
# postings and dues together take at most this many bytes (`assessment` splits by it). The rest
# of the event is at most about 11 kB: ids, hashes, sequences and times (~400 bytes), the memo
# and the terms' name (120 characters of at most 4 bytes: ~490 each), a part's request key
# (~200), who posted it (a token's subject, inside gRPC's 8 KiB of metadata), the terms' other
# fields (~60). 960,000 + 11,000 is under services.common.outbox.MAX_EVENT_BYTES (1,000,000).
MAX_ASSESSMENT_BYTES = 960_000
# The most households one campaign lists, twice the largest ward's: its dues are one MongoDB
# document (each household's is also kept on its own, which GetCampaignStatus pages through);
# its assessment, however many transactions it takes, is written in one MongoDB
# transaction (10,000 households take about a second).
MAX_CAMPAIGN_HOUSEHOLDS = 20_000
# The longest idempotency key a client may send.
MAX_REQUEST_ID = 100
MAX_TEXT = 500
ACCOUNT_KINDS = ("cash", "bank", "receivable", "income", "expense", "equity")
# Accounts that hold money or money owed: they never go below zero.
NON_NEGATIVE = ("cash", "bank", "receivable")
# The accounts that hold the fund's money: a statement's money in and out is what moves them.
MONEY = ("cash", "bank")
_SEGMENT = re.compile(r"[a-z0-9][a-z0-9_-]{0,79}")
_ID_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
# The longest account name: receivable/<campaign_id>/<household_id>, each id a segment as above.
MAX_ACCOUNT = len("receivable//") + 2 * 100
# A GetBalances without a page (as callers from before paging ask) answers every account, up to
# this many: with the longest account names still well inside a 4 MiB gRPC message.
MAX_UNPAGED_BALANCES = 10_000
# A GetCampaignStatus without a page answers every household of the campaign, up to this many:
# with the dues list beside them and the longest names (120 characters of Vietnamese), still
# inside a 4 MiB gRPC message; a group's campaign, and most wards', as answered before paging.
MAX_UNPAGED_HOUSEHOLDS = 4_000
# A GetStatement without a page answers every line of the period, up to this many: lines with
# the longest memos still inside a 4 MiB gRPC message.
MAX_UNPAGED_LINES = 2_000
_RECEIPT = re.compile(r"[A-Za-z0-9][A-Za-z0-9/._-]{0,39}")
_PERIOD = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,19}")
DONATIONS = "income/donations"
DUES = "income/dues"


class Kind(IntEnum):
    """TransactionKind in the protos."""

    GENERAL = 1
    CONTRIBUTION = 2
    EXPENSE = 3
    ASSESSMENT = 4
    REVERSAL = 5


KINDS = frozenset(int(k) for k in Kind)


class Method(IntEnum):
    """PaymentMethod in the protos: where the money goes in or comes out."""

    CASH = 1
    TRANSFER = 2


class Basis(IntEnum):
    PER_HOUSEHOLD = 1
    PER_PERSON = 2


class Exemption(IntEnum):
    POOR_HOUSEHOLD = 1
    WAR_INVALID_MEMBER = 2


EXEMPTIONS = frozenset(int(e) for e in Exemption)


class PaymentStatus(IntEnum):
    PAID = 1
    PARTLY_PAID = 2
    UNPAID = 3
    EXEMPT = 4
    CANCELLED = 5


Postings = list[tuple[str, int]]


# ---- accounts and postings ---------------------------------------------------------------------


# Account names already found well-formed (they repeat from one transaction to the next).
# Account names found well-formed, each with whether it may not go below zero.
_GOOD_ACCOUNTS: dict[str, bool] = {}


@functools.lru_cache(maxsize=4096)
def _account_problem(account: str) -> str:
    """What is wrong with an account name ("" if nothing); names repeat, so it is asked once."""
    try:
        _check_account(account)
    except InvalidArgument as error:
        return error.problem
    return ""


def check_account(field_name: str, account: str) -> str:
    if problem := _account_problem(account):
        raise InvalidArgument(field_name, problem)
    return account


def _check_account(account: str) -> None:
    field_name = "account"
    kind, _, rest = account.partition("/")
    if kind not in ACCOUNT_KINDS:
        raise InvalidArgument(field_name, f"must start with one of {', '.join(ACCOUNT_KINDS)}")
    parts = rest.split("/") if rest else []
    if kind in MONEY:
        if parts:
            raise InvalidArgument(field_name, f"{kind} takes no sub-account")
    elif kind == "receivable":
        if len(parts) != 2 or not all(_ID_SEGMENT.fullmatch(p) for p in parts):
            raise InvalidArgument(field_name, "must be receivable/<campaign_id>/<household_id>")
    elif len(parts) != 1 or not _SEGMENT.fullmatch(parts[0]):
        raise InvalidArgument(field_name, f"must be {kind}/<name> (a-z, 0-9, '-', '_')")


def money_account(method: int, field_name: str = "method") -> str:
    if method == Method.CASH:
        return "cash"
    if method == Method.TRANSFER:
        return "bank"
    raise InvalidArgument(field_name, "must be PAYMENT_METHOD_CASH or PAYMENT_METHOD_TRANSFER")


def receivable(campaign_id: str, household_id: str) -> str:
    return f"receivable/{campaign_id}/{household_id}"


@dataclass(frozen=True)
class Owed:
    """What one campaign's households owe together, and how many of them owe anything."""

    outstanding: int = 0
    households: int = 0


@dataclass(frozen=True)
class Standing:
    """A fund's books at a moment as its statement shows them: the balances other than zero of
    every account but the households' receivables, and those receivables summed per
    campaign."""

    balances: dict[str, int] = field(default_factory=dict)
    owed: dict[str, Owed] = field(default_factory=dict)


def receivables_apart(balances: Mapping[str, int]) -> Standing:
    """The balances, one per account, as a statement shows them: the households' receivables
    (one per household and campaign, thousands in a ward's fund) summed per campaign. The
    store has MongoDB sum them so (LedgerStore.statement_balances), which must agree with
    this, the sum done account by account."""
    standing = Standing()
    for account, balance in balances.items():
        if not balance:
            continue
        kind, _, rest = account.partition("/")
        if kind != "receivable":
            standing.balances[account] = balance
            continue
        campaign = rest.partition("/")[0]
        so_far = standing.owed.get(campaign, Owed())
        standing.owed[campaign] = Owed(so_far.outstanding + balance, so_far.households + 1)
    return standing


def non_negative(account: str) -> bool:
    return account.split("/", 1)[0] in NON_NEGATIVE


def check_amount(field_name: str, amount: int) -> int:
    if amount <= 0:
        raise InvalidArgument(field_name, "must be a positive number of đồng")
    if amount > MAX_AMOUNT:
        raise InvalidArgument(field_name, f"must be at most {MAX_AMOUNT} đồng")
    return amount


def check_postings(field_name: str, postings: Sequence[tuple[str, int]]) -> Postings:
    """Two or more non-zero postings that balance, each account once. (One pass: the auditors'
    replay runs it for every event.)"""
    if len(postings) < 2:
        raise InvalidArgument(field_name, "a transaction needs at least two postings")
    if len(postings) > MAX_POSTINGS:
        raise InvalidArgument(field_name, f"at most {MAX_POSTINGS} postings per transaction")
    seen: set[str] = set()
    total = 0
    for i, (account, amount) in enumerate(postings):
        if account not in _GOOD_ACCOUNTS:
            if problem := _account_problem(account):
                raise InvalidArgument(f"{field_name}[{i}].account", problem)
            if len(_GOOD_ACCOUNTS) > 100_000:
                _GOOD_ACCOUNTS.clear()
            _GOOD_ACCOUNTS[account] = non_negative(account)
        if account in seen:
            raise InvalidArgument(f"{field_name}[{i}].account", f"{account} appears twice")
        seen.add(account)
        if not 0 < abs(amount) <= MAX_AMOUNT:
            problem = "must not be zero" if amount == 0 else f"is over {MAX_AMOUNT} đồng"
            raise InvalidArgument(f"{field_name}[{i}].amount", problem)
        total += amount
    if total:
        debits = sum(a for _, a in postings if a > 0)
        credits = -sum(a for _, a in postings if a < 0)
        raise InvalidArgument(
            field_name, f"do not balance: debits {debits} đồng, credits {credits} đồng"
        )
    return list(postings)


def check_postings_fit(field_name: str, postings: Postings) -> None:
    """A new transaction's postings fit in one event. Not part of `check_postings`, which the
    auditors' replay runs on every event ever published: those all fitted."""
    size = sum(posting_bytes(account, amount) for account, amount in postings)
    if size > MAX_POSTINGS_BYTES:
        raise InvalidArgument(
            field_name, f"hold too much for one transaction ({size:,} bytes): post it in parts"
        )


def _varint_bytes(value: int) -> int:
    """The bytes of an integer as a protobuf varint (a negative one takes ten)."""
    return 10 if value < 0 else max(1, (value.bit_length() + 6) // 7)


def _number_field_bytes(value: int) -> int:
    """An integer field with its tag (field numbers under 16); nothing when 0, as proto3 has it."""
    return 1 + _varint_bytes(value) if value else 0


def _text_field_bytes(size: int) -> int:
    """A length-delimited field of `size` bytes with its tag and length (field numbers under
    16): a string, or a message within a message."""
    return 1 + _varint_bytes(size) + size


def posting_bytes(account: str, amount: int) -> int:
    """The bytes a posting takes in its transaction (Posting, in `postings`), exactly."""
    return _text_field_bytes(_text_field_bytes(len(account.encode())) + _number_field_bytes(amount))


def apply_postings(
    balances: Mapping[str, int], postings: Iterable[tuple[str, int]]
) -> dict[str, int]:
    """The touched accounts' new balances; refuses (FAILED_PRECONDITION) any that would take an
    account that holds money, or money owed, below zero, or any account past MAX_BALANCE."""
    updated: dict[str, int] = {}
    for account, amount in postings:
        after = balances.get(account, 0) + amount
        if after < 0 and non_negative(account):
            before = balances.get(account, 0)
            raise FailedPrecondition(
                f"would overdraw {account}: balance {before} đồng, posting {amount} đồng"
            )
        if abs(after) > MAX_BALANCE:
            raise FailedPrecondition(
                f"would take {account} past {MAX_BALANCE:,} đồng: balance "
                f"{balances.get(account, 0)} đồng, posting {amount} đồng"
            )
        updated[account] = after
    return updated


def available(balances: Mapping[str, int]) -> int:
    """The money the fund holds: cash plus bank."""
    return sum(balances.get(account, 0) for account in MONEY)


def statement_total(direction: str, total: int) -> int:
    """The money in (or out) over a statement's lines; refuses (FAILED_PRECONDITION, naming
    `from`: a later one shortens the period) a total past MAX_BALANCE, the bound every balance
    keeps, rather than answer a figure no balance could reach or its int64 field hold."""
    if total > MAX_BALANCE:
        raise FailedPrecondition(
            f"from: the money {direction} over the period comes to {total:,} đồng, past the "
            f"{MAX_BALANCE:,} a statement totals; ask for a shorter period"
        )
    return total


@dataclass(frozen=True)
class StatementPeriod:
    """A statement's period [start, end) (from the beginning without a start), read through
    the fund's transaction `through`: the chain's head when its first page was read, so later
    pages, and the header each carries, read the same transactions whatever was posted since.
    `first`: the period's first transaction (0 for none), where its lines begin."""

    start: datetime | None
    end: datetime
    through: int
    first: int = 0

    def token(self, after: int) -> str:
        """The page token for the lines after transaction `after`: it pins the end and the
        head (the end to the microsecond, as the first page had it)."""
        return f"{after}.{(self.end - EPOCH) // MICROSECOND}.{self.through}"


def statement_token(token: str) -> tuple[int, datetime, int]:
    """The transaction after which a page token's lines go on, and the period's end and the
    chain's head it pinned."""
    try:
        after, micros, through = (int(part) for part in token.split("."))
        end = EPOCH + micros * MICROSECOND
        if after < 0 or through < after or end.year not in YEARS:
            raise ValueError(token)
    except (ValueError, OverflowError):
        raise InvalidArgument("page.page_token", "is not a token this statement gave") from None
    return after, end, through


def pinned_token(through: int, last: str) -> str:
    """The page token of a listing read as of the fund's transaction `through` (the moment its
    first page read), for what comes after `last` (an account, a household)."""
    return f"{through}|{last}"


def pinned_position(token: str, gave: str) -> tuple[int, str]:
    """The moment (the chain's transaction) a pinned page token holds, and what its page begins
    after; INVALID_ARGUMENT naming the token if it is not one of these (`gave`: what gives
    them, for the message)."""
    through, _, last = token.partition("|")
    try:
        if not last or int(through) < 0:
            raise ValueError(token)
        return int(through), last
    except ValueError:
        raise InvalidArgument("page.page_token", f"is not a token {gave} gave") from None


def balances_position(token: str, prefix: str) -> tuple[int, str]:
    """The moment a balances page token pinned, and the account after which its page begins."""
    through, account = pinned_position(token, "these balances")
    if not account.startswith(prefix):
        raise InvalidArgument("page.page_token", "is not a token these balances gave")
    return through, account


def part_request_id(request_id: str, part: int) -> str:
    """The idempotency key of part `part` (1, 2, ...) of a request booked as several
    transactions: the request's own key for the first; for the others one to one with it, and
    longer than any key a client may send (MAX_REQUEST_ID), so never one of theirs."""
    if part == 1:
        return request_id
    return f"part {part} of ".ljust(MAX_REQUEST_ID + 1, "-") + request_id


def reversal_of(postings: Iterable[tuple[str, int]]) -> Postings:
    return [(account, -amount) for account, amount in postings]


def check_text(field_name: str, value: str, required: bool = False, limit: int = MAX_TEXT) -> str:
    # Composed (NFC): Vietnamese typed with separate tone marks is the same letters, kept and
    # measured as such.
    text = " ".join(unicodedata.normalize("NFC", value).split())
    if required and not text:
        raise InvalidArgument(field_name, "is required")
    if len(text) > limit:
        raise InvalidArgument(field_name, f"is longer than {limit} characters")
    return text


def check_day(field_name: str, value: str, today: date) -> str:
    """A YYYY-MM-DD day, not in the future; today if empty."""
    if not value:
        return today.isoformat()
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(field_name, "must be a date as YYYY-MM-DD") from None
    if day > today:
        raise InvalidArgument(field_name, "must not be in the future")
    return day.isoformat()


def first_day_of_books(opened_at: datetime) -> date:
    """The earliest day a fund's payment or expense may be dated: 1 January of the year before
    the fund was opened (in Vietnam). A unit moving its paper books into the ledger enters the
    receipts of this year and the last as dated on paper; a day before that is a mistyped year
    (1900, or 2016 for 2026), which would put the payment on the board in a year the fund did
    not keep. Not the opening day itself: those paper receipts come before it, and so may the
    payments towards a campaign declared once the fund is in the ledger."""
    return date(local_date(opened_at).year - 1, 1, 1)


def check_in_books(field_name: str, day: str, first: date) -> None:
    """`day` (as `check_day` gives it) is not before the fund's `first_day_of_books`. Checked
    for new commands only: a retry of one recorded before answers it, and the replay of the
    events does not ask."""
    if date.fromisoformat(day) < first:
        raise InvalidArgument(
            field_name,
            f"must not be before {first.isoformat()}: the fund's books begin with the year "
            "before it was opened",
        )


def check_receipt_number(field_name: str, value: str) -> str:
    """The paper receipt's number as printed; spaces around it (copied from a form) dropped."""
    number = value.strip()
    if not number:
        raise InvalidArgument(field_name, "is required (the paper receipt's number)")
    if not _RECEIPT.fullmatch(number):
        raise InvalidArgument(
            field_name,
            f"{number!r} is not a receipt number: letters, digits, '/', '.', '_' or '-', "
            "starting with a letter or digit, at most 40",
        )
    return number


def check_period(field_name: str, value: str) -> str:
    if not _PERIOD.fullmatch(value):
        raise InvalidArgument(field_name, "is required, e.g. 2026 or 2026-H1 (at most 20)")
    return value


def campaign_key(name: str, period: str) -> tuple[str, str]:
    """What makes two declarations one campaign: its name as a reader reads it, whatever its
    capitals and however its Vietnamese letters were typed (a letter with its marks as one
    character, or the letter followed by the marks, as some keyboards send them), and its
    period, whatever its capitals."""
    caseless = unicodedata.normalize("NFD", name).casefold()
    return unicodedata.normalize("NFC", caseless), period.casefold()


def check_category(field_name: str, value: str) -> str:
    if not _SEGMENT.fullmatch(value):
        raise InvalidArgument(field_name, "is required: a-z, 0-9, '-' or '_' (e.g. sanitation)")
    return value


# ---- dues ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HouseholdFacts:
    """What the register says about a household when dues are levied."""

    household_id: str
    unit_id: str
    name: str
    residents: int
    poor: bool
    war_invalid_member: bool


@dataclass(frozen=True)
class Due:
    household_id: str
    name: str
    residents: int
    amount: int
    exempt_because: Exemption | None


def owed(basis: int, rate: int, residents: int, exempt: bool) -> int | None:
    """A household's due under a campaign's terms: the rate per household, or per resident
    counted; nothing when exempt. None when it is not listed at all: nobody lives there and it
    is not exempt (a per-household due would stand unpaid on the board for ever, with nobody to
    pay it). The service levies dues by this, and the auditors' replay checks them by it."""
    if exempt:
        return 0
    if residents <= 0:
        return None
    return rate * (1 if basis == Basis.PER_HOUSEHOLD else residents)


def compute_dues(
    households: Iterable[HouseholdFacts],
    basis: Basis,
    rate: int,
    exemptions: Iterable[Exemption],
) -> list[Due]:
    """What each household owes (`owed`), in household order. A household listed twice owes
    once, as last read: a registry from before it read every page of a listing as at the first
    could list one twice, its group merged into a later one between two pages."""
    exempt = set(exemptions)
    latest = {household.household_id: household for household in households}
    dues = []
    for household in sorted(latest.values(), key=lambda h: h.household_id):
        because = None
        if Exemption.POOR_HOUSEHOLD in exempt and household.poor:
            because = Exemption.POOR_HOUSEHOLD
        elif Exemption.WAR_INVALID_MEMBER in exempt and household.war_invalid_member:
            because = Exemption.WAR_INVALID_MEMBER
        amount = owed(basis, rate, household.residents, because is not None)
        if amount is None:
            continue
        dues.append(
            Due(household.household_id, household.name, household.residents, amount, because)
        )
    return dues


def due_bytes(due: Due) -> int:
    """The bytes a due takes in an assessment's event (AssessedDue, in `dues`), exactly: the
    household by id, never by name."""
    return _text_field_bytes(
        _text_field_bytes(len(due.household_id.encode()))
        + _number_field_bytes(due.residents)
        + _number_field_bytes(due.amount)
        + _number_field_bytes(int(due.exempt_because or 0))
    )


@dataclass(frozen=True)
class AssessmentPart:
    """One transaction of a campaign's assessment: its postings, and the dues its event carries
    (those it books, and on the first part the exempt households, which book nothing)."""

    postings: Postings
    dues: list[Due]


def assessment(campaign_id: str, dues: Sequence[Due]) -> list[AssessmentPart]:
    """The transactions that book the dues as receivables: each household's receivable, in
    household order, against the income/dues that balances them; at most MAX_POSTINGS - 1
    receivables to a transaction, and its postings and dues within MAX_ASSESSMENT_BYTES, so
    its event fits one Kafka record. The exempt households go with the first, which books
    fewer when they take room. FAILED_PRECONDITION (naming `exemptions`) when the exempt
    households alone would not fit: with the registry's ids (27 characters) 20,000 of them take
    720 kB, so only ids far longer than it makes come near."""
    exempt = [d for d in dues if not d.amount]
    balance = posting_bytes(DUES, -1)  # a credit: ten bytes whatever its amount
    parts: list[AssessmentPart] = []
    listed: list[Due] = list(exempt)
    booked: Postings = []
    used = balance + sum(due_bytes(d) for d in exempt)
    for due in dues:
        if not due.amount:
            continue
        account = receivable(campaign_id, due.household_id)
        more = posting_bytes(account, due.amount) + due_bytes(due)
        if booked and (len(booked) == MAX_POSTINGS - 1 or used + more > MAX_ASSESSMENT_BYTES):
            parts.append(_assessment_part(booked, listed))
            listed, booked, used = [], [], balance
        listed.append(due)
        booked.append((account, due.amount))
        used += more
        if used > MAX_ASSESSMENT_BYTES:  # only the first part's exempt households can do it
            raise FailedPrecondition(
                f"exemptions: {len(exempt):,} households are exempt, more than one assessment "
                "event can list with their ids; declare the campaign in the funds of the units "
                "below"
            )
    if booked:
        parts.append(_assessment_part(booked, listed))
    return parts


def _assessment_part(booked: Postings, listed: list[Due]) -> AssessmentPart:
    postings = [*booked, (DUES, -sum(amount for _, amount in booked))]
    return AssessmentPart(postings, sorted(listed, key=lambda d: d.household_id))


@dataclass(frozen=True)
class Terms:
    """A campaign's terms as its assessment's events carry them (enums as the numbers on the
    wire, which an event may hold even when the ledger knows no such value)."""

    name: str
    period: str
    basis: int
    rate: int
    exemptions: tuple[int, ...]
    registry_read_at: datetime | None


@dataclass(frozen=True)
class Assessed:
    """What an assessment's event says besides its postings: its campaign, the campaign's terms
    (None on events from before they were carried), its place among the campaign's
    assessment transactions (from 1, of `parts`) and the dues it books."""

    campaign_id: str
    terms: Terms | None = None
    part: int = 0
    parts: int = 0
    dues: tuple[Due, ...] = ()


_BASES: dict[int, str] = {Basis.PER_HOUSEHOLD: "per household", Basis.PER_PERSON: "per person"}


def basis_text(basis: int) -> str:
    return _BASES.get(basis, f"basis {basis}")


def assessed_due(household_id: str, residents: int, amount: int, exempt_because: int) -> Due:
    """A due as an assessment's event carries it (no name); BadEvent for an exemption the ledger
    does not know."""
    if exempt_because and exempt_because not in EXEMPTIONS:
        raise BadEvent(f"exempts household {household_id} for an unknown reason {exempt_because}")
    return Due(
        household_id, "", residents, amount, Exemption(exempt_because) if exempt_because else None
    )


def check_assessed_dues(
    campaign_id: str, terms: Terms, dues: Sequence[Due], postings: Sequence[tuple[str, int]]
) -> None:
    """BadEvent unless every due is what the terms make it (`owed`, as the service levied it),
    each exempt household for one of the campaign's exemptions, and the transaction's postings
    book exactly those dues, household by household, against income/dues."""
    if terms.basis not in _BASES:
        raise BadEvent(
            f"campaign {campaign_id}: basis {terms.basis} is neither per household nor per person"
        )
    if not 0 < terms.rate <= MAX_AMOUNT:
        raise BadEvent(f"campaign {campaign_id}: rate {terms.rate} đồng is not one it may have")
    if unknown := sorted(set(terms.exemptions) - EXEMPTIONS):
        raise BadEvent(
            f"campaign {campaign_id}: exemption {unknown[0]} is not one the ledger knows"
        )
    charged: dict[str, int] = {}
    for due in dues:
        who = f"household {due.household_id}"
        if due.household_id in charged:
            raise BadEvent(f"campaign {campaign_id}: lists {who} twice")
        if due.exempt_because is not None and due.exempt_because not in terms.exemptions:
            raise BadEvent(
                f"campaign {campaign_id}: {who} is exempt as {due.exempt_because.name}, an "
                "exemption its terms do not grant"
            )
        if due.residents < 0:
            raise BadEvent(f"campaign {campaign_id}: {who} counts {due.residents} residents")
        expected = owed(terms.basis, terms.rate, due.residents, due.exempt_because is not None)
        if expected is None:
            raise BadEvent(
                f"campaign {campaign_id}: {who} is listed as owing, with nobody living there"
            )
        if due.amount != expected:
            raise BadEvent(
                f"campaign {campaign_id}: {who} is charged {due.amount} đồng; its terms "
                f"({basis_text(terms.basis)} at {terms.rate} đồng, {due.residents} "
                f"{'resident' if due.residents == 1 else 'residents'} counted"
                f"{', exempt' if due.exempt_because else ''}) make it {expected}"
            )
        charged[due.household_id] = due.amount
    prefix = receivable(campaign_id, "")
    booked: dict[str, int] = {}
    for account, amount in postings:
        if account.startswith(prefix):
            booked[account.removeprefix(prefix)] = amount
        elif account != DUES:
            raise BadEvent(
                f"campaign {campaign_id}: its assessment posts to {account}, neither a "
                "receivable of the campaign nor income/dues"
            )
    for household_id in sorted(charged.keys() | booked.keys()):
        if household_id not in charged:
            raise BadEvent(
                f"campaign {campaign_id}: a receivable of household {household_id} is booked, "
                "which its dues do not list"
            )
        if booked.get(household_id, 0) != charged[household_id]:
            raise BadEvent(
                f"campaign {campaign_id}: household {household_id}'s receivable is booked at "
                f"{booked.get(household_id, 0)} đồng, its due is {charged[household_id]}"
            )


def paid_towards_dues(
    contributions: Iterable[Mapping[str, Any]], reversed_ids: Container[str]
) -> dict[tuple[str, str], int]:
    """(campaign id, household id) -> what the household paid towards that due: the part of
    each contribution, not reversed, that settled its receivable."""
    paid: dict[tuple[str, str], int] = {}
    for doc in contributions:
        details = doc.get("contribution") or {}
        campaign_id, household_id = details.get("campaign_id"), details.get("household_id")
        if not (campaign_id and household_id) or doc["_id"] in reversed_ids:
            continue
        owed = receivable(campaign_id, household_id)
        settled = -sum(p["amount"] for p in doc["postings"] if p["account"] == owed)
        paid[campaign_id, household_id] = paid.get((campaign_id, household_id), 0) + settled
    return paid


@dataclass(frozen=True)
class DueStanding:
    """What a household had paid towards its due in a campaign, and what it still owed."""

    paid: int = 0
    outstanding: int = 0


@dataclass(frozen=True)
class CampaignTotals:
    """A campaign's households counted and summed: those that paid (PAID), those that still
    owe (UNPAID or PARTLY_PAID), and what all of them paid and still owe."""

    paid: int = 0
    unpaid: int = 0
    collected: int = 0
    outstanding: int = 0


def payment_status(due: int, paid: int, outstanding: int, exempt: bool) -> PaymentStatus:
    """From what the household paid towards the due (its contributions, not reversed) and what
    it still owes (the receivable): the two differ once a due is cancelled or written off."""
    if exempt:
        return PaymentStatus.EXEMPT
    if outstanding <= 0:
        return PaymentStatus.PAID if paid >= due else PaymentStatus.CANCELLED
    return PaymentStatus.PARTLY_PAID if paid > 0 else PaymentStatus.UNPAID


# ---- who may read and change what ------------------------------------------------------------


def can_read_fund(caller: Principal, unit_id: str) -> bool:
    """Residents read the funds of their unit and of the units above it (they belong to those
    too); everyone else the funds within their scope."""
    if caller.role is Role.RESIDENT:
        return unit_within(caller.scope, unit_id)
    return caller.covers(unit_id)


def may_read_fund(caller: Principal, unit_id: str) -> None:
    if not can_read_fund(caller, unit_id):
        raise PermissionDenied(f"the funds of {unit_id} are not yours to read")


def may_keep_books(caller: Principal, unit_id: str) -> None:
    """Only the unit's own leader or treasurer changes its funds (not a neighbour, nor an
    official above, who reads them)."""
    if caller.role is not Role.TREASURER and caller.role not in OFFICIALS:
        raise PermissionDenied(
            f"role {caller.role.value} may not change funds (needs the leader or treasurer)"
        )
    if caller.scope != unit_id:
        raise PermissionDenied(f"only the leader or treasurer of {unit_id} may change its funds")


def may_keep_books_of(caller: Principal, unit_id: str, merged_into: str | None) -> None:
    """A group merged away has its books kept by the group it went into: the tokens of its
    own leader and treasurer, still scoped to it until they expire, no longer change them."""
    may_keep_books(caller, unit_id)
    if merged_into is not None:
        raise PermissionDenied(
            f"{unit_id} was merged into {merged_into}: the leader or treasurer of "
            f"{merged_into} keeps its funds now"
        )


def sees_why_exempt(caller: Principal, household_id: str) -> bool:
    """Why a household is exempt (poverty, a war invalid) and how many live in it are personal
    data: those who levy and check dues see them (officials, treasurers, auditors), a resident
    their own household's; the board, and an integrator, show others only as exempt."""
    if caller.role is Role.RESIDENT:
        return caller.household_id == household_id
    return caller.role is not Role.INTEGRATOR


def may_read_household_dues(caller: Principal, unit_id: str, household_id: str) -> None:
    if caller.role is Role.RESIDENT and caller.household_id != household_id:
        raise PermissionDenied("residents see only their own household's dues")
    if caller.role is Role.INTEGRATOR:
        raise PermissionDenied("a household's dues and payments are not for integrators")
    may_read_fund(caller, unit_id)


def describe(
    transaction: ledger_pb2.Transaction, campaigns: Mapping[str, str], sequences: Mapping[str, int]
) -> str:
    """A statement line's text: who paid for what, what was spent on what (names only)."""
    kind = Kind(transaction.kind) if transaction.kind in KINDS else None
    if kind is Kind.CONTRIBUTION:
        c = transaction.contribution
        payer = c.household_name or "Người ủng hộ"
        purpose = campaigns.get(c.campaign_id, "") if c.campaign_id else "ủng hộ"
        text = f"{payer} — {purpose}"
    elif kind is Kind.EXPENSE:
        e = transaction.expense
        text = f"{e.category} — {e.payee} (duyệt: {e.approved_by})"
    elif kind is Kind.ASSESSMENT:
        text = f"Lập sổ thu: {campaigns.get(transaction.campaign_id, transaction.memo)}"
    elif kind is Kind.REVERSAL:
        original = transaction.reverses_transaction_id
        number = sequences.get(original)
        text = f"Hủy giao dịch {f'số {number}' if number else original}"
    else:
        text = "Bút toán"
    return (
        f"{text}: {transaction.memo}" if transaction.memo and kind is not Kind.ASSESSMENT else text
    )


# ---- the hash chain ------------------------------------------------------------------------------


def chain_hash(event: Message) -> str:
    """The hash an event of a fund's chain must carry (its `prev_hash` set, `hash` ignored)."""
    carried: str = event.hash  # type: ignore[attr-defined]
    event.hash = ""  # type: ignore[attr-defined]
    try:
        unsealed = event.SerializeToString(deterministic=True)
    finally:
        event.hash = carried  # type: ignore[attr-defined]
    prev: str = event.prev_hash  # type: ignore[attr-defined]
    return hashlib.sha256(prev.encode() + unsealed).hexdigest()


# How a 64-character `hash` (field 4 of both chain events) looks on the wire: tag, length, text.
_HASH_FIELD = bytes([4 << 3 | 2, 64])


def seals_bytes(raw: bytes, prev_hash: str, hash_: str) -> bool:
    """Whether an event's bytes as published are sealed by `hash_`: the fast check. Events are
    serialized in field order, so the bytes without the hash field are exactly what was hashed;
    bytes that are not in that form are checked by chain_hash instead."""
    field = _HASH_FIELD + hash_.encode()
    if raw.count(field) != 1:
        return False
    unsealed = raw.replace(field, b"", 1)
    return hashlib.sha256(prev_hash.encode() + unsealed).hexdigest() == hash_


def seal(event: Message, sequence: int, prev_hash: str) -> str:
    """Links `event` after the fund's event `prev_hash` as number `sequence`; returns its hash."""
    event.sequence = sequence  # type: ignore[attr-defined]
    event.prev_hash = prev_hash  # type: ignore[attr-defined]
    event.hash = chain_hash(event)  # type: ignore[attr-defined]
    return event.hash  # type: ignore[attr-defined, no-any-return]


# ---- books rebuilt from events (auditors, tests) -------------------------------------------------


class BadEvent(Exception):
    """An event that breaks the chain or the rules; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class CampaignBooks:
    """A dues campaign as its assessment's events show it, summed over its parts."""

    campaign_id: str
    # Its first assessment transaction (reversing it cancels the campaign), and where it is.
    transaction_id: str
    sequence: int
    # None for a campaign declared before the events carried its terms.
    terms: Terms | None
    parts: int = 0  # how many it has (0: not said)
    parts_seen: int = 0
    charged: int = 0
    exempt: int = 0
    total_due: int = 0
    # The households listed by the parts seen so far; let go once the last part is in.
    households: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.parts_seen >= self.parts


@dataclass
class FundBooks:
    fund_id: str
    unit_id: str
    sequence: int = -1
    head_hash: str = ""
    # The hash at every place of the chain, to tell an event published twice from a fork.
    hashes: list[str] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    transactions: dict[str, Postings] = field(default_factory=dict)
    reversals: set[str] = field(default_factory=set)
    reversal_ids: set[str] = field(default_factory=set)
    transaction_count: int = 0
    # The fund's dues campaigns, in the chain's order.
    campaigns: dict[str, CampaignBooks] = field(default_factory=dict)


@dataclass
class Books:
    """Every fund's balances recomputed from its chain of events, each event checked: the chain
    (sequence, previous hash, own hash), double entry, no overdraft, reversals that undo exactly
    what they point at. Feeding the same events twice gives the same books."""

    funds: dict[str, FundBooks] = field(default_factory=dict)
    events: int = 0
    duplicates: int = 0

    def open_fund(
        self, fund_id: str, unit_id: str, sequence: int, prev_hash: str, hash_: str
    ) -> bool:
        known = self.funds.get(fund_id)
        if known is not None:
            if sequence == 0 and hash_ == known.hashes[0]:
                self.duplicates += 1
                return False
            raise BadEvent(f"fund {fund_id} opened twice")
        if sequence != 0 or prev_hash:
            raise BadEvent("a fund's first event must have sequence 0 and no previous hash")
        self.funds[fund_id] = FundBooks(fund_id, unit_id, 0, hash_, [hash_])
        self.events += 1
        return True

    def link(self, fund_id: str, sequence: int, prev_hash: str, hash_: str) -> FundBooks | None:
        """The fund whose chain this event extends; None for a repeat of an event already seen
        (a relay may publish an event twice)."""
        fund = self.funds.get(fund_id)
        if fund is None:
            raise BadEvent(f"fund {fund_id} has no FundOpened before it")
        if sequence <= fund.sequence:
            if sequence >= 0 and hash_ == fund.hashes[sequence]:
                self.duplicates += 1
                return None
            raise BadEvent(f"sequence {sequence} comes after {fund.sequence}: replayed or forked")
        if sequence != fund.sequence + 1:
            raise BadEvent(f"sequence {sequence} skips after {fund.sequence}: an event is missing")
        if prev_hash != fund.head_hash:
            raise BadEvent("prev_hash is not the hash of the fund's previous event")
        return fund

    def post(
        self,
        fund: FundBooks,
        sequence: int,
        hash_: str,
        transaction_id: str,
        postings: Sequence[tuple[str, int]],
        reverses: str = "",
        assessed: Assessed | None = None,
    ) -> None:
        """Applies a transaction's event; `assessed` for an assessment (a campaign's), whose
        dues are checked against its terms, when it carries them, before anything is applied."""
        campaign = None
        if assessed is not None:
            campaign = self._campaign_part(fund, sequence, transaction_id, assessed)
            if assessed.terms is not None:
                check_assessed_dues(assessed.campaign_id, assessed.terms, assessed.dues, postings)
        if reverses or not self._post_plain(fund, postings):
            self._post_checked(fund, postings, reverses)
        if transaction_id in fund.transactions:
            raise BadEvent(f"transaction id {transaction_id} used twice")
        if assessed is not None and campaign is not None:
            self._count_part(fund, campaign, sequence, assessed, postings)
        fund.transactions[transaction_id] = list(postings)
        if reverses:
            fund.reversals.add(reverses)
            fund.reversal_ids.add(transaction_id)
        fund.sequence = sequence
        fund.head_hash = hash_
        fund.hashes.append(hash_)
        fund.transaction_count += 1
        self.events += 1

    @staticmethod
    def _campaign_part(
        fund: FundBooks, sequence: int, transaction_id: str, assessed: Assessed
    ) -> CampaignBooks:
        """The campaign an assessment belongs to, once its place among the campaign's parts
        checks out (a new one for its first part); not yet counted."""
        campaign_id, terms = assessed.campaign_id, assessed.terms
        if not campaign_id:
            raise BadEvent("an assessment that names no campaign")
        known = fund.campaigns.get(campaign_id)
        if terms is None:
            # From a build before events carried terms: parts neither numbered nor said. Such a
            # build may still post while a newer one runs beside it (a rolling deploy), so a
            # campaign without terms after one with them is no forgery; but one instance posts a
            # campaign's parts together, so they carry terms all or none.
            if known is not None and known.terms is not None:
                raise BadEvent(
                    f"campaign {campaign_id}: a part carries no terms, though its first did"
                )
            return known or CampaignBooks(campaign_id, transaction_id, sequence, None)
        if not 1 <= assessed.part <= assessed.parts:
            raise BadEvent(
                f"campaign {campaign_id}: part {assessed.part} of {assessed.parts} is no place "
                "in an assessment"
            )
        if known is None:
            if assessed.part != 1:
                raise BadEvent(
                    f"campaign {campaign_id}: part {assessed.part} comes before its first"
                )
            return CampaignBooks(campaign_id, transaction_id, sequence, terms, assessed.parts)
        if known.terms != terms or known.parts != assessed.parts:
            raise BadEvent(f"campaign {campaign_id}: part {assessed.part} states other terms")
        if known.complete or assessed.part != known.parts_seen + 1:
            raise BadEvent(
                f"campaign {campaign_id}: part {assessed.part} follows part {known.parts_seen}"
            )
        if listed := next((d for d in assessed.dues if d.household_id in known.households), None):
            raise BadEvent(
                f"campaign {campaign_id}: household {listed.household_id} is listed by an "
                "earlier part too"
            )
        return known

    @staticmethod
    def _count_part(
        fund: FundBooks,
        campaign: CampaignBooks,
        sequence: int,
        assessed: Assessed,
        postings: Sequence[tuple[str, int]],
    ) -> None:
        fund.campaigns[campaign.campaign_id] = campaign
        campaign.parts_seen += 1
        if campaign.terms is None:
            # No dues on the event: the receivables it books are the households charged.
            owed = [amount for account, amount in postings if account.startswith("receivable/")]
            campaign.charged += len(owed)
            campaign.total_due += sum(owed)
            campaign.parts = campaign.parts_seen
            return
        for due in assessed.dues:
            if due.exempt_because is not None:
                campaign.exempt += 1
            else:
                campaign.charged += 1
                campaign.total_due += due.amount
        if campaign.complete:
            campaign.households = set()
        else:
            campaign.households.update(d.household_id for d in assessed.dues)

    @staticmethod
    def _post_plain(fund: FundBooks, postings: Sequence[tuple[str, int]]) -> bool:
        """The common case in one pass: well-known accounts, each once, non-zero amounts that
        balance, no guarded account below zero. Applies it and says so; otherwise changes
        nothing, and the full checks find what is wrong."""
        if not 2 <= len(postings) <= MAX_POSTINGS:
            return False
        balances = fund.balances
        total = 0
        after = {}
        for account, amount in postings:
            guarded = _GOOD_ACCOUNTS.get(account)
            if guarded is None or account in after or not amount:
                return False
            if amount > MAX_AMOUNT or amount < -MAX_AMOUNT:
                return False
            value = balances.get(account, 0) + amount
            if (value < 0 and guarded) or abs(value) > MAX_BALANCE:
                return False
            after[account] = value
            total += amount
        if total:
            return False
        balances.update(after)
        return True

    @staticmethod
    def _post_checked(fund: FundBooks, postings: Sequence[tuple[str, int]], reverses: str) -> None:
        try:
            checked = check_postings("postings", postings)
            if reverses:
                original = fund.transactions.get(reverses)
                if original is None:
                    raise BadEvent(f"reverses {reverses}, which is not a transaction of the fund")
                if reverses in fund.reversals or reverses in fund.reversal_ids:
                    raise BadEvent(f"reverses {reverses}, which is reversed or is a reversal")
                if sorted(checked) != sorted(reversal_of(original)):
                    raise BadEvent(f"does not undo exactly the postings of {reverses}")
            updated = apply_postings(fund.balances, checked)
        except (InvalidArgument, FailedPrecondition) as error:
            raise BadEvent(error.message) from None
        fund.balances.update(updated)

    def total(self) -> int:
        """The sum of every posting ever made: zero while double entry holds."""
        return sum(sum(fund.balances.values()) for fund in self.funds.values())
