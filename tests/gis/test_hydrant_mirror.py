"""The in-memory hydrant layer follows MongoDB's, and recovers when its change stream ends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from services.common.config import Settings
from services.common.mongo import Document, mongo_client
from services.gis.domain import Layer
from services.gis.store import HydrantMirror
from tests.kafka_reader import eventually


def hydrant(n: int) -> dict[str, object]:
    return {
        "_id": f"h{n}",
        "layer": Layer.HYDRANT.key,
        "source_unit": "dn.hc.hc1",
        "geometry": {"type": "Point", "coordinates": [108.2 + n / 1000, 16.05]},
        "properties": {"n": n},
    }


async def test_the_mirror_reopens_a_change_stream_that_ended(settings: Settings) -> None:
    """Dropping the collection ends (invalidates) the stream. A mirror that iterated the ended
    stream again would spin, holding the event loop: this test itself would stop."""
    client = mongo_client(settings.mongo_uri)
    features = client[f"{settings.database_prefix}_mirror_{uuid.uuid4().hex[:6]}"]["features"]
    await features.insert_one(hydrant(1))
    mirror = HydrantMirror(features)
    await mirror.start()
    try:
        assert "h1" in mirror.grid

        async def following() -> bool:
            await asyncio.sleep(0)
            return mirror.following

        await eventually(following, what="the mirror following its change stream")
        await features.drop()

        async def reopened() -> bool:
            await asyncio.sleep(0)
            return mirror.following and "h1" not in mirror.grid

        await eventually(reopened, what="the mirror following a new change stream", within=15)
        await features.insert_one(hydrant(2))

        async def followed() -> bool:
            return "h2" in mirror.grid

        await eventually(followed, what="a hydrant added after the reopening")
    finally:
        await mirror.stop()
        await client.drop_database(features.database.name)
        await client.close()


class ReadThenWait:
    """The collection, whose finds read everything, then let `meanwhile` happen, then give
    what they read: as a reload's read goes when another writer commits just after it."""

    def __init__(self, features: Any, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self.features = features
        self.meanwhile = meanwhile

    def find(self, *args: Any, **kwargs: Any) -> AsyncIterator[Document]:
        return self._read(args, kwargs)

    async def _read(self, args: Any, kwargs: Any) -> AsyncIterator[Document]:
        docs = await self.features.find(*args, **kwargs).to_list()
        await self.meanwhile()
        for doc in docs:
            yield doc


async def test_a_hydrant_another_writer_adds_during_a_reload_stays(settings: Settings) -> None:
    """This instance's import reloads its unit's hydrants; another instance's hydrant of the
    same unit, committed and followed while the reload was reading, is not dropped by it (no
    later change would ever bring it back)."""
    client = mongo_client(settings.mongo_uri)
    features = client[f"{settings.database_prefix}_mirror_{uuid.uuid4().hex[:6]}"]["features"]
    await features.insert_one(hydrant(1))
    mirror = HydrantMirror(features)
    await mirror.start()
    try:

        async def following() -> bool:
            await asyncio.sleep(0)
            return mirror.following

        await eventually(following, what="the mirror following its change stream")

        async def another_writer() -> None:
            await features.insert_one(hydrant(2))

            async def followed() -> bool:
                return "h2" in mirror.grid

            await eventually(followed, what="the other writer's hydrant followed")

        mirror._features = ReadThenWait(features, another_writer)  # type: ignore[assignment]
        await mirror.reload("dn.hc.hc1")
        assert "h1" in mirror.grid and "h2" in mirror.grid
    finally:
        await mirror.stop()
        await client.drop_database(features.database.name)
        await client.close()
