"""A fund's statement for a period as CSV (for spreadsheets) and PDF (to print and pin on the
community house board). Pure rendering: no I/O but reading the bundled font."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, time, timedelta
from typing import BinaryIO

import font_roboto
from civic.ledger.v1 import ledger_pb2
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from fpdf.fonts import TTFFont

from services.common.wire import VIETNAM

KIND_LABELS = {
    ledger_pb2.TRANSACTION_KIND_GENERAL: "Bút toán",
    ledger_pb2.TRANSACTION_KIND_CONTRIBUTION: "Thu",
    ledger_pb2.TRANSACTION_KIND_EXPENSE: "Chi",
    ledger_pb2.TRANSACTION_KIND_ASSESSMENT: "Lập sổ thu",
    ledger_pb2.TRANSACTION_KIND_REVERSAL: "Hủy",
}
HEADER = ["Số", "Ngày", "Loại", "Nội dung", "Số biên lai", "Thu (đ)", "Chi (đ)", "Mã giao dịch"]
# Each column's width in mm and whether its text keeps to the right (numbers): 277 mm, the
# width of A4 landscape within its margins.
COLUMNS = (
    (10, True),
    (26, False),
    (18, False),
    (90, False),
    (24, False),
    (26, True),
    (26, True),
    (57, False),
)
FONT = "Roboto"
TABLE_PT = 8
LINE_MM = 3.4
PAD_MM = 0.8
# From the top of a line to its baseline: the 8 pt letters' ascent, centred in the line.
BASELINE_MM = (LINE_MM - TABLE_PT * 25.4 / 72) / 2 + 0.8 * TABLE_PT * 25.4 / 72


def local_time(stamp: datetime) -> str:
    return stamp.astimezone(VIETNAM).strftime("%d/%m/%Y %H:%M")


def money(amount: int) -> str:
    """12.500.000 — the Vietnamese way of grouping đồng."""
    return f"{amount:,}".replace(",", ".")


def period_of(statement: ledger_pb2.Statement) -> str:
    """The period as a reader takes it: whole days from first to last (its end, midnight of
    the day after, is not in it), or, where it starts or ends within a day, to the minute."""
    start = getattr(statement, "from").ToDatetime(UTC).astimezone(VIETNAM)
    end = statement.to.ToDatetime(UTC).astimezone(VIETNAM)
    if start.time() == end.time() == time(0):
        last = end - timedelta(days=1)
        return f"{start:%d/%m/%Y} – {last:%d/%m/%Y}"
    return f"{local_time(start)} – {local_time(end)}"


def _text(value: str) -> str:
    """A text cell a spreadsheet shows as text: one that begins like a formula (a fund or a
    household head may be named "=HYPERLINK(...)") is marked as text with a leading quote."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


class CsvStatement:
    """A statement's CSV, its lines written to `out` a page at a time as they are read: the
    header's figures are the whole period's, and neither the lines nor the file are held."""

    def __init__(self, statement: ledger_pb2.Statement, out: BinaryIO) -> None:
        self.statement = statement
        # newline="": the csv module ends its rows itself.
        self.out = io.TextIOWrapper(out, encoding="utf-8", newline="")
        # A byte-order mark, so spreadsheet programs read the Vietnamese letters as UTF-8.
        self.out.write("\ufeff")
        self.writer = csv.writer(self.out)
        self.writer.writerow(["Quỹ", _text(statement.fund.name), "Đơn vị", statement.fund.unit_id])
        self.writer.writerow(["Kỳ", period_of(statement)])
        self.writer.writerow(["Tồn đầu kỳ (đ)", statement.opening_available])
        self.writer.writerow(HEADER)

    def add(self, lines: Iterable[ledger_pb2.StatementLine]) -> None:
        for line in lines:
            self.writer.writerow(
                [
                    line.sequence,
                    local_time(line.posted_at.ToDatetime(UTC)),
                    KIND_LABELS.get(line.kind, ""),
                    _text(line.description),
                    _text(line.receipt_number),
                    line.money_in,
                    line.money_out,
                    line.transaction_id,
                ]
            )

    def finish(self) -> None:
        statement = self.statement
        self.writer.writerow(
            ["Tổng thu (đ)", statement.total_in, "Tổng chi (đ)", statement.total_out]
        )
        self.writer.writerow(["Tồn cuối kỳ (đ)", statement.closing_available])
        self.out.flush()
        self.out.detach()  # `out` stays open for its caller, to be uploaded


def csv_bytes(statement: ledger_pb2.Statement) -> bytes:
    """The CSV of a statement whose lines are all in it."""
    out = io.BytesIO()
    table = CsvStatement(statement, out)
    table.add(statement.lines)
    table.finish()
    return out.getvalue()


class _Measure(dict[str, float]):
    """Each letter's width in mm in one font and size, looked up once. fpdf2's own layout
    (multi_cell, tables) measures a line anew for every letter it adds to it, which made
    laying out the longest memos most of an export's time."""

    def __init__(self, pdf: FPDF, style: str, size_pt: float) -> None:
        super().__init__()
        pdf.set_font(FONT, style, size_pt)
        assert isinstance(pdf.current_font, TTFFont)  # the embedded font, not a PDF core one
        self.advances = pdf.current_font.cw  # thousandths of the font's size, by code point
        self.scale = size_pt / 1000 / pdf.k

    def __missing__(self, letter: str) -> float:
        width: float = self.advances[ord(letter)] * self.scale
        self[letter] = width
        return width

    def width(self, text: str) -> float:
        return sum(map(self.__getitem__, text))

    def wrap(self, text: str, room: float) -> list[tuple[str, float]]:
        """`text` in lines, each with its width, no wider than `room`: broken between words,
        and within a word longer than a line (a receipt number, a memo without spaces)."""
        space = self[" "]
        lines: list[tuple[str, float]] = []
        words: list[str] = []
        used = 0.0
        for word in text.split():
            width = self.width(word)
            if words and used + space + width <= room:
                words.append(word)
                used += space + width
                continue
            if words:
                lines.append((" ".join(words), used))
            if width > room:
                *whole, (word, width) = self._cut(word, room)
                lines.extend(whole)
            words, used = [word], width
        if words:
            lines.append((" ".join(words), used))
        return lines

    def _cut(self, word: str, room: float) -> list[tuple[str, float]]:
        pieces: list[tuple[str, float]] = []
        start, used = 0, 0.0
        for end, letter in enumerate(word):
            width = self[letter]
            if used + width > room and end > start:
                pieces.append((word[start:end], used))
                start, used = end, 0.0
            used += width
        pieces.append((word[start:], used))
        return pieces


class _Sheets(FPDF):
    """The printed statement's pages. Each after the first opens with the table's heading row,
    and each ends with the fund, the period and the page's number: a page pinned apart from
    the others still says what it is."""

    def __init__(self, caption: str) -> None:
        super().__init__(orientation="landscape", format="A4")
        self.caption = caption
        # The page count's stand-in, as wide as the count of a year's thousands of pages.
        self.alias_nb_pages("{pages}")
        self.statement_table: PdfStatement | None = None  # once the table has begun

    def header(self) -> None:
        if self.statement_table is not None:
            self.statement_table.heading()

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(FONT, "", 7)
        self.cell(0, 5, f"{self.caption} · Trang {self.page_no()}/{{pages}}", align="R")


class PdfStatement:
    """A statement's PDF, its lines drawn a page at a time as they are read, so none is held
    but as the page's text. Every memo is printed whole, wrapped in its column: the board is
    where residents check what the money was for and who approved it, which a memo's end
    says, and a memo is at most 500 letters (nine lines); the CSV is no help on paper."""

    def __init__(self, statement: ledger_pb2.Statement) -> None:
        self.statement = statement
        self.pdf = pdf = _Sheets(f"Sao kê quỹ {statement.fund.name} · Kỳ {period_of(statement)}")
        pdf.set_title(f"Sao kê quỹ {statement.fund.name}")
        pdf.add_font(FONT, "", font_roboto.Roboto)
        pdf.add_font(FONT, "B", font_roboto.RobotoBold)
        self.bold = _Measure(pdf, "B", TABLE_PT)
        self.plain = _Measure(pdf, "", TABLE_PT)
        pdf.add_page()
        pdf.set_font(FONT, "B", 15)
        # Wrapped: a fund's name of 120 letters would run off the page in one line.
        pdf.multi_cell(
            0, 9, f"SAO KÊ QUỸ: {statement.fund.name}", new_x=XPos.LMARGIN, new_y=YPos.NEXT
        )
        pdf.set_font(FONT, "", 10)
        for text in (
            f"Đơn vị: {statement.fund.unit_id}",
            f"Kỳ: {period_of(statement)}",
            f"Tồn đầu kỳ: {money(statement.opening_available)} đ",
        ):
            pdf.cell(0, 6, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(2)
        pdf.set_fill_color(235)
        self.heading()
        pdf.statement_table = self

    def heading(self) -> None:
        """The table's heading row, in bold on grey."""
        self.pdf.set_font(FONT, "B", TABLE_PT)
        self._row(HEADER, self.bold, "DF")
        self.pdf.set_font(FONT, "", TABLE_PT)

    def _row(self, cells: Sequence[str], measure: _Measure, style: str = "D") -> None:
        """One row, on this page if it fits, else on the next; its text drawn line by line
        where `measure` laid it out, with nothing for fpdf2 to measure again."""
        pdf = self.pdf
        laid = [
            measure.wrap(text, width - 2 * PAD_MM)
            for text, (width, _) in zip(cells, COLUMNS, strict=True)
        ]
        height = max(1, *map(len, laid)) * LINE_MM + 2 * PAD_MM
        if pdf.will_page_break(height):
            pdf.add_page()
        x, top = pdf.l_margin, pdf.y
        for lines, (width, right) in zip(laid, COLUMNS, strict=True):
            pdf.rect(x, top, width, height, style)
            baseline = top + PAD_MM + BASELINE_MM
            for text, text_width in lines:
                pdf.text(x + width - PAD_MM - text_width if right else x + PAD_MM, baseline, text)
                baseline += LINE_MM
            x += width
        pdf.set_y(top + height)

    def add(self, lines: Iterable[ledger_pb2.StatementLine]) -> None:
        for line in lines:
            cells = (
                str(line.sequence),
                local_time(line.posted_at.ToDatetime(UTC)),
                KIND_LABELS.get(line.kind, ""),
                line.description,
                line.receipt_number,
                money(line.money_in) if line.money_in else "",
                money(line.money_out) if line.money_out else "",
                line.transaction_id,
            )
            self._row(cells, self.plain)

    def finish(self, out: BinaryIO) -> None:
        """The totals under the table, and the whole document written to `out`."""
        statement, pdf = self.statement, self.pdf
        pdf.ln(3)
        pdf.set_font(FONT, "B", 10)
        for text in (
            f"Tổng thu: {money(statement.total_in)} đ    Tổng chi: {money(statement.total_out)} đ",
            f"Tồn cuối kỳ: {money(statement.closing_available)} đ",
        ):
            pdf.cell(0, 6, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        out.write(pdf.output())
