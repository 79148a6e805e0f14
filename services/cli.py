"""The `civic` operator command (also `python -m services.cli`).

  civic stack up|down|status [--env dev]                the local servers (MongoDB, Kafka, S3)
  civic token --role ward_officer --scope dn.hc.hc1     a signed dev bearer token
  civic import-csv people.csv --token T                 onboard a file of persons and households
  civic city city/ [--residents N] [--token T]          a synthetic city as import files
  civic tail civic.tickets.v1 [--from-beginning]        a topic's events, decoded, as they come
  civic map dn.hc.hc1.t17 group.png --token T           a group's map as a picture to print
  civic replay-ledger --token T [--unit U]              auditors: check the funds from their events
  civic demo                                            a day in the pilot, step by step
  civic parked [--service tickets]                      events consumers set aside, and why

import-csv, map and replay-ledger take their token from $CIVIC_TOKEN when --token is not given.
Tokens are signed with CIVIC_AUTH_SECRET (the services' own setting), so they are only as good
as the secret the target services run with. The columns of an import file are described in
services/registry/csv_rows.py; `civic import-csv --help` lists them.

Exit status: 0 when the command did its work, 1 when a call or the file failed half-way, 2 when
it could not start (bad arguments, unreadable file), 3 when an import left rows out: they are
reported, the other rows are imported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import inspect
import logging
import math
import os
import re
import stat
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
from aiokafka.errors import KafkaError
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from civic.registry.v1 import registry_pb2, registry_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.errors import InvalidName, PyMongoError

from infra import local
from infra.local import InfraError
from services import demo_day, topic_tail
from services.common.auth import Role, mint_token
from services.common.broker import faststream_warnings_only
from services.common.config import GRPC_PORTS, Settings, SettingsError
from services.common.grpc_client import civic_channel
from services.common.mongo import UNIT_ID, Document
from services.common.parking import PARKED
from services.common.runtime import run_async
from services.ledger import replay
from services.ledger.events import TOPIC as LEDGER_TOPIC
from services.platform import SERVICES, create_units
from services.registry import csv_rows
from services.registry.domain import UnitKind
from services.registry.importer import STARTED_HEADER
from services.synthetic_city import (
    DEFAULT_GROUPS,
    DEFAULT_RESIDENTS,
    HOUSEHOLDS_PER_RESIDENT,
    SyntheticCity,
    write_csv,
)

DEFAULT_TARGET = f"127.0.0.1:{GRPC_PORTS['registry']}"
GIS_TARGET = f"127.0.0.1:{GRPC_PORTS['gis']}"
MAP_FORMATS = {".svg": gis_pb2.IMAGE_FORMAT_SVG, ".png": gis_pb2.IMAGE_FORMAT_PNG}
TOKEN_ENV = "CIVIC_TOKEN"
PROGRESS_EVERY = 10_000  # rows between progress lines on stderr
WAITING_EVERY = 10.0  # seconds between lines while the registry applies the last rows
UNITS_PER_LINE = 100  # units created between progress lines of `civic city --token`
MAX_CHUNK = 5_000  # rows per message; keeps a message well under gRPC's 4 MB default limit
MAX_TTL_HOURS = 366 * 24  # a year: a longer-lived token is a standing credential
MIN_TTL_SECONDS = 60  # a shorter-lived token expires before anyone can use it
HOUSEHOLD_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What no bearer token holds (RFC 6750's b64token; a signed token is base64url parts and dots).
NOT_IN_TOKEN = re.compile(r"[^A-Za-z0-9._~+/=-]")
# The tree is city › district › ward › group, one code each (dn.hc.hc1.t17): these roles act for
# one level of it. A leader's token for a ward would let a group's leader publish to, and keep the
# books of, the whole ward; a resident's, above their group, read as living nowhere.
ROLE_LEVELS = {
    Role.CITY_ADMIN: UnitKind.CITY,
    Role.DISTRICT_OFFICER: UnitKind.DISTRICT,
    Role.WARD_OFFICER: UnitKind.WARD,
    Role.GROUP_LEADER: UnitKind.GROUP,
    Role.RESIDENT: UnitKind.GROUP,
}
# An import's exit status when rows were left out: not 0, or a script would take the file as
# onboarded; not 1, which says the import itself failed.
ROWS_LEFT_OUT = 3

Handler = Callable[[argparse.Namespace], Awaitable[int]]


def main(argv: Sequence[str] | None = None) -> int:
    # Commands report problems in one line of their own: the clients' logs would repeat them
    # (aiokafka's connection errors) or bury the story (faststream's per-message lines).
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    faststream_warnings_only()
    try:
        return run_async(run(argv))
    except KeyboardInterrupt:
        given = list(sys.argv[1:] if argv is None else argv)
        if given[:1] == ["import-csv"]:
            # The rows of each batch the registry took are committed; the file is safe to run
            # again (what was imported is matched, not added twice).
            print(
                "interrupted: the rows imported so far stay; run the same file again for the rest",
                file=sys.stderr,
            )
        else:
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whatever read the output went away (`civic tail ... | head`): stop quietly, and keep
        # Python from flushing what is left into the closed pipe on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SettingsError as error:  # any command's settings, read where it needs them
        return _fail(str(error), status=2)


async def run(argv: Sequence[str] | None = None) -> int:
    """The command for argv, in the running event loop (tests call this)."""
    args = _parser().parse_args(argv)
    if "token" in args:
        try:
            args.token = _bearer(args.token)
        except ValueError as error:
            return _fail(str(error), status=2)
    handler: Handler = args.handler
    return await handler(args)


def _bearer(given: str) -> str:
    """The token of every command that takes one, checked before any call: a token read from
    a file saved on Windows ends in a carriage return, and gRPC refuses such metadata only
    once the call is made, in a log of its own."""
    token = given.strip()
    if found := NOT_IN_TOKEN.search(token):
        source = f"${TOKEN_ENV}" if given == os.environ.get(TOKEN_ENV) else "--token"
        raise ValueError(
            f"{source} is not a token: it holds {found.group()!r} (character {found.start() + 1});"
            " a token is letters, digits and . _ - ~ + / ="
        )
    return token


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="civic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    token = commands.add_parser(
        "token", help="print a signed dev bearer token", description=_token.__doc__
    )
    roles = [role.value for role in Role]
    token.add_argument(
        "--role", required=True, choices=roles, metavar="ROLE", help=" | ".join(roles)
    )
    token.add_argument("--scope", required=True, metavar="UNIT_ID", help="e.g. dn.hc.hc1")
    token.add_argument("--household", default="", metavar="HH", help="a resident's household")
    token.add_argument(
        "--subject", default="", help="who the token is for (default: you, as ROLE there)"
    )
    token.add_argument(
        "--ttl-hours",
        type=_positive(float, MAX_TTL_HOURS),
        default=12.0,
        metavar="N",
        help=f"how long the token is valid (default: 12; at most {MAX_TTL_HOURS})",
    )
    token.set_defaults(handler=_token)

    imports = commands.add_parser(
        "import-csv",
        help="import a CSV of persons with their households into the registry",
        description=inspect.cleandoc(_import_csv.__doc__ or ""),
        epilog=_file_format(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imports.add_argument("file", type=Path, metavar="FILE", help="the CSV file (UTF-8)")
    imports.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV, ""), help=f"bearer token (or ${TOKEN_ENV})"
    )
    imports.add_argument("--target", default=DEFAULT_TARGET, help="the registry's host:port")
    imports.add_argument(
        "--chunk", type=_positive(int, MAX_CHUNK), default=500, metavar="N", help="rows per message"
    )
    imports.set_defaults(handler=_import_csv)

    city = commands.add_parser(
        "city", help="write a synthetic city as import files", description=_city.__doc__
    )
    city.add_argument("directory", type=Path, metavar="DIR", help="one CSV per ward goes here")
    city.add_argument(
        "--residents",
        type=_positive(int),
        default=DEFAULT_RESIDENTS,
        metavar="N",
        help=f"how many people live in the city (default: {DEFAULT_RESIDENTS:,})",
    )
    city.add_argument(
        "--groups",
        type=_positive(int),
        default=DEFAULT_GROUPS,
        metavar="N",
        help=f"residential groups, at least one per ward (default: {DEFAULT_GROUPS:,})",
    )
    city.add_argument(
        "--seed", type=int, default=1, help="the same seed writes the same city (default: 1)"
    )
    city.add_argument(
        "--token",
        default="",
        help="a city admin's token: create the city's units in the registry too",
    )
    city.add_argument("--target", default=DEFAULT_TARGET, help="the registry's host:port")
    city.set_defaults(handler=_city)

    stack = commands.add_parser(
        "stack", help="start, stop or show the local servers", description=_stack.__doc__
    )
    stack.add_argument(
        "action",
        choices=["up", "down", "status"],
        help="up: start them (again: nothing changes); down: stop them, keeping their data; "
        "status: show each one",
    )
    stack.add_argument(
        "--env",
        default="dev",
        type=local.env_name,
        help="environment name: letters, digits, - and _ (default: dev)",
    )
    stack.set_defaults(handler=_stack)

    tail = commands.add_parser(
        "tail", help="print a topic's events, decoded", description=topic_tail.__doc__
    )
    tail.add_argument(
        "topic",
        choices=topic_tail.TOPIC_NAMES,
        metavar="TOPIC",
        help=" | ".join(topic_tail.TOPIC_NAMES),
    )
    tail.add_argument("--from-beginning", action="store_true", help="not only new events")
    tail.add_argument(
        "--type",
        action="append",
        default=[],
        help="only this event type, e.g. PersonRegistered or civic.registry.v1.PersonRegistered "
        "(repeatable)",
    )
    tail.add_argument("--key", default="", help="only this aggregate (ticket, household, fund...)")
    tail.add_argument("--count", type=_positive(int), default=0, metavar="N", help="stop after N")
    tail.add_argument("--bootstrap", default="", help="Kafka brokers (default: the services')")
    tail.set_defaults(handler=_tail)

    render = commands.add_parser(
        "map", help="render a unit's map to an SVG or PNG file", description=_map.__doc__
    )
    render.add_argument("unit", metavar="UNIT_ID", help="e.g. dn.hc.hc1.t17")
    render.add_argument("file", type=Path, metavar="FILE", help="where to write it: .svg or .png")
    render.add_argument(
        "--width",
        type=_positive(int, 4000),
        default=1200,
        metavar="PX",
        help="the picture's width in pixels (default: 1200; at most 4000)",
    )
    render.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV, ""), help=f"bearer token (or ${TOKEN_ENV})"
    )
    render.add_argument("--target", default=GIS_TARGET, help="the GIS service's host:port")
    render.set_defaults(handler=_map)
    audit = commands.add_parser(
        "replay-ledger",
        help="auditors: rebuild every fund from civic.ledger.v1, check it, compare with live",
        description=inspect.cleandoc(replay.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_arguments(audit, os.environ.get(TOKEN_ENV, ""))
    audit.set_defaults(handler=_replay_ledger)

    demo = commands.add_parser(
        "demo",
        help="play a day in the pilot through the services' gRPC APIs, printing each step",
        description=inspect.cleandoc(demo_day.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.set_defaults(handler=_demo)

    parked = commands.add_parser(
        "parked",
        help="list the events each service's consumers parked: their handler fails on them",
        description=inspect.cleandoc(_parked.__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parked.add_argument(
        "--service",
        choices=SERVICES,
        action="append",
        help="only this service's (again for more); all of them by default",
    )
    parked.add_argument(
        "--mongo", help="MongoDB's URI (default: $CIVIC_MONGO_URI, else the local stack's)"
    )
    parked.add_argument(
        "--database-prefix",
        help="the services' database prefix (default: $CIVIC_DATABASE_PREFIX, else civic)",
    )
    parked.set_defaults(handler=_parked)
    return parser


def _file_format() -> str:
    """The import file's columns and words, for `civic import-csv --help`."""
    required = set(csv_rows.REQUIRED)
    columns = ", ".join(c + ("*" if c in required else "") for c in csv_rows.COLUMNS)
    tables: dict[str, Mapping[str, int]] = {
        "sex": csv_rows.SEXES,
        "relationship": csv_rows.RELATIONSHIPS,
        "education": csv_rows.EDUCATION_LEVELS,
        "residence_kind": csv_rows.RESIDENCE_KINDS,
    }
    lines = ["columns (named in line 1, any order; * = required):"]
    lines += textwrap.wrap(columns, 96, initial_indent="  ", subsequent_indent="  ")
    lines.append("  a household not registered yet needs its address on its first row")
    lines.append("words (an empty cell means not given):")
    for column, table in tables.items():
        words = " | ".join(word for word in table if word)
        lines += textwrap.wrap(
            words, 96, initial_indent=f"  {column:<16}", subsequent_indent=" " * 18
        )
    lines.append("dates are YYYY-MM-DD; errors name the row by its line (the header is line 1)")
    return "\n".join(lines)


def _positive(kind: type[int] | type[float], most: float = float("inf")) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= most:
            limit = f" and at most {most:g}" if most < float("inf") else ""
            raise argparse.ArgumentTypeError(f"must be more than 0{limit}")
        return value

    return parse


# ---- civic token ---------------------------------------------------------------------------------


async def _token(args: argparse.Namespace) -> int:
    """Print a bearer token signed with CIVIC_AUTH_SECRET, for development and operations."""
    role = Role(args.role)
    if role is Role.RESIDENT and not args.household:
        return _fail("a resident's token needs --household", status=2)
    if args.household and role is not Role.RESIDENT:
        return _fail(f"--household is for a resident's token, not a {role.value}'s", status=2)
    if args.household and not HOUSEHOLD_ID.fullmatch(args.household):
        return _fail(f"--household {args.household!r} is not a household id", status=2)
    ttl_seconds = round(args.ttl_hours * 3600)
    if ttl_seconds < MIN_TTL_SECONDS:
        return _fail(
            f"--ttl-hours {args.ttl_hours:g} is under a minute: the token would expire before "
            "it is used",
            status=2,
        )
    if args.subject and not args.subject.strip():
        # Every access-log entry made with the token would name nobody as the reader.
        return _fail("--subject must name someone (or leave it out: you, as ROLE)", status=2)
    if not args.scope.strip():
        return _fail(
            "--scope must name a unit (e.g. dn.hc.hc1): every service refuses a token without one",
            status=2,
        )
    if not UNIT_ID.fullmatch(args.scope):
        # Such a token would be accepted and then cover nothing: every call would be refused.
        return _fail(
            f"--scope {args.scope!r} is not a unit id: lower-case codes joined by dots, "
            "e.g. dn.hc.hc1",
            status=2,
        )
    settings = Settings()
    if problem := _scope_level_problem(role, args.scope):
        return _fail(f"--scope {args.scope!r} {problem}", status=2)
    if settings.auth_secret == Settings.model_fields["auth_secret"].default:
        print(
            "note: signed with the development secret (CIVIC_AUTH_SECRET is not set)",
            file=sys.stderr,
        )
    print(
        mint_token(
            settings.auth_secret,
            subject=args.subject.strip() or _default_subject(role, args.scope, args.household),
            role=role,
            scope=args.scope,
            household_id=args.household,
            ttl_seconds=ttl_seconds,
        )
    )
    return 0


def _scope_level_problem(role: Role, scope: str) -> str:
    """Why the scope is not a unit the role acts for, or "": every service would accept such a
    token, covering nothing (below a group) or more than the role is for."""
    level = scope.count(".") + 1
    if level > len(UnitKind):
        return "is below a group: units go city.district.ward.group (e.g. dn.hc.hc1.t17)"
    wanted = ROLE_LEVELS.get(role)
    if wanted is None or level == wanted:
        return ""
    example = "dn.hc.hc1.t17".split(".")[:wanted]
    return (
        f"is a {UnitKind(level).name.lower()}; a {role.value}'s token is for a "
        f"{wanted.name.lower()} (e.g. {'.'.join(example)})"
    )


def _default_subject(role: Role, scope: str, household_id: str) -> str:
    """The operator, as this role there: the services take one subject for one person, so the
    operator's tokens for a resident and an integrator (or for two households) must differ, or
    the integrator would be shown as the ticket's submitter, a resident another's tickets."""
    return f"{_operator()}/{role.value}@{household_id or scope}"


def _operator() -> str:
    """The login name, so access logs and events show who acted with a CLI-minted token."""
    try:
        return f"{getpass.getuser()}@cli"
    except (OSError, KeyError):  # no login name for this uid (some containers)
        return "operator@cli"


# ---- civic import-csv ---------------------------------------------------------------------------


async def _import_csv(args: argparse.Namespace) -> int:
    """Stream the file's rows to the registry's ImportPersons and report per-row errors. A second
    run of the same file changes nothing, so an import that failed half-way can be run again.
    Exit status 0 when every row is in the register, 3 when rows were left out (listed; the
    others are imported), 1 when the import failed half-way, 2 when it could not start."""
    if not args.token:
        return _fail(f"--token is required (or set ${TOKEN_ENV})", status=2)
    path: Path = args.file
    try:
        # Read the whole file once first: a broken file fails here, before anything is imported.
        total = csv_rows.count_records(path)
    except csv_rows.CsvFileError as error:
        return _fail(str(error), status=2)
    if not total:
        return _fail(f"{path}: no rows below the header (line 1): nothing to import", status=2)

    progress = _Progress(total)
    stream = _RowStream(path, args.chunk, progress)
    async with civic_channel(args.target, args.token, purpose="bulk import") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            response = await stub.ImportPersons(stream.requests())
        except grpc.aio.AioRpcError as error:
            # Only an import the registry had begun can have committed rows (a refused token
            # or an unreachable registry imported nothing).
            begun = any(key == STARTED_HEADER for key, _ in error.initial_metadata() or ())
            again = " (rows committed before it stay; running the file again is safe)"
            return _fail(
                f"import failed: {error.code().name}: {error.details()}" + (again if begun else ""),
                status=1,
            )
        finally:
            progress.stop()
    failed = _report(path, total, stream, response)
    if stream.failure is not None:
        return _fail(f"stopped reading after {stream.read} rows: {stream.failure}", status=1)
    if failed:
        rows = f"{failed:,} row{'s' if failed > 1 else ''}"
        return _fail(
            f"{rows} not imported (listed above); correct them and run the file again "
            "(the rows imported stay)",
            status=ROWS_LEFT_OUT,
        )
    return 0


class _Progress:
    """Lines on stderr, so a long import shows it is alive: one every PROGRESS_EVERY rows sent,
    then one every WAITING_EVERY seconds until the registry answers. gRPC buffers what the
    registry has not read yet, so sending runs ahead of importing and ends well before it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        self.next_line = PROGRESS_EVERY
        self._waiting: asyncio.Task[None] | None = None

    def sent(self, rows: int) -> None:
        if rows >= self.next_line:
            self.next_line = rows - rows % PROGRESS_EVERY + PROGRESS_EVERY
            self._say(f"{rows:,}/{self.total:,} rows sent ({100 * rows / self.total:.0f}%)")

    def all_sent(self, rows: int) -> None:
        self._waiting = asyncio.create_task(self._wait_lines(rows))

    def stop(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()

    async def _wait_lines(self, rows: int) -> None:
        while True:
            await asyncio.sleep(WAITING_EVERY)
            self._say(f"all {rows:,} rows sent; waiting for the registry to apply them")

    def _say(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"import-csv: {message} ({elapsed:.0f} s)", file=sys.stderr)


class _RowStream:
    """The file's rows as ImportPersons messages. Rows that fail to parse stay here as errors,
    and so does a failure to read on (the stream then ends: what was sent is imported)."""

    def __init__(self, path: Path, chunk: int, progress: _Progress) -> None:
        self.path = path
        self.chunk = chunk
        self.progress = progress
        self.local_errors: list[registry_pb2.ImportRowError] = []
        self.failure: csv_rows.CsvFileError | None = None
        self.read = 0
        self.sent = 0

    async def requests(self) -> AsyncIterator[registry_pb2.ImportPersonsRequest]:
        rows: list[registry_pb2.ImportRow] = []
        try:
            for item in csv_rows.read_rows(self.path):
                self.read += 1
                if isinstance(item, registry_pb2.ImportRowError):
                    self.local_errors.append(item)
                    continue
                rows.append(item)
                if len(rows) == self.chunk:
                    yield self._message(rows)
                    rows = []
        except csv_rows.CsvFileError as error:
            # An exception here would only cancel the call; end the stream and say why instead.
            self.failure = error
        if rows:
            yield self._message(rows)
        self.progress.all_sent(self.sent)

    def _message(self, rows: list[registry_pb2.ImportRow]) -> registry_pb2.ImportPersonsRequest:
        self.sent += len(rows)
        self.progress.sent(self.sent)
        return registry_pb2.ImportPersonsRequest(rows=rows)


def _report(
    path: Path, total: int, stream: _RowStream, response: registry_pb2.ImportPersonsResponse
) -> int:
    """Prints the import's counts and its row errors; returns how many rows failed."""
    # Every row sent is created, unchanged, gives someone their citizen ID or failed; the
    # registry lists at most 10,000 failures.
    failed_there = (
        response.rows
        - response.persons_created
        - response.persons_unchanged
        - response.citizen_ids_added
    )
    failed = len(stream.local_errors) + max(failed_there, len(response.errors))
    errors = sorted([*stream.local_errors, *response.errors], key=lambda error: error.row_number)
    refused = len(stream.local_errors)
    rows = f"{total:,} row{'' if total == 1 else 's'}"
    print(f"{path}: {rows}, {refused:,} refused before sending, {response.rows:,} sent")
    print(f"  households created  {response.households_created:,}")
    print(f"  persons created     {response.persons_created:,}")
    print(f"  persons unchanged   {response.persons_unchanged:,}")
    if response.citizen_ids_added:
        print(f"  citizen IDs added   {response.citizen_ids_added:,}")
    print(f"  rows with errors    {failed:,}")
    if failed > len(errors):
        print(f"  ({failed - len(errors):,} of them not listed by the registry)")
    for error in errors:
        column = csv_rows.column_for(error.field)
        print(f"row {error.row_number}  {column + ': ' if column else ''}{error.message}")
    return failed


# ---- civic city ---------------------------------------------------------------------------------


async def _city(args: argparse.Namespace) -> int:
    """Write a synthetic city (services/synthetic_city.py: districts, 50 wards, groups, and
    households of made-up families) as one import file per ward, for `civic import-csv`. With
    --token, first create the city's units in the registry, which the files' rows belong to."""
    try:
        city = SyntheticCity(args.residents, groups=args.groups, seed=args.seed)
    except ValueError as error:
        return _fail(str(error), status=2)
    if city.households < len(city.wards):
        # A ward without households gets a file with no row, which import-csv refuses.
        least = math.ceil((len(city.wards) - 0.5) / HOUSEHOLDS_PER_RESIDENT)
        return _fail(
            f"--residents {args.residents:,} makes {city.households:,} households, fewer than "
            f"the city's {len(city.wards)} wards: each ward's file needs one (at least "
            f"{least:,} residents)",
            status=2,
        )
    directory: Path = args.directory
    # Before the units go into the registry: a directory that cannot be made leaves no trace.
    try:
        made = await asyncio.to_thread(_make_directory, directory)
    except OSError as error:
        return _fail(f"{directory}: cannot make the directory: {error.strerror or error}", status=2)
    status = 1
    try:
        status = await _create_units(city, args.target, args.token) if args.token else 0
    finally:
        if status:  # what this run made holds nothing: leave no empty directory behind
            _remove_directories(made)
    if status:
        return status
    for ward in city.wards:
        path = directory / f"{ward.unit_id}.csv"
        try:
            rows = await asyncio.to_thread(write_csv, path, city.ward_records(ward.unit_id))
        except OSError as error:
            return _fail(f"{path}: {error.strerror or error}", status=1)
        print(f"{path}: {rows:,} persons")
    return 0


async def _create_units(city: SyntheticCity, target: str, token: str) -> int:
    """The city's units in the registry; an exit status."""
    units = [(u.parent_id, u.code, u.name, u.kind) for u in city.units()]
    async with civic_channel(target, token) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            # A line per UNITS_PER_LINE: a city's thousand units take a while.
            for start in range(0, len(units), UNITS_PER_LINE):
                await create_units(registry, units[start : start + UNITS_PER_LINE])
                done = min(start + UNITS_PER_LINE, len(units))
                print(f"city: {done:,}/{len(units):,} units created", file=sys.stderr)
        except grpc.aio.AioRpcError as error:
            return _fail(f"creating units: {error.code().name}: {error.details()}", status=1)
    print(f"{len(units):,} units in the registry")
    return 0


def _make_directory(directory: Path) -> list[Path]:
    """Makes the directory and those above it that are missing; returns those it made, the
    deepest first."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_directories(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):  # not empty after all (someone else's file): keep it
            path.rmdir()


# ---- civic stack, civic tail ------------------------------------------------------------------


async def _stack(args: argparse.Namespace) -> int:
    """The local servers of an environment, as `make run` starts them (data in .civic/<env>)."""
    return local.main([args.action, "--env", args.env])


async def _tail(args: argparse.Namespace) -> int:
    types = set()
    if args.type:
        known = topic_tail.event_types(args.topic)
        # A type the topic never carries (misspelt, or another topic's) would match nothing,
        # and the tail would wait in silence for ever.
        types = {name if "." in name else f"{args.topic}.{name}" for name in args.type}
        if unknown := sorted(types.difference(known)):
            return _fail(
                f"{args.topic} carries no {', '.join(unknown)}; its types are "
                + ", ".join(name.removeprefix(f"{args.topic}.") for name in known),
                status=2,
            )
    bootstrap = args.bootstrap or Settings().kafka_bootstrap_servers
    source = "--bootstrap" if args.bootstrap else "KAFKA_BOOTSTRAP_SERVERS"
    try:
        local.kafka_addresses(bootstrap, source)
    except InfraError as error:
        return _fail(str(error), status=2)
    try:
        await topic_tail.tail(
            bootstrap,
            args.topic,
            sys.stdout,
            from_beginning=args.from_beginning,
            types=types,
            key=args.key,
            count=int(args.count),
            notes=sys.stderr,
        )
    except KafkaError as error:
        return _fail(f"Kafka at {bootstrap}: {error}", status=1)
    except topic_tail.MissingTopic as error:
        return _fail(str(error), status=1)
    return 0


async def _replay_ledger(args: argparse.Namespace) -> int:
    # Another service's topic would be replayed as a ledger whose every event is bad: a report
    # of differences, the status auditors escalate, for what is only a wrong --topic.
    if args.topic in topic_tail.TOPIC_NAMES and args.topic != LEDGER_TOPIC:
        return _fail(f"{args.topic} is not a ledger topic", status=2)
    return await replay.command(args)


async def _demo(args: argparse.Namespace) -> int:
    try:
        return await demo_day.command()
    except (
        InfraError,
        TimeoutError,
        grpc.aio.AioRpcError,
        KafkaError,
        topic_tail.MissingTopic,
    ) as error:
        return _fail(f"the demo stopped: {error}", status=1)


async def _map(args: argparse.Namespace) -> int:
    """Draw a unit's map — buildings shaded by storeys, alleys, hydrants — as the GIS service
    renders it, into FILE (SVG or PNG by its extension), ready to print or show."""
    if not args.token:
        return _fail(f"--token is required (or set ${TOKEN_ENV})", status=2)
    if not UNIT_ID.fullmatch(args.unit):
        # Not asked of the service, which would answer that such a unit has no boundary.
        return _fail(f"UNIT_ID {args.unit!r} is not a unit id (e.g. dn.hc.hc1.t17)", status=2)
    path: Path = args.file
    image_format = MAP_FORMATS.get(path.suffix.lower())
    if image_format is None:
        return _fail(f"{path}: the file must end in .svg or .png", status=2)
    # Before the service draws the map: a file that cannot be written is known now.
    resolved = await asyncio.to_thread(path.resolve)
    folder = resolved.parent
    if not await asyncio.to_thread(folder.is_dir):
        return _fail(f"{folder}: no such directory", status=2)
    if await asyncio.to_thread(resolved.is_dir):
        return _fail(f"{path}: is a directory, not a file to write the map to", status=2)
    if not os.access(folder, os.W_OK | os.X_OK):
        return _fail(f"{folder}: no permission to write there", status=2)
    async with civic_channel(args.target, args.token) as channel:
        try:
            answer = await gis_pb2_grpc.GisServiceStub(channel).RenderMap(
                gis_pb2.RenderMapRequest(
                    unit_id=args.unit, format=image_format, width_px=int(args.width)
                ),
                timeout=120,
            )
        except grpc.aio.AioRpcError as error:
            return _fail(f"map failed: {error.code().name}: {error.details()}", status=1)
    try:
        await asyncio.to_thread(_write_whole, path, answer.content)
    except OSError as error:
        return _fail(f"{path}: {error.strerror or error}", status=1)
    print(f"{path}: {answer.width_px} x {answer.height_px} px, {len(answer.content):,} bytes")
    return 0


async def _parked(args: argparse.Namespace) -> int:
    """List the events that consumers parked because their handler failed on each of them
    every time (see "Events" in the README): one line each, oldest first per consumer group,
    with the error, or the parked event of the same key it waits behind. They are handled when
    a release that fixes the handler starts, or by the running consumer once it passes."""
    settings = Settings()
    uri = args.mongo or settings.mongo_uri
    prefix = args.database_prefix or settings.database_prefix
    try:
        client = AsyncMongoClient[Document](uri, tz_aware=True, serverSelectionTimeoutMS=3000)
    except (PyMongoError, ValueError) as error:  # the driver parses the URI as it is made
        source = "--mongo" if args.mongo else "CIVIC_MONGO_URI"
        return _fail(f"{source} {uri!r} is not a MongoDB URI: {error}", status=2)
    found = 0
    try:
        try:
            databases = {service: client[f"{prefix}_{service}"] for service in SERVICES}
        except InvalidName as error:
            return _fail(f"--database-prefix {prefix!r} names no database: {error}", status=2)
        # A misspelt prefix (or another MongoDB) would list nothing, which reads as all clear.
        if not set(await client.list_database_names()) & {db.name for db in databases.values()}:
            return _fail(
                f"MongoDB at {uri} holds no database of prefix {prefix!r}"
                f" ({prefix}_registry, {prefix}_tickets, ...): see --database-prefix",
                status=2,
            )
        # Each once, however often named: twice would list its events twice, and count them.
        for service in dict.fromkeys(args.service or SERVICES):
            parked = databases[service][PARKED]
            async for doc in parked.find({}, {"value": 0, "headers": 0}).sort(
                [("group", 1), ("partition", 1), ("offset", 1)]
            ):
                found += 1
                print(_parked_line(service, doc))
    except PyMongoError as error:
        return _fail(f"MongoDB at {uri} did not answer: {_mongo_reason(error)}", status=1)
    finally:
        await client.close()
    print(f"{found} parked event{'' if found == 1 else 's'}", file=sys.stderr)
    return 0


def _mongo_reason(error: PyMongoError) -> str:
    """The driver's reason, without the topology it appends to a server it could not select."""
    reason = str(error).split(", Timeout: ")[0]
    return re.sub(r" \(configured timeouts: [^)]*\)", "", reason)


def _parked_line(service: str, doc: Mapping[str, Any]) -> str:
    key = doc["key"].decode(errors="replace") if doc["key"] is not None else "-"
    why = (
        f"waits behind {doc['behind']}"
        if doc["behind"]
        # On one line, as every parked event is: an error's text may span several (a gRPC
        # error's does), which would read as events of their own.
        else f"failed {doc['attempts']} times: {' '.join(doc['error'].split())}"
    )
    since = doc["parked_at"].astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"{service} {doc['group']} {doc['event_id']} {doc['type']} key={key}"
        f" {doc['topic']}[{doc['partition']}]@{doc['offset']} since {since} {why}"
    )


def _write_whole(path: Path, content: bytes) -> None:
    """Writes the file whole or not at all: the content goes to a file beside it, renamed over
    it once complete, so a failure half-way (a full disk) leaves the old file as it was. A link
    is written through, to the file it names; a file there keeps its permissions."""
    path = path.resolve()
    part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with part.open("xb") as file:
            file.write(content)
        if path.exists():
            part.chmod(stat.S_IMODE(path.stat().st_mode))
        part.replace(path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _fail(message: str, *, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
