"""Running a benchmark under bench/ on servers of its own: a LocalStack in a temporary directory
on free ports (or the external servers named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS /
CIVIC_S3_ENDPOINT), with one child process for load that must not share the measured process's
CPU, and stdout kept for the report."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from infra.local import Endpoints, LocalStack, Ports
from services.common.runtime import run_async

T = TypeVar("T")
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
        stack = LocalStack(workdir / "servers", Ports.free())
        # spawn: a forked child would inherit this process's gRPC and event-loop state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(warm_up).result()
            try:
                say("starting servers")
                endpoints = stack.up()
                # faststream's loggers write to the stdout of when they are made: keep stdout
                # for the report.
                with contextlib.redirect_stdout(sys.stderr):
                    result = run_async(measure(endpoints, pool, workdir))
            finally:
                stack.down()
    say(f"done in {time.monotonic() - started:.0f} s")
    return result
