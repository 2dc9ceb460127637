"""Compare two batchwbc reports cell by cell: the check that a refactor changed no output.

Compares every sheet of two workbooks by cell value (not bytes: the zip container and
timestamps differ between any two runs) and, optionally, two cells CSVs line by line. The
Run sheet's rows that describe the run itself rather than its results (start, finish,
duration) are skipped; `--formats` also compares widths, filters, embedded images, number
formats and cell styles; `--ignore-run-row` adds more (e.g. "Model file" when the two runs
used copies of the same model at different paths). Exit code 0 when identical, 1 otherwise.

    python benchmarks/compare_reports.py before.xlsx after.xlsx --csv before.csv after.csv
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RUN_ROWS_THAT_DIFFER = ("Run started", "Run finished", "Duration (h:mm:ss)", "Command line")


def sheet_rows(path: Path, ignore_run_rows: set[str]) -> dict[str, list[tuple]]:
    from openpyxl import load_workbook

    wb = load_workbook(path, read_only=True)
    out = {}
    for ws in wb.worksheets:
        rows = [tuple(r) for r in ws.iter_rows(values_only=True)]
        if ws.title == "Run":
            rows = [r for r in rows if not (r and r[0] in ignore_run_rows)]
        out[ws.title] = rows
    wb.close()
    return out


def compare_workbooks(a: Path, b: Path, ignore_run_rows: set[str], show: int = 10) -> list[str]:
    """Human-readable differences (empty when the workbooks hold the same values)."""
    ra, rb = sheet_rows(a, ignore_run_rows), sheet_rows(b, ignore_run_rows)
    diffs = []
    if list(ra) != list(rb):
        diffs.append(f"sheets differ: {list(ra)} vs {list(rb)}")
    for title in ra:
        if title not in rb:
            continue
        xa, xb = ra[title], rb[title]
        if len(xa) != len(xb):
            diffs.append(f"{title}: {len(xa)} rows vs {len(xb)} rows")
        bad = [(i, p, q) for i, (p, q) in enumerate(zip(xa, xb), 1) if p != q]
        for i, p, q in bad[:show]:
            diffs.append(f"{title} row {i}: {p!r} != {q!r}")
        if len(bad) > show:
            diffs.append(f"{title}: {len(bad) - show} more differing rows")
    return diffs


def _looks(path: Path) -> dict[str, list]:
    """Per sheet: column widths, images (anchor, size), row heights and every cell's type and style."""
    from openpyxl import load_workbook

    wb = load_workbook(path)
    out: dict[str, list] = {}
    for ws in wb.worksheets:
        items: list = [("widths", sorted((k, round(d.width or 0, 3)) for k, d in ws.column_dimensions.items()))]
        items.append(("filter", ws.auto_filter.ref, ws.freeze_panes))
        items.append(("images", [(i.anchor._from.row, i.anchor._from.col, i.width, i.height) for i in ws._images]))
        items.append(("heights", sorted((k, d.height) for k, d in ws.row_dimensions.items() if d.height)))
        for row in ws.iter_rows():
            for c in row:
                if ws.title == "Run" and c.column == 2 and ws.cell(c.row, 1).value in RUN_ROWS_THAT_DIFFER:
                    continue
                items.append((c.coordinate, c.data_type, c.number_format, c.quotePrefix, c.font.bold,
                              c.font.color.rgb if c.font.color else None, c.fill.fgColor.rgb, c.alignment.wrap_text))
        out[ws.title] = items
    return out


def compare_looks(a: Path, b: Path, show: int = 10) -> list[str]:
    """Differences in formatting: widths, filters, images, row heights, cell types and styles."""
    la, lb = _looks(a), _looks(b)
    diffs = []
    for title in la:
        bad = [(p, q) for p, q in zip(la[title], lb.get(title, [])) if p != q]
        diffs += [f"{title} format: {p!r} != {q!r}" for p, q in bad[:show]]
        if len(la[title]) != len(lb.get(title, [])):
            diffs.append(f"{title} format: {len(la[title])} vs {len(lb.get(title, []))} items")
    return diffs


def compare_csv(a: Path, b: Path) -> list[str]:
    la, lb = a.read_text(encoding="utf-8").splitlines(), b.read_text(encoding="utf-8").splitlines()
    if la == lb:
        return []
    first = next((i for i, (p, q) in enumerate(zip(la, lb), 1) if p != q), min(len(la), len(lb)) + 1)
    return [f"{a.name} vs {b.name}: {len(la)} vs {len(lb)} lines, first difference at line {first}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--csv", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--formats", action="store_true",
                    help="Also compare widths, filters, images, number formats, fonts, fills (slower).")
    ap.add_argument("--ignore-run-row", action="append", default=[], help="Run sheet item to skip (repeatable).")
    args = ap.parse_args(argv)
    ignore = set(RUN_ROWS_THAT_DIFFER) | set(args.ignore_run_row)
    diffs = compare_workbooks(args.before, args.after, ignore)
    if args.formats:
        diffs += compare_looks(args.before, args.after)
    if args.csv:
        diffs += compare_csv(*args.csv)
    counts = {t: len(r) for t, r in sheet_rows(args.after, ignore).items()}
    if diffs:
        print("DIFFERENT:\n  " + "\n  ".join(diffs))
        return 1
    print(f"identical values (rows per sheet: {counts}; ignored Run rows: {sorted(ignore)})"
          + (", identical formats" if args.formats else "") + (" and identical CSVs" if args.csv else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
