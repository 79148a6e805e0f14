"""Published messages change only compatibly: `buf breaking` against the committed baseline
catches an incompatible change, and the protos as committed pass it and `buf lint`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
BASELINE = ROOT / "proto" / "baseline.binpb"


def buf(*args: str) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is missing: `make test` installs it (npm install)"
    return subprocess.run([str(BUF), *args], capture_output=True, text=True, check=False)


def test_committed_protos_are_compatible_and_lint_clean() -> None:
    assert buf("breaking", str(ROOT / "proto"), "--against", str(BASELINE)).returncode == 0
    assert buf("lint", str(ROOT / "proto")).returncode == 0


def breaking_after(tmp_path: Path, service: str, old: str, new: str) -> str:
    """`buf breaking` on a copy of the protos with `old` made `new` in a service's events:
    what it reports, or "" if it lets the change through."""
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy)
    events = copy / "civic" / service / "v1" / "events.proto"
    text = events.read_text()
    assert old in text
    events.write_text(text.replace(old, new, 1))
    result = buf("breaking", str(copy), "--against", str(BASELINE))
    return result.stdout + result.stderr if result.returncode else ""


def test_removing_an_event_field_is_caught(tmp_path: Path) -> None:
    assert "death_date" in breaking_after(tmp_path, "registry", "  string death_date = 4;\n", "")


def test_renumbering_a_field_is_caught(tmp_path: Path) -> None:
    assert breaking_after(tmp_path, "registry", "string unit_id = 3;", "string unit_id = 30;")


def test_renaming_an_event_message_is_caught(tmp_path: Path) -> None:
    """An event's ce_type is its message's full name: stored events of the old name would no
    longer decode, though the bytes on the wire are unchanged."""
    report = breaking_after(
        tmp_path, "tickets", "message TicketSubmitted {", "message TicketFiled {"
    )
    assert "TicketSubmitted" in report
