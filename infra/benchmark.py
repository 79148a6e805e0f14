"""Running a benchmark under bench/ on servers of its own: a LocalStack in a temporary directory
on free ports (or the external servers named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS /
CIVIC_S3_ENDPOINT), with one child process for load that must not share the measured process's
CPU, and stdout kept for the report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from infra.local import EXTERNAL_ENV, Endpoints, LocalStack, Ports
from services.common.runtime import run_async

T = TypeVar("T")
SERVERS = "servers"  # the run's LocalStack root, under its working directory
Measure = Callable[[Endpoints, ProcessPoolExecutor, Path], Coroutine[Any, Any, T]]


def say(message: str) -> None:
    """Progress on stderr; stdout carries only the report."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run_on_own_servers(measure: Measure[T], warm_up: Callable[[], None]) -> T:
    """`measure(endpoints, pool, workdir)` on fresh servers, which are stopped afterwards.
    `warm_up`, a function of the benchmark's own module, runs in the child first, so the
    child has imported what it needs before anything is timed."""
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="civic-bench-") as tmp:
        workdir = Path(tmp)
        stack = LocalStack(workdir / SERVERS, Ports.free())
        # spawn: a forked child would inherit this process's gRPC and event-loop state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(warm_up).result()
            try:
                say("starting servers")
                endpoints = stack.up()
                stack.stop_with(os.getpid())
                # faststream's loggers write to the stdout of when they are made: keep stdout
                # for the report.
                with contextlib.redirect_stdout(sys.stderr):
                    result = run_async(measure(endpoints, pool, workdir))
            finally:
                stack.down()
    say(f"done in {time.monotonic() - started:.0f} s")
    return result


def disk_used(workdir: Path, server: str) -> int | None:
    """Bytes on disk under the data directory of one of the run's own servers ("mongo",
    "kafka", "s3"); None when the run uses an external server."""
    if os.environ.get(EXTERNAL_ENV[server]):
        return None
    total = 0
    # A LocalStack keeps each server's data in <root>/<server>.
    for folder, _, files in os.walk(workdir / SERVERS / server):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a server may remove files meanwhile
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def percentile(samples: list[float], fraction: float, missing: int = 0) -> float:
    """The fraction's sample; `missing` samples (never arrived) count as infinitely late."""
    ordered = sorted(samples) + [math.inf] * missing
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def ms(value: float, digits: int = 1) -> float | None:
    """For the JSON line: None stands for "never" (an infinite percentile)."""
    return round(value, digits) if math.isfinite(value) else None


async def open_loop(
    rate: float, seconds: float, send: Callable[[int, float], Coroutine[Any, Any, None]]
) -> tuple[int, float, int]:
    """Call `send(index, scheduled)` every 1/rate s for `seconds`, whatever the answers.
    Returns (sent, seconds from the first schedule to the last, sends more than 5 ms late)."""
    count = int(rate * seconds)
    tasks: list[asyncio.Task[None]] = []
    late = 0
    start = time.perf_counter() + 0.05
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.005:
            late += 1
        tasks.append(asyncio.create_task(send(index, scheduled)))
    await asyncio.gather(*tasks)
    return count, count / rate, late
