"""A clock that can be moved forward: the services read time only through the clock they are
given, so tests, benchmarks and `civic demo` can let a day's deadlines pass in seconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Real time plus an offset that only grows; shared by every service of one process."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **delta: float) -> None:
        self.offset += timedelta(**delta)
