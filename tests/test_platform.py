"""`make run` beside a platform already running refuses at once, starting nothing."""

from __future__ import annotations

import contextlib
import socket

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
