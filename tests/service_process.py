"""A Civic service as a real process of its own, configured only by its environment, for tests
that kill it at an injected fault point and start it again."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


def service_env(settings: Settings, prefix: str, port: int, *faults: str) -> dict[str, str]:
    """The environment of one deployment (its database prefix and gRPC port), fault switches
    on; nothing from the outer environment may configure it (another stack, a fault switch)."""
    s = settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIVIC_", "KAFKA_", "OTEL_"))}
    env.update(
        {
            "CIVIC_MONGO_URI": s.mongo_uri,
            "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
            "CIVIC_S3_ENDPOINT": s.s3_endpoint,
            "CIVIC_S3_ACCESS_KEY": s.s3_access_key,
            "CIVIC_S3_SECRET_KEY": s.s3_secret_key,
            "CIVIC_S3_SECURE": str(s.s3_secure).lower(),
            "CIVIC_DATABASE_PREFIX": prefix,
            "CIVIC_AUTH_SECRET": s.auth_secret,
            "CIVIC_DATA_KEY": s.data_key,
            "CIVIC_GRPC_PORT": str(port),
            "CIVIC_OUTBOX_POLL_SECONDS": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({fault: "1" for fault in faults})
    return env


class ServiceProcess:
    """`python -m <module>` as its own process, configured only by environment."""

    def __init__(self, module: str, env: dict[str, str], log: Path) -> None:
        self.module = module
        self._env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ServiceProcess:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
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
                        f"{self.module} exited with {self.proc.returncode} while starting:\n"
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
                    raise AssertionError(f"{self.module} not serving in {START_TIMEOUT} s")
                await asyncio.sleep(0.1)

    async def exited(self, within: float = 15.0) -> int:
        """Its exit code, once it has ended by itself."""
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"{self.module} still running after {within} s") from None

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
