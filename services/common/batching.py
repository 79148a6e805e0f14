"""Coalescing concurrent operations into one database round trip.

Under load, a Python service spends more CPU driving a MongoDB round trip than the database spends
answering it. A `Coalescer` gathers the requests that arrive while earlier ones are in flight and
sends them as one batch: a lone caller's request goes out at once (after the current event-loop
tick, so requests that arrived together go together), and many callers share a round trip. Nothing
is cached: every caller sees the database as of its own batch, and every write is acknowledged
before its caller resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class Coalescer(Generic[In, Out]):
    """`run(items)` answers a whole batch, one result per item and in order."""

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[Sequence[Out]]],
        *,
        max_batch: int = 500,
        max_in_flight: int = 1,
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._waiting: list[tuple[In, asyncio.Future[Out]]] = []
        self._in_flight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: In) -> Out:
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._schedule()
        return await future

    def _schedule(self) -> None:
        if self._waiting and not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._scheduled = False
        batch, self._waiting = (
            self._waiting[: self._max_batch],
            self._waiting[self._max_batch :],
        )
        # A caller cancelled while waiting (its deadline passed) is not sent at all.
        batch = [(item, future) for item, future in batch if not future.done()]
        if batch:
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
        self._schedule()

    async def _send(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            # A wrong number of answers fails every caller too, rather than leaving some waiting.
            answered = list(zip(batch, results, strict=True))
        except Exception as error:  # every caller of the batch learns it failed
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        else:
            for (_, future), result in answered:
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._schedule()
