"""Pure rules of the population register: no I/O here."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from collections.abc import Container, Iterable, Mapping
from datetime import date, datetime, time, timedelta
from enum import IntEnum
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.auth import Principal, Role
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.wire import VIETNAM

# Vital events are dated by the calendar day in Vietnam; callers use domain.local_date.
from services.common.wire import local_date as local_date


class UnitKind(IntEnum):
    # Values match civic.registry.v1.UnitKind.
    CITY = 1
    DISTRICT = 2
    WARD = 3
    GROUP = 4


UNIT_CODE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
MAX_NAME_LENGTH = 120
VERIFICATION_INTERVAL_DAYS = 183  # six months
VIRTUAL_RESIDENT_DAYS = 365
OLDEST_BIRTH = date(1890, 1, 1)
# A ListLikelyDuplicatePersons without a page (as callers ask from before paging) answers every
# group, up to this many: as many as it answered then, refused rather than cut short beyond.
MAX_UNPAGED_DUPLICATES = 1000

# Province codes that open a citizen ID (the 63 provinces and cities before the 2025 merger,
# whose codes stay valid on every card already issued).
PROVINCE_CODES = frozenset(
    [
        "001",
        "002",
        "004",
        "006",
        "008",
        "010",
        "011",
        "012",
        "014",
        "015",
        "017",
        "019",
        "020",
        "022",
        "024",
        "025",
        "026",
        "027",
        "030",
        "031",
        "033",
        "034",
        "035",
        "036",
        "037",
        "038",
        "040",
        "042",
        "044",
        "045",
        "046",
        "048",
        "049",
        "051",
        "052",
        "054",
        "056",
        "058",
        "060",
        "062",
        "064",
        "066",
        "067",
        "068",
        "070",
        "072",
        "074",
        "075",
        "077",
        "079",
        "080",
        "082",
        "083",
        "084",
        "086",
        "087",
        "089",
        "091",
        "092",
        "093",
        "094",
        "095",
        "096",
    ]
)


# ---- administrative units ------------------------------------------------------------------


def child_unit_id(parent_id: str, code: str) -> str:
    if not UNIT_CODE.match(code):
        raise InvalidArgument("code", "use 1-32 lower-case letters, digits or '-'")
    return f"{parent_id}.{code}" if parent_id else code


def check_child_kind(parent_kind: UnitKind | None, kind: UnitKind) -> None:
    if parent_kind == UnitKind.GROUP:
        raise InvalidArgument("parent_id", "a residential group has no child units")
    expected = UnitKind.CITY if parent_kind is None else UnitKind(parent_kind + 1)
    if kind != expected:
        raise InvalidArgument("kind", f"must be {expected.name.lower()} under this parent")


def may_manage_units(caller: Principal, parent_or_unit_id: str) -> None:
    """Ward officers and above shape the tree below their own unit."""
    caller.require_role(Role.WARD_OFFICER, Role.DISTRICT_OFFICER, Role.CITY_ADMIN)
    caller.require_unit(parent_or_unit_id)


# ---- names ------------------------------------------------------------------------------------


def fields_to_update(named: Iterable[str], known: Container[str]) -> list[str]:
    """The fields an update names, each once in the order named: at least one, all known."""
    fields = list(dict.fromkeys(named))
    if not fields:
        raise InvalidArgument("update_fields", "name at least one field to change")
    unknown = [field for field in fields if field not in known]
    if unknown:
        raise InvalidArgument("update_fields", f"unknown field {unknown[0]!r}")
    return fields


def normalize_name(field: str, value: str) -> str:
    """NFC, single spaces, no control characters; Vietnamese letters kept as written."""
    name = " ".join(unicodedata.normalize("NFC", value).split())
    if not name:
        raise InvalidArgument(field, "must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"is longer than {MAX_NAME_LENGTH} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidArgument(field, "contains control characters")
    return name


# Besides letters and spaces, what a person's name may hold: ethnic minority names such as
# "H'Hen Niê" or "Y-Ngông" are written with an apostrophe or a hyphen.
NAME_MARKS = frozenset("'’-.")


def person_name(field: str, value: str) -> str:
    """A person's full name as `normalize_name` keeps it, made of letters: a digit or a sign in
    it is a slip (a phone number or a date in the name column of an import file, say)."""
    name = normalize_name(field, value)
    odd = sorted(
        {ch for ch in name if not (ch == " " or ch in NAME_MARKS or _is_letter_or_mark(ch))}
    )
    if odd:
        raise InvalidArgument(field, f"holds {''.join(odd)!r}: a name is written in letters")
    if not any(unicodedata.category(ch).startswith("L") for ch in name):
        raise InvalidArgument(field, "has no letters")
    return name


def _is_letter_or_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LM"


# Letters with no decomposition to strip: Đ and đ, and Ð and ð (eth), which look the same and
# are often typed for them. And the apostrophe of names such as "H'Hen Niê" as a keyboard types
# it, for the curly one a phone puts in its place and the modifier letter that looks the same.
FOLDED_LOOK_ALIKES = str.maketrans("ĐđÐð’ʼ", "DdDd''")


def fold(text: str) -> str:
    """Lower case without diacritics, so "Nguyen Thi Be" matches "Nguyễn Thị Bê"."""
    decomposed = unicodedata.normalize("NFD", text.translate(FOLDED_LOOK_ALIKES))
    stripped = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    return " ".join(stripped.lower().split())


# ---- contact ----------------------------------------------------------------------------------

# Digits with the separators people write them with ("0905 123 456", "+84 (236) 3.821.234").
PHONE = re.compile(r"\+?[0-9 .()-]+")
PHONE_DIGITS = range(8, 16)  # a landline without its area code at least; E.164 at most
EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")
MAX_EMAIL_LENGTH = 254  # what a mail server takes


def check_contact(field: str, phone: str, email: str) -> tuple[str, str]:
    """Both optional; when given, a number one can call and an address one can write to, as
    the person stated them (surrounding spaces dropped)."""
    phone, email = phone.strip(), email.strip()
    if phone and not (PHONE.fullmatch(phone) and sum(ch.isdigit() for ch in phone) in PHONE_DIGITS):
        raise InvalidArgument(f"{field}.phone", "must be a phone number of 8 to 15 digits")
    if email and (len(email) > MAX_EMAIL_LENGTH or not EMAIL.fullmatch(email)):
        raise InvalidArgument(f"{field}.email", "must be an email address (name@domain)")
    return phone, email


# ---- dates ------------------------------------------------------------------------------------


def parse_date(field: str, value: str, *, required: bool = True) -> date | None:
    if not value:
        if required:
            raise InvalidArgument(field, "is required (YYYY-MM-DD)")
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(field, f"{value!r} is not a date (YYYY-MM-DD)") from None


def check_birth_date(field: str, value: str, today: date) -> date:
    born = parse_date(field, value)
    assert born is not None
    if born > today:
        raise InvalidArgument(field, "is in the future")
    if born < OLDEST_BIRTH:
        raise InvalidArgument(field, "is implausibly early")
    return born


def age_on(born: date, day: date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


MAX_AGE = 150  # years, in searches by age
MAX_DAYS_BACK = 36_500  # how far back "not verified / not active for N days" may look


def birth_dates_for_ages(min_age: int, max_age: int | None, as_of: date) -> tuple[str | None, str]:
    """Birth-date bounds (inclusive, ISO) of people aged min_age..max_age on as_of; no
    max_age is no upper bound, and max_age 0 is the infants not yet a year old. Someone born
    after as_of has no age on it: an as_of in the past never finds them."""
    for name, age in (("min_age", min_age), ("max_age", max_age or 0)):
        if not 0 <= age <= MAX_AGE:
            raise InvalidArgument(name, f"must be between 0 and {MAX_AGE}")
    if max_age is not None and min_age > max_age:
        raise InvalidArgument("min_age", "is greater than max_age")
    latest = _years_before(as_of, min_age).isoformat()
    earliest = (
        (_years_before(as_of, max_age + 1) + timedelta(days=1)).isoformat()
        if max_age is not None
        else None
    )
    return earliest, latest


def _years_before(day: date, years: int) -> date:
    if day.year - years < 1:
        raise InvalidArgument("as_of", f"is too early to count {years} years back")
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


# ---- citizen IDs ------------------------------------------------------------------------------


def check_citizen_id(value: str, born: date | None, sex: int) -> str:
    """Twelve digits: province, century-and-sex digit, birth year's last two digits, serial."""
    cid = value.strip()
    if not re.fullmatch(r"[0-9]{12}", cid):  # \d would take other scripts' digits too
        raise InvalidArgument("citizen_id", "must be exactly 12 digits")
    if cid[:3] not in PROVINCE_CODES:
        raise InvalidArgument("citizen_id", f"{cid[:3]} is not a province code")
    century_sex = int(cid[3])
    if century_sex > 9:
        raise InvalidArgument("citizen_id", "has an invalid century digit")
    if born is not None:
        century = 1900 + 100 * (century_sex // 2)
        if born.year != century + int(cid[4:6]):
            raise InvalidArgument("citizen_id", "does not match the birth year")
        if sex in (1, 2) and century_sex % 2 != sex - 1:
            raise InvalidArgument("citizen_id", "does not match the sex")
    return cid


def mask_citizen_id(cid: str) -> str:
    return cid[:3] + "*" * (len(cid) - 6) + cid[-3:] if cid else ""


class CitizenIdVault:
    """Citizen IDs at rest: a keyed hash to look them up and refuse duplicates, and AES-GCM
    ciphertext to show them in full to those allowed. The database never holds them in clear."""

    def __init__(self, data_key: str) -> None:
        if len(data_key) < 32:
            raise ValueError("CIVIC_DATA_KEY must be at least 32 characters")
        material = hashlib.sha256(data_key.encode()).digest()
        self._lookup_key = hashlib.sha256(b"lookup" + material).digest()
        self._cipher = AESGCM(hashlib.sha256(b"seal" + material).digest())

    def lookup_hash(self, cid: str) -> str:
        return hmac.new(self._lookup_key, cid.encode(), hashlib.sha256).hexdigest()

    def seal(self, cid: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._cipher.encrypt(nonce, cid.encode(), b"citizen_id")

    def open(self, sealed: bytes) -> str:
        return self._cipher.decrypt(sealed[:12], sealed[12:], b"citizen_id").decode()


def may_see_citizen_id(caller: Principal, household_id: str) -> bool:
    """Ward officers and above (who certify civil status) see IDs in full, and a household its
    own; group leaders and everyone else see them masked."""
    if caller.role in (Role.WARD_OFFICER, Role.DISTRICT_OFFICER, Role.CITY_ADMIN):
        return True
    return caller.role is Role.RESIDENT and caller.household_id == household_id


# ---- who may read and change what ---------------------------------------------------------


def may_read_household(caller: Principal, unit_id: str, household_id: str, record: str) -> None:
    """A household's data, or a person's (`record` names which): its own residents, and the
    officials whose scope it lies in. To anyone else in a role that may read personal data, it
    is not found, as if it did not exist: an id guessed tells nothing."""
    if caller.role is Role.RESIDENT:
        if caller.household_id != household_id:
            raise NotFound(f"{record} not found")
        return
    may_keep(caller, unit_id, record, "read personal data")


def may_keep(
    caller: Principal, unit_id: str, record: str, what: str = "change the register"
) -> None:
    """A person or household on the register (`record` names it) read or changed by an
    official: outside the official's scope it is not found. A role that may not do `what` at
    all is refused as such."""
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not {what}")
    if not caller.covers(unit_id):
        raise NotFound(f"{record} not found")


def may_read_people(caller: Principal, unit_id: str) -> None:
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not read personal data")
    caller.require_unit(unit_id)


def may_list_households(caller: Principal, unit_id: str) -> None:
    """Household summaries (head's name, size, exemptions) for levying dues: officials, and
    services acting for one (the ledger), within their scope."""
    if not (caller.is_official or caller.role is Role.SERVICE):
        raise PermissionDenied(f"role {caller.role.value} may not list households")
    caller.require_unit(unit_id)


def may_register(caller: Principal, unit_id: str) -> None:
    """Group leaders and the officials above them keep the register of their own units."""
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not change the register")
    caller.require_unit(unit_id)


def may_import(caller: Principal) -> None:
    """Onboarding a ward is the register's keepers' work: anyone else is refused the whole
    import, not told row by row that each group is outside their scope (which each row still
    is checked for)."""
    if not caller.is_official:
        raise PermissionDenied(f"role {caller.role.value} may not change the register")


def may_count(caller: Principal, unit_id: str) -> None:
    """Aggregate counts hold no personal data: officials, auditors and integrators in scope."""
    if caller.role is Role.RESIDENT:
        raise PermissionDenied("residents may not read unit statistics")
    caller.require_unit(unit_id)


# ---- data quality -----------------------------------------------------------------------------


def inactive_since(now: datetime, inactive_days: int) -> datetime:
    """Households neither verified nor active since this moment hold suspected virtual residents."""
    if not 0 <= inactive_days <= MAX_DAYS_BACK:
        raise InvalidArgument("inactive_days", f"must be between 0 and {MAX_DAYS_BACK}")
    return _days_before(now, inactive_days or VIRTUAL_RESIDENT_DAYS)


def verified_before(now: datetime, max_age_days: int) -> datetime:
    if not 0 <= max_age_days <= MAX_DAYS_BACK:
        raise InvalidArgument("max_age_days", f"must be between 0 and {MAX_DAYS_BACK}")
    return _days_before(now, max_age_days or VERIFICATION_INTERVAL_DAYS)


def _days_before(now: datetime, days: int) -> datetime:
    """The start, in Vietnam, of the calendar day `days` before today: a household verified or
    active on that day or later is not yet due. Whole days, so that a list of those due does not
    change through the day with the hour at which each was last seen."""
    return datetime.combine(local_date(now) - timedelta(days=days), time(), tzinfo=VIETNAM)


def check_housing(floor_area_m2: float, storeys: int, sub_households: int) -> None:
    if not 0 <= floor_area_m2 <= 100_000:  # NaN is refused too
        raise InvalidArgument("housing.floor_area_m2", "must be between 0 and 100000")
    if storeys < 0 or storeys > 100:
        raise InvalidArgument("housing.storeys", "must be between 0 and 100")
    if sub_households < 0 or sub_households > 50:
        raise InvalidArgument("housing.sub_households", "must be between 0 and 50")


def stay_has_ended(person: Mapping[str, Any], today: str) -> bool:
    """A guest whose temporary stay's last day is before `today` (ISO): on the register still,
    a suspect for the leader to act on, but no longer living here (the census's rule, as
    `store.living_here` asks MongoDB)."""
    return "" < (person.get("stay_end") or "") < today


def lives_here(person: Mapping[str, Any], today: str) -> bool:
    """A resident on the register who lives here on `today` (ISO): not a guest whose stay has
    ended, nor one whose stay is yet to begin (as `store.living_here` asks MongoDB)."""
    return not stay_has_ended(person, today) and (person.get("stay_start") or "") <= today


MAX_STAY_DAYS = 2 * 366  # a temporary stay is registered for two years at most
# A guest is registered ahead of arriving by weeks, not years: a start further off is a typo
# (2062 for 2026) that would keep them off the register's counts for decades.
MAX_DAYS_AHEAD = 366


def check_stay(start: date, end: date, today: date, born: date | None) -> None:
    """A stay registered is one the guest lives here for now or will: one that has ended would
    be on the register and at once a suspect whose stay expired, not living here."""
    if end < today:
        raise InvalidArgument("stay_end", "is in the past: the stay has ended")
    if end < start:
        raise InvalidArgument("stay_end", "is before stay_start")
    if born is not None and start < born:
        raise InvalidArgument("stay_start", "is before the birth date")
    if (start - today).days > MAX_DAYS_AHEAD:
        raise InvalidArgument("stay_start", "is more than a year ahead")
    if (end - start).days > MAX_STAY_DAYS:
        raise InvalidArgument("stay_end", "a temporary stay lasts at most two years")


def check_extension(start: date, end: date, today: date) -> None:
    """A stay renewed, its start kept as registered: a renewal is for two years at most too,
    and a guest who stays on is renewed as often as needed (as the Law on Residence allows), so
    its term counts from today, or from the stay's start if it has yet to begin."""
    check_stay(max(start, today), end, today, None)
