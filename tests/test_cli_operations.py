"""The `civic` command for operators: a topic tailed as decoded events, the local stack status,
what the demo prints."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from civic.tickets.v1 import events_pb2

from infra.local import REPO_ROOT, LocalStack, Ports, free_port
from services import cli, topic_tail
from services.common.cloudevents import CloudEvent
from services.common.config import Settings
from services.common.mongo import mongo_client
from services.common.parking import PARK_AFTER_ATTEMPTS, PARKED, parked_record
from tests.registry_fixtures import City, new_household

PERSON_REGISTERED = "civic.registry.v1.PersonRegistered"


def tail_args(settings: Settings, *args: str) -> list[str]:
    return ["tail", "civic.registry.v1", "--bootstrap", settings.kafka_bootstrap_servers, *args]


async def test_tail_prints_an_aggregates_events_decoded_with_the_published_protos(
    city: City, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    created = await new_household(city.leader, city.group, head_name="Lê Thị Tâm")
    household = created.household
    capsys.readouterr()

    args = tail_args(settings, "--from-beginning", "--key", household.household_id, "--count", "1")
    assert await cli.run(args) == 0

    [line] = capsys.readouterr().out.splitlines()
    _, event_type, key, position, data = line.split(" ", 4)
    assert event_type == "civic.registry.v1.HouseholdCreated"
    assert key == f"key={household.household_id}"
    assert position.split("@")[0].isdigit() and position.split("@")[1].isdigit()
    decoded = json.loads(data)
    assert decoded["household_id"] == household.household_id
    assert decoded["unit_id"] == city.group
    assert decoded["address"] == household.address


async def test_tail_keeps_to_the_types_asked_for(
    city: City, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    created = await new_household(city.leader, city.group, head_name="Phạm Văn Lộc")
    head = created.household.head_person_id
    capsys.readouterr()

    # The type as its topic's events name it (the short form of PERSON_REGISTERED).
    args = ["--from-beginning", "--key", head, "--type", "PersonRegistered", "--count", "1"]
    assert await cli.run(tail_args(settings, *args)) == 0

    [line] = capsys.readouterr().out.splitlines()
    assert line.split(" ")[1] == PERSON_REGISTERED
    decoded = json.loads(line.split(" ", 4)[4])
    assert decoded["person_id"] == head
    assert decoded["household_id"] == created.household.household_id


def test_tail_shows_another_producers_record_as_such_and_goes_on() -> None:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="civic.registry.v1", partition=2, offset=7, timestamp=0, timestamp_type=0,
        key=b"k", value=b"hello", checksum=None, serialized_key_size=1,
        serialized_value_size=5, headers=[("x-origin", b"\xfe\xff")],
    )  # fmt: skip
    line = topic_tail.line_for(record, ())
    assert line is not None and line.startswith("2@7 (not a readable CloudEvent")
    assert topic_tail.line_for(record, (PERSON_REGISTERED,)) is None


async def test_tail_of_an_unknown_topic_is_refused_with_the_topics_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        await cli.run(["tail", "civic.nothing.v1"])
    assert exited.value.code == 2
    assert "civic.tickets.v1" in capsys.readouterr().err


async def test_tail_of_an_unreachable_broker_is_one_line() -> None:
    """Not aiokafka's own log lines and warnings besides: the command's one line."""
    tail = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "tail", "civic.tickets.v1"),
        *("--bootstrap", "127.0.0.1:1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    out, err = await asyncio.wait_for(tail.communicate(), 60)
    assert tail.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Kafka at 127.0.0.1:1"), lines
    assert not out


async def test_tail_of_a_broker_address_whose_port_is_no_number_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A typo in the address: refused before connecting, naming where it was given."""
    assert await cli.run(["tail", "civic.tickets.v1", "--bootstrap", "localhost:909z"]) == 2
    assert capsys.readouterr().err == (
        "error: --bootstrap 'localhost:909z': a broker is host:port, the port a number\n"
    )


def test_a_broker_variable_whose_port_is_no_number_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Any command reading the settings refuses it, naming the variable (here `tail`)."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka-1:9092,kafka-2:")
    assert cli.main(["tail", "civic.tickets.v1"]) == 2
    assert capsys.readouterr().err == (
        "error: KAFKA_BOOTSTRAP_SERVERS: a broker is host:port, the port a number\n"
    )


async def test_tail_into_a_reader_gone_away_stops_without_a_traceback(
    city: City, settings: Settings
) -> None:
    """`civic tail ... | head`: once head has its lines, the next line meets a closed pipe."""
    created = await new_household(city.leader, city.group, head_name="Hồ Thị Lan")
    args = tail_args(settings, "--from-beginning", "--key", created.household.household_id)
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before the first line
    try:
        tail = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "services.cli", *args),
            stdout=writer,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
    finally:
        os.close(writer)
    _, err = await asyncio.wait_for(tail.communicate(), 60)

    assert tail.returncode == 1
    assert (
        err.decode()
        == f"tailing civic.registry.v1 on {settings.kafka_bootstrap_servers} (Ctrl-C stops)\n"
    )


async def test_tail_says_on_stderr_that_it_has_started(
    city: City, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a silent wait that looks the same as a tail that never started."""
    created = await new_household(city.leader, city.group, head_name="Đinh Văn Sơn")
    capsys.readouterr()
    args = ["--from-beginning", "--key", created.household.household_id, "--count", "1"]

    assert await cli.run(tail_args(settings, *args)) == 0

    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1
    bootstrap = settings.kafka_bootstrap_servers
    assert err == f"tailing civic.registry.v1 on {bootstrap} (Ctrl-C stops)\n"


async def test_tail_says_when_the_broker_is_lost_and_when_it_is_back(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker of its own (the session's goes on serving the other tests), stopped and started
    again under a running tail: the consumer's own retries are silent."""
    external = {
        "CIVIC_MONGO_URI": settings.mongo_uri,
        "CIVIC_S3_ENDPOINT": settings.s3_endpoint,
        "CIVIC_S3_ACCESS_KEY": settings.s3_access_key,
        "CIVIC_S3_SECRET_KEY": settings.s3_secret_key,
        "CIVIC_S3_SECURE": str(settings.s3_secure).lower(),
    }
    for name, value in external.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    broker = LocalStack(tmp_path, Ports.free())
    bootstrap = (await asyncio.to_thread(broker.up, 1)).kafka_bootstrap_servers
    broker.stop_with(os.getpid())  # a killed run leaves no broker behind
    tail = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "tail", "civic.tickets.v1"),
        *("--bootstrap", bootstrap),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert tail.stderr is not None

        async def next_line() -> str:
            assert tail.stderr is not None
            return (await asyncio.wait_for(tail.stderr.readline(), 60)).decode()

        assert await next_line() == f"tailing civic.tickets.v1 on {bootstrap} (Ctrl-C stops)\n"
        await asyncio.to_thread(broker.down)
        assert await next_line() == f"lost the broker at {bootstrap}, retrying\n"
        await asyncio.to_thread(broker.up, 1)
        assert await next_line() == f"the broker at {bootstrap} is back\n"
    finally:
        if tail.returncode is None:
            tail.kill()
        await tail.wait()
        await asyncio.to_thread(broker.down)


async def test_tail_of_a_topic_the_broker_lacks_is_one_line_and_creates_nothing(
    settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a silent wait for ever; nor a topic made with one partition on a broker that
    creates topics when asked for them."""
    absent = f"civic.absent{uuid.uuid4().hex[:8]}.v1"
    # As if this build knew a topic the servers were never provisioned with.
    monkeypatch.setattr(topic_tail, "TOPIC_NAMES", (*topic_tail.TOPIC_NAMES, absent))
    monkeypatch.setattr(topic_tail, "load_event_types", lambda topic: None)

    args = ["tail", absent, "--bootstrap", settings.kafka_bootstrap_servers]
    status = await asyncio.wait_for(cli.run(args), 60)

    assert status == 1
    bootstrap = settings.kafka_bootstrap_servers
    assert capsys.readouterr().err == (
        f"error: topic {absent} does not exist on {bootstrap}; provision it "
        "(python -m infra.provision, or civic stack up)\n"
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        assert absent not in await admin.list_topics()
    finally:
        await admin.close()


async def test_demo_tells_its_story_on_stdout_and_only_warnings_on_stderr(
    settings: Settings,
) -> None:
    """faststream's access logger (own level, own coloured handler) keeps quiet too; and the
    demo names only the servers it starts itself: here not MongoDB, which is the session's.
    (Its own broker: on the session's, the pilot's households would reach other tests.)"""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KAFKA_BOOTSTRAP_SERVERS", "CIVIC_S3_ENDPOINT")
    }
    demo = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "demo"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env=env | {"CIVIC_MONGO_URI": settings.mongo_uri},
    )
    out, err = await asyncio.wait_for(demo.communicate(), 300)

    assert demo.returncode == 0, err.decode()
    first = out.decode().splitlines()[0]
    assert first == "Starting local servers (Kafka-protocol broker, S3) and the five services…"
    noise = [line for line in err.decode().splitlines() if "INFO" in line or "\x1b[" in line]
    assert noise == []


def test_demo_on_a_broker_address_whose_port_is_no_number_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:")
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == (
        "error: KAFKA_BOOTSTRAP_SERVERS: a broker is host:port, the port a number\n"
    )


# `civic demo` whose servers take a moment to start, and say when they begin.
DEMO_STARTING = """
import sys, time
from infra.local import LocalStack
from services import cli

up = LocalStack.up

def slow_up(self, partitions=None):
    print("starting", file=sys.stderr, flush=True)
    time.sleep(1)
    return up(self, partitions)

LocalStack.up = slow_up
sys.exit(cli.main(["demo"]))
"""


def test_demo_interrupted_while_its_servers_start_leaves_none_running(tmp_path: Path) -> None:
    """Ctrl-C then says so and stops the servers being started, which would otherwise run on
    (the watchdog starts after them) over a directory removed under them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIVIC_", "KAFKA_"))}
    demo = subprocess.Popen(
        [sys.executable, "-c", DEMO_STARTING],
        cwd=REPO_ROOT,
        env=env | {"TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stderr is not None and demo.stderr.readline() == "starting\n"
        demo.send_signal(signal.SIGINT)
        _, err = demo.communicate(timeout=120)
    finally:
        demo.kill()
        demo.wait()
    left = [
        cmdline.parent.name
        for cmdline in Path("/proc").glob("[0-9]*/cmdline")
        if str(tmp_path) in cmdline.read_bytes().decode(errors="replace")
    ]
    for pid in left:  # not to outlive a failed test
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    assert (demo.returncode, err, left) == (130, "interrupted\n", [])
    assert not list(tmp_path.glob("civic-demo-*"))


@pytest.mark.parametrize("action", ["status", "down"])
async def test_stack_of_an_environment_never_started_says_so_and_makes_nothing(
    action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt name: not "stopped" or three stopped servers, nor a directory made for it."""
    env = "t" + uuid.uuid4().hex[:8]
    root = REPO_ROOT / ".civic" / env
    try:
        status = await cli.run(["stack", action, "--env", env])
    finally:
        made = root.exists()
        if made:
            shutil.rmtree(root)
    assert (status, made) == (2, False)
    assert capsys.readouterr() == ("", f"error: no environment {env} ({root} was never up)\n")


@pytest.mark.parametrize("env", ["", "/tmp/civic-elsewhere", "../dev", "dev/..", "a b", "dev."])
async def test_stack_refuses_an_environment_name_that_is_not_a_plain_name(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a path outside .civic, nor .civic itself."""
    with pytest.raises(SystemExit) as exited:
        await cli.run(["stack", "down", "--env", env])

    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"civic stack: error: argument --env: {env!r} is not an environment name: "
        "letters, digits, - and _"
    )


def test_every_option_and_argument_says_what_it_does() -> None:
    """`civic <command> --help` is the operator's manual: nothing in it may be a bare name."""
    commands = next(
        action
        for action in cli._parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    bare = [
        f"{name} {action.dest}"
        for name, parser in commands.choices.items()
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert bare == []


async def test_tail_refuses_an_event_type_its_topic_never_carries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A misspelt --type would otherwise match nothing, and the tail would wait in silence."""
    misspelt, elsewhere = "civic.registry.v1.PersonRegisterd", "civic.tickets.v1.TicketClosed"
    args = ["--type", misspelt, "--type", PERSON_REGISTERED, "--type", elsewhere]
    assert await cli.run(["tail", "civic.registry.v1", *args]) == 2

    err = capsys.readouterr().err
    assert err.startswith(f"error: civic.registry.v1 carries no {misspelt}, {elsewhere}; its ")
    assert " PersonRegistered, " in err and len(err.splitlines()) == 1


async def test_tail_refuses_a_part_of_an_event_as_a_type_and_lists_only_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The ledger's Assessment travels inside a TransactionPosted, never as an event: a tail of
    it would wait in silence."""
    assert await cli.run(["tail", "civic.ledger.v1", "--type", "Assessment"]) == 2

    assert capsys.readouterr().err == (
        "error: civic.ledger.v1 carries no civic.ledger.v1.Assessment; its types are "
        "FundOpened, TransactionPosted\n"
    )


def test_a_short_signing_secret_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Tokens signed with a short secret can be forged by whoever guesses it from one token:
    every command and service refuses to start with one, naming the variable."""
    monkeypatch.setenv("CIVIC_AUTH_SECRET", "too-short")
    assert cli.main(["token", "--role", "city_admin", "--scope", "dn"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: CIVIC_AUTH_SECRET:")
    assert "32 characters" in line


@pytest.mark.parametrize("topic", sorted(set(topic_tail.TOPIC_NAMES) - {"civic.ledger.v1"}))
async def test_replay_ledger_refuses_another_services_topic(
    topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "N bad events ... DIFFERENCES FOUND" (status 1, which auditors escalate)."""
    args = ["replay-ledger", "--token", "t", "--unit", "dn", "--topic", topic]
    status = await cli.run([*args, "--target", "127.0.0.1:1"])

    assert status == 2
    assert capsys.readouterr() == ("", f"error: {topic} is not a ledger topic\n")


def test_help_tells_the_commands_the_token_variable_and_the_exit_statuses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])

    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "$CIVIC_TOKEN" in out and "Exit status: 0 when" in out
    assert "3 when an import left rows out" in out
    for command in ("stack", "token", "import-csv", "city", "tail", "map", "replay-ledger"):
        assert f"\n  civic {command} " in out, command


async def test_map_into_a_directory_that_does_not_exist_is_refused_before_asking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not the map drawn first, then nowhere to put it: nothing listens at the target."""
    missing = tmp_path / "nonexistent"
    args = ["--token", "t", "--target", f"127.0.0.1:{free_port()}"]

    status = await cli.run(["map", "dn.hc.hc1.t17", str(missing / "m.png"), *args])

    assert status == 2
    assert capsys.readouterr() == ("", f"error: {missing}: no such directory\n")


@pytest.mark.parametrize("unit", ["DN.HC.HC1", "dn hc", "dn..hc1", ""])
async def test_map_of_what_is_no_unit_id_is_refused_before_asking(
    unit: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--token", "t", "--target", f"127.0.0.1:{free_port()}"]

    status = await cli.run(["map", unit, str(tmp_path / "m.png"), *args])

    assert status == 2
    assert capsys.readouterr() == (
        "",
        f"error: UNIT_ID {unit!r} is not a unit id (e.g. dn.hc.hc1.t17)\n",
    )


async def test_map_onto_a_directory_is_refused_before_asking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FILE that names a directory cannot take the map: said before it is drawn."""
    folder = tmp_path / "maps.png"
    folder.mkdir()
    args = ["--token", "t", "--target", f"127.0.0.1:{free_port()}"]

    status = await cli.run(["map", "dn.hc.hc1.t17", str(folder), *args])

    assert status == 2
    assert capsys.readouterr() == (
        "",
        f"error: {folder}: is a directory, not a file to write the map to\n",
    )


async def test_city_that_cannot_create_its_units_leaves_no_directory_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    city = tmp_path / "new" / "city"
    args = ["--residents", "200", "--groups", "50", "--token", "t"]

    status = await cli.run(["city", str(city), *args, "--target", f"127.0.0.1:{free_port()}"])

    assert status == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: creating units: UNAVAILABLE"), line
    assert os.listdir(tmp_path) == []


async def test_city_too_small_for_a_household_in_every_ward_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a directory of files with no row below the header, which import-csv refuses."""
    city = tmp_path / "city"

    status = await cli.run(["city", str(city), "--residents", "50", "--groups", "50"])

    assert status == 2
    assert capsys.readouterr() == (
        "",
        "error: --residents 50 makes 15 households, fewer than the city's 50 wards: each"
        " ward's file needs one (at least 170 residents)\n",
    )
    assert os.listdir(tmp_path) == []
    assert await cli.run(["city", str(city), "--residents", "170", "--groups", "50"]) == 0
    assert all(len(path.read_text().splitlines()) > 1 for path in city.iterdir()), (
        "a ward's file with no row"
    )


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("broker", ("broker", 9092)),
        ("broker:19092", ("broker", 19092)),
        ("[::1]:9093", ("::1", 9093)),
        ("[::1]", ("::1", 9092)),
    ],
)
def test_tail_probes_a_broker_named_without_a_port_where_the_client_connects(
    address: str, expected: tuple[str, int]
) -> None:
    """Kafka's clients take an address without a port as port 9092: the probe that tells the
    broker lost must look there too, not call a broker that answers lost."""
    assert topic_tail.host_and_port(address) == expected


async def test_parked_lists_each_services_parked_events_with_why_they_wait(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"{settings.database_prefix}_parked_{uuid.uuid4().hex[:6]}"
    client = mongo_client(settings.mongo_uri)
    parked = client[f"{prefix}_tickets"][PARKED]
    group = "civic.tickets.routing"
    now = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)

    def record(offset: int) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(
            "civic.tickets.v1", 2, offset, 0, 0, b"tk-1", b"\x0a\x04tk-1", None, 4, 6, []
        )

    try:
        await parked.insert_many(
            [
                parked_record(
                    group,
                    "e1",
                    "civic.tickets.v1.TicketSubmitted",
                    record(17),
                    error="KeyError: 'flooding'",
                    behind=None,
                    now=now,
                ),
                parked_record(
                    group,
                    "e2",
                    "civic.tickets.v1.TicketCommented",
                    record(18),
                    error=None,
                    behind="e1",
                    now=now,
                ),
            ]
        )
        args = ["parked", "--mongo", settings.mongo_uri, "--database-prefix", prefix]
        assert await cli.run(args) == 0
        out, err = capsys.readouterr()
        assert out.splitlines() == [
            f"tickets {group} e1 civic.tickets.v1.TicketSubmitted key=tk-1"
            f" civic.tickets.v1[2]@17 since 2026-11-24T09:30:00Z failed {PARK_AFTER_ATTEMPTS}"
            " times: KeyError: 'flooding'",
            f"tickets {group} e2 civic.tickets.v1.TicketCommented key=tk-1"
            " civic.tickets.v1[2]@18 since 2026-11-24T09:30:00Z waits behind e1",
        ]
        assert err == "2 parked events\n"

        assert await cli.run([*args, "--service", "registry"]) == 0
        assert capsys.readouterr() == ("", "0 parked events\n")
        assert await cli.run([*args, "--service", "tickets", "--service", "tickets"]) == 0
        again, err = capsys.readouterr()
        assert (again, err) == (out, "2 parked events\n")
    finally:
        await client.drop_database(f"{prefix}_tickets")
        await client.close()


async def test_parked_of_a_mongodb_away_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/"
    assert await cli.run(["parked", "--mongo", uri]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: MongoDB at {uri} did not answer: 127.0.0.1:{port}: ")
    # The reason, not the driver's whole view of the topology and its timeouts.
    assert "Topology Description" not in line and "configured timeouts" not in line, line


@pytest.mark.parametrize("uri", ["mongodb://a:b:c", "http://127.0.0.1:27117", "mongodb://h:99999"])
async def test_parked_of_a_uri_that_is_no_mongodb_uri_is_one_line(
    uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli.run(["parked", "--mongo", uri]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: --mongo {uri!r} is not a MongoDB URI: "), line


async def test_parked_of_a_prefix_with_no_database_says_so_rather_than_none_parked(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt prefix lists nothing: "0 parked events" would read as all clear."""
    misspelt = f"{settings.database_prefix}x{uuid.uuid4().hex[:6]}"
    args = ["parked", "--mongo", settings.mongo_uri, "--database-prefix", misspelt]
    assert await cli.run(args) == 2
    assert capsys.readouterr() == (
        "",
        f"error: MongoDB at {settings.mongo_uri} holds no database of prefix {misspelt!r}"
        f" ({misspelt}_registry, {misspelt}_tickets, ...): see --database-prefix\n",
    )
    # Not a MongoDB that "did not answer": a prefix no database can have.
    args = ["parked", "--mongo", settings.mongo_uri, "--database-prefix", "a/b"]
    assert await cli.run(args) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --database-prefix 'a/b' names no database: "), line


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["import-csv", "people.csv"], "interrupted: the rows imported so far stay; run the same "),
        (["tail", "civic.registry.v1"], "interrupted\n"),
    ],
)
def test_an_interrupted_command_says_what_it_leaves(
    argv: list[str], said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in an import: the officer learns that running the file again is safe."""

    async def interrupted(argv: list[str] | None = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", interrupted)
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.startswith(said)


@pytest.mark.parametrize(
    ("role", "scope", "complaint"),
    [
        ("group_leader", "dn.hc.hc1", "is a ward; a group_leader's token is for a group"),
        ("resident", "dn", "is a city; a resident's token is for a group"),
        ("ward_officer", "dn.hc", "is a district; a ward_officer's token is for a ward"),
        ("district_officer", "dn.hc.hc1.t17", "is a group; a district_officer's token"),
        ("auditor", "dn.hc.hc1.t17.x", "is below a group"),
    ],
)
async def test_token_for_a_unit_of_another_level_than_the_roles_is_refused(
    role: str, scope: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A leader's token for a ward would act for the whole ward; one below a group, for none."""
    household = ["--household", "hh-1"] if role == "resident" else []
    assert await cli.run(["token", "--role", role, "--scope", scope, *household]) == 2
    captured = capsys.readouterr()
    assert not captured.out
    [line] = captured.err.splitlines()
    assert line.startswith(f"error: --scope {scope!r} {complaint}")


@pytest.mark.parametrize(
    ("role", "scope"),
    [
        ("city_admin", "dn"),
        ("ward_officer", "dn.hc.hc1"),
        ("auditor", "dn.hc"),
        ("treasurer", "dn.hc.hc1"),
        ("integrator", "dn.hc.hc1.t17"),
    ],
)
async def test_token_for_a_unit_of_the_roles_level_is_minted(
    role: str, scope: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli.run(["token", "--role", role, "--scope", scope]) == 0
    assert capsys.readouterr().out.count(".") == 2  # header.claims.signature


def test_parked_event_whose_error_spans_lines_is_listed_on_one() -> None:
    """A gRPC error's text spans lines; `civic parked | wc -l` counts events."""
    record = ConsumerRecord("civic.ledger.v1", 0, 5, 0, 0, b"f-1", b"", None, 3, 0, [])
    error = "AioRpcError: <AioRpcError of RPC that terminated with:\n\tstatus = UNAVAILABLE\n>"
    doc = parked_record(
        "civic.ledger.dues",
        "e9",
        "civic.ledger.v1.FundOpened",
        record,
        error=error,
        behind=None,
        now=datetime(2026, 11, 24, 9, 30, tzinfo=UTC),
    )
    assert cli._parked_line("ledger", doc) == (
        "ledger civic.ledger.dues e9 civic.ledger.v1.FundOpened key=f-1 civic.ledger.v1[0]@5"
        f" since 2026-11-24T09:30:00Z failed {PARK_AFTER_ATTEMPTS} times: AioRpcError:"
        " <AioRpcError of RPC that terminated with: status = UNAVAILABLE >"
    )


class Started(io.StringIO):
    """The tail's notes; set once it says it has started."""

    def __init__(self) -> None:
        super().__init__()
        self.said = asyncio.Event()

    def write(self, text: str) -> int:
        self.said.set()
        return super().write(text)


async def test_tail_shows_an_event_sent_right_after_it_says_it_has_started(
    settings: Settings,
) -> None:
    """ "tailing ..." is when to act (file a ticket, run an import): what is sent from then on
    is shown, not only what comes once the consumer has found the topic's ends."""
    key = f"tk-{uuid.uuid4().hex}"
    event = CloudEvent(
        id=uuid.uuid4().hex,
        type="civic.tickets.v1.TicketClosed",
        source="test",
        time=datetime.now(UTC),
        data=events_pb2.TicketClosed(ticket_id=key).SerializeToString(),
    )
    out, notes = io.StringIO(), Started()
    bootstrap = settings.kafka_bootstrap_servers
    tailing = asyncio.create_task(
        topic_tail.tail(bootstrap, "civic.tickets.v1", out, key=key, count=1, notes=notes)
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await asyncio.wait_for(notes.said.wait(), 30)
        headers = [(name, value.encode()) for name, value in event.kafka_headers().items()]
        await producer.send_and_wait(
            "civic.tickets.v1", event.data, key=key.encode(), headers=headers
        )
        assert await asyncio.wait_for(tailing, 30) == 1
    finally:
        tailing.cancel()
        await producer.stop()
    assert f" civic.tickets.v1.TicketClosed key={key} " in out.getvalue()
