"""Uploads nobody attached are removed after a while.

An upload link hands a client a key to PUT to; what the service accepts is copied to
`checked/` and the upload removed (services/common/objects.py). What stays under an upload
prefix is what was never attached — a photo taken and abandoned, a receipt for an expense
never recorded — or refused and not yet gone. The sweeper removes such objects a day after
they were written. Records written before accepted uploads were copied name the upload key
itself: `referenced` says which of the keys a record still points at, and those stay.

A sweep of a prefix under `checked/` removes accepted files no record names: an upload accepted
by a command whose transaction then failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from services.common.objects import ObjectStore, checked
from services.common.runtime import Every

log = logging.getLogger(__name__)

# Longer than any upload link is valid (15 minutes), and than a client takes to attach.
KEEP_UPLOADS_FOR = timedelta(days=1)
SWEEP_EVERY_SECONDS = 3600.0
# Keys asked about at once: a sweep of `checked/` lists every file ever accepted there.
REFERENCED_BATCH = 1000


async def nothing_referenced(keys: list[str]) -> set[str]:
    return set()


@dataclass(frozen=True)
class Sweep:
    """Objects under `prefix` older than `keep_for` go, but those `referenced` names."""

    prefix: str
    keep_for: timedelta = KEEP_UPLOADS_FOR
    referenced: Callable[[list[str]], Awaitable[set[str]]] = field(default=nothing_referenced)


def attached_files(
    prefix: str, referenced: Callable[[list[str]], Awaitable[set[str]]]
) -> list[Sweep]:
    """The sweeps for files records attach under `prefix`: uploads never attached, and
    accepted copies no record names (accepted by a command whose transaction then failed)."""
    return [Sweep(prefix, referenced=referenced), Sweep(checked(prefix), referenced=referenced)]


class UploadSweeper:
    def __init__(
        self,
        store: ObjectStore,
        sweeps: Sequence[Sweep],
        interval_seconds: float = SWEEP_EVERY_SECONDS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.sweeps = sweeps
        # The store's clock dates the objects; this one only says how old is old.
        self.clock = clock
        self._task = Every(f"upload sweep of {store.bucket}", interval_seconds, self.sweep)

    async def sweep(self) -> int:
        """Removes what is due now; returns how many objects went."""
        removed = 0
        for sweep in self.sweeps:
            old = await self.store.written_before(sweep.prefix, self.clock() - sweep.keep_for)
            if not old:
                continue
            kept: set[str] = set()
            for start in range(0, len(old), REFERENCED_BATCH):
                kept |= await sweep.referenced(old[start : start + REFERENCED_BATCH])
            gone = [key for key in old if key not in kept]
            await self.store.remove(gone)
            removed += len(gone)
        if removed:
            log.info("removed %d unattached uploads from %s", removed, self.store.bucket)
        return removed

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
