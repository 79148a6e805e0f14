"""Fixtures of the shared runtime's tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.config import Settings

PARTITIONS = 3


@pytest.fixture
async def topic(settings: Settings) -> AsyncIterator[str]:
    """A topic of its own for one test, with a few partitions."""
    name = f"test.runtime.{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()
