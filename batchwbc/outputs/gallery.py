"""A static, offline HTML gallery of every cell, grouped by class, for the technologist's review.

    out_dir/index.html           patients: flags, counts, cells to review, links
                                 (verify --html: also who signed each patient, and when)
    out_dir/patient-0001.html    one page per patient: flags, differential, every cell by class
    out_dir/thumbs/<hash>.jpg    one small JPEG per cell (outputs/gallery_thumbs.py)

This layer only formats: differentials, flags and sign-offs arrive already computed (the same
objects the workbook shows), so the gallery can never disagree with the report.

Three promises:
* Offline and self-contained: inline CSS, no script, relative links only, so the folder opens
  from a network share in any browser; a Content-Security-Policy meta tag forbids loading
  anything but images from the gallery's own origin.
* Names are untrusted: patient folders and file names are escaped everywhere
  (html.escape(quote=True)), and no URL is ever built from them (pages and thumbnails have
  generated names).
* Atomic: the gallery is built in a hidden temp folder beside DIR and swapped in only when
  complete, so an interrupted run leaves the previous gallery (or none), never half of one.
  An existing DIR is replaced only if it is empty or a batchwbc gallery.
"""
from __future__ import annotations

import html
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from batchwbc.core import catalogue
from batchwbc.core.differential import Differential
from batchwbc.core.flags import CRITICAL, NOTE, POSSIBLE_CRITICAL, REVIEW, UNRELIABLE, Flag, worst_severity
from batchwbc.outputs.gallery_thumbs import EDGE, THUMBS_DIR, ThumbJob, crop_path, thumbnail_name, write_thumbnails
from batchwbc.core.records import CellResult, FileError, RunData

#: File in every gallery folder; an existing folder without it is never replaced.
MARKER = ".batchwbc-gallery"
INDEX = "index.html"
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
BANNER = "Pre-classification by software: to be verified by a qualified person."

# Characters that have no business in HTML text (C0 controls except tab/newline, lone surrogates
# from undecodable file names): shown as U+FFFD instead of breaking the page or the encoder.
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class GalleryError(Exception):
    """The gallery cannot be written where asked; str(exc) is one sentence for the user."""


class PatientSummaryLike(Protocol):
    """What the gallery needs of a patient's already computed summary (summary.PatientSummary fits)."""

    @property
    def differential(self) -> Differential: ...

    @property
    def flags(self) -> Sequence[Flag]: ...

    @property
    def errors(self) -> Sequence[FileError]: ...


@dataclass(frozen=True)
class GalleryRunInfo:
    """The run facts printed at the top of every page."""

    started: datetime
    tool_version: str
    slides_root: str
    model_name: str
    model_version: str
    model_sha256: str
    review_threshold: float
    classes: tuple[str, ...]  # the model's classes: the differential lists only these
    title: str = "batchwbc cell gallery"
    alert: str | None = None  # summary.run_alert: why the results are unreliable and what to do next

    @classmethod
    def from_run(cls, run: RunData) -> "GalleryRunInfo":
        m = run.model
        return cls(run.started, run.tool_version, run.root, m.path.name, m.model_version, m.sha256,
                   run.review_threshold, tuple(m.classes))


@dataclass(frozen=True)
class SignOff:
    """A patient's sign-off as `batchwbc verify` decided it, for the verified gallery's index.

    The verify job owns the rule (a name in Verified by and every review cell verified) and
    the date it stamps; the gallery only prints this, so its index can never disagree with
    the verified workbook's Summary sheet. `reason` says why an unsigned patient is not signed.
    """

    signed: bool
    by: str = ""
    on: str = ""
    reason: str = ""

    def __post_init__(self) -> None:
        # A "Signed by ... on ..." line with a blank name or date would be a claim nobody made.
        if self.signed and not (self.by.strip() and self.on.strip()):
            raise ValueError("a signed patient needs both a name and a date")


@dataclass(frozen=True)
class GalleryResult:
    pages: int  # patient pages, index not counted
    cells: int
    thumbnails: int  # thumbnails written; the other cells show a placeholder


# =================================================================== text helpers

def esc(value: object) -> str:
    """Text or attribute value, safe in HTML: escaped with quote=True, control characters replaced."""
    return html.escape(_BAD_CHARS.sub("\ufffd", str(value)), quote=True)


def _display(class_id: str) -> str:
    return catalogue.get(class_id).display if catalogue.is_known(class_id) else class_id


def _pct(x: float | None) -> str:
    return "&ndash;" if x is None else f"{x:.1f}"


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def patient_page_name(index: int) -> str:
    """Page file of the index-th patient (0-based): generated, so no patient name reaches a URL."""
    return f"patient-{index + 1:04d}.html"


def class_order(class_ids: Iterable[str]) -> list[str]:
    """Catalogue order; ids outside the catalogue (defensive) follow, sorted."""
    present = set(class_ids)
    known = [c for c in catalogue.CLASS_IDS if c in present]
    return known + sorted(present - set(known))


def cells_in_review_order(cells: Sequence[CellResult]) -> dict[str, list[CellResult]]:
    """Cells grouped by class in catalogue order, each group lowest confidence first."""
    by_class: dict[str, list[CellResult]] = {}
    for cid in class_order(c.class_id for c in cells):
        by_class[cid] = sorted((c for c in cells if c.class_id == cid), key=lambda c: (c.confidence, c.file))
    return by_class


# =================================================================== page parts

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:0 1.5em 2em;color:#1a1a1a}
h1{font-size:1.5em;margin:.6em 0 .2em;overflow-wrap:anywhere}
h2{font-size:1.15em;margin:1.4em 0 .4em;border-bottom:1px solid #ccc;padding-bottom:.15em}
.banner{background:#fff4ce;border:1px solid #c9a400;padding:.35em .7em;margin:.6em 0;font-weight:600}
.alert{background:#5b1f7a;color:#fff;padding:.5em .8em;margin:.6em 0;font-weight:700;font-size:1.1em}
.run{color:#555;font-size:.85em;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.4em 0}
th,td{border:1px solid #bbb;padding:.15em .5em;text-align:left;vertical-align:top}
table.diff{font-size:.9em}
.top{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}
.top>.f{flex:1 1 22em;max-width:50em}
.top>.d{flex:0 0 auto}
.top>.d .legend{max-width:32em}
table.diff td,table.diff th{white-space:nowrap}
th{background:#e8e8e8}
td.n{text-align:right;font-variant-numeric:tabular-nums}
td.name{overflow-wrap:break-word;word-break:normal;hyphens:none;min-width:8em;max-width:24em}
tr.critical td:first-child{border-left:6px solid #9c0006}
tr.warning td:first-child{border-left:6px solid #c98a00}
tr.review td:first-child{border-left:6px solid #1f4e78}
tr.possible_critical td:first-child{border-left:6px solid #e0301e}
tr.unreliable td:first-child{border-left:6px solid #5b1f7a}
tr.note td:first-child{border-left:6px solid #8a8a8a}
ul.flags{margin:.2em 0;padding-left:1.2em}
.sev-critical{color:#9c0006;font-weight:700}
.sev-warning{color:#7a4b00;font-weight:600}
.sev-review{color:#1f4e78;font-weight:600}
.sev-possible_critical{color:#fff;background:#c00000;font-weight:700;padding:0 .25em}
.sev-unreliable{color:#fff;background:#5b1f7a;font-weight:700;padding:0 .25em}
.sev-note{color:#404040}
nav.classes{position:sticky;top:0;background:#fff;padding:.3em 0;border-bottom:1px solid #ddd;z-index:1}
nav.classes a{margin-right:.9em;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:8px}
figure.cell{margin:0;width:104px;border:2px solid #ccc;border-radius:3px;padding:2px;background:#fafafa}
figure.cell img,.noimg{display:block;width:96px;height:96px;object-fit:contain;margin:0 auto;background:#eee}
.noimg{font-size:.75em;color:#555;text-align:center;line-height:96px}
figure.review{border:3px dashed #b00020;background:#fff0f0;padding:1px}
figcaption{font-size:.75em;line-height:1.25;margin-top:2px;overflow-wrap:anywhere}
figcaption .tag{font-weight:700;color:#b00020}
figcaption .fix{font-weight:700;color:#00529b}
figure.corrected{border-color:#00529b}
figcaption small{display:block;color:#444}
.legend{font-size:.85em;color:#333}
.signed{color:#00612e;font-weight:600}
.unsigned{color:#9c0006;font-weight:700}
@media print{figure.cell{break-inside:avoid}nav.classes{display:none}}
"""


_SEVERITY_LABEL = {CRITICAL: "Critical", POSSIBLE_CRITICAL: "Possible critical, pending review",
                   UNRELIABLE: "Results unreliable", REVIEW: "Pending review", NOTE: "Note"}

def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(CSP)}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta name=\"generator\" content=\"batchwbc\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def _run_line(info: GalleryRunInfo) -> str:
    return (
        f"<p class=\"run\">Run {esc(info.started.isoformat(sep=' ', timespec='seconds'))}"
        f" &middot; batchwbc {esc(info.tool_version)} &middot; slides {esc(info.slides_root)}"
        f" &middot; model {esc(info.model_name)} (version {esc(info.model_version)},"
        f" sha256 {esc(info.model_sha256[:12])}&hellip;) &middot; review threshold {info.review_threshold:.3g}</p>\n"
    )


def _flags_html(flags: Sequence[Flag]) -> str:
    if not flags:
        return "none"
    items = "".join(
        f"<li><span class=\"sev-{esc(f.severity)}\">{_SEVERITY_LABEL.get(f.severity, 'Warning')}:</span>"
        f" {esc(f.message)} <small>({esc(f.code)})</small></li>"
        for f in flags
    )
    return f"<ul class=\"flags\">{items}</ul>"


def _row_class(flags: Sequence[Flag]) -> str:
    sev = worst_severity(list(flags))
    return f" class=\"{esc(sev)}\"" if sev else ""


def _signoff_html(s: SignOff) -> str:
    """The index's sign-off cell: who signed and when, or plainly that nobody has (and why)."""
    if s.signed:
        return f"<td><span class=\"signed\">Signed by {esc(s.by)} on {esc(s.on)}</span></td>"
    why = f"<br><small>{esc(s.reason)}</small>" if s.reason else ""
    return f"<td><span class=\"unsigned\">Not signed</span>{why}</td>"


def _require_every_patient(patients: Sequence[str], per_patient: Mapping[str, Any], what: str) -> None:
    """A page or row without its patient's data would be silently wrong: refuse it (ValueError)."""
    missing = [p for p in patients if p not in per_patient]
    if missing:
        raise ValueError(f"no {what} for patient {missing[0]!r}")


def render_index(patients: Sequence[str], cells_by_patient: Mapping[str, Sequence[CellResult]],
                 summaries: Mapping[str, PatientSummaryLike], info: GalleryRunInfo,
                 signoffs: Mapping[str, SignOff] | None = None) -> str:
    """index.html: one row per patient, in report order, linking to its page.

    `signoffs` (verify --html only) adds a Sign-off column; without it (a run's gallery, where
    nobody can have signed yet) the index says nothing about sign-off at all.
    """
    if signoffs is not None:
        _require_every_patient(patients, signoffs, "sign-off")
    rows = []
    for i, patient in enumerate(patients):
        s = summaries[patient]
        d = s.differential
        unreadable = sum(1 for e in s.errors if e.file)
        failed = "; ".join(e.reason for e in s.errors if not e.file)
        note = f"<br><span class=\"sev-warning\">Folder failed:</span> {esc(failed)}" if failed else ""
        rows.append(
            f"<tr{_row_class(s.flags)}><td class=\"name\"><a href=\"{patient_page_name(i)}\">{esc(patient)}</a>{note}</td>"
            f"<td class=\"n\">{d.n_cells}</td><td class=\"n\">{d.wbc}</td><td class=\"n\">{d.n_review}</td>"
            f"<td class=\"n\">{unreadable}</td><td>{_flags_html(s.flags)}</td>"
            + (_signoff_html(signoffs[patient]) if signoffs is not None else "") + "</tr>\n"
        )
    n_cells = sum(len(cells_by_patient.get(p, ())) for p in patients)
    body = (
        f"<h1>{esc(info.title)}</h1>\n<p class=\"banner\">{esc(BANNER)}</p>\n"
        + (f"<p class=\"alert\" role=\"alert\">{esc(info.alert)}</p>\n" if info.alert else "")
        + f"{_run_line(info)}"
        f"<p>{len(patients)} patients, {n_cells} cells. Each patient's page shows every cell grouped by class, "
        "the least confident first; cells below the review threshold are framed with a dashed border and marked REVIEW.</p>\n"
        "<table>\n<thead><tr><th>Patient</th><th>Cells</th><th>WBC</th><th>To review</th><th>Unreadable files</th>"
        "<th>Flags</th>" + ("<th>Sign-off</th>" if signoffs is not None else "")
        + "</tr></thead>\n<tbody>\n" + "".join(rows) + "</tbody>\n</table>\n"
    )
    return _page(info.title, body)


def _differential_table(d: Differential, classes: Sequence[str]) -> str:
    rows = []
    for cid in class_order(classes):
        if not catalogue.is_known(cid):
            continue
        cls = catalogue.get(cid)
        if cls.counts_in_wbc:
            ci = d.ci.get(cid)
            pct, ci_text = _pct(d.percent.get(cid)), "&ndash;" if ci is None else f"{ci[0]:.1f}&ndash;{ci[1]:.1f}"
        else:
            pct, ci_text = "not in WBC", ""
        rows.append(f"<tr><td>{esc(cls.display)}</td><td class=\"n\">{d.counts.get(cid, 0)}</td>"
                    f"<td class=\"n\">{pct}</td><td class=\"n\">{ci_text}</td></tr>")
    groups = [
        ("Blasts", d.blasts, d.blasts_pct), ("Immature granulocytes (IG)", d.ig, d.ig_pct),
        ("Band neutrophils", d.bands, d.band_pct), ("Immature total", d.immature, d.immature_pct),
    ]
    for label, count, pct in groups:
        rows.append(f"<tr><th>{label}</th><td class=\"n\">{count}</td><td class=\"n\">{_pct(pct)}</td><td></td></tr>")
    rows.append(f"<tr><th>NRBC per 100 WBC</th><td class=\"n\">{d.nrbc}</td>"
                f"<td class=\"n\">{_pct(d.nrbc_per_100_wbc)}</td><td></td></tr>")
    return (
        "<table class=\"diff\">\n<thead><tr><th>Class</th><th>Count</th><th>% of WBC</th><th>95% CI (%)</th></tr></thead>\n"
        "<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>\n"
        f"<p class=\"legend\">{d.wbc} WBC of {d.n_cells} cells; percentages of WBC with exact (Clopper-Pearson) 95% "
        "confidence intervals, as in the workbook's Differential sheet.</p>\n"
    )


def confidence_text(confidence: float) -> str:
    """A confidence with 2 decimals, rounded down: the review threshold compares the exact value
    (below it: review), so 0.7969 under a threshold of 0.80 must not read "0.80" beside a
    cell that is not in review at 0.80."""
    return f"{math.floor(confidence * 100 + 1e-9) / 100:.2f}"


def _cell_html(c: CellResult, thumbs: set[str], threshold: float, machine_class: str | None = None) -> str:
    """One cell; `machine_class` is set when a person corrected the machine's class (verify
    --html): c.class_id is then the verified class and c.confidence the machine's own."""
    name = thumbnail_name(c.patient, c.file)
    second = f"2nd {_display(c.second_class)} {c.second_prob:.2f}"
    if machine_class is not None:
        second = f"machine: {_display(machine_class)} {confidence_text(c.confidence)}"
    title = (f"{c.file}\n{_display(c.class_id)}"
             + (f" (verified)\n{second}" if machine_class is not None else f" {confidence_text(c.confidence)}\n{second}")
             + (f"\nREVIEW: confidence below {threshold:.3g}" if c.review else ""))
    if name in thumbs:
        picture = f"<img src=\"{THUMBS_DIR}/{name}\" alt=\"{esc(c.file)}\" width=\"{EDGE}\" height=\"{EDGE}\" loading=\"lazy\">"
    else:
        picture = "<div class=\"noimg\">no image</div>"
    tag = "<span class=\"tag\">REVIEW</span> " if c.review else ""
    shown = confidence_text(c.confidence)
    css = " review" if c.review else ""
    if machine_class is not None:
        shown, css = "<span class=\"fix\">CORRECTED</span>", css + " corrected"
    return (
        f"<figure class=\"cell{css}\" data-file=\"{esc(c.file)}\" title=\"{esc(title)}\">"
        f"{picture}<figcaption>{tag}{shown}<small>{esc(second)}</small></figcaption></figure>\n"
    )


def render_patient(patient: str, cells: Sequence[CellResult], summary: PatientSummaryLike,
                   info: GalleryRunInfo, thumbs: set[str], corrected: Mapping[str, str] | None = None) -> str:
    """One patient's page: flags, differential, then every cell by class, least confident first.
    `corrected` maps a file a person reclassified to the machine's class (verify --html)."""
    corrected = corrected or {}
    d = summary.differential
    by_class = cells_in_review_order(cells)
    anchors = {cid: f"c{i}" for i, cid in enumerate(by_class)}  # generated ids: never from a class name
    nav = " ".join(f"<a href=\"#{anchors[cid]}\">{esc(_display(cid))} ({len(cs)})</a>" for cid, cs in by_class.items())
    sections = []
    for cid, cs in by_class.items():
        n_review = sum(c.review for c in cs)
        review = f", {n_review} to review" if n_review else ""
        sections.append(
            f"<section id=\"{anchors[cid]}\"><h2>{esc(_display(cid))} <small>({_cells(len(cs))}{review})</small></h2>\n"
            "<div class=\"grid\">\n" + "".join(_cell_html(c, thumbs, info.review_threshold, corrected.get(c.file)) for c in cs) + "</div></section>\n"
        )
    errors = ""
    if summary.errors:
        items = "".join(f"<li>{esc(e.file or '(whole patient folder)')}: {esc(e.reason)}</li>" for e in summary.errors)
        errors = f"<h2>Files that could not be classified ({len(summary.errors)})</h2>\n<ul>{items}</ul>\n"
    body = (
        f"<p><a href=\"{INDEX}\">&larr; All patients</a></p>\n<h1>{esc(patient)}</h1>\n"
        f"<p class=\"banner\">{esc(BANNER)}</p>\n{_run_line(info)}"
        f"<p>{_cells(d.n_cells)}, {d.wbc} WBC, {d.n_review} to review.</p>\n"
        f"<div class=\"top\"><div class=\"f\"><h2>Flags</h2>\n{_flags_html(summary.flags)}</div>\n"
        f"<div class=\"d\"><h2>Differential</h2>\n{_differential_table(d, info.classes)}</div></div>\n"
        "<h2>Cells by class</h2>\n"
        "<p class=\"legend\">Least confident first in each class. Under each cell: its confidence and the second most "
        "likely class with its probability (also on hover). <span class=\"tag\">REVIEW</span> and a dashed frame: "
        "confidence below the review threshold."
        + (" <span class=\"fix\">CORRECTED</span>: a person changed the machine's class; the machine's class "
           "and confidence are shown under the cell.</p>\n" if corrected else "</p>\n")
        + (f"<nav class=\"classes\">{nav}</nav>\n" if nav else "<p>No cells were classified for this patient.</p>\n")
        + "".join(sections) + errors
    )
    return _page(f"{patient} - {info.title}", body)


# =================================================================== writing

def check_target(out_dir: str | os.PathLike) -> None:
    """Fail before any classification if DIR could not receive the gallery.

    DIR may be missing (its parent must exist and be writable), an empty folder, or an earlier
    batchwbc gallery (it has the marker file); anything else is refused rather than replaced.
    """
    out = Path(out_dir)
    parent = out.absolute().parent
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise GalleryError(f"the gallery folder {out} exists and is not a folder; choose a new folder name.")
        if not (out / MARKER).is_file() and any(out.iterdir()):
            raise GalleryError(f"the folder {out} is not empty and is not a batchwbc gallery; "
                               "choose a new or empty folder for --html.")
    elif not parent.is_dir():
        raise GalleryError(f"the folder {parent} for the gallery {out.name} does not exist.")
    try:
        probe = _temp_dir(out, "probe")
    except OSError as exc:
        raise GalleryError(f"cannot write in the folder {parent} ({exc.strerror or exc}).") from None
    shutil.rmtree(probe, ignore_errors=True)


def _temp_dir(out: Path, kind: str) -> Path:
    tmp = out.absolute().parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`; an earlier gallery there is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.absolute().parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)  # put the previous gallery back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_gallery(out_dir: str | os.PathLike, patients: Sequence[str],
                  cells_by_patient: Mapping[str, Sequence[CellResult]],
                  summaries: Mapping[str, PatientSummaryLike], run_info: GalleryRunInfo,
                  crops_root: str | os.PathLike | None, *, threads: int | None = None,
                  corrected: Mapping[tuple[str, str], str] | None = None,
                  signoffs: Mapping[str, SignOff] | None = None) -> GalleryResult:
    """Write the gallery for already computed per-patient summaries, atomically.

    `patients` gives the order (the report's); every patient needs an entry in `summaries`.
    Thumbnails are made from the original crops at `crops_root / cell.file` (cell.file is
    relative to the slides folder), falling back to the cell's own review thumbnail; a cell
    with neither shows a "no image" placeholder. `corrected` maps (patient, file) of a cell a
    person reclassified to the machine's class, for `batchwbc verify --html`: the cells then
    carry their verified classes and a corrected one is marked. `signoffs` (verify --html)
    gives every patient's sign-off for the index; None for a run, where nothing is signed
    yet and the index makes no sign-off claim. Raises GalleryError for an unusable DIR.
    """
    out = Path(out_dir)
    _require_every_patient(patients, summaries, "summary")
    if signoffs is not None:  # checked before any thumbnail work, not only when the index is rendered
        _require_every_patient(patients, signoffs, "sign-off")
    check_target(out)
    root = Path(crops_root) if crops_root is not None else None
    tmp = _temp_dir(out, "tmp")
    try:
        jobs: dict[str, ThumbJob] = {}
        for p in patients:
            for c in cells_by_patient.get(p, ()):
                name = thumbnail_name(c.patient, c.file)
                jobs.setdefault(name, ThumbJob(name, crop_path(root, c.file), c.thumbnail_jpeg))
        thumbs = write_thumbnails(list(jobs.values()), tmp / THUMBS_DIR, threads)
        for i, p in enumerate(patients):
            mine = {f: cid for (patient, f), cid in (corrected or {}).items() if patient == p}
            page = render_patient(p, cells_by_patient.get(p, ()), summaries[p], run_info, thumbs, mine)
            _write_text(tmp / patient_page_name(i), page)
        _write_text(tmp / INDEX, render_index(patients, cells_by_patient, summaries, run_info, signoffs))
        _write_text(tmp / MARKER, f"batchwbc {run_info.tool_version} gallery; this folder is replaced by the next run\n")
        _swap_in(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise GalleryError(f"the gallery {out} could not be written ({exc.strerror or exc}).") from None
        raise
    n_cells = sum(len(cells_by_patient.get(p, ())) for p in patients)
    return GalleryResult(pages=len(patients), cells=n_cells, thumbnails=len(thumbs))
