"""A command's key names its method, its caller and the caller's request_id, and no two of
those triples share one."""

from __future__ import annotations

from civic.registry.v1 import registry_pb2

from services.common.auth import Principal, Role, current_principal
from services.common.commands import _identify


def key_of(subject: str, request_id: str) -> str:
    caller = Principal(subject=subject, role=Role.WARD_OFFICER, scope="dn.hc.hc1")
    token = current_principal.set(caller)
    try:
        request = registry_pb2.RenameUnitRequest(request_id=request_id, unit_id="dn", name="x")
        return _identify("RenameUnit", request)[0]
    finally:
        current_principal.reset(token)


def test_callers_whose_subject_and_request_id_run_together_get_different_keys() -> None:
    assert key_of("alice", "b:r1") != key_of("alice:b", "r1")
    assert key_of("alice", "b%3Ar1") != key_of("alice", "b:r1")


def test_a_usual_callers_key_is_unchanged() -> None:
    """Answers stored before keys were escaped are still found by a retry."""
    assert key_of("officer-7", "0f5c9e3a-uuid") == "RenameUnit:officer-7:0f5c9e3a-uuid"
