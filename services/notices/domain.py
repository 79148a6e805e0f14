"""Pure rules of announcements: who may publish where, what a notice may say and carry, who it
reaches, and when it is live. No I/O here."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import IntEnum
from zoneinfo import ZoneInfo

from services.common.auth import Principal, Role, unit_within
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from services.common.media import DOCX, IMAGE_SIGNATURES
from services.common.text import plain_text


class Priority(IntEnum):
    # Values match civic.notices.v1.Priority.
    NORMAL = 1
    IMPORTANT = 2
    EMERGENCY = 3


class State(IntEnum):
    # Values match civic.notices.v1.NoticeState; EXPIRED is also derived from expires_at.
    SCHEDULED = 1
    PUBLISHED = 2
    EXPIRED = 3
    RETRACTED = 4


# Values of civic.registry.v1.Sex and ResidenceKind, the registry's vocabulary.
SEXES = frozenset({1, 2})
RESIDENCE_KINDS = frozenset({1, 2, 3})

MAX_TITLE = 200
MAX_BODY = 10_000
MAX_REASON = 1000
MAX_AGE = 150
MAX_ATTACHMENTS = 5
MAX_ATTACHMENT_BYTES = 20 * 1024 * 1024
MAX_FILE_NAME = 120
DEFAULT_RESEND_AFTER = timedelta(minutes=30)
MIN_RESEND_AFTER = timedelta(minutes=1)
MAX_RESEND_AFTER = timedelta(days=2)
# An unopened emergency is sent again at most this many times, resend_after apart.
MAX_RESENDS = 3
# How far ahead a notice may be scheduled, and the longest a notice may stay up.
MAX_SCHEDULE_AHEAD = timedelta(days=366)
# Ages are counted on the calendar of the residents.
LOCAL_TIME = ZoneInfo("Asia/Ho_Chi_Minh")

# How each accepted attachment type's bytes begin: the declared type must match the content.
ATTACHMENT_SIGNATURES: dict[str, re.Pattern[bytes]] = {
    "application/pdf": re.compile(rb"%PDF-"),
    DOCX: re.compile(rb"PK\x03\x04"),
    **IMAGE_SIGNATURES,
}
EXTENSIONS = {
    "application/pdf": "pdf",
    DOCX: "docx",
    "image/jpeg": "jpg",
    "image/png": "png",
    "image/webp": "webp",
}
UPLOAD_NAME = re.compile(r"[0-9a-f]{32}\.(?:pdf|docx|jpg|png|webp)")
PUBLISHERS = (Role.GROUP_LEADER, Role.WARD_OFFICER, Role.DISTRICT_OFFICER, Role.CITY_ADMIN)


# ---- who may do what ---------------------------------------------------------------------------


def may_publish(caller: Principal, unit_id: str) -> None:
    """Officials publish to their own unit or any unit below it: never above or beside it."""
    caller.require_role(*PUBLISHERS)
    caller.require_unit(unit_id)


def may_manage(caller: Principal, notice_publisher_unit: str) -> None:
    """Revising and retracting: officials whose scope covers the publisher's unit."""
    caller.require_role(*PUBLISHERS)
    if not caller.covers(notice_publisher_unit):
        raise PermissionDenied(
            f"notice was published by {notice_publisher_unit}, outside your scope {caller.scope}"
        )


def may_see_as_official(
    caller: Principal, notice_unit: str, merged_into: Sequence[str] = ()
) -> bool:
    """Officials, auditors and integrators see notices that reach into their scope: to a unit
    above, at or below it, or to one whose groups merged away went into a group of it
    (`merged_into`), whose households, its residents now, keep the notice. Seeing is not
    managing (`may_manage`)."""
    if caller.role is Role.RESIDENT:
        return False
    return any(_overlap(unit, caller.scope) for unit in (notice_unit, *merged_into))


def reach_area(
    caller: Principal, notice_unit: str, requested: str, merged_into: Sequence[str] = ()
) -> str:
    """The unit whose reach a caller may count: inside both the caller's scope and the notice's
    unit, or where the households of its groups merged away are now (`merged_into`). A group
    leader counts their own group of a city-wide notice, or of a notice to a group merged into
    theirs."""
    if caller.role in (Role.RESIDENT, Role.INTEGRATOR):
        raise PermissionDenied(f"role {caller.role.value} may not read reach")
    if not requested:
        requested = notice_unit if caller.covers(notice_unit) else caller.scope
    caller.require_unit(requested)
    if unit_within(requested, notice_unit):
        return requested
    if unit_within(notice_unit, requested):
        return notice_unit
    if any(_overlap(requested, unit) for unit in merged_into):
        return requested
    raise InvalidArgument("unit_id", f"{requested} is outside the notice's unit {notice_unit}")


def _overlap(unit_id: str, other: str) -> bool:
    """One of the two units holds the other."""
    return unit_within(unit_id, other) or unit_within(other, unit_id)


# ---- what a notice says -----------------------------------------------------------------------


def check_title(title: str) -> str:
    return plain_text("title", title, MAX_TITLE, one_line=True)


def check_body(body: str) -> str:
    return plain_text("body", body, MAX_BODY)


def batch_of(after: dict[str, str] | None) -> str:
    """The key of the first-delivery batch that starts after `after` (its marker), which
    records written before pending marks name (`NoticeStore.ensure_indexes`)."""
    return f"{after['unit']}|{after['household']}" if after else ""


def check_reason(name: str, reason: str) -> str:
    return plain_text(name, reason, MAX_REASON)


def check_file_name(name: str, file_name: str) -> str:
    cleaned = plain_text(name, file_name, MAX_FILE_NAME, one_line=True)
    if "/" in cleaned or "\\" in cleaned:
        raise InvalidArgument(name, "must not contain a path")
    return cleaned


def upload_folder(scope: str) -> str:
    """Uploads are filed under the uploader's unit; only that unit's officials attach them."""
    return f"notices/{scope}/"


def check_upload_key(name: str, scope: str, key: str) -> None:
    folder = upload_folder(scope)
    if not (key.startswith(folder) and UPLOAD_NAME.fullmatch(key.removeprefix(folder))):
        raise InvalidArgument(name, "was not issued to your unit by CreateAttachmentUpload")


def check_priority(value: int) -> Priority:
    if value not in {int(p) for p in Priority}:
        raise InvalidArgument("priority", "must be NORMAL, IMPORTANT or EMERGENCY")
    return Priority(value)


@dataclass(frozen=True)
class Timing:
    publish_at: datetime | None
    expires_at: datetime | None
    resend_after: timedelta | None


def check_timing(
    now: datetime,
    publish_at: datetime | None,
    expires_at: datetime | None,
    priority: Priority,
    resend_after: timedelta | None,
) -> Timing:
    if publish_at is not None and publish_at <= now:
        publish_at = None  # "at" a moment already passed: now
    if publish_at is not None and publish_at > now + MAX_SCHEDULE_AHEAD:
        raise InvalidArgument("publish_at", "is more than a year ahead")
    starts = publish_at or now
    if expires_at is not None and expires_at <= starts:
        raise InvalidArgument("expires_at", "must be after the notice is published")
    if expires_at is not None and expires_at > starts + MAX_SCHEDULE_AHEAD:
        raise InvalidArgument("expires_at", "is more than a year after the notice is published")
    if priority is Priority.EMERGENCY:
        resend_after = DEFAULT_RESEND_AFTER if resend_after is None else resend_after
        if not MIN_RESEND_AFTER <= resend_after <= MAX_RESEND_AFTER:
            raise InvalidArgument("resend_after", "must be between 1 minute and 2 days")
    elif resend_after is not None:
        raise InvalidArgument("resend_after", "is for emergency notices only")
    return Timing(publish_at, expires_at, resend_after)


# ---- the audience -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Audience:
    """Households with a resident member matching the member bounds (when any is set), of the
    given residence kinds (when any is given)."""

    min_age: int = 0
    max_age: int | None = None  # None: no upper bound; 0: not yet a year old
    sex: int = 0
    residence_kinds: tuple[int, ...] = field(default=())

    @property
    def filters_members(self) -> bool:
        return bool(self.min_age or self.max_age is not None or self.sex)

    @property
    def everyone(self) -> bool:
        return not (self.filters_members or self.residence_kinds)


def check_audience(
    min_age: int, max_age: int | None, sex: int, residence_kinds: list[int], member_set: bool
) -> Audience:
    for name, age in (("min_age", min_age), ("max_age", max_age or 0)):
        if not 0 <= age <= MAX_AGE:
            raise InvalidArgument(f"audience.member.{name}", f"must be between 0 and {MAX_AGE}")
    if max_age is not None and min_age > max_age:
        raise InvalidArgument("audience.member.max_age", "must not be below min_age")
    if sex and sex not in SEXES:
        raise InvalidArgument("audience.member.sex", "must be SEX_MALE or SEX_FEMALE")
    if member_set and not (min_age or max_age is not None or sex):
        raise InvalidArgument("audience.member", "set an age bound or a sex, or leave it out")
    for i, kind in enumerate(residence_kinds):
        if kind not in RESIDENCE_KINDS:
            raise InvalidArgument(f"audience.residence_kinds[{i}]", "is not a residence kind")
    return Audience(min_age, max_age, sex, tuple(sorted(set(residence_kinds))))


def local_day(moment: datetime) -> date:
    return moment.astimezone(LOCAL_TIME).date()


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a year without it
        return day.replace(year=day.year - years, day=28)


def birth_date_bounds(audience: Audience, on: date) -> tuple[str | None, str | None]:
    """Birth dates (ISO strings, which sort as dates) of people aged min..max on `on`: born on
    or before the first bound and after the second."""
    born_by = _years_before(on, audience.min_age).isoformat() if audience.min_age else None
    born_after = (
        _years_before(on, audience.max_age + 1).isoformat()
        if audience.max_age is not None
        else None
    )
    return born_by, born_after


def birthdays_between(
    audiences: Iterable[Audience], after: date, on: date
) -> list[tuple[str, str]]:
    """Birth dates (after, up to], as ISO strings, of the people whose birthday on a day after
    `after`, up to `on`, took them across an age bound of one of the audiences: into it at
    min_age, out of it past max_age."""
    years = {a.min_age for a in audiences if a.min_age}
    years |= {a.max_age + 1 for a in audiences if a.max_age is not None}
    return [
        (_years_before(after, n).isoformat(), _years_before(on, n).isoformat())
        for n in sorted(years)
    ]


# ---- when a notice is live --------------------------------------------------------------------


def state_at(state: State, expires_at: datetime | None, now: datetime) -> State:
    """A notice past its expiry has expired, published or (its time to go out missed, the
    service down then) still waiting to be."""
    if state in (State.SCHEDULED, State.PUBLISHED) and expires_at is not None and expires_at <= now:
        return State.EXPIRED
    return state


def require_live(state: State, what: str) -> None:
    if state is State.RETRACTED:
        raise FailedPrecondition(f"the notice was retracted; it cannot be {what}")
    if state is State.EXPIRED:
        raise FailedPrecondition(f"the notice has expired; it cannot be {what}")


def require_retractable(state: State, what: str) -> None:
    """An expired notice may still be retracted: residents can list expired notices, and a
    notice sent in error (a list of poor households attached, say) must not stay readable."""
    if state is not State.EXPIRED:
        require_live(state, what)


def require_open_to_reads(state: State) -> None:
    """A retracted notice takes no new read receipt: its reach stays as it stood when it was
    retracted. A household that opened it before is answered as before, nothing recorded."""
    if state is State.RETRACTED:
        raise FailedPrecondition("the notice was retracted; it takes no more read receipts")


def ancestors(unit_id: str) -> list[str]:
    """The unit and every unit above it: "dn.hc.hc1" -> ["dn", "dn.hc", "dn.hc.hc1"]."""
    parts = unit_id.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def delivery_id(notice_id: str, household_id: str) -> str:
    """One delivery record per notice and household, whoever writes it first."""
    return f"{notice_id}:{household_id}"
