"""`make run`: the local servers, every service, the pilot's demo data, and how to reach them.

python -m services.platform run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import grpc
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.local import InfraError, LocalStack, Ports, last_line, port_busy, runs
from services.common.auth import Role, mint_token
from services.common.config import GRPC_PORTS, Settings, SettingsError
from services.common.grpc_client import civic_channel
from services.common.runtime import run_async
from services.demo import CITY, PILOT, PILOT_DAY, pilot_rows
from services.demo_map import geojson, pilot_maps

ROOT = Path(__file__).resolve().parent.parent
# The services built so far: each has services/<name>/main.py.
SERVICES = [name for name in GRPC_PORTS if (ROOT / "services" / name / "main.py").exists()]
# Stable per demo: request ids derived from the unit, so a second load is a retry, not a change.
DEMO_NAMESPACE = uuid.UUID("6f1c63a4-7c55-4a57-9d0e-2f5b0c1d9a11")
DEV_LOGS = ROOT / ".civic" / "dev" / "logs"
# What `make run` started, so `make stop` ends it even when `make run` is no longer attached.
DEV_PIDS = ROOT / ".civic" / "dev" / "pids" / "platform"
STOP_SECONDS = 20.0


def service_env(settings: Settings, prefix: str, port: int, **extra: str) -> dict[str, str]:
    """The environment of one service process of the deployment `prefix` on `port`; nothing
    from the outer environment may configure it (another stack, a fault switch)."""
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
    env.update(extra)
    return env


def service_log(logs: Path, name: str) -> Path:
    return logs / f"{name}.log"


def start_services(
    envs: Mapping[str, dict[str, str]], logs: Path = DEV_LOGS, pids: Path = DEV_PIDS
) -> list[subprocess.Popen[bytes]]:
    """`python -m services.<name>.main` for each named service, with its environment, writing
    to <logs>/<name>.log and its PID to <pids>/<name>.pid."""
    logs.mkdir(parents=True, exist_ok=True)
    pids.mkdir(parents=True, exist_ok=True)
    processes = []
    for name, env in envs.items():
        log = service_log(logs, name).open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}.main"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (pids / f"{name}.pid").write_text(str(process.pid))
        processes.append(process)
    return processes


def stop_services(pids: Path = DEV_PIDS) -> list[str]:
    """Ends the services (and the `make run` process) named in <pids>: SIGTERM, then SIGKILL
    after STOP_SECONDS. A PID whose process is not that service (a PID reused since) is left
    alone. Returns the names of those that were running."""
    running = running_services(pids)
    for pid in running.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for path in _pid_files(pids):
        path.unlink(missing_ok=True)
    deadline = time.monotonic() + STOP_SECONDS
    while (alive := [pid for pid in running.values() if runs(pid, "")]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return sorted(running)


def running_services(pids: Path = DEV_PIDS) -> dict[str, int]:
    """The PID of each process named in <pids> that still runs, by name; a PID whose process
    is not that service (a PID reused since) is not one."""
    running: dict[str, int] = {}
    for path in _pid_files(pids):
        pid = int(path.read_text() or 0)
        if pid and runs(pid, f"services.{path.stem}"):
            running[path.stem] = pid
    return running


def _pid_files(pids: Path) -> list[Path]:
    return sorted(pids.glob("*.pid")) if pids.exists() else []


async def wait_healthy(
    name: str,
    port: int,
    process: subprocess.Popen[bytes],
    logs: Path = DEV_LOGS,
    seconds: float = 30,
) -> None:
    """Wait until the service start_services started answers SERVING. If it exits first or
    never answers, raise an InfraError naming it and its log; when it exited, with the log's
    last line (its reason, as a rule)."""
    log = service_log(logs, name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type only sync channels
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            if process.poll() is not None:
                raise InfraError(f"{name} exited while starting: {last_line(log)} (log: {log})")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise InfraError(f"{name} not serving on port {port} after {seconds:.0f} s (log: {log})")


def _units() -> Iterator[tuple[str, str, str, registry_pb2.UnitKind.ValueType]]:
    """(parent, code, name, kind) for the pilot's tree, parents first, each once."""
    seen: set[str] = set()
    city_code, city_name = CITY
    yield "", city_code, city_name, registry_pb2.UNIT_KIND_CITY
    for group in PILOT:
        parent = city_code
        for (code, name), kind in (
            (group.district, registry_pb2.UNIT_KIND_DISTRICT),
            (group.ward, registry_pb2.UNIT_KIND_WARD),
            (group.group, registry_pb2.UNIT_KIND_GROUP),
        ):
            unit_id = f"{parent}.{code}"
            if unit_id not in seen:
                seen.add(unit_id)
                yield parent, code, name, kind
            parent = unit_id


Units = Iterable[tuple[str, str, str, registry_pb2.UnitKind.ValueType]]


async def create_units(registry: registry_pb2_grpc.RegistryServiceAsyncStub, units: Units) -> None:
    """CreateUnit for each (parent, code, name, kind), parents first; a unit already there (a
    second load) is left as it is."""
    for parent, code, name, kind in units:
        unit_id = f"{parent}.{code}" if parent else code
        try:
            await registry.CreateUnit(
                registry_pb2.CreateUnitRequest(
                    request_id=str(uuid.uuid5(DEMO_NAMESPACE, unit_id)),
                    parent_id=parent,
                    code=code,
                    name=name,
                    kind=kind,
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise


async def create_pilot_units(registry: registry_pb2_grpc.RegistryServiceAsyncStub) -> None:
    """The pilot's administrative tree, each unit created once (a second run finds them)."""
    await create_units(registry, _units())


def demo_admin(settings: Settings) -> str:
    """The city admin's token the demo loaders act with."""
    return mint_token(
        settings.auth_secret, subject="demo-loader", role=Role.CITY_ADMIN, scope=CITY[0]
    )


async def load_demo(settings: Settings) -> str:
    """Creates the pilot tree and imports its households; a second load changes nothing."""
    async with civic_channel(settings.registry(), demo_admin(settings)) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        await create_pilot_units(registry)
        rows = list(pilot_rows(PILOT_DAY))
        chunks = [
            registry_pb2.ImportPersonsRequest(rows=rows[i : i + 500])
            for i in range(0, len(rows), 500)
        ]

        async def stream() -> AsyncIterator[registry_pb2.ImportPersonsRequest]:
            for chunk in chunks:
                yield chunk

        report = await registry.ImportPersons(stream())
    said = (
        f"demo data: {report.rows} persons read, {report.households_created} households and "
        f"{report.persons_created} persons created, {report.persons_unchanged} already there, "
        f"{len(report.errors)} errors"
    )
    if report.errors:
        # The generator's own rows never fail: these meet what another version of it loaded.
        first = report.errors[0]
        said += (
            f" (the first: row {first.row_number} {first.field}: {first.message}); the register "
            "holds another version's demo data: `make stop`, remove .civic/dev, `make run` again"
        )
    return said


DEMO_FUND = "Quỹ vì người nghèo"


async def load_ledger_demo(settings: Settings) -> str:
    """A poor-relief fund in each pilot group with an opening balance and a year's dues
    (poor households and those with a war invalid exempt); a second load changes nothing."""
    opened = 0
    for group in PILOT:
        leader = mint_token(
            settings.auth_secret,
            subject=f"demo-leader-{group.unit_id}",
            role=Role.GROUP_LEADER,
            scope=group.unit_id,
        )
        async with civic_channel(f"127.0.0.1:{GRPC_PORTS['ledger']}", leader) as channel:
            ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
            funds = await ledger.ListFunds(ledger_pb2.ListFundsRequest(unit_id=group.unit_id))
            fund = next(
                (f for f in funds.funds if f.unit_id == group.unit_id and f.name == DEMO_FUND),
                None,
            )
            if fund is None:
                fund = (
                    await ledger.OpenFund(
                        ledger_pb2.OpenFundRequest(
                            request_id=str(uuid.uuid4()), unit_id=group.unit_id, name=DEMO_FUND
                        )
                    )
                ).fund
                opened += 1

            def key(what: str, fund_id: str = fund.fund_id) -> str:
                return str(uuid.uuid5(DEMO_NAMESPACE, f"{fund_id}:{what}"))

            await ledger.PostTransaction(
                ledger_pb2.PostTransactionRequest(
                    request_id=key("opening"),
                    fund_id=fund.fund_id,
                    memo="Tồn quỹ chuyển sang",
                    postings=[
                        ledger_pb2.Posting(account="cash", amount=12_500_000),
                        ledger_pb2.Posting(account="equity/opening", amount=-12_500_000),
                    ],
                )
            )
            await ledger.DeclareCampaign(
                ledger_pb2.DeclareCampaignRequest(
                    request_id=key("dues-2026"),
                    fund_id=fund.fund_id,
                    name="Đóng góp quỹ vì người nghèo năm 2026",
                    period="2026",
                    basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                    rate=100_000,
                    exemptions=[
                        ledger_pb2.EXEMPTION_POOR_HOUSEHOLD,
                        ledger_pb2.EXEMPTION_WAR_INVALID_MEMBER,
                    ],
                )
            )
    return f"ledger demo: {len(PILOT)} pilot funds ({opened} opened now), 2026 dues declared"


# How long the map load waits for the GIS service to learn the pilot units from the registry.
UNITS_KNOWN_SECONDS = 60.0


async def load_map_demo(settings: Settings, target: str = "") -> str:
    """Each pilot unit's boundary, buildings, alleys and hydrants, imported through the GIS
    service's ImportLayer. With `replace` each layer of the unit becomes exactly the generated
    one: a second load finds every feature unchanged and writes nothing to the map."""
    totals: Counter[str] = Counter()
    gis_target = target or f"127.0.0.1:{GRPC_PORTS['gis']}"
    async with civic_channel(gis_target, demo_admin(settings)) as channel:
        gis = gis_pb2_grpc.GisServiceStub(channel)
        for unit in pilot_maps():
            for layer, features in unit.layers():
                request = gis_pb2.ImportLayerRequest(
                    request_id=str(uuid.uuid4()),
                    unit_id=unit.group.unit_id,
                    layer=layer,
                    format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                    content=geojson(features),
                    replace=True,
                )
                done = await _once_unit_known(gis.ImportLayer, request)
                if done.rejected:
                    raise InfraError(
                        f"the GIS service refused {len(done.rejected)} demo features of "
                        f"{unit.group.unit_id}: {done.rejected[0].message}"
                    )
                totals[gis_pb2.Layer.Name(layer)] += len(features)
                totals["created"] += done.created
                totals["changed"] += done.updated + done.removed
                totals["unchanged"] += done.unchanged
    return (
        f"map demo: {totals['LAYER_BUILDING']} buildings, {totals['LAYER_ALLEY']} streets and "
        f"alleys, {totals['LAYER_HYDRANT']} hydrants and wells in {len(PILOT)} units; "
        f"{totals['created']} features created, {totals['changed']} changed, "
        f"{totals['unchanged']} already there"
    )


async def _once_unit_known(
    call: Any, request: gis_pb2.ImportLayerRequest
) -> gis_pb2.ImportLayerResponse:
    """The import, retried while the GIS service has not yet read the unit's creation from the
    registry's events (NOT_FOUND; nothing was imported, so the retry keeps its request_id)."""
    deadline = asyncio.get_running_loop().time() + UNITS_KNOWN_SECONDS
    while True:
        try:
            response: gis_pb2.ImportLayerResponse = await call(request)
            return response
        except grpc.aio.AioRpcError as error:
            late = asyncio.get_running_loop().time() > deadline
            if error.code() != grpc.StatusCode.NOT_FOUND or late:
                raise
        await asyncio.sleep(0.2)


DEV_TOKEN_DAYS = 30  # `make run` stays up for days: its printed tokens should outlast it


async def a_pilot_household(settings: Settings) -> str:
    """One household of the first pilot group, for the resident's development token (the read is
    logged, as every official read of a head's name is)."""
    async with civic_channel(
        settings.registry(), demo_admin(settings), "development token for a resident"
    ) as channel:
        page = await registry_pb2_grpc.RegistryServiceStub(channel).ListHouseholdSummaries(
            registry_pb2.ListHouseholdSummariesRequest(
                unit_id=PILOT[0].unit_id, page=types_pb2.PageRequest(page_size=1)
            )
        )
    return page.households[0].household_id


def tokens(settings: Settings, household_id: str) -> dict[str, str]:
    """A development token for each role; the resident's speaks for `household_id`."""
    group = PILOT[0]
    ward = group.unit_id.rsplit(".", 1)[0]
    scopes = {
        Role.RESIDENT: group.unit_id,
        Role.CITY_ADMIN: CITY[0],
        Role.DISTRICT_OFFICER: ward.rsplit(".", 1)[0],
        Role.WARD_OFFICER: ward,
        Role.GROUP_LEADER: group.unit_id,
        Role.TREASURER: group.unit_id,
        Role.AUDITOR: CITY[0],
        Role.INTEGRATOR: CITY[0],
    }
    return {
        role.value: mint_token(
            settings.auth_secret,
            subject=f"demo-{role.value}",
            role=role,
            scope=scope,
            household_id=household_id if role is Role.RESIDENT else "",
            ttl_seconds=DEV_TOKEN_DAYS * 24 * 3600,
        )
        for role, scope in scopes.items()
    }


async def run() -> None:
    outside = Settings()  # a bad setting stops here, before anything is started
    busy = [f"{name} ({GRPC_PORTS[name]})" for name in SERVICES if port_busy(GRPC_PORTS[name])]
    if busy:
        # A second run would start services that fail to bind, after joining (and upsetting)
        # the first run's consumer groups.
        raise InfraError(
            f"Civic is already running (ports of {', '.join(busy)} are taken); `make stop` ends it"
        )
    stack = LocalStack(ROOT / ".civic" / "dev", Ports.dev())
    endpoints = stack.up()
    DEV_PIDS.mkdir(parents=True, exist_ok=True)
    (DEV_PIDS / "platform.pid").write_text(str(os.getpid()))
    env = os.environ | endpoints.as_env()
    settings = outside.model_copy(update=endpoints.__dict__)
    # Each on its own port: a CIVIC_GRPC_PORT exported in the shell would put all five on one.
    envs = {name: env | {"CIVIC_GRPC_PORT": str(GRPC_PORTS[name])} for name in SERVICES}
    processes = start_services(envs)
    try:
        for name, process in zip(SERVICES, processes, strict=True):
            await wait_healthy(name, GRPC_PORTS[name], process)
        print(await load_demo(settings))
        if "ledger" in SERVICES:
            print(await load_ledger_demo(settings))
        if "gis" in SERVICES:
            print(await load_map_demo(settings))
        print("\nCivic is running:")
        for name in SERVICES:
            print(f"  {name:<9} gRPC 127.0.0.1:{GRPC_PORTS[name]}")
        print(f"  MongoDB   {endpoints.mongo_uri}")
        print(f"  Kafka     {endpoints.kafka_bootstrap_servers}")
        print(f"  S3        http://{endpoints.s3_endpoint}")
        household_id = await a_pilot_household(settings)
        print(
            f"\nDevelopment tokens, valid {DEV_TOKEN_DAYS} days (authorization: Bearer <token>);"
            f" the resident's is of household {household_id} in {PILOT[0].unit_id}:"
        )
        for role, token in tokens(settings, household_id).items():
            print(f"  {role:<17} {token}")
        print("\nCtrl-C stops the services; `make stop` also stops the local servers.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        stop_started(dict(zip(SERVICES, processes, strict=True)))


def stop_started(processes: Mapping[str, subprocess.Popen[bytes]], pids: Path = DEV_PIDS) -> None:
    """Ends the services this run started, and removes its PID files: one left behind says
    that its service ended on its own (`civic stack status` shows it as died)."""
    for process in processes.values():
        process.terminate()
    for name, process in processes.items():
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print(f"civic: {name} did not stop within 15 s; killed it", file=sys.stderr)
            process.kill()
            process.wait()
    for path in _pid_files(pids):
        path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m services.platform")
    parser.add_argument("command", choices=["run", "stop"])
    if parser.parse_args().command == "stop":
        stopped = stop_services()
        print(f"stopped: {', '.join(stopped)}" if stopped else "no Civic services were running")
        return
    try:
        run_async(run())
    except KeyboardInterrupt:  # Ctrl-C while starting; once running, it ends run() normally
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except (InfraError, SettingsError) as error:
        _fail(str(error))
    except grpc.aio.AioRpcError as error:  # the demo data's calls
        _fail(f"loading the demo data: {error.code().name}: {error.details()}")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
