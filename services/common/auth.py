"""Bearer tokens: who the caller is, in which role, over which part of the administrative tree.

Unit ids are hierarchical ("dn.hc.hc1.g17": city, district, ward, group), so whether a unit lies
inside a caller's scope is a prefix test that needs no lookup, in any service.
"""

from __future__ import annotations

import functools
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum

import jwt

from services.common.errors import PermissionDenied, Unauthenticated

ALGORITHM = "HS256"
ISSUER = "civic"
# How far the clock of the host that minted a token may run ahead of this one's: a service's
# token is used the moment it is minted, and its issue time (whole seconds) would otherwise be
# "in the future" here for a host whose clock runs even a fraction of a second behind.
CLOCK_SKEW_SECONDS = 60


class Role(StrEnum):
    RESIDENT = "resident"
    GROUP_LEADER = "group_leader"
    WARD_OFFICER = "ward_officer"
    DISTRICT_OFFICER = "district_officer"
    CITY_ADMIN = "city_admin"
    AUDITOR = "auditor"
    INTEGRATOR = "integrator"
    # Keeps a unit's funds (thủ quỹ) beside its leader; sees no personal data elsewhere.
    TREASURER = "treasurer"
    # Services calling each other; scope is the whole city.
    SERVICE = "service"


OFFICIALS = frozenset(
    {Role.GROUP_LEADER, Role.WARD_OFFICER, Role.DISTRICT_OFFICER, Role.CITY_ADMIN}
)


def unit_within(unit_id: str, scope: str) -> bool:
    """True when unit_id is scope itself or lies below it in the tree."""
    return unit_id == scope or unit_id.startswith(scope + ".")


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role
    # The unit the caller acts for; a resident's is their group.
    scope: str
    # A resident's own household.
    household_id: str = ""
    # When the token ends (Unix time): a stream opened with it ends then too.
    expires_at: float = field(default=math.inf, compare=False)

    @property
    def is_official(self) -> bool:
        return self.role in OFFICIALS

    def covers(self, unit_id: str) -> bool:
        return unit_within(unit_id, self.scope)

    def require_unit(self, unit_id: str) -> None:
        if not self.covers(unit_id):
            raise PermissionDenied(f"unit {unit_id} is outside your scope {self.scope}")

    def require_unexpired(self) -> None:
        if self.expires_at <= time.time():
            raise Unauthenticated("token expired")

    def require_role(self, *roles: Role) -> None:
        if self.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise PermissionDenied(f"role {self.role.value} may not do this (needs: {allowed})")


def mint_token(
    secret: str,
    *,
    subject: str,
    role: Role,
    scope: str,
    household_id: str = "",
    ttl_seconds: int = 12 * 3600,
) -> str:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": subject,
        "role": role.value,
        "scope": scope,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if household_id:
        claims["hh"] = household_id
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


# A service's own calls to another are short: its token need not outlive them by much.
SERVICE_TOKEN_SECONDS = 300


def service_token(secret: str, service: str, scope: str) -> str:
    """The token one Civic service calls another with, scoped to the unit it asks about."""
    return mint_token(
        secret,
        subject=f"service:{service}",
        role=Role.SERVICE,
        scope=scope,
        ttl_seconds=SERVICE_TOKEN_SECONDS,
    )


def verify_token(secret: str, token: str) -> Principal:
    caller = _verified(secret, token)
    caller.require_unexpired()
    return caller


@functools.lru_cache(maxsize=4096)
def _verified(secret: str, token: str) -> Principal:
    """A token's signature is checked once; its expiry on every call (verify_token)."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            # Also lets through a token expired within it, which require_unexpired then refuses:
            # the leeway is for issue times only.
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["exp", "sub", "iss"]},
        )
        role = Role(claims["role"])
        scope = str(claims["scope"])
    except jwt.ExpiredSignatureError as exc:
        raise Unauthenticated("token expired") from exc
    except (jwt.InvalidTokenError, KeyError, ValueError) as exc:
        raise Unauthenticated("invalid token") from exc
    if not scope:
        raise Unauthenticated("token has no scope")
    household_id = str(claims.get("hh", ""))
    if role is Role.RESIDENT and not household_id:
        raise Unauthenticated("resident token names no household")
    return Principal(str(claims["sub"]), role, scope, household_id, float(claims["exp"]))


# The caller of the RPC being served; set by the authentication interceptor.
current_principal: ContextVar[Principal] = ContextVar("current_principal")
# Why an official reads personal data (x-civic-purpose metadata), for the access log.
current_purpose: ContextVar[str] = ContextVar("current_purpose", default="")


def principal() -> Principal:
    try:
        return current_principal.get()
    except LookupError:
        raise Unauthenticated("no credentials") from None
