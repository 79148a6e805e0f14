"""Onboarding files: a CSV of persons with their households, read into ImportRow messages.

One record per person, a line each; a quoted cell may run over a few lines (an address typed with
a line break in a spreadsheet cell), at most MAX_RECORD_LINES in all. A quote left open is the
problem of the line it opens on and takes no other record into its cell: the lines after it are
read again as records of their own. The header names the columns (any
order, case-insensitive); COLUMNS lists them and REQUIRED those the header must have. A header
cell left empty (spreadsheets export the empty columns beside a table so) names no column: its
cells must be empty too, or their row is reported. A row's number is its line, the header being
line 1, so an operator can find it in any editor. Words (sex, relationship, education,
residence_kind) are the enum names without their prefix, in lower case: "female",
"other_relative", "lower_secondary", "renter"; sex and relationship also in Vietnamese ("Nữ",
"Chủ hộ", "Vợ", "Con", "Cháu nội"), with or without marks. An empty cell means "not given";
the registry decides whether the value is required. Range checks are the registry's too, so a
file is judged by the same rules as every other way into the register.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2

from services.registry.domain import fold

HOUSEHOLD_COLUMNS = (
    "unit_id",
    "household_ref",
    "address",
    "floor_area_m2",
    "storeys",
    "sub_households",
    "residence_kind",
    "latitude",
    "longitude",
)
PERSON_COLUMNS = (
    "full_name",
    "birth_date",
    "sex",
    "citizen_id",
    "relationship",
    "education",
    "occupation",
    "phone",
    "email",
)
COLUMNS = HOUSEHOLD_COLUMNS + PERSON_COLUMNS
REQUIRED = ("unit_id", "household_ref", "full_name", "birth_date", "sex", "relationship")

E = TypeVar("E", bound=int)


def _words(items: list[tuple[str, E]], prefix: str) -> dict[str, E]:
    """Enum values by their name without prefix, lower case; UNSPECIFIED is the empty cell."""
    return {name.removeprefix(prefix).lower() if value else "": value for name, value in items}


# A ward's spreadsheet says it in Vietnamese: these words too, matched without their marks
# ("Nữ", "nu", "NỮ" alike).
SEXES = _words(registry_pb2.Sex.items(), "SEX_") | {
    "nam": registry_pb2.SEX_MALE,
    "nu": registry_pb2.SEX_FEMALE,
}
RELATIONSHIPS = _words(registry_pb2.Relationship.items(), "RELATIONSHIP_") | {
    "chu ho": registry_pb2.RELATIONSHIP_HEAD,
    **dict.fromkeys(("vo", "chong"), registry_pb2.RELATIONSHIP_SPOUSE),
    **dict.fromkeys(("con", "con trai", "con gai"), registry_pb2.RELATIONSHIP_CHILD),
    **dict.fromkeys(("bo", "cha", "me"), registry_pb2.RELATIONSHIP_PARENT),
    **dict.fromkeys(("chau", "chau noi", "chau ngoai"), registry_pb2.RELATIONSHIP_GRANDCHILD),
    **dict.fromkeys(
        ("ong", "ba", "ong noi", "ba noi", "ong ngoai", "ba ngoai"),
        registry_pb2.RELATIONSHIP_GRANDPARENT,
    ),
    **dict.fromkeys(
        ("anh", "chi", "em", "anh trai", "chi gai", "em trai", "em gai"),
        registry_pb2.RELATIONSHIP_SIBLING,
    ),
}
EDUCATION_LEVELS = _words(registry_pb2.EducationLevel.items(), "EDUCATION_LEVEL_")
RESIDENCE_KINDS = _words(registry_pb2.ResidenceKind.items(), "RESIDENCE_KIND_")


class CsvFileError(Exception):
    """The file as a whole cannot be read (missing, not UTF-8, bad header): one line of why."""


class RowProblem(Exception):
    """A cell that cannot become a field of the row; the row is reported and skipped."""

    def __init__(self, column: str, message: str) -> None:
        super().__init__(f"{column}: {message}")
        self.column = column
        self.message = message


# ---- one record ---------------------------------------------------------------------------------


def import_row(line: int, record: Mapping[str, str]) -> registry_pb2.ImportRow:
    """The ImportRow for one record (column -> cell); RowProblem names the first bad cell."""

    def cell(column: str) -> str:
        return record.get(column, "").strip()

    row = registry_pb2.ImportRow(
        row_number=line,
        unit_id=cell("unit_id"),
        household_ref=cell("household_ref"),
        address=cell("address"),
        housing=registry_pb2.Housing(
            floor_area_m2=_number(cell("floor_area_m2"), "floor_area_m2"),
            storeys=_whole(cell("storeys"), "storeys"),
            sub_households=_whole(cell("sub_households"), "sub_households"),
        ),
        residence_kind=_word(cell("residence_kind"), "residence_kind", RESIDENCE_KINDS),
        person=registry_pb2.PersonDetails(
            full_name=cell("full_name"),
            birth_date=cell("birth_date"),
            sex=_word(cell("sex"), "sex", SEXES),
            citizen_id=_citizen_id(cell("citizen_id")),
            relationship=_word(cell("relationship"), "relationship", RELATIONSHIPS),
            education=_word(cell("education"), "education", EDUCATION_LEVELS),
            occupation=cell("occupation"),
            contact=registry_pb2.Contact(phone=_phone(cell("phone")), email=cell("email")),
        ),
    )
    location = _location(cell("latitude"), cell("longitude"))
    if location is not None:
        row.location.CopyFrom(location)
    return row


# A citizen ID as a spreadsheet writes it when it took the column for numbers: without the
# leading zeros, one or two, of its province code (every one begins with a zero).
ID_WITHOUT_LEADING_ZEROS = re.compile(r"[1-9][0-9]{9,10}")


def _citizen_id(value: str) -> str:
    """The ID with the leading zeros a spreadsheet dropped given back; anything else as written,
    for the registry to judge."""
    return value.zfill(12) if ID_WITHOUT_LEADING_ZEROS.fullmatch(value) else value


# A Vietnamese phone number, mobile (10 digits) or landline with its area code (11), as a
# spreadsheet that took the column for numbers writes it: without its leading zero. Dialled
# so, it reaches nobody; no number is 9 or 10 digits from a first digit other than 0.
PHONE_WITHOUT_LEADING_ZERO = re.compile(r"[1-9][0-9]{8,9}")


def _phone(value: str) -> str:
    """The number with the leading zero a spreadsheet dropped given back; anything else as
    written, for the registry to judge."""
    return "0" + value if PHONE_WITHOUT_LEADING_ZERO.fullmatch(value) else value


def _word(value: str, column: str, words: dict[str, E]) -> E:
    # An empty cell is UNSPECIFIED: the registry says whether the value is required.
    try:
        return words[value.lower()] if value.lower() in words else words[fold(value)]
    except KeyError:
        known = ", ".join(word for word in words if word)
        raise RowProblem(column, f"{value!r} is not one of {known}") from None


def _number(value: str, column: str) -> float:
    if not value:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        hint = f" (write {value.replace(',', '.')})" if value.count(",") == 1 else ""
        raise RowProblem(column, f"{value!r} is not a number{hint}") from None
    if not math.isfinite(number):
        raise RowProblem(column, f"{value!r} is not a number")
    return number


def _whole(value: str, column: str) -> int:
    if not value:
        return 0
    try:
        number = int(value)
    except ValueError:
        raise RowProblem(column, f"{value!r} is not a whole number") from None
    if not -(2**31) <= number < 2**31:  # the message's int32 (a phone number in the wrong column)
        raise RowProblem(column, f"{value!r} is out of range")
    return number


def _location(latitude: str, longitude: str) -> types_pb2.GeoPoint | None:
    if not latitude and not longitude:
        return None
    if not latitude or not longitude:
        missing, given = ("latitude", "longitude") if not latitude else ("longitude", "latitude")
        raise RowProblem(missing, f"is required when {given} is given")
    return types_pb2.GeoPoint(
        latitude=_number(latitude, "latitude"), longitude=_number(longitude, "longitude")
    )


# ---- a file -------------------------------------------------------------------------------------


# The most lines one record may take: a cell with a line break or two in it. A quote left open
# would take every line after it, record after record, into its cell.
MAX_RECORD_LINES = 3


def records(path: Path) -> Iterator[tuple[int, dict[str, str] | RowProblem]]:
    """(line it starts on, column -> cell) per data record, or the problem that keeps the
    record out. A quote open at a line's end takes the next line into its cell, up to
    MAX_RECORD_LINES and only while the record has no more cells than the header; otherwise it
    is the first line's problem, and the lines after it are records of their own."""
    try:
        # utf-8-sig: spreadsheets often start their CSV exports with a byte-order mark.
        with path.open(newline="", encoding="utf-8-sig") as file:
            first = file.readline()
            # Spreadsheets in locales with a decimal comma separate cells with ";".
            delimiter = ";" if first.count(";") > first.count(",") else ","
            header = _header(path, next(csv.reader([first], delimiter=delimiter), []))
            lines = enumerate(file, start=2)
            again: list[tuple[int, str]] = []  # lines to read again, the next one last
            while True:
                if again:
                    line, text = again.pop()
                elif (following := next(lines, None)) is not None:
                    line, text = following
                else:
                    break
                taken = [text]
                while _left_open(text := "".join(taken), delimiter):
                    if len(taken) == MAX_RECORD_LINES or (more := next(lines, None)) is None:
                        break
                    taken.append(more[1])
                record = _record(header, text, delimiter)
                if len(taken) > 1 and not isinstance(record, dict):
                    # No record over several lines: the quote opening it was left open.
                    again.extend(reversed(list(enumerate(taken[1:], start=line + 1))))
                    record = _record(header, taken[0], delimiter)
                if record is not None:
                    yield line, record
    except FileNotFoundError:
        raise CsvFileError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise CsvFileError(
            f"{path}: not UTF-8 text near byte {error.start}; save it as CSV UTF-8"
        ) from None
    except csv.Error as error:  # the header line (a record's own is its row's problem)
        raise CsvFileError(f"{path}: {error}") from None
    except OSError as error:
        raise CsvFileError(f"{path}: {error.strerror or error}") from None


def _left_open(text: str, delimiter: str) -> bool:
    return '"' in text and _quoted_cell(text, delimiter)[1]


def _record(header: list[str], text: str, delimiter: str) -> dict[str, str] | RowProblem | None:
    """A record's cells by column, its problem, or None for a line with no value."""
    try:
        cells = next(csv.reader([text], delimiter=delimiter, strict=True), [])
    except csv.Error:
        return _quote_problem(header, text, delimiter)
    if not any(c.strip() for c in cells):
        return None  # blank lines and rows of empty cells
    if len(cells) > len(header):
        return RowProblem("", f"has {len(cells)} cells, the header {len(header)}")
    stray = _unnamed_value(header, cells)
    if stray is not None:
        return stray
    return {name: cell for name, cell in zip(header, cells, strict=False) if name}


def _quote_problem(header: list[str], text: str, delimiter: str) -> RowProblem:
    """What is wrong with a line's quotes, named by the column of the cell where it is."""
    number, left_open = _quoted_cell(text, delimiter)
    name = header[number] if number < len(header) else ""
    if left_open:
        message = (
            f"the quote that opens it is not closed on this line or the {MAX_RECORD_LINES - 1} "
            "after it"
        )
    else:
        message = "a quote ends it before its end: quote the whole cell, doubling quotes inside it"
    return RowProblem(name, message if name else f"cell {number + 1}: {message}")


def _quoted_cell(text: str, delimiter: str) -> tuple[int, bool]:
    """The index of the cell whose quotes break the line, and whether it is left open at the
    line's end (else a closing quote is followed by more text)."""
    number, quoted, closed, start = 0, False, False, True
    for char in text.rstrip("\r\n"):
        if quoted:
            quoted = char != '"'
            closed = not quoted
        elif char == delimiter:
            number, closed, start = number + 1, False, True
            continue
        elif closed and char == '"':  # a doubled quote inside the quoted cell
            quoted, closed = True, False
        elif closed:
            return number, False
        elif char == '"' and start:
            quoted = True
        start = False
    return number, quoted


def _header(path: Path, names: list[str]) -> list[str]:
    """The column names, "" for a cell of the header left empty: spreadsheets export the empty
    columns beside a table so, and a record may leave such a column empty too."""
    header = [name.strip().lower() for name in names]
    if not any(header):
        raise CsvFileError(f"{path}: line 1 must name the columns ({', '.join(REQUIRED)}, ...)")
    unknown = [name for name in header if name and name not in COLUMNS]
    if unknown:
        raise CsvFileError(
            f"{path}: unknown column {unknown[0]!r} in line 1 (known: {', '.join(COLUMNS)})"
        )
    repeated = sorted({name for name in header if name and header.count(name) > 1})
    if repeated:
        raise CsvFileError(f"{path}: column {repeated[0]!r} appears twice in line 1")
    missing = [name for name in REQUIRED if name not in header]
    if missing:
        raise CsvFileError(f"{path}: line 1 lacks the column(s) {', '.join(missing)}")
    return header


def _unnamed_value(header: list[str], cells: list[str]) -> RowProblem | None:
    """A value in a column the header left without a name: meant for some field, so not dropped
    unread."""
    for number, (name, cell) in enumerate(zip(header, cells, strict=False), 1):
        if not name and cell.strip():
            return RowProblem("", f"cell {number} has a value but no column name in line 1")
    return None


def read_rows(path: Path) -> Iterator[registry_pb2.ImportRow | registry_pb2.ImportRowError]:
    """Every data record in order: its ImportRow, or the error that keeps it out of the import."""
    for line, record in records(path):
        try:
            if isinstance(record, RowProblem):
                raise record
            yield import_row(line, record)
        except RowProblem as problem:
            yield registry_pb2.ImportRowError(
                row_number=line, field=problem.column, message=problem.message
            )


def rows_from_csv(path: Path) -> Iterator[registry_pb2.ImportRow]:
    """Only the records that make rows (for callers that do not report the others)."""
    return (row for row in read_rows(path) if isinstance(row, registry_pb2.ImportRow))


def count_records(path: Path) -> int:
    """How many data records the file holds; reads it through, so it also fails early on a file
    that would fail half-way through an import."""
    return sum(1 for _ in records(path))


def column_for(field: str) -> str:
    """The CSV column a registry field path names ("person.citizen_id" -> "citizen_id")."""
    last = field.rsplit(".", 1)[-1]
    return last if last in COLUMNS else field
