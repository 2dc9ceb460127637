"""One HL7 v2.5.1 ORU^R01 message per patient - final (F) when signed, preliminary (P) from a run - built and validated with hl7apy.

The structure (segments, groups, required fields, data types) is hl7apy's, checked with its
STRICT validation before a message is written. Text from outside - the folder name, the
signer's name, flag messages - goes into leaf fields through `Text`, which escapes every
HL7 delimiter and the escape character itself, and line breaks as hex escapes (\\X0D\\ \\X0A\\):
hl7apy 1.3.5 leaves a backslash that looks like an escape sequence unescaped and does not
escape line breaks, which would split a segment. `unescape` reverses it for a reader.
Segment layout and field choices: docs/lis.md.
"""
from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import TYPE_CHECKING, Sequence

from hl7apy.base_datatypes import FT, ST
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from batchwbc.outputs.lis import LisError
from batchwbc.outputs.lis.results import (FINAL, PRELIMINARY, ReportedPatient, ReportedResult, RunFacts, final,
                                          preliminary, reported_results)

if TYPE_CHECKING:
    from batchwbc.core.config import ResultCode, Settings
    from batchwbc.core.summary import PatientSummary
    from batchwbc.core.verification import PatientVerification

VERSION = "2.5.1"
STRICT = VALIDATION_LEVEL.STRICT
#: HL7 escapes (v2.5.1 section 2.7.4), the escape character first so no sequence is escaped twice.
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"),
            ("\r", "\\X0D\\"), ("\n", "\\X0A\\"))
_UNESCAPE = re.compile(r"\\(E|F|S|T|R|X[0-9A-Fa-f]+|\.br)\\")


def escape(text: str) -> str:
    for char, seq in _ESCAPES:
        text = text.replace(char, seq)
    return text


def unescape(text: str) -> str:
    """The text an escaped field holds: the inverse of `escape` (also \\.br\\ as a line break)."""
    def one(m: re.Match[str]) -> str:
        s = m.group(1)
        if s[0] == "X":
            return bytes.fromhex(s[1:]).decode("utf-8", errors="replace")
        return {"E": "\\", "F": "|", "S": "^", "T": "&", "R": "~", ".br": "\n"}[s]
    return _UNESCAPE.sub(one, text)


class Text(ST):
    """An ST leaf whose value is escaped completely (see the module docstring); at most 199 characters."""

    @property
    def classname(self) -> str:  # hl7apy takes a value's data type from its class name
        return "ST"

    def to_er7(self, encoding_chars=None):  # noqa: ANN001 - hl7apy's signature
        return escape(self.value)


class LongText(FT):
    """The same for FT leaves (NTE comments), which may be long."""

    @property
    def classname(self) -> str:
        return "FT"

    def to_er7(self, encoding_chars=None):  # noqa: ANN001
        return escape(self.value)


def _dtm(t: datetime) -> str:
    """HL7 DTM: YYYYMMDDHHMMSS and the UTC offset when known."""
    text = t.strftime("%Y%m%d%H%M%S")
    return text + t.strftime("%z") if t.tzinfo else text


def _coded(field, code: "ResultCode") -> None:  # noqa: ANN001 - an hl7apy CE/CWE field
    field.ce_1 = Text(code.code)
    field.ce_2 = Text(code.display)
    field.ce_3 = code.system  # an ID; config keeps delimiters out


def control_id(rp: ReportedPatient, results: Sequence[ReportedResult], settings: "Settings",
               facts: RunFacts) -> str:
    """MSH-10 from what the message states - patient, signer, status, coded values, flags, model,
    notes - and not from when it was built: the same result always gets the same id, so a
    re-send recognises what the LIS already acknowledged (docs/lis.md, "Re-sending"). The
    status is part of it, so a patient's final result never shares an id with its preliminary
    one, even when a person changed nothing. 20 characters, HL7 v2.5.1's length for MSH-10."""
    what = [rp.patient, rp.signer, rp.status, settings.lis.identifier_field, facts.model_sha256,
            *(f"{r.code.system}|{r.code.code}|{r.text}|{r.interpretation}" for r in results),
            *(f.code for f in rp.summary.flags)]
    if rp.notes:  # only preliminary results carry notes; final ids stay what they were before P existed
        what += ["notes", *rp.notes]
    return hashlib.sha256("\x00".join(what).encode()).hexdigest()[:20]


def build_oru(p: "PatientVerification", settings: "Settings", facts: RunFacts, classes: Sequence[str],
              now: datetime) -> tuple[str, str]:
    """(control id, ER7 text with \\r between segments) of a signed patient's final ORU^R01.
    Raises LisError with one sentence (unsigned, undated, too long, not valid)."""
    return build(final(p), settings, facts, classes, now)


def build_preliminary(s: "PatientSummary", settings: "Settings", facts: RunFacts, classes: Sequence[str],
                      now: datetime, banner: Sequence[str], finished: datetime) -> tuple[str, str]:
    """(control id, ER7) of a run's preliminary ORU^R01 (status P) for one patient: its
    pre-classified values, with the workbook's banner and the run's flags as NTEs."""
    return build(preliminary(s, banner, finished), settings, facts, classes, now)


def build(rp: ReportedPatient, settings: "Settings", facts: RunFacts, classes: Sequence[str],
          now: datetime) -> tuple[str, str]:
    """(control id, ER7 text) of the patient's ORU^R01, validated with hl7apy's STRICT level."""
    if rp.status not in (FINAL, PRELIMINARY):
        raise LisError(f"result status {rp.status!r} is neither F (final) nor P (preliminary).")
    if rp.status == FINAL and (not rp.signer or rp.signed_at is None):
        raise LisError(f"patient {rp.patient!r} has no signer and signing time, so its result cannot be final.")
    if len(rp.patient) > 199:
        raise LisError(f"patient folder name {rp.patient[:40]!r}... is longer than HL7's 199 characters.")
    results = reported_results(rp.summary, settings, classes)
    try:
        cid = control_id(rp, results, settings, facts)
        msg = _message(rp, settings, facts, results, now, cid)
        msg.validate()
        return cid, msg.to_er7()
    except HL7apyException as exc:
        raise LisError(f"patient {rp.patient!r}: the HL7 message is not valid ({exc}).") from None


def _message(rp: ReportedPatient, settings: "Settings", facts: RunFacts, results: list[ReportedResult],
             now: datetime, cid: str) -> Message:
    lis, status = settings.lis, rp.status
    m = Message("ORU_R01", version=VERSION, validation_level=STRICT)
    m.msh.msh_3.hd_1 = "batchwbc"
    m.msh.msh_3.hd_2 = re.sub(r"[^0-9A-Za-z.+-]", "", facts.batchwbc_version)  # the sending application's version
    if lis.sending_facility:
        m.msh.msh_4.hd_1 = lis.sending_facility
    if lis.receiving_application:
        m.msh.msh_5.hd_1 = lis.receiving_application
    if lis.receiving_facility:
        m.msh.msh_6.hd_1 = lis.receiving_facility
    m.msh.msh_7 = _dtm(now)
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = cid
    m.msh.msh_11 = lis.processing_id
    m.msh.msh_12 = VERSION
    m.msh.msh_18 = "UNICODE UTF-8"
    pr = m.add_group("ORU_R01_PATIENT_RESULT")
    pid = pr.add_group("ORU_R01_PATIENT").pid
    pid.pid_1 = "1"
    # PID-3 is required: it holds the folder name unless the LIS matches on an order number,
    # then the same name is sent there too with identifier type "SID" (specimen id) - never empty.
    pid.pid_3.cx_1 = Text(rp.patient)
    pid.pid_3.cx_5 = "PI" if lis.identifier_field == "PID-3" else "SID"
    pid.pid_5.xpn_7 = "U"  # name type "unspecified": batchwbc does not know the patient's name
    oo = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    oo.orc.orc_1 = "RE"  # observations to follow
    oo.obr.obr_1 = "1"
    for seg, fields in ((oo.orc, {"OBR-2": "orc_2", "OBR-3": "orc_3"}), (oo.obr, {"OBR-2": "obr_2", "OBR-3": "obr_3"})):
        name = fields.get(lis.identifier_field)
        if name:
            getattr(seg, name).ei_1 = Text(rp.patient)
    if lis.identifier_field != "OBR-3":  # batchwbc is the filler: its order number is the folder name
        oo.obr.obr_3.ei_1 = Text(rp.patient)
        oo.orc.orc_3.ei_1 = Text(rp.patient)
    _coded(oo.obr.obr_4, lis.code("panel"))
    if facts.run_started is not None:
        oo.obr.obr_7 = _dtm(facts.run_started)  # when the crops were classified
    changed = rp.signed_at or rp.reported_at  # results status change: the verification (F), the run (P)
    if changed is not None:
        oo.obr.obr_22 = _dtm(changed)
    oo.obr.obr_25 = status
    notes = [*rp.notes, *(f"{f.code}: {f.message}" for f in rp.summary.flags)]
    for i, text in enumerate(notes, 1):
        nte = oo.add_segment("NTE")
        nte.nte_1 = str(i)
        nte.nte_2 = "L"  # ancillary (filler) department is the source of the comment
        nte.nte_3.value = LongText(text)
    for i, r in enumerate(results, 1):
        obx = oo.add_group("ORU_R01_OBSERVATION").obx
        obx.obx_1 = str(i)
        obx.obx_2 = "NM"
        _coded(obx.obx_3, r.code)
        obx.obx_5 = r.text
        obx.obx_6.ce_1 = Text(r.unit[0])
        obx.obx_6.ce_2 = Text(r.unit[1])
        obx.obx_6.ce_3 = "UCUM"
        if r.reference is not None:
            obx.obx_7 = f"{r.reference[0]:g}-{r.reference[1]:g}"
        if r.interpretation:
            obx.obx_8 = r.interpretation
        obx.obx_11 = status
        if rp.signer:
            obx.obx_16.xcn_2.fn_1 = Text(rp.signer)  # responsible observer: the signer, as typed
        obx.obx_17.ce_1 = Text(facts.model_version or "unknown")
        obx.obx_17.ce_2 = Text(f"batchwbc model {facts.model_file}".strip())
        obx.obx_17.ce_3 = "99BWBC"
        obx.obx_18.ei_1 = Text(facts.model_sha256 or "unknown")
        obx.obx_18.ei_2 = "SHA-256"
        if facts.run_started is not None:
            obx.obx_19 = _dtm(facts.run_started)
    return m


def parse(er7: str):  # noqa: ANN201 - an hl7apy Message
    """Parse a message back with hl7apy's STRICT validation (raises on any structural error)."""
    msg = parse_message(er7, validation_level=STRICT, find_groups=True)
    msg.validate()
    return msg



def text_of(element) -> str:  # noqa: ANN001 - an hl7apy field, component or subcomponent
    """The text a parsed single-valued leaf holds, unescaped. hl7apy keeps what it parsed as
    raw ER7 in the leaf's data type, and re-escapes it in to_er7, so read the leaf itself."""
    while getattr(element, "children", None) and len(element.children) == 1:
        element = element.children[0]
    value = getattr(element, "value", element)
    raw = getattr(value, "value", value)
    if not isinstance(raw, str):
        raise LisError(f"{element!r} holds no single text value.")
    return unescape(raw)
