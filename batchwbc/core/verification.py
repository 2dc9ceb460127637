"""A technologist's verification of a report: verified classes, recounted patients, sign-off.

The machine pre-classifies; a person looks at the cells, corrects the wrong ones and signs
the patient. This module turns what the person wrote in the workbook into verified
differentials and flags through the very functions the run uses (summary.summarize_groups:
batchwbc.core.differential and batchwbc.core.flags), so a verified count can never be computed by
other rules than a pre-classified one. Pure: no I/O, no heavy imports.

Rules, documented in docs/report.md:
* a blank Verified class accepts the machine's class;
* a patient is signed when every one of its review cells has an explicit Verified class
  (a person looked at each uncertain cell) and its "Verified by" cell holds a name.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from batchwbc.core import catalogue
from batchwbc.core.config import Settings
from batchwbc.engine.ood import UNCLASSIFIED, UNCLASSIFIED_DISPLAY
from batchwbc.core.records import CellResult, FileError
from batchwbc.core.summary import PatientSummary, summarize_groups


def class_choices(model_classes: Sequence[str], seen: Sequence[str] = ()) -> list[str]:
    """The class ids a person may choose as Verified class: the model's classes, then any
    other label the run's cells carry, then `unclassified` (batchwbc.ood: not a cell the model
    knows, counted in no percentage), which a person may also give a crop the model did
    classify. The same list feeds the drop-down and the check of typed values."""
    choices = list(dict.fromkeys(model_classes))
    for cid in [*seen, UNCLASSIFIED]:
        if cid and cid not in choices:
            choices.append(cid)
    return choices


def resolve_class(text: str, choices: Sequence[str]) -> str | None:
    """The class id a person meant, or None when it is not one of `choices`.

    Lenient where nothing can be misread: surrounding spaces and letter case are ignored,
    and the display name ("Band neutrophil") is accepted for its id ("neutrophil_band").
    """
    wanted = " ".join(text.split()).casefold()
    for cid in choices:
        names = {cid.casefold()}
        if catalogue.is_known(cid):
            names.add(catalogue.get(cid).display.casefold())
        elif cid == UNCLASSIFIED:
            names.add(UNCLASSIFIED_DISPLAY.casefold())
        if wanted in names:
            return cid
    return None


@dataclass(frozen=True)
class VerifiedCell:
    """One cell as the machine classified it and as a person verified it."""

    cell: CellResult  # the machine's result; class_id is the pre-classification
    verified: str = ""  # class id a person set; "" = left blank, the machine's class accepted

    @property
    def final(self) -> str:
        return self.verified or self.cell.class_id

    @property
    def corrected(self) -> bool:
        return bool(self.verified) and self.verified != self.cell.class_id


@dataclass(frozen=True)
class PatientVerification:
    """One patient before and after verification, and whether a person signed it."""

    patient: str
    pre: PatientSummary  # from the machine's classes
    post: PatientSummary  # from the verified classes
    verified_by: str
    verified_on: str
    corrected: int  # cells whose verified class differs from the machine's
    review_cells: int
    review_verified: int  # review cells with an explicit Verified class

    @property
    def signed(self) -> bool:
        return bool(self.verified_by) and self.review_verified == self.review_cells

    @property
    def status(self) -> str:
        """'signed', or why not, in words a technologist acts on."""
        if self.signed:
            return "signed"
        missing = []
        if self.review_verified < self.review_cells:
            left = self.review_cells - self.review_verified
            missing.append(f"{left} of {self.review_cells} review cell{'s' if self.review_cells != 1 else ''} "
                           "without a Verified class")
        if not self.verified_by:
            missing.append("no name in Verified by")
        return "not signed: " + "; ".join(missing)


@dataclass(frozen=True)
class CarriedShift:
    """A DATA_SHIFT decision as the report states it. The decision needs the model's per-cell
    scores, which verify does not compute; it is about the images, not their classes, so
    it holds after verification and is carried over word for word."""

    message: str  # the flag message after "Data shift: "
    raised: bool = True

    def text(self) -> str:
        return self.message


def verify_patients(patients: Sequence[str], cells: Sequence[VerifiedCell], errors: Sequence[FileError],
                    signoff: Mapping[str, tuple[str, str]], settings: Settings,
                    now: str, shifts: Mapping[str, CarriedShift] | None = None) -> list[PatientVerification]:
    """Each patient counted twice - machine classes and verified classes - with its sign-off.

    `signoff` maps a patient to the (Verified by, Verified on) a person wrote; a signed
    patient whose Verified on was left blank gets `now`, so the date of the first
    verification that found it signed stays in the workbook from then on.
    """
    pre = summarize_groups(patients, [vc.cell for vc in cells], errors, settings, shifts)  # type: ignore[arg-type]
    # A cell a person classified is no longer unverified: it counts for the definite flags, so
    # a pending flag (core/flags.py) resolves into its definite flag or disappears; review cells
    # left blank stay in review and keep their flags pending.
    post = summarize_groups(patients, [replace(vc.cell, class_id=vc.final, review=vc.cell.review and not vc.verified)
                                       for vc in cells], errors, settings, shifts)  # type: ignore[arg-type]
    by_patient: dict[str, list[VerifiedCell]] = {}
    for vc in cells:
        by_patient.setdefault(vc.cell.patient, []).append(vc)
    out = []
    for before, after in zip(pre, post):
        mine = by_patient.get(before.patient, [])
        review = [vc for vc in mine if vc.cell.review]
        by, on = (" ".join(s.split()) for s in signoff.get(before.patient, ("", "")))
        pv = PatientVerification(
            patient=before.patient, pre=before, post=after, verified_by=by, verified_on=on,
            corrected=sum(vc.corrected for vc in mine), review_cells=len(review),
            review_verified=sum(bool(vc.verified) for vc in review),
        )
        if pv.signed and not pv.verified_on:
            pv = replace(pv, verified_on=now)
        out.append(pv)
    return out


def is_exported(vc: VerifiedCell, patient: PatientVerification) -> bool:
    """Whether a cell belongs in the labelled export: every cell of a signed patient
    (confirmed or corrected), and elsewhere only the cells a person explicitly classified -
    an unsigned patient's blank cells were never confirmed by anyone."""
    return patient.signed or bool(vc.verified)


@dataclass(frozen=True)
class VerifiedReport:
    """Everything the verified workbook shows; the report module only formats it."""

    patients: tuple[PatientVerification, ...]  # in the report's order
    cells: tuple[VerifiedCell, ...]  # in the report's Cells order, review thumbnails kept
    errors: tuple[FileError, ...]
    model_classes: tuple[str, ...]
    choices: tuple[str, ...]  # the drop-down of Verified class
    run_rows: tuple[tuple[str, str], ...]  # the report's Run rows, then the verification's
    model_adapted: bool = False  # the run's model was written by `batchwbc adapt` (its warnings' next step)
