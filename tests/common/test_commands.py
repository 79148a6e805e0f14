"""A command's key names its method, its caller and the caller's request_id, and no two of
those triples share one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from civic.registry.v1 import registry_pb2

from services.common.auth import Principal, Role, current_principal
from services.common.commands import CommandRunner, _identify
from services.common.config import Settings
from services.common.errors import AlreadyExists
from services.common.mongo import Document, Session, mongo_client
from services.common.outbox import Outbox


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


@pytest.fixture
async def runner(settings: Settings) -> AsyncIterator[CommandRunner]:
    client = mongo_client(settings.mongo_uri)
    db = client[f"{settings.database_prefix}_commands_{uuid.uuid4().hex[:6]}"]
    outbox = Outbox(db, source="/civic/test", topic="test.commands")
    token = current_principal.set(Principal("officer", Role.WARD_OFFICER, "dn.hc.hc1"))
    try:
        yield CommandRunner(client, db, outbox)
    finally:
        current_principal.reset(token)
        await client.drop_database(db.name)
        await client.close()


async def test_a_retry_of_a_command_that_inserts_many_gets_the_first_answer(
    runner: CommandRunner, settings: Settings
) -> None:
    """A command may write its new documents with insert_many, whose duplicate key is a
    BulkWriteError: its retry is answered as a retry, and a true duplicate is ALREADY_EXISTS."""
    runs = iter(["first", "second"])

    async def create(session: Session) -> tuple[registry_pb2.RenameUnitResponse, list[Document]]:
        await runner._db["units"].insert_many([{"_id": "dn.hc.hc1.g1"}], session=session)
        return registry_pb2.RenameUnitResponse(unit=registry_pb2.Unit(name=next(runs))), []

    request = registry_pb2.RenameUnitRequest(request_id="r-1", unit_id="dn.hc.hc1.g1", name="x")
    first = await runner.run("CreateGroups", request, registry_pb2.RenameUnitResponse, create)
    again = await runner.run("CreateGroups", request, registry_pb2.RenameUnitResponse, create)
    assert first.unit.name == again.unit.name == "first"

    with pytest.raises(AlreadyExists) as duplicate:
        other = registry_pb2.RenameUnitRequest(request_id="r-2", unit_id="dn.hc.hc1.g1", name="x")
        await runner.run("CreateGroups", other, registry_pb2.RenameUnitResponse, create)
    # The store's own names (the index's fields) are not the client's to read.
    assert "_id" not in duplicate.value.message, duplicate.value.message
