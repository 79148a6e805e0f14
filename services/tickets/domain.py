"""Pure rules of complaints and requests: routing, the lifecycle, deadlines. No I/O here."""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any
from zoneinfo import ZoneInfo

from services.common.auth import OFFICIALS, Principal, Role
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.text import plain_text


class Level(IntEnum):
    # Values match civic.tickets.v1.Level; a unit id has one segment per level from the city.
    GROUP = 1
    WARD = 2
    DISTRICT = 3
    CITY = 4


class Status(IntEnum):
    # Values match civic.tickets.v1.TicketStatus.
    SUBMITTED = 1
    ROUTED = 2
    ACKNOWLEDGED = 3
    IN_PROGRESS = 4
    RESOLVED = 5
    REJECTED = 6
    CLOSED = 7


OPEN = (Status.SUBMITTED, Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS)
CATEGORY = re.compile(r"[a-z][a-z0-9-]{1,39}")
DEPARTMENT = re.compile(r"[a-z][a-z0-9-]{0,39}")
MAX_DESCRIPTION = 4000
MAX_COMMENT = 2000
# A category's title: one line in every resident's list of what they can report.
MAX_TITLE = 200
# Comments a ticket keeps: every answer carries them all, within gRPC's 4 MiB and far from
# MongoDB's 16 MiB per ticket.
MAX_COMMENTS = 200
MAX_PHOTO_BYTES = 8 * 1024 * 1024
MAX_PHOTOS = 6
# Duplicates GetTicket shows with a ticket, the first filed first (the ticket lists them all).
MAX_LINKED_SHOWN = 100


EARTH_RADIUS_M = 6_378_100  # as MongoDB's $centerSphere distances are reckoned here


def distance_m(a: Sequence[float], b: Sequence[float]) -> float:
    """Great-circle distance between two [longitude, latitude] points."""
    (lon1, lat1), (lon2, lat2) = (map(math.radians, a), map(math.radians, b))
    h = math.sin((lat2 - lat1) / 2) ** 2
    h += math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def first_open_nearby(
    ticket: Mapping[str, Any],
    candidates: Iterable[Mapping[str, Any]],
    *,
    area: str,
    meters: float,
    window: timedelta,
) -> Mapping[str, Any] | None:
    """The ticket `ticket` duplicates: the first-filed open, unlinked ticket of its category
    within `meters` of it, filed in `area` (the unit it goes to: a duplicate never crosses into
    another unit's) before it, but no longer than `window` before. Only an earlier one: tickets
    filed together link to the first of them, whatever order they are routed in."""
    filed = (ticket["submitted_at"], ticket["_id"])
    since = ticket["submitted_at"] - window
    here = ticket["location"]["coordinates"]
    matches = [
        other
        for other in candidates
        if (other["submitted_at"], other["_id"]) < filed
        and other["category"] == ticket["category"]
        and other["status"] in OPEN
        and other.get("duplicate_of") is None
        and other["submitted_at"] >= since
        and (other["origin_unit_id"] + ".").startswith(area + ".")
        and other.get("location")
        and distance_m(here, other["location"]["coordinates"]) <= meters
    ]
    return min(matches, key=lambda other: (other["submitted_at"], other["_id"]), default=None)


def unit_at_level(group_id: str, level: Level) -> str:
    """The unit at `level` above a residential group: "dn.hc.hc1.t17" at WARD is "dn.hc.hc1"."""
    parts = group_id.split(".")
    return ".".join(parts[: len(parts) - (int(level) - 1)])


def level_of(unit_id: str) -> Level:
    return Level(5 - len(unit_id.split(".")))


# ---- routing rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Sla:
    acknowledge_within: timedelta
    resolve_within: timedelta


@dataclass(frozen=True)
class Rule:
    category: str
    title: str
    level: Level
    department: str
    slas: dict[Level, Sla] = field(default_factory=dict)

    def sla_at(self, level: Level) -> Sla:
        return self.slas.get(level) or next(iter(self.slas.values()))


SPELLING = {
    CATEGORY: "use 2-40 lower-case letters, digits, '-'",
    DEPARTMENT: "use lower-case letters, digits, '-'",
}


def check_name(field_name: str, value: str, pattern: re.Pattern[str]) -> None:
    """A category or department spelt as one can be (CATEGORY or DEPARTMENT): in a rule, and in
    a queue's filter, where a misspelt one would match nothing and read as an empty queue."""
    if not pattern.fullmatch(value):
        raise InvalidArgument(field_name, SPELLING[pattern])


def check_rules(rules: list[Rule], reopen_within: timedelta | None) -> None:
    """Rules an admin sets, and the reopen period if they set one (None keeps the current)."""
    if not rules:
        raise InvalidArgument("rules", "name at least one category")
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        where = f"rules[{index}]"
        check_name(f"{where}.category", rule.category, CATEGORY)
        if rule.category in seen:
            raise InvalidArgument(f"{where}.category", f"{rule.category} appears twice")
        seen.add(rule.category)
        if rule.department:
            check_name(f"{where}.department", rule.department, DEPARTMENT)
        if not rule.slas:
            raise InvalidArgument(f"{where}.slas", "name at least one deadline")
        # In the order given (a level appears once), so each is named by its place.
        for position, sla in enumerate(rule.slas.values()):
            deadline = f"{where}.slas[{position}]"
            if sla.acknowledge_within <= timedelta(0):
                raise InvalidArgument(f"{deadline}.acknowledge_within", "must be positive")
            if sla.resolve_within <= timedelta(0):
                raise InvalidArgument(f"{deadline}.resolve_within", "must be positive")
            if sla.resolve_within < sla.acknowledge_within:
                raise InvalidArgument(f"{deadline}.resolve_within", "is before acknowledge_within")
    if reopen_within is not None and reopen_within <= timedelta(0):
        raise InvalidArgument("reopen_within", "must be positive")


def _sla(ack_hours: float, resolve_days: float) -> dict[Level, Sla]:
    sla = Sla(timedelta(hours=ack_hours), timedelta(days=resolve_days))
    return dict.fromkeys(Level, sla)


# The pilots' categories; a city admin replaces them at runtime (SetRoutingRules).
DEFAULT_RULES = [
    Rule("sanitation", "Vệ sinh môi trường", Level.GROUP, "", _sla(24, 3)),
    Rule("groceries-for-quarantine", "Mua hàng cho hộ cách ly", Level.GROUP, "", _sla(4, 1)),
    Rule("street-light", "Đèn đường hỏng", Level.WARD, "urban-order", _sla(24, 5)),
    Rule("flooding", "Ngập úng", Level.WARD, "urban-order", _sla(12, 3)),
    Rule("illegal-construction", "Xây dựng trái phép", Level.WARD, "urban-order", _sla(24, 10)),
    Rule("noise", "Tiếng ồn, mất trật tự", Level.WARD, "ward-police", _sla(12, 3)),
    Rule("citizen-id-at-home", "Làm căn cước tại nhà", Level.WARD, "ward-police", _sla(48, 14)),
    Rule("civil-procedure", "Hỗ trợ thủ tục hộ tịch", Level.WARD, "justice", _sla(24, 7)),
    Rule("health", "Y tế", Level.WARD, "health-station", _sla(12, 3)),
]
DEFAULT_REOPEN_WITHIN = timedelta(days=7)
# The longest deadline or reopening period a rule may set: a year is more than any SLA needs, and
# a deadline must stay a date that can be computed.
LONGEST_DEADLINE = timedelta(days=366)


# ---- the lifecycle --------------------------------------------------------------------------

TRANSITIONS: dict[str, tuple[Status, ...]] = {
    "route": (Status.SUBMITTED,),
    "acknowledge": (Status.ROUTED,),
    "start": (Status.ACKNOWLEDGED,),
    "resolve": (Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
    "reject": (Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
    "escalate": (Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
    "reopen": (Status.RESOLVED, Status.REJECTED),
    "close": (Status.RESOLVED, Status.REJECTED),
    "withdraw": (Status.SUBMITTED, Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
    "rate": (Status.RESOLVED, Status.CLOSED),
    "support": (Status.SUBMITTED, Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
    "attach": (Status.SUBMITTED, Status.ROUTED, Status.ACKNOWLEDGED, Status.IN_PROGRESS),
}


# The city's clock: a moment told to an official is told as they read their own.
LOCAL_TIME = ZoneInfo("Asia/Ho_Chi_Minh")


def local_time(moment: datetime) -> str:
    """A moment as an official in the city reads it (UTC+7): late in the evening UTC is
    already the next day there."""
    return f"{moment.astimezone(LOCAL_TIME):%Y-%m-%d %H:%M} (Asia/Ho_Chi_Minh time)"


def check_transition(action: str, status: Status) -> None:
    if status not in TRANSITIONS[action]:
        raise FailedPrecondition(f"cannot {action} a ticket that is {status.name.lower()}")


def attached_already(photo_keys: Sequence[str], key: str) -> bool:
    """Whether the photo kept at `key` is one of the ticket's already; if not, whether there is
    room for it."""
    if key in photo_keys:
        return True
    require_room_for_photo(photo_keys)
    return False


def require_room_for_photo(photo_keys: Sequence[str]) -> None:
    if len(photo_keys) >= MAX_PHOTOS:
        raise FailedPrecondition(f"a ticket holds at most {MAX_PHOTOS} photos")


@dataclass(frozen=True)
class Deadlines:
    acknowledge_by: datetime | None
    resolve_by: datetime


def deadlines(rule: Rule, level: Level, since: datetime, acknowledged: bool) -> Deadlines:
    """Deadlines at a level, counted from when the ticket reached it."""
    sla = rule.sla_at(level)
    return Deadlines(
        acknowledge_by=None if acknowledged else since + sla.acknowledge_within,
        resolve_by=since + sla.resolve_within,
    )


def next_deadline(
    status: Status, acknowledge_by: datetime | None, resolve_by: datetime
) -> datetime:
    if status is Status.ROUTED and acknowledge_by is not None:
        return min(acknowledge_by, resolve_by)
    return resolve_by


def missed(deadline: datetime | None, now: datetime) -> bool:
    """A deadline is missed once it has passed; at its very moment there is still time. The
    overdue flag and the sweep count so, as do the store's queries (`$lt`)."""
    return deadline is not None and deadline < now


def escalation_target(assigned_unit_id: str) -> str | None:
    """One level up; the city has nobody above it."""
    if level_of(assigned_unit_id) is Level.CITY:
        return None
    return assigned_unit_id.rsplit(".", 1)[0]


# ---- who may do what --------------------------------------------------------------------------


# Who sees the tickets of a unit in their scope (residents see their own only).
SEES_TICKETS_IN_SCOPE = OFFICIALS | {Role.AUDITOR, Role.INTEGRATOR}
MAX_NEARBY_RADIUS_M = 5_000
DEFAULT_NEARBY, MAX_NEARBY = 20, 100


@dataclass(frozen=True)
class Submitter:
    """Who filed a ticket (`subject`, in `role`) and for which household, if any."""

    subject: str
    role: str
    household_id: str

    def includes(self, caller: Principal) -> bool:
        """Whether the caller has the submitter's say over the ticket: sees it, comments on it,
        rates, reopens and closes it at any time. A ticket an official filed on a household's
        behalf is that household's: its residents have that say, and the official what
        officials of the unit have (closing at once would take the household's right to
        reopen away)."""
        if self.role in OFFICIALS and self.household_id:
            return caller.role is Role.RESIDENT and caller.household_id == self.household_id
        return caller.subject == self.subject


def may_see(
    caller: Principal, origin_unit_id: str, assigned_unit_id: str, submitter: Submitter
) -> None:
    """Submitters see their own tickets; officials, integrators and auditors those in scope."""
    if submitter.includes(caller):
        return
    if caller.role is Role.RESIDENT:
        raise PermissionDenied("residents see only their own tickets")
    if caller.role not in SEES_TICKETS_IN_SCOPE:
        raise PermissionDenied(f"role {caller.role.value} does not see tickets")
    if not (caller.covers(origin_unit_id) or caller.covers(assigned_unit_id)):
        raise PermissionDenied("the ticket is outside your scope")


def may_handle(caller: Principal, assigned_unit_id: str) -> None:
    """The officials of the unit the ticket is assigned to, or of any unit above it."""
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not handle tickets")
    if not caller.covers(assigned_unit_id):
        raise PermissionDenied(f"the ticket is assigned to {assigned_unit_id}, outside your scope")


def may_list_nearby(caller: Principal) -> None:
    """Residents, to "+1" a ticket of their group; and whoever sees the tickets in a scope."""
    if caller.role is not Role.RESIDENT and caller.role not in SEES_TICKETS_IN_SCOPE:
        raise PermissionDenied(f"role {caller.role.value} does not see tickets")


def nearby_radius(radius_m: int, default_m: float) -> float:
    if radius_m == 0:
        return default_m
    if not 1 <= radius_m <= MAX_NEARBY_RADIUS_M:
        raise InvalidArgument("radius_m", f"must be between 1 and {MAX_NEARBY_RADIUS_M:,} metres")
    return float(radius_m)


def nearby_limit(limit: int) -> int:
    if limit == 0:
        return DEFAULT_NEARBY
    if not 1 <= limit <= MAX_NEARBY:
        raise InvalidArgument("limit", f"must be between 1 and {MAX_NEARBY}")
    return limit


def may_support(caller: Principal, origin_unit_id: str, submitter: Submitter) -> None:
    """Residents of the ticket's group "+1" it; not its submitter, whom it counts already."""
    if caller.role is not Role.RESIDENT or not caller.covers(origin_unit_id):
        raise PermissionDenied("residents of the ticket's group may support it")
    if submitter.includes(caller):
        raise PermissionDenied("you filed this ticket: it counts you already")


def may_file(caller: Principal) -> None:
    """Residents and officials file tickets; no other role does."""
    if caller.role is not Role.RESIDENT and not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not file tickets")


def may_submit_for(caller: Principal, unit_id: str) -> None:
    may_file(caller)
    if caller.role is not Role.RESIDENT:
        caller.require_unit(unit_id)


def submitter_ref(key: bytes, subject: str) -> str:
    """A pseudonym for integrators: stable per submitter, says nothing about who it is."""
    return hmac.new(key, subject.encode(), hashlib.sha256).hexdigest()[:24]


def check_statuses(field_name: str, values: Iterable[int]) -> None:
    """Statuses to filter by, each one a ticket may have: an unknown one (0 among them) would
    match nothing and read as an empty queue."""
    known = {int(status) for status in Status}
    for i, value in enumerate(values):
        if value not in known:
            raise InvalidArgument(f"{field_name}[{i}]", f"{value} is not a ticket status")


def check_room_for_comment(ticket: Mapping[str, Any], instead: str = "") -> None:
    """A ticket keeps at most MAX_COMMENTS comments; `instead` says what to do then."""
    if len(ticket.get("comments", [])) >= MAX_COMMENTS:
        advice = f": {instead}" if instead else ""
        raise FailedPrecondition(
            f"ticket {ticket['_id']} has {MAX_COMMENTS} comments, the most it keeps{advice}"
        )


def check_title(field_name: str, title: str) -> str:
    """A category's title: plain text on one line."""
    return plain_text(field_name, title, MAX_TITLE, one_line=True)


def check_text(field_name: str, text: str, limit: int) -> str:
    return plain_text(field_name, text, limit)
