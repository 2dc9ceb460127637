"""What a LIS message reports for one patient, decided once for HL7 and FHIR alike.

A final result (status F, `batchwbc verify`) reads every value from the verified differential
(verification.PatientVerification.post); a preliminary one (status P, `batchwbc run` when the
config's [lis] send_preliminary allows it) from the run's own core.summary.PatientSummary, the
values its Summary sheet shows. Every H/L/N is the workbook's own "vs. reference" verdict
(workbook.vs_reference) and every flag the summary's: this layer formats, it does not
compute, so a message can never disagree with the workbook it goes with. Pure: no I/O, no
HL7 or FHIR library.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Sequence

from batchwbc.core import catalogue
from batchwbc.core.flags import NRBC_PRESENT
from batchwbc.outputs.lis import LisError
from batchwbc.outputs.workbook import vs_reference

if TYPE_CHECKING:
    from batchwbc.core.config import ResultCode, Settings
    from batchwbc.core.summary import PatientSummary
    from batchwbc.core.verification import PatientVerification

FINAL, PRELIMINARY = "F", "P"  # HL7 table 0123 result status (OBR-25, OBX-11)

#: HL7 table 0078 / FHIR v3-ObservationInterpretation codes for the workbook's verdicts.
INTERPRETATION = {"above": "H", "below": "L", "within": "N"}
PERCENT_UNIT = ("%", "%")  # (UCUM code, text)
PER_100_WBC_UNIT = ("/100{WBCs}", "per 100 WBC")
CELLS_UNIT = ("{cells}", "cells")


@dataclass(frozen=True)
class ReportedResult:
    """One OBX / one Observation: a coded value with its unit, range and interpretation."""

    key: str  # a class id or one of config.LIS_EXTRA_KEYS
    code: "ResultCode"
    value: float | int
    decimals: int  # 1 for percentages and ratios (the workbook's "0.0"), 0 for counts
    unit: tuple[str, str]  # (UCUM code, text)
    reference: tuple[float, float] | None
    interpretation: str  # H, L, N, A or "" (no range, nothing to say)

    @property
    def text(self) -> str:
        return f"{self.value:.{self.decimals}f}"


@dataclass(frozen=True)
class RunFacts:
    """What the verified workbook's Run sheet says about the run, for the message headers."""

    batchwbc_version: str
    model_file: str
    model_version: str
    model_sha256: str
    run_started: datetime | None


@dataclass(frozen=True)
class ReportedPatient:
    """One patient as one message reports it: whose values, which status, who signed, what notes.

    One type for F and P so both go through the same builder: a preliminary message cannot
    drift from the final one in layout, codes or escaping."""

    patient: str
    summary: "PatientSummary"  # the values sent: verified (F) or the run's pre-classification (P)
    status: str  # FINAL or PRELIMINARY
    signer: str = ""  # Verified by (F only)
    signed_at: datetime | None = None  # Verified on (F only)
    reported_at: datetime | None = None  # P: when the run finished (OBR-22 of a preliminary result)
    notes: tuple[str, ...] = ()  # comments before the flags' (P: the workbook's pre-classification banner)


def final(p: "PatientVerification") -> ReportedPatient:
    """A signed patient's final result; LisError (one sentence) when unsigned or undated."""
    if not p.signed:
        raise LisError(f"patient {p.patient!r} is not signed ({p.status}); only signed results are final.")
    return ReportedPatient(p.patient, p.post, FINAL, p.verified_by, verified_at(p))


def preliminary(s: "PatientSummary", banner: Sequence[str], reported_at: datetime) -> ReportedPatient:
    """A patient's pre-classification as a preliminary result; `banner` is the workbook's Summary
    banner, line by line, so the LIS shows the same warning a person sees on the report."""
    return ReportedPatient(s.patient, s, PRELIMINARY, reported_at=reported_at,
                           notes=tuple(line for line in banner if line))


def reported_results(summary: "PatientSummary", settings: "Settings", classes: Sequence[str]) -> list[ReportedResult]:
    """The results sent for one patient (its verified or its pre-classified summary), in catalogue order.

    A leukocyte class is sent when the model has it (`classes`) or a person verified a cell
    into it: a class the model cannot see is not "0 %", so it is left out, as the workbook's
    columns are. A percentage is None when the patient has no WBC: then it is not sent.
    """
    d = summary.differential
    codes = settings.lis.codes
    out: list[ReportedResult] = []
    for cid in catalogue.WBC_CLASS_IDS:
        pct = d.percent.get(cid)
        if pct is None or (cid not in classes and not d.counts.get(cid)):
            continue
        rng = settings.reference_range(cid)
        out.append(ReportedResult(cid, codes[cid], pct, 1, PERCENT_UNIT, rng,
                                  INTERPRETATION.get(vs_reference(pct, rng), "")))
    if d.nrbc_per_100_wbc is not None and ("erythroblast" in classes or d.nrbc):
        raised = any(f.code == NRBC_PRESENT for f in summary.flags)
        out.append(ReportedResult("nrbc_per_100_wbc", codes["nrbc_per_100_wbc"], d.nrbc_per_100_wbc, 1,
                                  PER_100_WBC_UNIT, None, "A" if raised else ""))
    if "smudge" in classes or d.smudge:
        out.append(ReportedResult("smudge", codes["smudge"], d.smudge, 0, CELLS_UNIT, None, ""))
    out.append(ReportedResult("unclassified", codes["unclassified"], d.unclassified, 0, CELLS_UNIT, None, ""))
    return out


def verified_at(p: "PatientVerification") -> datetime:
    """The patient's Verified on as a date-time (batchwbc stamps ISO 8601; a person may type a date)."""
    text = p.verified_on.strip()
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise LisError(f"patient {p.patient!r}: Verified on {text!r} is not a date (YYYY-MM-DD [HH:MM]), "
                       "so no LIS message states when it was signed; correct it and verify again.") from None
