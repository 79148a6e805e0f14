"""The `civic` command: tokens, and CSV imports against the registry running in-process."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import subprocess
import sys
import uuid
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2

from infra.local import free_port
from services import cli
from services.common.auth import Role, verify_token
from services.registry import csv_rows, importer
from tests.conftest import TEST_SECRET, token
from tests.registry_fixtures import City, citizen_id

REPO = Path(__file__).resolve().parents[2]


def write_csv(path: Path, records: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=csv_rows.COLUMNS)
        writer.writeheader()
        writer.writerows(records)
    return path


def record(
    unit_id: str, household_ref: str, name: str, born: str, sex: str, **more: str
) -> dict[str, str]:
    """A person's row; household columns as the first row of the household gives them."""
    return {
        "unit_id": unit_id,
        "household_ref": household_ref,
        "address": "12 Kiệt 45 Trần Phú",
        "floor_area_m2": "62.5",
        "storeys": "3",
        "sub_households": "1",
        "residence_kind": "permanent",
        "latitude": "16.0678",
        "longitude": "108.2208",
        "full_name": name,
        "birth_date": born,
        "sex": sex,
        "relationship": "head",
        "education": "university",
        "occupation": "giáo viên",
        "phone": "0905123456",
        **more,
    }


def cid(born: str, sex: str) -> str:
    return citizen_id(born, registry_pb2.SEX_MALE if sex == "male" else registry_pb2.SEX_FEMALE)


def good_records(city: City) -> list[dict[str, str]]:
    """Two households, five persons (two without a citizen ID: matched by name and birth)."""
    g = city.group
    return [
        record(
            g, "HK-1", "Trần Văn An", "1975-02-03", "male", citizen_id=cid("1975-02-03", "male")
        ),
        record(
            g,
            "HK-1",
            "Lê Thị Hoa",
            "1978-09-09",
            "female",
            citizen_id=cid("1978-09-09", "female"),
            relationship="spouse",
        ),
        record(g, "HK-1", "Trần Minh Khôi", "2012-04-30", "male", relationship="child"),
        record(
            g,
            "HK-2",
            "Nguyễn Thị Bê",
            "1958-11-20",
            "female",
            citizen_id=cid("1958-11-20", "female"),
            residence_kind="renter",
        ),
        record(g, "HK-2", "Võ Ngọc Ánh", "2016-01-15", "female", relationship="grandchild"),
    ]


def good_records_for(group: str) -> list[dict[str, str]]:
    return [record(group, "HK-1", "Trần Văn An", "1975-02-03", "male")]


def summary(output: str, label: str) -> int:
    found = re.search(rf"^\s+{label}\s+([\d,]+)$", output, re.MULTILINE)
    assert found, f"no {label!r} in:\n{output}"
    return int(found.group(1).replace(",", ""))


async def import_csv(
    city: City, path: Path, capsys: pytest.CaptureFixture[str], *, refused: int = 0
) -> str:
    """The report of importing `path`, whose `refused` rows are not imported."""
    bearer = token(Role.WARD_OFFICER, city.ward)
    status = await cli.run(["import-csv", str(path), "--token", bearer, "--target", city.target])
    out, err = capsys.readouterr()
    if refused:
        # A script running the import must see that rows are missing, not a clean 0.
        assert status == 3, err
        rows = f"{refused} row{'s' if refused > 1 else ''}"
        assert err.splitlines()[-1] == (
            f"error: {rows} not imported (listed above); correct them and run the file again "
            "(the rows imported stay)"
        )
    else:
        assert status == 0, err
    return out


async def residents(city: City) -> list[registry_pb2.Person]:
    found = await city.ward_officer.SearchPersons(
        registry_pb2.SearchPersonsRequest(
            unit_id=city.group, page=types_pb2.PageRequest(page_size=100)
        )
    )
    return list(found.persons)


async def civic(*args: str, **env: str) -> tuple[int, str, list[str]]:
    """`civic ARGS` as an operator runs it: (exit status, stdout, lines on stderr)."""
    done = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", *args),
        cwd=REPO,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await done.communicate()
    assert done.returncode is not None
    return done.returncode, out.decode(), err.decode().splitlines()


# ---- civic token -----------------------------------------------------------------------------


async def test_token_verifies_with_the_services_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CIVIC_AUTH_SECRET", TEST_SECRET)

    status = await cli.run(
        [
            *("token", "--role", "resident", "--scope", "dn.hc.hc1.g17", "--household", "hh-1"),
            *("--subject", "an@example.vn", "--ttl-hours", "2"),
        ]
    )

    assert status == 0
    bearer = capsys.readouterr().out.strip()
    caller = verify_token(TEST_SECRET, bearer)
    assert (caller.role, caller.scope, caller.household_id, caller.subject) == (
        Role.RESIDENT,
        "dn.hc.hc1.g17",
        "hh-1",
        "an@example.vn",
    )
    claims = jwt.decode(bearer, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 2 * 3600


async def test_resident_token_needs_a_household(capsys: pytest.CaptureFixture[str]) -> None:
    status = await cli.run(["token", "--role", "resident", "--scope", "dn"])

    assert status == 2
    assert "--household" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--role", "ward_officer", "--household", "hh-1"), "--household is for a resident"),
        (("--role", "resident", "--household", "hh 1; x"), "is not a household id"),
        (("--role", "ward_officer", "--ttl-hours", "0.01"), "under a minute"),
        # The access log would name nobody as the reader.
        (("--role", "ward_officer", "--subject", "  "), "--subject must name"),
    ],
)
async def test_a_token_that_could_not_serve_is_refused(
    args: tuple[str, ...], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await cli.run(["token", "--scope", "dn.hc.hc1", *args])

    assert status == 2
    captured = capsys.readouterr()
    assert complaint in captured.err and not captured.out


@pytest.mark.parametrize("scope", [" ", "DN HC", "dn..hc", "dn.hc."])
async def test_a_token_without_a_unit_for_scope_is_refused(
    scope: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = await cli.run(["token", "--role", "ward_officer", "--scope", scope])

    assert status == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --scope") and not captured.out


async def test_token_from_the_command_line() -> None:
    status, out, err = await civic(
        *("token", "--role", "ward_officer", "--scope", "dn.hc.hc1"), CIVIC_AUTH_SECRET=TEST_SECRET
    )

    assert status == 0, err
    caller = verify_token(TEST_SECRET, out.strip())
    assert (caller.role, caller.scope) == (Role.WARD_OFFICER, "dn.hc.hc1")
    assert caller.subject.endswith("@cli/ward_officer@dn.hc.hc1")


@pytest.mark.parametrize("hours", ["inf", "nan", "1e20", "8785"])
async def test_a_token_lives_a_year_at_most(hours: str) -> None:
    status, out, err = await civic(
        *("token", "--role", "ward_officer", "--scope", "dn", "--ttl-hours", hours)
    )
    assert (status, out) == (2, "")
    assert not any("Traceback" in line for line in err), err
    assert err[-1].endswith("argument --ttl-hours: must be more than 0 and at most 8784"), err


async def test_a_bad_setting_is_one_line_naming_its_variable() -> None:
    status, out, err = await civic(
        *("token", "--role", "ward_officer", "--scope", "dn"), CIVIC_GRPC_PORT="abc"
    )
    assert (status, out) == (2, "")
    assert len(err) == 1 and err[0].startswith("error: CIVIC_GRPC_PORT: "), err


@pytest.mark.parametrize(
    ("command", "sources"),
    [
        (["import-csv", "people.csv"], ["$CIVIC_TOKEN", "--token"]),
        (["map", "dn.hc.hc1.t17", "map.png"], ["$CIVIC_TOKEN", "--token"]),
        (["city", "city", "--residents", "100", "--groups", "50"], ["--token"]),
        (["replay-ledger", "--unit", "dn.hc.hc1"], ["$CIVIC_TOKEN", "--token"]),
    ],
)
@pytest.mark.parametrize("bad", ["é", "\r\nx", "\x7f"])
def test_a_token_with_what_no_token_holds_is_refused_in_one_line_before_any_call(
    command: list[str], sources: list[str], bad: str, tmp_path: Path
) -> None:
    write_csv(tmp_path / "people.csv", good_records_for("dn.hc.hc1.t17"))
    closed = f"127.0.0.1:{free_port()}"  # nothing would answer a call
    bearer = token(Role.CITY_ADMIN, "dn")
    broken = bearer[:10] + bad + bearer[10:]

    for source in sources:
        env, flag = (broken, []) if source == "$CIVIC_TOKEN" else ("", ["--token", broken])
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *command, *flag, "--target", closed],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO), "CIVIC_TOKEN": env},
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert (done.returncode, done.stdout) == (2, ""), done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"error: {source} is not a token: it holds "), line
        assert sorted(path.name for path in tmp_path.iterdir()) == ["people.csv"]


async def test_a_token_with_a_line_end_after_it_is_used_without_it(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export CIVIC_TOKEN=$(cat token.txt)` of a file saved on Windows."""
    monkeypatch.setenv("CIVIC_TOKEN", token(Role.WARD_OFFICER, city.ward) + "\r\n ")
    path = write_csv(tmp_path / "people.csv", good_records_for(city.group))

    status = await cli.run(["import-csv", str(path), "--target", city.target])

    assert status == 0, capsys.readouterr().err
    assert [p.full_name for p in await residents(city)] == ["Trần Văn An"]


# ---- civic import-csv ------------------------------------------------------------------------


async def test_import_creates_households_and_persons(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "people.csv", good_records(city))

    out = await import_csv(city, path, capsys)

    assert (summary(out, "households created"), summary(out, "persons created")) == (2, 5)
    assert summary(out, "rows with errors") == 0
    persons = await residents(city)
    assert {p.full_name for p in persons} == {r["full_name"] for r in good_records(city)}
    head = next(p for p in persons if p.full_name == "Trần Văn An")
    got = await city.ward_officer.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=head.household_id)
    )
    assert got.household.external_ref == "HK-1"
    assert got.household.unit_id == city.group
    assert got.household.housing == registry_pb2.Housing(
        floor_area_m2=62.5, storeys=3, sub_households=1
    )
    assert got.household.location.latitude == pytest.approx(16.0678)
    assert got.head.person_id == head.person_id
    assert {m.full_name for m in got.members} == {"Trần Văn An", "Lê Thị Hoa", "Trần Minh Khôi"}
    child = next(m for m in got.members if m.full_name == "Trần Minh Khôi")
    assert (child.relationship, child.sex, child.education) == (
        registry_pb2.RELATIONSHIP_CHILD,
        registry_pb2.SEX_MALE,
        registry_pb2.EDUCATION_LEVEL_UNIVERSITY,
    )


async def test_bad_rows_are_reported_by_line_and_the_others_imported(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g, tomorrow = city.group, (date.today() + timedelta(days=2)).isoformat()
    good = good_records(city)
    bad = [
        # line 3: the ID says born in 1991
        record(
            g,
            "HK-1",
            "Phạm Văn Cường",
            "1990-06-01",
            "male",
            citizen_id=cid("1991-06-01", "male"),
            relationship="sibling",
        ),
        # line 5: born in the future
        record(g, "HK-1", "Trần Thị Mai", tomorrow, "female", relationship="child"),
        # line 7: a unit that does not exist (inside the officer's scope)
        record(f"{city.ward}.nowhere", "HK-9", "Đỗ Văn Hùng", "1980-01-01", "male"),
        # line 9: a word the file format does not know, refused before sending
        record(g, "HK-2", "Hồ Thị Lan", "1990-03-03", "gái", relationship="other_relative"),
    ]
    rows = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4]]
    path = write_csv(tmp_path / "people.csv", rows)

    out = await import_csv(city, path, capsys, refused=4)

    assert summary(out, "persons created") == 5
    assert summary(out, "rows with errors") == 4
    errors = re.findall(r"^row (\d+)  (\w+): (.*)$", out, re.MULTILINE)
    assert [(int(line), column) for line, column, _ in errors] == [
        (3, "citizen_id"),
        (5, "birth_date"),
        (7, "unit_id"),
        (9, "sex"),
    ]
    assert "birth year" in errors[0][2]
    assert "future" in errors[1][2]
    assert "no known unit" in errors[2][2]
    assert "'gái' is not one of male, female, nam, nu" in errors[3][2]
    assert len(await residents(city)) == 5


async def test_second_run_of_the_same_file_changes_nothing(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = good_records(city)
    rows.insert(1, record(city.group, "HK-1", "Bùi Văn Tư", "1990-01-01", "robot"))
    path = write_csv(tmp_path / "people.csv", rows)
    await import_csv(city, path, capsys, refused=1)

    out = await import_csv(city, path, capsys, refused=1)

    assert summary(out, "households created") == 0
    assert summary(out, "persons created") == 0
    assert summary(out, "persons unchanged") == 5
    assert re.findall(r"^row (\d+)  (\w+):", out, re.MULTILINE) == [("3", "sex")]
    assert len(await residents(city)) == 5


async def test_a_failed_call_is_one_line_and_exit_status_1(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "people.csv", good_records_for("dn.x.y.g1"))
    closed = f"127.0.0.1:{free_port()}"

    status, _, err = await civic(
        "import-csv", str(path), "--target", closed, CIVIC_TOKEN=token(Role.WARD_OFFICER, "dn")
    )

    assert status == 1
    assert len(err) == 1, err
    assert err[0].startswith("error: import failed: UNAVAILABLE")
    assert "again" not in err[0]  # nothing reached the registry


async def test_a_refused_token_is_not_followed_by_advice_to_run_the_file_again(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "people.csv", good_records(city))

    status = await cli.run(["import-csv", str(path), "--token", "garbage", "--target", city.target])

    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("error: import failed: UNAUTHENTICATED: ")
    assert "committed" not in err and "again" not in err
    assert await residents(city) == []


async def test_an_import_failing_half_way_says_running_the_file_again_is_safe(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry commits a batch, then fails (a fault of its own) on the next one."""
    monkeypatch.setattr(importer, "BATCH_ROWS", 2)
    apply = importer.Importer._apply
    batches = 0

    async def second_batch_fails(self: importer.Importer, *args: Any) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:
            raise RuntimeError("a fault in the registry")
        await apply(self, *args)

    monkeypatch.setattr(importer.Importer, "_apply", second_batch_fails)
    path = write_csv(tmp_path / "people.csv", good_records(city))
    bearer = token(Role.WARD_OFFICER, city.ward)

    status = await cli.run(["import-csv", str(path), "--token", bearer, "--target", city.target])

    assert status == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: import failed: INTERNAL: ")
    assert line.endswith("(rows committed before it stay; running the file again is safe)")
    assert len(await residents(city)) == 2  # the first batch


async def test_a_file_without_a_required_column_is_refused_before_importing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "people.csv"
    path.write_text("unit_id,household_ref,full_name,birth_date,relationship\n", encoding="utf-8")

    status = await cli.run(["import-csv", str(path), "--token", "t", "--target", "127.0.0.1:1"])

    assert status == 2
    assert "lacks the column(s) sex" in capsys.readouterr().err


async def test_a_quote_left_open_takes_no_row_into_its_cell(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A closing quote lost in an edit: the row is reported by its line and column, and the
    next row is imported, not swallowed into the open cell."""
    g = city.group
    rows = [
        record(g, "HK-1", "Trần Văn An", "1975-02-03", "male", email="OPEN"),
        record(g, "HK-2", "Lê Văn Bình", "1980-02-03", "male"),
    ]
    path = write_csv(tmp_path / "people.csv", rows)
    path.write_text(path.read_text(encoding="utf-8").replace("OPEN", '"thợ may'), "utf-8")

    out = await import_csv(city, path, capsys, refused=1)

    assert out.startswith(f"{path}: 2 rows, 1 refused before sending, 1 sent")
    assert re.findall(r"^row (\d+)  (\w+): (.*)$", out, re.MULTILINE) == [
        ("2", "email", "the quote that opens it is not closed on this line or the 2 after it")
    ]
    assert [p.full_name for p in await residents(city)] == ["Lê Văn Bình"]


async def test_a_file_with_no_row_below_its_header_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "people.csv", [])
    path.write_text(path.read_text(encoding="utf-8") + "\n,,\n", encoding="utf-8")

    status = await cli.run(["import-csv", str(path), "--token", "t", "--target", "127.0.0.1:1"])

    assert status == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {path}: no rows below the header (line 1): nothing to import\n"
    assert not captured.out


# ---- the file format -----------------------------------------------------------------------------


def test_rows_are_numbered_by_their_line(tmp_path: Path) -> None:
    # A byte-order mark and ";" as spreadsheets write them; a quoted address holding a ";".
    path = tmp_path / "people.csv"
    path.write_text(
        "\ufeffUnit_ID;household_ref;address;full_name;birth_date;sex;relationship;latitude\n"
        'g1;HK-1;"12 Trần Phú; Hải Châu";Trần Văn An;1975-02-03;male;head;\n'
        "\n"
        "g1;HK-1;;Lê Thị Hoa;1978-09-09;Female;spouse;16.1\n"
        "g1;HK-2;;Hồ Văn Ba;1978-09-09;male;head;;extra\n",
        encoding="utf-8",
    )

    rows = list(csv_rows.read_rows(path))

    first, second, third = rows
    assert isinstance(first, registry_pb2.ImportRow)
    assert (first.row_number, first.address, first.HasField("location")) == (
        2,
        "12 Trần Phú; Hải Châu",
        False,
    )
    assert (first.person.sex, first.person.relationship) == (
        registry_pb2.SEX_MALE,
        registry_pb2.RELATIONSHIP_HEAD,
    )
    assert second == registry_pb2.ImportRowError(
        row_number=4, field="longitude", message="is required when latitude is given"
    )
    assert isinstance(third, registry_pb2.ImportRowError)
    assert (third.row_number, third.field) == (5, "")
    assert csv_rows.count_records(path) == 3


@pytest.mark.parametrize(
    ("line", "field", "complaint"),
    [
        # A quote left open takes no other record into its cell, however many lines it tries.
        ('g1,HK-1,"12 Trần Phú,Trần Văn An,1975-02-03,male,head', "address", "not closed"),
        ('g1,"HK"1,,Trần Văn An,1975-02-03,male,head', "household_ref", "quote the whole cell"),
        ('g1,HK-1,,Trần Văn An,1975-02-03,male,head,,"x', "", "cell 9: the quote"),
    ],
)
def test_a_cell_whose_quotes_are_broken_is_its_rows_error(
    tmp_path: Path, line: str, field: str, complaint: str
) -> None:
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,address,full_name,birth_date,sex,relationship,,\n"
        f"{line}\n"
        'g1,HK-2,"5 Lê Lợi, ""B""",Hồ Văn Ba,1978-09-09,male,head\n',
        encoding="utf-8",
    )

    error, *others = csv_rows.read_rows(path)

    assert isinstance(error, registry_pb2.ImportRowError)
    assert (error.row_number, error.field) == (2, field)
    assert complaint in error.message, error.message
    last = others[-1]
    assert isinstance(last, registry_pb2.ImportRow)
    assert (last.row_number, last.address) == (len(others) + 2, '5 Lê Lợi, "B"')


def test_a_cell_over_two_lines_as_a_spreadsheet_writes_one_is_one_record(tmp_path: Path) -> None:
    """An address typed with a line break in its cell (Alt+Enter) is quoted over two lines: one
    record, numbered by the line it starts on; the rows after it keep their own numbers."""
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,address,full_name,birth_date,sex,relationship\n"
        'g1,HK-1,"12 Trần Phú\nHải Châu",Trần Văn An,1975-02-03,male,head\n'
        "g1,HK-1,,Lê Thị Hoa,1978-09-09,female,spouse\n",
        encoding="utf-8",
    )

    first, second = csv_rows.read_rows(path)

    assert isinstance(first, registry_pb2.ImportRow)
    assert (first.row_number, first.address, first.person.full_name) == (
        2,
        "12 Trần Phú\nHải Châu",
        "Trần Văn An",
    )
    assert isinstance(second, registry_pb2.ImportRow)
    assert (second.row_number, second.person.full_name) == (4, "Lê Thị Hoa")


def test_empty_columns_a_spreadsheet_adds_are_ignored_unless_they_hold_a_value(
    tmp_path: Path,
) -> None:
    # Spreadsheets export the empty columns right of the table as trailing separators.
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,full_name,birth_date,sex,relationship,,,\n"
        "g1,HK-1,Trần Văn An,1975-02-03,male,head,,,\n"
        "g1,HK-1,Lê Thị Hoa,1978-09-09,female,spouse,,ghi chú,\n"
        "g1,HK-1,Trần Thị Bé,2010-01-01,female,child\n",
        encoding="utf-8",
    )

    first, second, third = csv_rows.read_rows(path)

    assert isinstance(first, registry_pb2.ImportRow) and isinstance(third, registry_pb2.ImportRow)
    assert (first.person.full_name, third.person.full_name) == ("Trần Văn An", "Trần Thị Bé")
    assert isinstance(second, registry_pb2.ImportRowError)
    assert (second.row_number, second.field) == (3, "")
    assert "cell 8" in second.message and "no column" in second.message, second.message


def test_citizen_ids_a_spreadsheet_wrote_as_numbers_get_their_leading_zeros_back(
    tmp_path: Path,
) -> None:
    """Every province code begins with a zero, which a spreadsheet drops from a column it took
    for numbers ("048190123456" is written 48190123456, "001..." 1...): given back, the row is
    the person's, not refused as an ID of 11 digits. Anything else is left as written."""
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,full_name,birth_date,sex,relationship,citizen_id\n"
        "g1,HK-1,Trần Văn An,1990-02-03,male,head,48090123456\n"
        "g1,HK-1,Lê Thị Hoa,1991-09-09,female,spouse,1191654321\n"
        "g1,HK-1,Trần Thị Bé,2010-01-01,female,child,048310000001\n"
        "g1,HK-1,Trần Văn Út,2012-01-01,male,child,123456789\n",
        encoding="utf-8",
    )

    ids = [row.person.citizen_id for row in csv_rows.rows_from_csv(path)]

    assert ids == ["048090123456", "001191654321", "048310000001", "123456789"]


def test_phone_numbers_a_spreadsheet_wrote_as_numbers_get_their_leading_zero_back(
    tmp_path: Path,
) -> None:
    """A mobile number (0905 123 456) or a landline with its area code (0236 3821 234) written
    by a spreadsheet as a number has lost its first 0 and reaches nobody: given back. Numbers
    written otherwise are left as written."""
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,full_name,birth_date,sex,relationship,phone\n"
        "g1,HK-1,Trần Văn An,1990-02-03,male,head,905123456\n"
        "g1,HK-1,Lê Thị Hoa,1991-09-09,female,spouse,2363821234\n"
        "g1,HK-1,Trần Thị Bé,2010-01-01,female,child,+84 905 123 456\n"
        "g1,HK-1,Trần Văn Út,2012-01-01,male,child,3821234\n",
        encoding="utf-8",
    )

    phones = [row.person.contact.phone for row in csv_rows.rows_from_csv(path)]

    assert phones == ["0905123456", "02363821234", "+84 905 123 456", "3821234"]


def test_registry_fields_name_their_columns() -> None:
    assert csv_rows.column_for("person.citizen_id") == "citizen_id"
    assert csv_rows.column_for("housing.floor_area_m2") == "floor_area_m2"
    assert csv_rows.column_for("location.latitude") == "latitude"
    assert csv_rows.column_for("unit_id") == "unit_id"
    assert csv_rows.column_for("") == ""


async def test_a_number_past_its_field_is_a_row_error_and_the_others_import(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A phone number pasted into `storeys` is the row's problem, not the whole import's."""
    g = city.group
    rows = [
        record(g, "HK-1", "Trần Văn An", "1975-02-03", "male"),
        record(g, "HK-2", "Lê Văn Bình", "1975-02-03", "male", storeys="3000000000"),
        record(g, "HK-3", "Lê Văn Cường", "1975-02-03", "male"),
    ]
    out = await import_csv(city, write_csv(tmp_path / "people.csv", rows), capsys, refused=1)
    assert summary(out, "persons created") == 2
    assert re.findall(r"^row (\d+)  (\w+):", out, re.MULTILINE) == [("3", "storeys")]


async def test_a_second_head_in_a_file_is_a_row_error(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = city.group
    rows = [
        record(g, "HK-1", "Trần Văn An", "1975-02-03", "male"),
        record(g, "HK-1", "Trần Văn Bảo", "1976-02-03", "male"),  # "head" too
    ]
    out = await import_csv(city, write_csv(tmp_path / "people.csv", rows), capsys, refused=1)
    assert re.findall(r"^row (\d+)  (\w+):", out, re.MULTILINE) == [("3", "relationship")]
    [head] = await residents(city)
    got = await city.ward_officer.GetHousehold(
        registry_pb2.GetHouseholdRequest(household_id=head.household_id)
    )
    assert got.household.head_person_id == head.person_id


async def test_a_second_run_does_not_bring_back_who_has_died_since(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = city.group
    rows = [
        record(g, "HK-1", "Trần Văn An", "1975-02-03", "male"),
        record(g, "HK-1", "Hồ Thị Tư", "1940-02-03", "female", relationship="parent"),
    ]
    path = write_csv(tmp_path / "people.csv", rows)
    await import_csv(city, path, capsys)
    [grandmother] = [p for p in await residents(city) if p.full_name == "Hồ Thị Tư"]
    await city.ward_officer.RegisterDeath(
        registry_pb2.RegisterDeathRequest(
            request_id=str(uuid.uuid4()),
            person_id=grandmother.person_id,
            death_date=date.today().isoformat(),
        )
    )

    out = await import_csv(city, path, capsys)

    assert summary(out, "persons created") == 0
    assert [p.full_name for p in await residents(city)] == ["Trần Văn An"]


async def test_a_file_of_one_row_is_reported_as_one_row(
    city: City, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_csv(tmp_path / "one.csv", good_records_for(city.group))

    out = await import_csv(city, path, capsys)

    assert out.startswith(f"{path}: 1 row, 0 refused before sending, 1 sent\n"), out


def test_sex_and_relationship_may_be_written_in_vietnamese(tmp_path: Path) -> None:
    """As a ward's spreadsheet has them, with or without their marks, in any case."""
    path = tmp_path / "people.csv"
    path.write_text(
        "unit_id,household_ref,full_name,birth_date,sex,relationship\n"
        "g1,HK-1,Trần Văn An,1960-02-03,Nam,Chủ hộ\n"
        "g1,HK-1,Lê Thị Hoa,1962-09-09,NỮ,Vợ\n"
        "g1,HK-1,Trần Thị Bé,1990-01-01,nu,con gai\n"
        "g1,HK-1,Trần Văn Út,2015-01-01,nam,Cháu nội\n",
        encoding="utf-8",
    )

    rows = list(csv_rows.rows_from_csv(path))

    assert [(r.person.sex, r.person.relationship) for r in rows] == [
        (registry_pb2.SEX_MALE, registry_pb2.RELATIONSHIP_HEAD),
        (registry_pb2.SEX_FEMALE, registry_pb2.RELATIONSHIP_SPOUSE),
        (registry_pb2.SEX_FEMALE, registry_pb2.RELATIONSHIP_CHILD),
        (registry_pb2.SEX_MALE, registry_pb2.RELATIONSHIP_GRANDCHILD),
    ]
