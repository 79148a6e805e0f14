"""Running a service process: logging, signals, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol


class Service(Protocol):
    async def start(self) -> int: ...
    async def stop(self) -> None: ...


async def serve_until_signalled(name: str, build: Callable[[], Service]) -> None:
    """Builds the service inside the running loop (gRPC and Kafka clients bind to it)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    service = build()
    port = await service.start()
    logging.getLogger(name).info("%s listening on port %d", name, port)
    await stop.wait()
    logging.getLogger(name).info("%s stopping", name)
    await service.stop()
