"""Empty fetches wait on the client side too, as a real broker would have waited.

A Kafka broker holds a fetch that finds nothing until data arrives or fetch.max.wait.ms passes.
The Kafka-protocol broker these build machines run answers at once, so every idle aiokafka
consumer would poll it thousands of times a second and burn most of a core. Here aiokafka's
fetcher waits after an empty answer: 1 ms after the first, doubling with each empty answer in a
row up to fetch.max.wait.ms. A busy consumer so sees a new event about as soon as a held fetch
would show it, and an idle one polls no more than once per fetch.max.wait.ms. Against a real
broker, which has already waited, the remainder is about zero and nothing changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka.consumer.fetcher import Fetcher

_fetch = Fetcher._proc_fetch_request
FIRST_WAIT_S = 0.001


def wait_after_empty(empty_in_a_row: int, max_wait_s: float) -> float:
    """Seconds to wait, in all, after this many empty answers in a row."""
    return min(max_wait_s, FIRST_WAIT_S * (1 << min(empty_in_a_row - 1, 16)))


async def _fetch_waiting_when_empty(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
    loop = asyncio.get_running_loop()
    started = loop.time()
    got_records = await _fetch(self, assignment, node_id, request)
    if got_records:
        self._civic_empty_in_a_row = 0
        return got_records
    empty = self._civic_empty_in_a_row = getattr(self, "_civic_empty_in_a_row", 0) + 1
    remaining = wait_after_empty(empty, self._fetch_max_wait_ms / 1000) - (loop.time() - started)
    if remaining > 0:
        try:
            await asyncio.sleep(remaining)
        except asyncio.CancelledError:
            return False  # closing or reassigned: as aiokafka itself answers then
    return got_records


def install() -> None:
    Fetcher._proc_fetch_request = _fetch_waiting_when_empty
