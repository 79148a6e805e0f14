"""Empty fetches wait out fetch.max.wait.ms on the client side too.

A Kafka broker holds a fetch that finds nothing for up to fetch.max.wait.ms before answering.
The Kafka-protocol broker these build machines run answers at once, so every idle aiokafka
consumer would poll it thousands of times a second and burn most of a core. Here aiokafka's
fetcher waits out the rest of that time after an empty answer. Against a real broker, which has
already waited, the remainder is about zero and nothing changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.consumer.fetcher import Fetcher

_fetch = Fetcher._proc_fetch_request


async def _fetch_waiting_when_empty(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
    loop = asyncio.get_running_loop()
    started = loop.time()
    got_records = await _fetch(self, assignment, node_id, request)
    if not got_records:
        remaining = self._fetch_max_wait_ms / 1000 - (loop.time() - started)
        if remaining > 0:
            try:
                await asyncio.sleep(remaining)
            except asyncio.CancelledError:
                return False  # closing or reassigned: as aiokafka itself answers then
    return got_records


def install() -> None:
    Fetcher._proc_fetch_request = _fetch_waiting_when_empty
