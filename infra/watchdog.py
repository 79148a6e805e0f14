"""Stops a run's own servers once the process that started them is gone.

Tests, benchmarks and `civic demo` start MongoDB, the broker and SeaweedFS in a temporary
directory, each in a session of its own (so Ctrl-C in a shell does not reach them), and stop
them when done. A run that is killed instead (SIGKILL, a CI job's time limit, pytest-timeout's
exit) stops nothing, and the servers would run on. This process, started beside them, watches
the run and stops them when it has gone; it ends by itself once they are stopped.

    python -m infra.watchdog <owner pid> <stack root>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from infra.local import WATCHDOG_POLL_S, LocalStack, Ports, _alive


def servers_running(root: Path) -> bool:
    """Whether the stack still has a server's PID file (down() removes them)."""
    return any((root / "pids").glob("*.pid"))


def main(argv: list[str] | None = None) -> int:
    owner, root = (argv or sys.argv[1:])[:2]
    owner_pid, stack_root = int(owner), Path(root)
    while servers_running(stack_root):
        if not _alive(owner_pid):  # a zombie, killed and not yet collected, is gone
            LocalStack(stack_root, Ports.load(stack_root / "ports.json")).down()
            return 0
        time.sleep(WATCHDOG_POLL_S)
    return 0


if __name__ == "__main__":
    sys.exit(main())
