"""`batchwbc verify --hl7 DIR [--mllp HOST:PORT] [--fhir FILE.json]` (and `batchwbc run --hl7 DIR
[--mllp HOST:PORT]` when the config's [lis] send_preliminary allows it): which patients, which
files, what was sent.

verify sends only signed patients (final, F); the others are listed (log and Run sheet). run
sends every patient's pre-classification as preliminary (P). Each message is a
file in DIR named after the patient and its control id, written atomically; with --mllp each
is sent and its ACK awaited. A message the LIS did not acknowledge stays in DIR with the
reason logged and the exit code NOT_DELIVERED; one it acknowledged is recorded in
DIR/delivered.tsv and never sent again, so verifying the same report again with the same
DIR sends only what is still missing.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from batchwbc.outputs.lis import LisError

if TYPE_CHECKING:
    from batchwbc.core.config import Settings
    from batchwbc.core.summary import PatientSummary
    from batchwbc.outputs.lis.results import RunFacts
    from batchwbc.core.verification import PatientVerification

log = logging.getLogger("batchwbc")


@dataclass(frozen=True)
class Message:
    patient: str
    control_id: str
    er7: str
    preliminary: bool = False  # status P (from `run`); F otherwise

    @property
    def file_name(self) -> str:
        """A safe, unique file name: the folder name's harmless characters, then the control id;
        a preliminary message says so in its name, so a person looking at DIR (which verify and
        run may share) tells a pre-classification from a signed result without opening it."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.patient).strip("._")[:60] or "patient"
        return f"{safe}-{'prelim-' if self.preliminary else ''}{self.control_id}.hl7"


@dataclass
class LisPlan:
    """What this verification sends: built messages, and who is not sent and why."""

    messages: list[Message] = field(default_factory=list)
    unsigned: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (patient, reason)


def plan_hl7(patients: Sequence["PatientVerification"], settings: "Settings", facts: "RunFacts",
             classes: Sequence[str], now: datetime) -> LisPlan:
    """Build the message of every signed patient; list the unsigned and those that cannot be built."""
    from batchwbc.outputs.lis.hl7 import build_oru

    plan = LisPlan()
    for p in patients:
        if not p.signed:
            plan.unsigned.append(p.patient)
            continue
        try:
            cid, er7 = build_oru(p, settings, facts, classes, now)
        except LisError as exc:
            plan.failed.append((p.patient, str(exc)))
            continue
        plan.messages.append(Message(p.patient, cid, er7))
    return plan


def plan_preliminary(summaries: Sequence["PatientSummary"], settings: "Settings", facts: "RunFacts",
                     classes: Sequence[str], now: datetime, banner: Sequence[str], finished: datetime) -> LisPlan:
    """Build every patient's preliminary message (status P): all are unsigned by definition, so
    none is left out for that; a message that cannot be built is listed with its reason."""
    from batchwbc.outputs.lis.hl7 import build_preliminary

    plan = LisPlan()
    for s in summaries:
        try:
            cid, er7 = build_preliminary(s, settings, facts, classes, now, banner, finished)
        except LisError as exc:
            plan.failed.append((s.patient, str(exc)))
            continue
        plan.messages.append(Message(s.patient, cid, er7, preliminary=True))
    return plan


#: The run's Run-sheet rows about preliminary results (the workbook is written before sending).
PRELIMINARY_ROW = "LIS preliminary results (status P)"
PRELIMINARY_FAILED_ROW = "LIS preliminary not sent (message could not be built)"


def preliminary_rows(plan: LisPlan, folder: Path, address: str | None) -> dict[str, str]:
    """What the run's Run sheet says it sends: how many, where, and who could not be built. The
    ACKs come after the workbook is written, so they are in the log and DIR/delivered.tsv."""
    n = len(plan.messages)
    text = f"{n} {'patient' if n == 1 else 'patients'}, ORU^R01 v2.5.1 in {folder}"
    if address:
        text += f"; sent to {address} after this workbook was written (each ACK: the log and {folder / 'delivered.tsv'})"
    return {PRELIMINARY_ROW: text,
            PRELIMINARY_FAILED_ROW: "; ".join(reason for _, reason in plan.failed) or "none"}


def run_rows(plan: LisPlan, folder: Path | None, fhir: Path | None) -> list[tuple[str, str]]:
    """The Run sheet's `Verification: LIS ...` rows."""
    from batchwbc.outputs.workbook_reader import VERIFICATION_PREFIX as V

    rows = []
    if folder is not None:
        rows.append((f"{V}LIS HL7 messages", f"{len(plan.messages)} signed patients, ORU^R01 v2.5.1 in {folder}"))
    if fhir is not None:
        rows.append((f"{V}LIS FHIR bundle", f"{len(plan.messages)} signed patients in {fhir}"))
    rows.append((f"{V}LIS not sent (not signed)", ", ".join(plan.unsigned) or "none"))
    if plan.failed:
        rows.append((f"{V}LIS not sent (message could not be built)", "; ".join(r for _, r in plan.failed)))
    return rows


def write_messages(folder: Path, messages: Sequence[Message]) -> None:
    """Each message as DIR/<patient>-<control id>.hl7 (UTF-8, segments ended by CR), atomically."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    for m in messages:
        target = folder / m.file_name
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(m.er7.encode("utf-8") + b"\r")
        os.replace(tmp, target)


def deliver(folder: Path, messages: Sequence[Message], host: str, port: int, timeout: float) -> list[tuple[str, str]]:
    """Send each message not yet acknowledged; returns (patient, reason) for each not delivered."""
    from batchwbc.outputs.lis import mllp

    done = mllp.acknowledged(folder)
    failed: list[tuple[str, str]] = []
    for m in messages:
        if m.control_id in done:
            log.info("LIS: patient %s already acknowledged (message %s), not sent again", m.patient, m.control_id)
            continue
        try:
            ack = mllp.send(host, port, m.er7, m.control_id, timeout)
        except mllp.DeliveryError as exc:
            failed.append((m.patient, str(exc)))
            log.error("LIS: patient %s was not delivered: %s; the message stays in %s", m.patient, exc,
                      folder / m.file_name)
            continue
        mllp.record(folder, m.control_id, m.file_name, ack, datetime.now().astimezone())
        log.info("LIS: patient %s delivered to %s:%d (%s)", m.patient, host, port, ack.code)
    return failed


def deliver_to(address: str | None, folder: Path, messages: Sequence[Message], timeout: float) -> list[tuple[str, str]]:
    """`deliver` to HOST:PORT when an --mllp address was given (nothing sent without one);
    the one place run and verify send from."""
    if address is None:
        return []
    from batchwbc.outputs.lis.mllp import parse_address

    host, port = parse_address(address)
    return deliver(folder, messages, host, port, timeout)
