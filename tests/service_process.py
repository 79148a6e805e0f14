"""Civic services run as real processes for the tests that kill and restart them."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Re-exported: the tests that start service processes import both from here.
from services.platform import service_env as service_env

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


class ServiceProcess:
    """`python -m services.<name>.main` as its own process, configured only by environment."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self._env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"services.{self.name}.main",
                cwd=REPO_ROOT,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # signals for the test runner do not reach it
            )
        try:
            await self._wait_serving()
        except BaseException:
            await self.end()  # __aexit__ does not run when __aenter__ fails
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.end()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self._env['CIVIC_GRPC_PORT']}"

    def describe(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()
        return "\n".join(lines[-30:])

    async def _wait_serving(self) -> None:
        """Ready once the gRPC health service answers SERVING (no sleeping on a guess)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        async with grpc.aio.insecure_channel(self.target) as channel:
            # The stubs package declares no methods on HealthStub.
            health: Any = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.returncode is not None:
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode} while starting:\n"
                        + self.describe()
                    )
                try:
                    reply: health_pb2.HealthCheckResponse = await health.Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} not serving in {START_TIMEOUT} s")
                await asyncio.sleep(0.1)

    async def exited(self, within: float = 15.0) -> int:
        """Its exit code, once it has ended by itself."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"{self.name} still running after {within} s") from None

    def kill(self) -> None:
        """Dies at once, as a crashed process or a lost machine does: no graceful stop."""
        assert self.proc is not None
        self.proc.kill()

    async def stop(self) -> int:
        """A graceful stop (SIGTERM), as an orchestrator does it."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.exited(30.0)

    async def end(self) -> None:
        """Leave nothing running, whatever happened: SIGTERM, then SIGKILL after 30 s."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30.0)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
