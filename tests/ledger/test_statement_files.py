"""A statement's files as made from its lines, read back: the printed PDF with a standard PDF
reader, for what a resident at the notice board reads on it."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pypdf
from civic.ledger.v1 import ledger_pb2
from pypdf.generic import ArrayObject, DictionaryObject

from services.common.wire import VIETNAM
from services.ledger import domain, statements

WORDED = (
    "Chi mua bóng đèn và dây điện cho kiệt 45 Trần Phú, thay ba cột đèn hỏng sau bão số 6; "
    "người nhận: Nguyễn Thị Hường, tổ dân phố 17; duyệt: Võ Minh Khang (tổ trưởng). "
) * 4


def statement_of(count: int) -> ledger_pb2.Statement:
    """A statement of `count` lines with the longest memos: in words, and in one word (a memo
    without a space, as long as a memo may be), taking turns."""
    statement = ledger_pb2.Statement(
        fund=ledger_pb2.Fund(name="Quỹ vì người nghèo", unit_id="dn.hc.hc1.t17"),
        opening_available=1_000_000,
        total_in=count * 50_000,
        closing_available=1_000_000 + count * 50_000,
        line_count=count,
    )
    # The year 2026 in Vietnam, as a statement of it is asked for.
    getattr(statement, "from").FromDatetime(datetime(2026, 1, 1, tzinfo=VIETNAM))
    statement.to.FromDatetime(datetime(2027, 1, 1, tzinfo=VIETNAM))
    for i in range(count):
        line = statement.lines.add(
            sequence=i + 1,
            kind=ledger_pb2.TRANSACTION_KIND_CONTRIBUTION,
            description=(WORDED if i % 2 else "ữ" * domain.MAX_TEXT)[: domain.MAX_TEXT].strip(),
            receipt_number=f"BL-{i:05d}/" + "9" * 33,  # as long as a receipt number may be
            money_in=50_000,
            transaction_id=f"tx-{i:024x}",
        )
        line.posted_at.FromDatetime(datetime(2026, 1, 2, tzinfo=UTC) + timedelta(hours=i))
    return statement


def printed(statement: ledger_pb2.Statement) -> list[str]:
    """The text of each page of the statement's PDF."""
    pdf = statements.PdfStatement(statement)
    pdf.add(statement.lines)
    out = io.BytesIO()
    pdf.finish(out)
    return [page.extract_text() for page in pypdf.PdfReader(out).pages]


def letters(text: str) -> str:
    """Text without the spaces and line ends its wrapping put in or took out."""
    return re.sub(r"\s+", "", text)


def test_a_printed_statement_draws_its_lines_as_they_are_added() -> None:
    """Each page of lines read for an export is laid out as it is added, not kept, with every
    line before it, to be laid out at the end."""
    statement = statement_of(40)
    pdf = statements.PdfStatement(statement)
    pdf.add(statement.lines[:20])
    drawn = pdf.pdf.page_no()
    assert drawn > 2, drawn
    pdf.add(statement.lines[20:])
    assert pdf.pdf.page_no() > drawn


def test_a_printed_statement_has_every_line_whole_under_a_heading_on_every_page() -> None:
    statement = statement_of(40)
    pages = printed(statement)
    assert len(pages) > 3
    heading = " ".join(statements.HEADER)
    caption = "Sao kê quỹ Quỹ vì người nghèo · Kỳ 01/01/2026 – 31/12/2026"
    for number, page in enumerate(pages, 1):
        assert heading in page, number
        assert page.rstrip().endswith(f"{caption} · Trang {number}/{len(pages)}"), page[-200:]
    # Every line in full, in order, its memo with every letter, Vietnamese ones included.
    text = letters("".join(pages))
    at = 0
    for line in statement.lines:
        row = letters(
            f"{line.sequence} {statements.local_time(line.posted_at.ToDatetime(UTC))} Thu"
            f" {line.description} {line.receipt_number} 50.000 {line.transaction_id}"
        )
        found = text.find(row, at)
        assert found >= 0, line.sequence
        at = found + len(row)
    assert "Tồn đầu kỳ: 1.000.000 đ" in pages[0]
    assert "Tổng thu: 2.000.000 đ    Tổng chi: 0 đ" in pages[-1]
    assert "Tồn cuối kỳ: 3.000.000 đ" in pages[-1]


def test_a_printed_statement_embeds_its_font() -> None:
    """The PDF carries the font its Vietnamese letters are drawn in: a printer's own fonts may
    have none of them."""
    pdf = statements.PdfStatement(statement_of(1))
    pdf.add(statement_of(1).lines)
    out = io.BytesIO()
    pdf.finish(out)
    page = pypdf.PdfReader(out).pages[0]
    fonts = entry(entry(page, "/Resources"), "/Font")
    embedded = set()
    for name in fonts:
        font = entry(fonts, name)
        descendant = entry(font, "/DescendantFonts")
        assert isinstance(descendant, ArrayObject)
        if "/FontFile2" in entry(descendant[0].get_object(), "/FontDescriptor"):
            embedded.add(str(font["/BaseFont"]).split("+")[-1])
    assert embedded == {"Roboto", "RobotoBold"}


def entry(dictionary: object, key: str) -> Any:
    """A PDF dictionary's entry, followed if a reference."""
    assert isinstance(dictionary, DictionaryObject)
    value = dictionary[key].get_object()
    assert isinstance(value, DictionaryObject | ArrayObject)
    return value


def test_a_long_fund_name_stays_on_the_printed_page() -> None:
    """A fund's name may be 120 letters: the statement's title wraps it within the page's
    margins, rather than running it off the paper pinned on the board."""
    statement = statement_of(1)
    name = (
        "Quỹ hỗ trợ đồng bào bị thiệt hại do bão số 6 và lũ lụt tháng 10 năm 2026 của tổ dân "
        "phố 17 phường Hòa Cường Bắc"
    )
    assert len(name) <= 120
    statement.fund.name = name
    pdf = statements.PdfStatement(statement)
    pdf.add(statement.lines)
    out = io.BytesIO()
    pdf.finish(out)
    page_width, margin = pdf.pdf.w, pdf.pdf.r_margin
    # What is drawn in the title's size, where it begins and how wide it is (in mm).
    drawn: list[tuple[str, float]] = []

    def visit(text: str, cm: Any, tm: Any, font: Any, size: float) -> None:
        if size == 15 and text.strip():
            drawn.append((text, tm[4] * 25.4 / 72))

    pypdf.PdfReader(out).pages[0].extract_text(visitor_text=visit)
    assert letters("".join(text for text, _ in drawn)) == letters(f"SAO KÊ QUỸ: {name}")
    pdf.pdf.set_font(statements.FONT, "B", 15)
    for text, x in drawn:
        assert x + pdf.pdf.get_string_width(text) <= page_width - margin + 0.01, text


def test_a_period_of_whole_days_names_its_last_day_not_the_midnight_after() -> None:
    """A November statement ends at midnight of 1 December, which is not in it."""
    statement = statement_of(1)
    getattr(statement, "from").FromDatetime(datetime(2026, 11, 1, tzinfo=VIETNAM))
    statement.to.FromDatetime(datetime(2026, 12, 1, tzinfo=VIETNAM))
    assert statements.period_of(statement) == "01/11/2026 – 30/11/2026"
    statement.to.FromDatetime(datetime(2026, 11, 15, 9, 30, tzinfo=VIETNAM))
    assert statements.period_of(statement) == "01/11/2026 00:00 – 15/11/2026 09:30"
