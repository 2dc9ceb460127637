"""Write `batchwbc evaluate`'s results: EVAL.xlsx for people, JSON for scripts.

Formatting only: every number arrives computed in an `agreement.Evaluation`; this module
lays it out. The workbook is written atomically (workbook.atomic_output) with text that can
never turn into a formula (folder names come from the lab's disk). Plots are PNGs made with
matplotlib, from the optional `report` extra; without it the workbook is complete except for
the pictures and says so in one line.

Sheets: Summary, Per class, Confusion, Calibration, Review threshold, Patients, Bland-Altman,
Run (docs/usage.md, "Validate on your own cells"). The numbers are those a run's report carries
(an unclassified crop is an abstention); the classifier-only view is a named secondary block.
"""
from __future__ import annotations

import json
import math
import os
from io import BytesIO
from typing import TYPE_CHECKING, Any, Sequence

from batchwbc.core import catalogue
from batchwbc.outputs.workbook import atomic_output, clean_text

if TYPE_CHECKING:
    from batchwbc.core.agreement import Evaluation
    from batchwbc.commands.evaluate import EvaluationRun

SHEETS = ("Summary", "Per class", "Confusion", "Calibration", "Review threshold", "Patients", "Bland-Altman", "Run")
PLOTS_MISSING = ("Plots were left out: matplotlib is not installed "
                 "(install it with: pip install \"batchwbc[report]\"); every number is in the tables.")
CLINICAL_NOTE = ("These numbers describe this model on these verified cells only. They support, and do not "
                 "replace, the laboratory's own method validation (e.g. CLSI H20-A2).")
_FORMULA_START = ("=", "+", "-", "@", "#")
_PCT = "0.0%"
_RATIO = "0.000"
_POINTS = "0.00"


# =================================================================== plots (optional)

def _matplotlib():
    """Figure and the Agg canvas, without pyplot (no global state, no display needed);
    ImportError when the `report` extra is not installed."""
    import matplotlib  # noqa: F401 - the import that fails without the extra
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _png(fig: Any, canvas_cls: Any) -> bytes:
    canvas_cls(fig)
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def make_plots(result: "Evaluation") -> dict[str, bytes] | None:
    """{'confusion' | 'reliability' | 'bland_altman': PNG bytes}, or None without matplotlib."""
    try:
        Figure, Canvas = _matplotlib()
    except ImportError:
        return None
    plots = {"confusion": _confusion_png(result, Figure, Canvas),
             "reliability": _reliability_png(result, Figure, Canvas)}
    ba = _bland_altman_png(result, Figure, Canvas)
    if ba is not None:
        plots["bland_altman"] = ba
    return plots


def _confusion_png(result: "Evaluation", Figure: Any, Canvas: Any) -> bytes:
    cm, ids, cols = result.confusion, result.classes, result.columns
    k, kc = len(ids), len(cols)
    fig = Figure(figsize=(1.0 + 0.55 * kc, 0.8 + 0.5 * k))
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(kc), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), ids, fontsize=8)
    top = cm.max() if cm.size else 0
    for i in range(k):
        for j in range(kc):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > top / 2 else "black")
    ax.set_xlabel("the run's answer")
    ax.set_ylabel("verified")
    ax.set_title(f"Confusion matrix ({result.n} cells)")
    fig.tight_layout()
    return _png(fig, Canvas)


def _reliability_png(result: "Evaluation", Figure: Any, Canvas: Any) -> bytes:
    bins = [b for b in result.calibration.bins if b.n]
    width = result.calibration.bins[0].hi - result.calibration.bins[0].lo
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.bar([(b.lo + b.hi) / 2 for b in bins], [b.accuracy for b in bins], width=width, edgecolor="k",
           alpha=0.7, label="accuracy of the cells in the bin")
    for b in bins:  # a tall bar over 3 cells means little: say how many
        ax.text((b.lo + b.hi) / 2, min(b.accuracy, 0.93) + 0.02, str(b.n), ha="center", fontsize=6)
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("model confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE = {result.calibration.ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig, Canvas)


def _bland_altman_png(result: "Evaluation", Figure: Any, Canvas: Any) -> bytes | None:
    # a class nobody saw in any patient (0% on both sides everywhere) gets no panel
    panels = [b for b in result.bland_altman if b.n >= 1 and any(m > 0 for m in b.means)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, b in enumerate(panels, 1):
        ax = fig.add_subplot(rows, cols, i)
        ax.scatter(b.means, b.differences, s=14)
        ax.axhline(0, color="grey", lw=0.6)
        ax.axhline(b.bias, color="C1", lw=1, label=f"bias {b.bias:+.1f}")
        if b.n >= 2:
            ax.axhline(b.lower, color="C3", ls="--", lw=1, label=f"95% limits {b.lower:+.1f} / {b.upper:+.1f}")
            ax.axhline(b.upper, color="C3", ls="--", lw=1)
        ax.set_title(f"{b.class_id} (n={b.n})", fontsize=9)
        ax.set_xlabel("mean of machine and verified, % of WBC", fontsize=7)
        ax.set_ylabel("machine - verified, points", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _png(fig, Canvas)


# =================================================================== workbook

def _finite(x: float | int | None) -> float | int | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return x


class _Writer:
    """Rows into one sheet; every str is forced to text, every nan becomes an empty cell."""

    def __init__(self, wb: Any, title: str, columns: Sequence[str], widths: Sequence[float]):
        from openpyxl.styles import Font, PatternFill
        from openpyxl.utils import get_column_letter

        self.ws = wb.create_sheet(title)
        self.row = 0
        for i, w in enumerate(widths, 1):
            self.ws.column_dimensions[get_column_letter(i)].width = w
        if columns:
            self.append(columns, bold=True)
            for cell in self.ws[1]:
                cell.fill = PatternFill("solid", fgColor="D9D9D9")
            self.ws.freeze_panes = "A2"
        self._Font = Font

    def append(self, values: Sequence[Any], formats: Sequence[str | None] = (), bold: bool = False) -> None:
        from openpyxl.styles import Font

        self.row += 1
        for col, value in enumerate(values, 1):
            cell = self.ws.cell(row=self.row, column=col)
            if isinstance(value, str):
                cell.value = clean_text(value)
                cell.data_type = "s"  # openpyxl would store "=..." as a formula and "#N/A" as an error
                if value.startswith(_FORMULA_START):
                    cell.quotePrefix = True
            else:
                cell.value = _finite(value)
                fmt = formats[col - 1] if col - 1 < len(formats) else None
                if fmt and cell.value is not None:
                    cell.number_format = fmt
            if bold:
                cell.font = Font(bold=True)

    def image(self, png: bytes | None, anchor: str) -> None:
        if png is None:
            return
        from openpyxl.drawing.image import Image

        self.ws.add_image(Image(BytesIO(png)), anchor)


def _summary_rows(result: "Evaluation", run: "EvaluationRun", plots_note: str | None) -> list[tuple[str, Any, str | None]]:
    o, p, cov = result.overall, result.paper10, result.coverage
    rows: list[tuple[str, Any, str | None]] = [
        ("Cells evaluated", result.n, None),
        ("Numbers below: the run's answers, as its report counts them (an unclassified crop is in no count)", "", None),
        (f"Coverage: cells classified ({cov.classified} of {cov.n}; {cov.unclassified} unclassified)", cov.coverage, _PCT),
        (f"Accuracy over the classified cells ({cov.classified} cells)", cov.accuracy_classified, _RATIO),
        (f"Accuracy, all classes ({o.n} cells, unclassified counted as misses)", o.accuracy, _RATIO),
        (f"Macro-F1, all classes ({len(o.classes)} verified classes)", o.macro_f1, _RATIO),
        (f"Accuracy, the paper's ten classes ({p.n} cells)", p.accuracy, _RATIO),
        (f"Macro-F1, the paper's ten classes ({len(p.classes)} verified)", p.macro_f1, _RATIO),
        ("Classifier only (secondary: an unclassified crop scored by the model's best guess; not what a "
         "report shows)", "", None),
        (f"  Accuracy, all classes, classifier only ({result.classifier.n} cells)", result.classifier.accuracy, _RATIO),
        ("  Macro-F1, all classes, classifier only", result.classifier.macro_f1, _RATIO),
        (f"  Accuracy, the paper's ten classes, classifier only ({result.classifier_paper10.n} cells)",
         result.classifier_paper10.accuracy, _RATIO),
        (f"Expected calibration error ({len(result.calibration.bins)} equal-width bins; classifier)",
         result.calibration.ece, _RATIO),
    ]
    t = result.model_threshold
    at = next((r for r in result.thresholds if t is not None and r.threshold == t), None)
    if at is not None:
        rows += [
            ("Model's review threshold", at.threshold, _POINTS),
            ("  cells it sends to review", at.share_to_review, _PCT),
            ("  accuracy of the cells it accepts", at.accuracy_accepted, _PCT),
            ("  share of the model's errors it sends to review", at.errors_to_review, _PCT),
        ]
    else:
        rows.append(("Model's review threshold", "not set in the model (see the Review threshold sheet)", None))
    if result.patients:
        rows.append(("Patients compared (machine vs verified differential)", len(result.patients), None))
    else:
        rows.append(("Patients compared", "none: no patient sub-folders below the class folders", None))
    if result.cells_without_patient and result.patients:
        rows.append(("Cells without a patient folder (not in the patient comparison)", result.cells_without_patient, None))
    rows += [
        ("Unreadable crops (left out, listed in the Run sheet)", len(run.errors), None),
        ("Crops in folders that are not classes of the model (skipped)", sum(run.unknown_folders.values()), None),
        ("Plots", plots_note or "embedded in the Confusion, Calibration and Bland-Altman sheets", None),
        ("Note", CLINICAL_NOTE, None),
    ]
    return rows


def _write_summary(wb: Any, rows: list[tuple[str, Any, str | None]]) -> None:
    w = _Writer(wb, "Summary", ("Item", "Value"), (62, 60))
    for label, value, fmt in rows:
        w.append((label, value), (None, fmt))


def _write_per_class(wb: Any, result: "Evaluation") -> None:
    w = _Writer(wb, "Per class", ("Class", "Class id", "Precision", "Recall", "F1", "Support (verified)",
                                  "Predicted", "Paper's ten", "Left unclassified"), (24, 22, 11, 11, 11, 18, 11, 12, 16))
    fm = (None, None, _RATIO, _RATIO, _RATIO, None, None, None, None)
    unclassified = {c: int(result.confusion[i, -1]) for i, c in enumerate(result.classes)}
    for m in result.overall.per_class:
        # blank, not 0, where a ratio has no denominator: a class nobody verified has no recall
        verified, called = m.support > 0, m.predicted > 0
        w.append((catalogue.get(m.class_id).display, m.class_id, m.precision if called else None,
                  m.recall if verified else None, m.f1 if verified or called else None, m.support,
                  m.predicted, "yes" if m.class_id in catalogue.PAPER_CLASS_IDS else "no",
                  unclassified.get(m.class_id, 0)), fm)
    for s in (result.overall, result.paper10):
        w.append((f"Macro-F1, {s.name}", "", "", "", s.macro_f1, s.n, "", ""), fm, bold=True)
    w.append(())
    w.append(("The run's answers: a verified cell left unclassified counts against its class's recall (a miss), "
              "as the report leaves it out of every count.",))
    w.append(("Macro-F1 averages over the classes with at least one verified cell. The paper's-ten row counts only "
              "cells verified as one of the ten: a prediction outside them is an error. Blank: no cell verified "
              "as (recall) or called (precision) this class. The JSON output writes 0 there.",))


def _write_confusion(wb: Any, result: "Evaluation", png: bytes | None) -> None:
    ids, cols = list(result.classes), list(result.columns)
    w = _Writer(wb, "Confusion", ("verified \\ run's answer", *cols, "Total"), (24, *([12] * len(cols)), 10))
    cm = result.confusion
    for i, cid in enumerate(ids):
        w.append((cid, *[int(v) for v in cm[i]], int(cm[i].sum())))
    w.append(("Total", *[int(v) for v in cm.sum(axis=0)], int(cm.sum())), bold=True)
    w.image(png, f"A{len(ids) + 4}")


def _write_calibration(wb: Any, result: "Evaluation", png: bytes | None) -> None:
    w = _Writer(wb, "Calibration", ("Confidence from (excl.)", "Confidence to (incl.)", "Cells", "Mean confidence",
                                    "Accuracy", "Accuracy - confidence"), (22, 20, 8, 16, 10, 20))
    fm = (_POINTS, _POINTS, None, _RATIO, _RATIO, _RATIO)
    for b in result.calibration.bins:
        w.append((b.lo, b.hi, b.n, b.confidence, b.accuracy, b.accuracy - b.confidence), fm)
    w.append(("Expected calibration error", "", result.n, "", "", result.calibration.ece), fm, bold=True)
    w.append(())
    w.append(("Confidence = the model's top calibrated probability. ECE = sum over bins of (cells in bin / all "
              "cells) x |accuracy - mean confidence|; the first bin also holds 0.",))
    w.image(png, "H2")


def _write_thresholds(wb: Any, result: "Evaluation") -> None:
    w = _Writer(wb, "Review threshold", ("Review threshold", "Sent to review", "Share sent to review", "Accepted",
                                         "Accuracy of accepted", "Share of errors sent to review", "Note"),
                (16, 15, 20, 10, 20, 28, 22))
    fm = (_POINTS + "0", None, _PCT, None, _PCT, _PCT, None)
    for r in result.thresholds:
        note = "the model's own default" if result.model_threshold is not None and r.threshold == result.model_threshold else ""
        w.append((r.threshold, r.to_review, r.share_to_review, r.accepted, r.accuracy_accepted, r.errors_to_review, note), fm)
    w.append(())
    w.append(("A cell goes to review when its confidence is below the threshold, as in `batchwbc run --review-threshold`; "
              "an unclassified crop always does, and is never among the accepted cells.",))


def _write_patients(wb: Any, result: "Evaluation") -> None:
    w = _Writer(wb, "Patients", ("Patient", "Class", "Verified count", "Verified % of WBC", "Machine count",
                                 "Machine % of WBC", "Machine - verified (points)", "Verified WBC", "Machine WBC",
                                 "Cells", "Machine unclassified"), (22, 22, 14, 17, 14, 17, 25, 13, 13, 8, 14))
    fm = (None, None, None, _POINTS, None, _POINTS, _POINTS, None, None, None, None)
    if not result.patients:
        w.append(("No patient sub-folders (LABELLED/<class>/<patient>/...): no per-patient comparison.",))
        return
    for pc in result.patients:
        for r in pc.rows:
            w.append((pc.patient, r.class_id, r.verified, r.verified_pct, r.machine, r.machine_pct, r.difference,
                      pc.verified_wbc, pc.machine_wbc, pc.cells, pc.machine_unclassified), fm)
    w.ws.auto_filter.ref = f"A1:K{w.row}"
    w.append(())
    w.append(("Machine: counted as the run's Summary counts (the same function): an unclassified crop is in no count "
              "and not in the machine's WBC.",))


def _write_bland_altman(wb: Any, result: "Evaluation", png: bytes | None) -> None:
    w = _Writer(wb, "Bland-Altman", ("Class", "Patients", "Bias (machine - verified, points)", "SD of differences",
                                     "Lower 95% limit", "Upper 95% limit"), (22, 10, 30, 17, 16, 16))
    fm = (None, None, _POINTS, _POINTS, _POINTS, _POINTS)
    for b in result.bland_altman:
        w.append((b.class_id, b.n, b.bias, b.sd, b.lower, b.upper), fm)
    w.append(())
    w.append(("Per class, across patients: the difference machine - verified in % of WBC; bias = its mean; 95% limits "
              "of agreement = bias +- 1.96 SD (Bland & Altman 1986; CLSI H20-A2). Few cells per patient make "
              "every percentage, and so the limits, imprecise.",))
    w.image(png, "H2")


def run_rows(result: "Evaluation", run: "EvaluationRun", plots_note: str | None) -> list[tuple[str, str]]:
    m = run.model
    rows = [
        ("Date", run.started.strftime("%Y-%m-%d %H:%M:%S %Z").strip()),
        ("Duration (reading and classifying)", f"{(run.finished - run.started).total_seconds():.1f} s"),
        ("batchwbc version", run.tool_version),
        ("Labelled folder", run.labelled_root),
        ("Model file", str(m.path)),
        ("Model SHA-256", m.sha256),
        ("Model version", m.model_version),
        ("Model classes", ", ".join(m.classes)),
        ("Preprocessing", m.preprocessing),
        ("Crops found", str(sum(run.found.values()))),
        ("Cells evaluated", str(result.n)),
    ]
    rows += [(f"Crops found: {c}", str(run.found[c])) for c in m.classes if run.found.get(c)]
    rows += [(f"Skipped folder (not a class of the model): {k}", f"{v} crops") for k, v in sorted(run.unknown_folders.items())]
    rows += [(f"Ignored files: {k}", str(v)) for k, v in sorted(run.skipped.items())]
    rows += [(f"Unreadable: {e.file}", e.reason) for e in run.errors]
    rows += [(k, v) for k, v in run.extra.items()]
    if plots_note:
        rows.append(("Plots", plots_note))
    return rows


def _write_run(wb: Any, rows: list[tuple[str, str]]) -> None:
    w = _Writer(wb, "Run", ("Item", "Value"), (min(max((len(k) for k, _ in rows), default=20) + 2, 80), 90))
    for key, value in rows:
        w.append((key, value))


def write_workbook(result: "Evaluation", run: "EvaluationRun", out_path: str | os.PathLike) -> str | None:
    """Write EVAL.xlsx atomically; returns the one-line note when the plots were left out."""
    from openpyxl import Workbook

    plots = make_plots(result)
    note = PLOTS_MISSING if plots is None else None
    plots = plots or {}
    wb = Workbook()
    wb.remove(wb.active)
    _write_summary(wb, _summary_rows(result, run, note))
    _write_per_class(wb, result)
    _write_confusion(wb, result, plots.get("confusion"))
    _write_calibration(wb, result, plots.get("reliability"))
    _write_thresholds(wb, result)
    _write_patients(wb, result)
    _write_bland_altman(wb, result, plots.get("bland_altman"))
    _write_run(wb, run_rows(result, run, note))
    with atomic_output(out_path) as tmp:
        wb.save(tmp)
    return note


# =================================================================== JSON

def _clean(x: Any) -> Any:
    """nan -> null (JSON has no nan), tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def as_dict(result: "Evaluation", run: "EvaluationRun") -> dict[str, Any]:
    """The workbook's numbers for scripts: accuracy, macro_f1, per_class, ece and the rest."""
    def per_class(s):
        return {m.class_id: {"precision": m.precision, "recall": m.recall, "f1": m.f1, "support": m.support,
                             "predicted": m.predicted} for m in s.per_class}

    o, p, cov = result.overall, result.paper10, result.coverage
    c, cp = result.classifier, result.classifier_paper10
    return _clean({
        "n": result.n,
        "coverage": cov.coverage,
        "classified": cov.classified,
        "unclassified": cov.unclassified,
        "accuracy_classified": cov.accuracy_classified,
        "accuracy": o.accuracy,  # unclassified counted as misses: what the report carries
        "macro_f1": o.macro_f1,
        "macro_f1_classes": o.classes,
        "per_class": per_class(o),
        "paper10": {"n": p.n, "accuracy": p.accuracy, "macro_f1": p.macro_f1, "macro_f1_classes": p.classes,
                    "per_class": per_class(p)},
        "classifier": {"note": "classifier only: an unclassified crop scored by the model's best guess",
                       "n": c.n, "accuracy": c.accuracy, "macro_f1": c.macro_f1, "per_class": per_class(c),
                       "paper10": {"n": cp.n, "accuracy": cp.accuracy, "macro_f1": cp.macro_f1,
                                   "per_class": per_class(cp)}},
        "ece": result.calibration.ece,
        "calibration_bins": [{"lo": b.lo, "hi": b.hi, "n": b.n, "confidence": b.confidence, "accuracy": b.accuracy}
                             for b in result.calibration.bins],
        "confusion": {"classes": result.classes, "columns": result.columns, "matrix": result.confusion.tolist()},
        "model_review_threshold": result.model_threshold,
        "review_thresholds": [{"threshold": r.threshold, "to_review": r.to_review, "share_to_review": r.share_to_review,
                               "accepted": r.accepted, "accuracy_accepted": r.accuracy_accepted,
                               "errors_to_review": r.errors_to_review} for r in result.thresholds],
        "patients": [{"patient": pc.patient, "cells": pc.cells, "verified_wbc": pc.verified_wbc,
                      "machine_wbc": pc.machine_wbc, "machine_unclassified": pc.machine_unclassified,
                      "classes": {r.class_id: {"verified": r.verified, "verified_pct": r.verified_pct,
                                               "machine": r.machine, "machine_pct": r.machine_pct,
                                               "difference": r.difference} for r in pc.rows}}
                     for pc in result.patients],
        "bland_altman": {b.class_id: {"n": b.n, "bias": b.bias, "sd": b.sd, "lower": b.lower, "upper": b.upper}
                         for b in result.bland_altman},
        "run": {
            "labelled_root": run.labelled_root, "model": str(run.model.path), "model_sha256": run.model.sha256,
            "model_version": run.model.model_version, "tool_version": run.tool_version,
            "started": run.started.isoformat(), "finished": run.finished.isoformat(),
            "found": dict(run.found), "unknown_folders": dict(run.unknown_folders), "skipped": dict(run.skipped),
            "unreadable": [{"file": e.file, "reason": e.reason} for e in run.errors],
        },
    })


def write_json(result: "Evaluation", run: "EvaluationRun", out_path: str | os.PathLike) -> None:
    text = json.dumps(as_dict(result, run), indent=2, allow_nan=False)
    with atomic_output(out_path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
