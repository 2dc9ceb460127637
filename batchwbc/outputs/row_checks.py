"""Per-row check values that reveal edits to the machine's columns of a report.

The report invites a person to edit a few columns (Verified class, Verified by, Verified on)
and nothing else. Locking the other columns with sheet protection would also block sorting
and filtering, which reviewers need, so instead every row carries a hidden "Check" cell: a
short hash of each protected value as written. `batchwbc verify` recomputes the hashes from
what it reads and names the column whose value no longer matches. This detects accidents
(a typed-over class, a pasted-over confidence), not forgery: the hash has no secret.

One hash per column (not one per row) so the error can name the edited column; a row keeps
its check when the sheet is sorted, because the check lives in the same row. Pure and light.
"""
from __future__ import annotations

import hashlib
import math
from datetime import date, datetime
from typing import Any, Sequence

#: Header of the hidden check column, always the last column of a sheet.
CHECK_HEADER = "Check"
_HEX_PER_VALUE = 6  # 24 bits per column: an accidental edit goes unnoticed with odds 1 in 16.7 million


def normal(value: Any) -> str:
    """The text a cell's value is hashed as: the same whether it was written by openpyxl or
    read back after Excel or LibreOffice saved the file (3 and 3.0 agree, CRLF is LF, an
    empty string is an empty cell)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return ""
        return format(float(value), ".10g")
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value).replace("\r\n", "\n")


def _digest(value: Any) -> str:
    data = normal(value).encode("utf-8", "replace")
    return hashlib.blake2b(data, digest_size=_HEX_PER_VALUE // 2).hexdigest()


def row_check(values: Sequence[Any], row: int) -> str:
    """The check text of one row's protected values, in column order, and of the row number
    it is written at (after "@"): a reader can tell a re-sorted sheet, whose pictures no
    longer sit beside the rows they were placed at, from one in its written order."""
    return "".join(_digest(v) for v in values) + f"@{row}"


def written_row(check: Any) -> int | None:
    """The row number a line was written at, from its check; None when unreadable."""
    if not isinstance(check, str) or "@" not in check:
        return None
    tail = check.rsplit("@", 1)[1]
    return int(tail) if tail.isdigit() else None


def edited(headers: Sequence[str], values: Sequence[Any], check: Any) -> list[str] | None:
    """The headers whose values no longer match `check`; [] when none was edited.

    None when the check cannot be compared at all: it is missing, or it covers a different
    number of columns (a column was inserted or deleted, or the row was typed in by hand)."""
    if not isinstance(check, str) or "@" not in check:
        return None
    check = check.rsplit("@", 1)[0]
    if len(check) != _HEX_PER_VALUE * len(values):
        return None
    return [
        h for i, (h, v) in enumerate(zip(headers, values))
        if check[i * _HEX_PER_VALUE:(i + 1) * _HEX_PER_VALUE] != _digest(v)
    ]
