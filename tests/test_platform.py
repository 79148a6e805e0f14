"""`make run` beside a platform already running refuses at once, starting nothing; `make stop`
ends the services `make run` started, from their PID files, even when `make run` is no longer
attached to a terminal, and leaves alone a process that took a stale PID."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.local import InfraError
from services import platform
from services.common.config import GRPC_PORTS


async def test_a_second_run_says_civic_is_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_stack(*args: object) -> None:
        raise AssertionError("the local servers were started")

    monkeypatch.setattr(platform, "LocalStack", no_stack)
    port = GRPC_PORTS[platform.SERVICES[0]]
    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # already taken by a running platform: as good
            taken.bind(("127.0.0.1", port))
            taken.listen()
        with pytest.raises(InfraError, match="already running"):
            await platform.run()


def test_stop_ends_the_services_named_in_the_pid_files_and_nothing_else(tmp_path: Path) -> None:
    # A stand-in whose command line names the service, as `python -m services.<name>.main` does.
    service = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "services.registry.main"],
        start_new_session=True,
    )
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        (tmp_path / "registry.pid").write_text(str(service.pid))
        (tmp_path / "tickets.pid").write_text(str(stranger.pid))  # a PID reused since

        assert platform.stop_services(tmp_path) == ["registry"]

        assert service.wait(timeout=10) != 0  # ended by the signal
        assert stranger.poll() is None
        assert not list(tmp_path.glob("*.pid"))
    finally:
        for process in (service, stranger):
            process.kill()
            process.wait()
