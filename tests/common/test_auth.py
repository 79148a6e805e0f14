"""Tokens and scope in the administrative tree."""

from __future__ import annotations

import time

import jwt
import pytest

from services.common.auth import (
    ALGORITHM,
    Principal,
    Role,
    mint_token,
    unit_within,
    verify_token,
)
from services.common.config import Settings, SettingsError
from services.common.errors import PermissionDenied, Unauthenticated

SECRET = "s" * 40


def test_scope_is_a_subtree_not_a_string_prefix() -> None:
    assert unit_within("dn.hc.hc1.t17", "dn.hc")
    assert unit_within("dn.hc", "dn.hc")
    assert not unit_within("dn.hc2.x", "dn.hc")  # a sibling whose code starts the same
    assert not unit_within("dn", "dn.hc")
    with pytest.raises(PermissionDenied):
        Principal("u", Role.GROUP_LEADER, "dn.hc.hc1.t17").require_unit("dn.hc.hc1.t18")


def test_token_round_trip() -> None:
    token = mint_token(SECRET, subject="leader-17", role=Role.GROUP_LEADER, scope="dn.hc.hc1.t17")
    assert verify_token(SECRET, token) == Principal("leader-17", Role.GROUP_LEADER, "dn.hc.hc1.t17")


def test_bad_tokens_are_refused() -> None:
    expired = mint_token(SECRET, subject="a", role=Role.CITY_ADMIN, scope="dn", ttl_seconds=-10)
    forged = mint_token("f" * 40, subject="a", role=Role.CITY_ADMIN, scope="dn")
    no_household = mint_token(SECRET, subject="r", role=Role.RESIDENT, scope="dn.hc.hc1.t17")
    for token in (expired, forged, no_household, "not.a.token"):
        with pytest.raises(Unauthenticated):
            verify_token(SECRET, token)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "registry"])
@pytest.mark.parametrize("variable", ["CIVIC_AUTH_SECRET", "CIVIC_DATA_KEY"])
def test_a_service_reachable_from_elsewhere_refuses_the_public_development_keys(
    monkeypatch: pytest.MonkeyPatch, host: str, variable: str
) -> None:
    """With the published signing key anyone mints a city admin's token: a service listening
    beyond this machine refuses to start on it, naming the variable to set."""
    for name in ("CIVIC_AUTH_SECRET", "CIVIC_DATA_KEY"):
        monkeypatch.setenv(name, "k" * 40)
    monkeypatch.delenv(variable)
    monkeypatch.setenv("CIVIC_GRPC_HOST", host)
    with pytest.raises(SettingsError, match=f"^{variable}: the development key is public"):
        Settings()
    # On this machine alone, as `make run` and the tests listen, it is good enough.
    for loopback in ("127.0.0.1", "localhost", "::1"):
        monkeypatch.setenv("CIVIC_GRPC_HOST", loopback)
        assert Settings().grpc_host == loopback


def issued(*, ahead_seconds: int, ttl_seconds: int = 300) -> str:
    """A token as a host whose clock runs `ahead_seconds` ahead of this one mints it."""
    now = int(time.time()) + ahead_seconds
    claims = {"iss": "civic", "sub": "service:tickets", "role": "service", "scope": "dn"}
    return jwt.encode(claims | {"iat": now, "exp": now + ttl_seconds}, SECRET, algorithm=ALGORITHM)


def test_a_token_minted_by_a_host_whose_clock_runs_a_little_ahead_is_accepted_at_once() -> None:
    assert verify_token(SECRET, issued(ahead_seconds=2)).subject == "service:tickets"
    # Expiry gets no such leeway, and a clock far ahead is no skew.
    for token in (issued(ahead_seconds=-20, ttl_seconds=10), issued(ahead_seconds=3600)):
        with pytest.raises(Unauthenticated):
            verify_token(SECRET, token)
