"""`make run` beside a platform already running refuses at once, starting nothing; `make stop`
ends the services `make run` started, from their PID files, even when `make run` is no longer
attached to a terminal, and leaves alone a process that took a stale PID. What goes wrong while
starting is one line: a service that exits, a failed call, Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from civic.registry.v1 import registry_pb2, registry_pb2_grpc

from infra.local import REPO_ROOT, Endpoints, InfraError, free_port
from services import platform
from services.common.auth import Role, verify_token
from services.common.config import GRPC_PORTS, Settings
from services.common.grpc_client import civic_channel
from services.demo import PILOT, PILOT_DAY, pilot_rows
from services.registry.main import RegistryService
from tests.conftest import Clock


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


def test_services_make_run_stops_leave_no_pid_file_to_read_as_died(tmp_path: Path) -> None:
    """A PID file left behind tells `civic stack status` its service ended on its own."""
    service = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "services.registry.main"],
        start_new_session=True,
    )
    try:
        (tmp_path / "registry.pid").write_text(str(service.pid))
        (tmp_path / "platform.pid").write_text("1")

        platform.stop_started({"registry": service}, tmp_path)

        assert service.returncode is not None
        assert not list(tmp_path.glob("*.pid"))
    finally:
        service.kill()
        service.wait()


async def test_a_service_that_exits_while_starting_is_named_with_its_log_and_reason(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = platform.service_env(Settings(data_key="short"), "opsfix", port)
    logs = tmp_path / "logs"
    [process] = platform.start_services({"registry": env}, logs, tmp_path / "pids")
    try:
        with pytest.raises(InfraError) as caught:
            await platform.wait_healthy("registry", port, process, logs)
    finally:
        process.kill()
        process.wait()

    log = logs / "registry.log"
    assert str(caught.value) == (
        "registry exited while starting: ValueError: CIVIC_DATA_KEY must be at least 32 "
        f"characters (log: {log})"
    )


class Started(Exception):
    """Ends run() where the services would start."""


async def test_each_service_gets_its_own_port_whatever_the_shell_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Stack:
        def __init__(self, *args: object) -> None:
            pass

        def up(self) -> Endpoints:
            return Endpoints("mongodb://127.0.0.1:1/", "127.0.0.1:2", "127.0.0.1:3", "a", "s")

    envs: dict[str, dict[str, str]] = {}

    def start_services(wanted: dict[str, dict[str, str]], *args: object) -> None:
        envs.update(wanted)
        raise Started

    monkeypatch.setenv("CIVIC_GRPC_PORT", "6000")
    monkeypatch.setattr(platform, "LocalStack", Stack)
    monkeypatch.setattr(platform, "port_busy", lambda port: False)
    monkeypatch.setattr(platform, "DEV_PIDS", tmp_path)
    monkeypatch.setattr(platform, "start_services", start_services)
    with pytest.raises(Started):
        await platform.run()

    ports = {name: env["CIVIC_GRPC_PORT"] for name, env in envs.items()}
    assert ports == {name: str(GRPC_PORTS[name]) for name in platform.SERVICES}


# `make run` with its start-up standing still, as while the servers and services start.
STARTING = """
import asyncio, sys
from services import platform

async def starting() -> None:
    print("starting", flush=True)
    await asyncio.sleep(60)

platform.run = starting
sys.argv = ["platform", "run"]
platform.main()
"""


def test_ctrl_c_while_starting_says_interrupted() -> None:
    run = subprocess.Popen(
        [sys.executable, "-c", STARTING],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None and run.stdout.readline() == "starting\n"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=30)
    finally:
        run.kill()
        run.wait()
    assert (run.returncode, err) == (130, "interrupted\n")


def test_a_failed_call_while_loading_the_demo_data_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def refused() -> None:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="outside your scope",
        )

    monkeypatch.setattr(platform, "run", refused)
    monkeypatch.setattr(sys, "argv", ["platform", "run"])
    with pytest.raises(SystemExit) as exited:
        platform.main()

    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "error: loading the demo data: PERMISSION_DENIED: outside your scope\n"
    )


def test_a_bad_setting_stops_make_run_before_it_starts_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_stack(*args: object) -> None:
        raise AssertionError("the local servers were started")

    monkeypatch.setattr(platform, "LocalStack", no_stack)
    monkeypatch.setenv("CIVIC_OUTBOX_POLL_SECONDS", "soon")
    monkeypatch.setattr(sys, "argv", ["platform", "run"])
    with pytest.raises(SystemExit) as exited:
        platform.main()

    assert exited.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: CIVIC_OUTBOX_POLL_SECONDS: ")


async def test_make_run_prints_a_residents_token_for_a_pilot_household_that_outlasts_a_day(
    settings: Settings, registry: RegistryService
) -> None:
    """Every role gets a token, the resident's naming a household of the first pilot group, so
    a resident's calls can be tried at once; none expires while the platform runs for days."""
    loaded = settings.model_copy(update={"registry_target": f"127.0.0.1:{registry.port}"})
    async with civic_channel(loaded.registry(), platform.demo_admin(loaded)) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await platform.create_pilot_units(stub)
        await stub.CreateHousehold(
            registry_pb2.CreateHouseholdRequest(
                request_id="pilot-household-for-a-resident-token",
                unit_id=PILOT[0].unit_id,
                address="1 Kiệt 2 Trần Phú",
                residence_kind=registry_pb2.RESIDENCE_KIND_PERMANENT,
                head=registry_pb2.PersonDetails(
                    full_name="Lê Thị Hoa",
                    birth_date="1980-02-03",
                    sex=registry_pb2.SEX_FEMALE,
                    relationship=registry_pb2.RELATIONSHIP_HEAD,
                ),
            )
        )
    household_id = await platform.a_pilot_household(loaded)
    printed = platform.tokens(loaded, household_id)
    assert set(printed) == {role.value for role in Role if role is not Role.SERVICE}
    resident = verify_token(settings.auth_secret, printed[Role.RESIDENT.value])
    assert (resident.household_id, resident.scope) == (household_id, PILOT[0].unit_id)
    for token in printed.values():
        assert verify_token(settings.auth_secret, token).expires_at > time.time() + 29 * 86400
    async with civic_channel(loaded.registry(), printed[Role.RESIDENT.value]) as channel:
        own = await registry_pb2_grpc.RegistryServiceStub(channel).GetHousehold(
            registry_pb2.GetHouseholdRequest(household_id=household_id)
        )
    assert own.household.unit_id == PILOT[0].unit_id


async def test_make_run_says_how_to_start_afresh_when_the_register_holds_another_demo(
    settings: Settings, session_clock: Clock
) -> None:
    """A dev register loaded by another version of the demo generator: the same household
    numbers, other people. The load reports the clash and how to start afresh."""
    own = settings.model_copy(
        update={"database_prefix": settings.database_prefix + "olddemo", "grpc_port": free_port()}
    )
    registry = RegistryService(own, clock=session_clock)
    await registry.start()
    try:
        loaded = own.model_copy(update={"registry_target": f"127.0.0.1:{registry.port}"})
        async with civic_channel(loaded.registry(), platform.demo_admin(loaded)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await platform.create_pilot_units(stub)
            head = next(pilot_rows(PILOT_DAY))
            head.person.full_name, head.person.birth_date = "Lê Văn Cũ", "1950-01-01"
            head.person.citizen_id = ""

            async def older_version() -> AsyncIterator[registry_pb2.ImportPersonsRequest]:
                yield registry_pb2.ImportPersonsRequest(rows=[head])

            await stub.ImportPersons(older_version())
        said = await platform.load_demo(loaded)
    finally:
        await registry.stop()
    assert ", 0 errors" not in said
    assert said.endswith(
        "another version's demo data: `make stop`, remove .civic/dev, `make run` again"
    )
