"""What people type into a form, checked the same way by every service: composed Unicode, no
control characters, within a length counted in letters."""

from __future__ import annotations

import re
import unicodedata

from services.common.errors import InvalidArgument

# C0 and C1 control characters other than newline and tab: a NUL, a terminal escape.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# What a one-line field must not hold either: newlines, tabs, and Unicode's line and paragraph
# separators, which break a line as a newline does.
LINE_BREAK = re.compile(r"[\n\t\u2028\u2029]")


def plain_text(field_name: str, value: str, limit: int, *, one_line: bool = False) -> str:
    """The text as kept, or INVALID_ARGUMENT naming the field. Composed (NFC): Vietnamese typed
    with separate tone marks is the same letters, measured by them (not refused at half the
    limit) and kept as typed precomposed."""
    text = unicodedata.normalize("NFC", value.replace("\r\n", "\n")).strip()
    if not text:
        raise InvalidArgument(field_name, "is required")
    if len(text) > limit:
        raise InvalidArgument(field_name, f"is longer than {limit} characters")
    if CONTROL.search(text):
        raise InvalidArgument(field_name, "contains control characters")
    if one_line and LINE_BREAK.search(text):
        raise InvalidArgument(field_name, "must be one line")
    return text
