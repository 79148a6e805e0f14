"""A fund's statement for a period as CSV (for spreadsheets) and PDF (to print and pin on the
community house board). Pure rendering: no I/O but reading the bundled font."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable
from datetime import UTC, datetime

import font_roboto
from civic.ledger.v1 import ledger_pb2
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from services.common.wire import VIETNAM

KIND_LABELS = {
    ledger_pb2.TRANSACTION_KIND_GENERAL: "Bút toán",
    ledger_pb2.TRANSACTION_KIND_CONTRIBUTION: "Thu",
    ledger_pb2.TRANSACTION_KIND_EXPENSE: "Chi",
    ledger_pb2.TRANSACTION_KIND_ASSESSMENT: "Lập sổ thu",
    ledger_pb2.TRANSACTION_KIND_REVERSAL: "Hủy",
}
HEADER = ["Số", "Ngày", "Loại", "Nội dung", "Số biên lai", "Thu (đ)", "Chi (đ)", "Mã giao dịch"]


def local_time(stamp: datetime) -> str:
    return stamp.astimezone(VIETNAM).strftime("%d/%m/%Y %H:%M")


def money(amount: int) -> str:
    """12.500.000 — the Vietnamese way of grouping đồng."""
    return f"{amount:,}".replace(",", ".")


def _rows(lines: Iterable[ledger_pb2.StatementLine]) -> list[list[str]]:
    return [
        [
            str(line.sequence),
            local_time(line.posted_at.ToDatetime(UTC)),
            KIND_LABELS.get(line.kind, ""),
            line.description,
            line.receipt_number,
            money(line.money_in) if line.money_in else "",
            money(line.money_out) if line.money_out else "",
            line.transaction_id,
        ]
        for line in lines
    ]


def _period(statement: ledger_pb2.Statement) -> str:
    start = local_time(getattr(statement, "from").ToDatetime(UTC))
    end = local_time(statement.to.ToDatetime(UTC))
    return f"{start} – {end}"


def _text(value: str) -> str:
    """A text cell a spreadsheet shows as text: one that begins like a formula (a fund or a
    household head may be named "=HYPERLINK(...)") is marked as text with a leading quote."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


class CsvStatement:
    """A statement's CSV, its lines added a page at a time: the header's figures are the whole
    period's, and no message of every line is needed."""

    def __init__(self, statement: ledger_pb2.Statement) -> None:
        self.statement = statement
        self.out = io.StringIO()
        self.writer = csv.writer(self.out)
        self.writer.writerow(["Quỹ", _text(statement.fund.name), "Đơn vị", statement.fund.unit_id])
        self.writer.writerow(["Kỳ", _period(statement)])
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

    def finish(self) -> bytes:
        statement = self.statement
        self.writer.writerow(
            ["Tổng thu (đ)", statement.total_in, "Tổng chi (đ)", statement.total_out]
        )
        self.writer.writerow(["Tồn cuối kỳ (đ)", statement.closing_available])
        # A byte-order mark, so spreadsheet programs read the Vietnamese letters as UTF-8.
        return ("\ufeff" + self.out.getvalue()).encode()


class PdfStatement:
    """A statement's PDF, its lines added a page at a time to one table, laid out by `finish`."""

    def __init__(self, statement: ledger_pb2.Statement) -> None:
        self.statement = statement
        self.pdf = pdf = FPDF(orientation="landscape", format="A4")
        pdf.set_title(f"Sao kê quỹ {statement.fund.name}")
        pdf.add_font("Roboto", "", font_roboto.Roboto)
        pdf.add_font("Roboto", "B", font_roboto.RobotoBold)
        pdf.add_page()
        pdf.set_font("Roboto", "B", 15)
        pdf.cell(0, 9, f"SAO KÊ QUỸ: {statement.fund.name}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.set_font("Roboto", "", 10)
        for text in (
            f"Đơn vị: {statement.fund.unit_id}",
            f"Kỳ: {_period(statement)}",
            f"Tồn đầu kỳ: {money(statement.opening_available)} đ",
        ):
            pdf.cell(0, 6, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        pdf.ln(2)
        pdf.set_font("Roboto", "", 8)
        # The table is drawn when its context closes, in `finish`: its heading row is repeated
        # at the top of every printed page.
        self.drawing = contextlib.ExitStack()
        self.table = self.drawing.enter_context(
            pdf.table(
                col_widths=(10, 26, 18, 90, 24, 26, 26, 57),
                text_align=("RIGHT", "LEFT", "LEFT", "LEFT", "LEFT", "RIGHT", "RIGHT", "LEFT"),
                first_row_as_headings=True,
            )
        )
        self._row(HEADER)

    def _row(self, cells: list[str]) -> None:
        row = self.table.row()
        for cell in cells:
            row.cell(cell)

    def add(self, lines: Iterable[ledger_pb2.StatementLine]) -> None:
        for cells in _rows(lines):
            self._row(cells)

    def finish(self) -> bytes:
        statement, pdf = self.statement, self.pdf
        self.drawing.close()
        pdf.ln(3)
        pdf.set_font("Roboto", "B", 10)
        for text in (
            f"Tổng thu: {money(statement.total_in)} đ    Tổng chi: {money(statement.total_out)} đ",
            f"Tồn cuối kỳ: {money(statement.closing_available)} đ",
        ):
            pdf.cell(0, 6, text, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        return bytes(pdf.output())


def csv_bytes(statement: ledger_pb2.Statement) -> bytes:
    """The CSV of a statement whose lines are all in it."""
    table = CsvStatement(statement)
    table.add(statement.lines)
    return table.finish()
