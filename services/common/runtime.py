"""Running a service process: logging, signals, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import uvloop

T = TypeVar("T")
# What a process ended by `fault` exits with.
FAULT_EXIT_CODE = 86


# Collect the youngest generation after this many net allocations, not CPython's 700: a
# service allocates thousands of short-lived objects per request, and collecting that often
# showed in every request profile (lookups gained 0-25% in A/B runs).
YOUNG_GENERATION_THRESHOLD = 50_000


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Every Civic process runs its event loop on uvloop: the same Python does markedly more
    gRPC calls and MongoDB round trips per second on it than on the default loop."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, older, oldest)
    return uvloop.run(main)


class Service(Protocol):
    async def start(self) -> int: ...
    async def stop(self) -> None: ...


# How long a stop waits for a cancelled task before it cancels it again.
RECANCEL_SECONDS = 1.0


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended; an error it ended with is raised. PyMongo now
    and then drops a cancellation that lands in the middle of an operation (2 in 100 in a stress
    run of random cancellations), and a sweep's loop that survives one would run on, with the
    stop waiting for it: the task is cancelled again until it ends."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_SECONDS)
    with contextlib.suppress(asyncio.CancelledError):
        await task


class BackgroundTask:
    """One long-running coroutine of a service (a sweep, a worker), started and stopped with it."""

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


class Every(BackgroundTask):
    """`work` every `seconds` for the life of the service. A round that fails is logged and the
    next one goes on: a sweep catches up with whatever the failed one left."""

    def __init__(self, name: str, seconds: float, work: Callable[[], Awaitable[object]]) -> None:
        super().__init__(name, self._rounds)
        self.seconds = seconds
        self._work = work

    async def _rounds(self) -> None:
        while True:
            try:
                await self._work()
            except asyncio.CancelledError:
                raise
            except Exception:
                logging.getLogger(__name__).exception("%s failed; retrying", self._name)
            await asyncio.sleep(self.seconds)


def fault(name: str) -> None:
    """Failure injection for the crash tests: end the process at this exact point when the
    environment variable `name` is "1"."""
    if os.environ.get(name) == "1":
        logging.getLogger(__name__).warning("fault injection %s: exiting", name)
        os._exit(FAULT_EXIT_CODE)


async def woken_or_after(wake: asyncio.Event, seconds: float) -> None:
    """Wait until `wake` is set or `seconds` have passed, then clear it: a sweep's sleep that
    new work cuts short. A stop that comes as `wake` is set still stops the sweep (Python
    3.11's `asyncio.wait_for` would drop that cancellation, and the sweep would run on)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await wake.wait()
    wake.clear()


async def stop_within(seconds: float, what: str, stopping: Awaitable[object]) -> None:
    """One step of a graceful stop, bounded: a broker or peer that does not answer must not
    keep the process (or a test session) from ending."""
    try:
        async with asyncio.timeout(seconds):
            await stopping
    except TimeoutError:
        logging.getLogger(__name__).warning("%s did not stop within %.0f s", what, seconds)


async def serve_until_signalled(name: str, build: Callable[[], Service]) -> None:
    """Builds the service inside the running loop (gRPC and Kafka clients bind to it), serves
    until SIGTERM or SIGINT, then stops gracefully. A signal during start-up (say, while the
    broker is unreachable) ends the start-up too."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger(name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = build()
    starting = asyncio.create_task(service.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            log.info("%s listening on port %d", name, starting.result())
            await stopping
        else:
            await cancel_and_wait(starting)
    finally:
        # Also when start-up failed (a busy port, say): what it had started (Kafka clients,
        # MongoDB sessions) is closed before the error ends the process.
        stopping.cancel()
        log.info("%s stopping", name)
        await service.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
