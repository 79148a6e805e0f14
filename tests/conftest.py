"""Test harness: real MongoDB, Kafka-protocol broker and S3 for the whole run.

External servers named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT are used
as they are; otherwise testcontainers where a Docker engine runs, else local servers on free ports
in a temporary directory, so a test run never touches the data of a running platform.
"""

from __future__ import annotations

import asyncio
import os

# The tests start service processes while gRPC's threads run here; gRPC's fork handlers, run in
# a child that is about to exec anyway, can crash it. Set before gRPC is first imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import timedelta

import pytest
import uvloop
from minio import Minio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.local import Endpoints, LocalStack, Ports, isolated_settings
from services.common.auth import Role, mint_token
from services.common.clock import Clock
from services.common.config import Settings

pytest_plugins = ["tests.registry_fixtures"]
# Test packages import the clock from here, with the fixtures that share it.
__all__ = ["Clock"]

EXTERNAL = ("CIVIC_MONGO_URI", "KAFKA_BOOTSTRAP_SERVERS", "CIVIC_S3_ENDPOINT")
TEST_SECRET = "test-signing-key-" + uuid.uuid4().hex


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on the event loop the services run on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    import os

    from infra.containers import docker_available, start_containers

    # Containers only when no server is named: a named one is used, and the local stack starts
    # just the others.
    if not any(os.environ.get(name) for name in EXTERNAL) and docker_available():
        found, stop = start_containers()
        yield found
        stop()
        return
    stack = LocalStack(tmp_path_factory.mktemp("servers"), Ports.free())
    endpoints = stack.up()
    stack.stop_with(os.getpid())  # a killed run leaves no server behind
    yield endpoints
    stack.down()


@pytest.fixture(scope="session")
def settings(endpoints: Endpoints) -> Settings:
    return isolated_settings(endpoints, "test", auth_secret=TEST_SECRET, outbox_poll_seconds=0.2)


@pytest.fixture(scope="session")
def session_clock() -> Clock:
    return Clock()


@pytest.fixture
def clock(session_clock: Clock) -> Iterator[Clock]:
    yield session_clock
    session_clock.offset = timedelta()


@pytest.fixture
def bucket(settings: Settings) -> Minio:
    """The object store, as an operator sees it: to check what a service kept or deleted."""
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
    )


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="session")
def span_processor(spans: InMemorySpanExporter) -> SimpleSpanProcessor:
    return SimpleSpanProcessor(spans)


def token(
    role: Role, scope: str, household_id: str = "", subject: str = "", secret: str = TEST_SECRET
) -> str:
    return mint_token(
        secret,
        subject=subject or f"{role.value}@{scope}",
        role=role,
        scope=scope,
        household_id=household_id,
    )


@pytest.fixture
def unique() -> str:
    """A fresh unit code, so each test works in its own corner of the tree."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
async def anyio_backend() -> AsyncIterator[str]:
    yield "asyncio"
