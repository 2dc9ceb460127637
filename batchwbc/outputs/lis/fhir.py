"""A FHIR transaction Bundle of the signed patients, validated resource by resource.

Per signed patient: a Patient (identifier = the folder name), the signer as a Practitioner,
a DiagnosticReport (status final, performer = signer, result -> the panel), a panel
Observation whose hasMember lists one Observation per reported result (LOINC-coded,
valueQuantity, referenceRange, interpretation); one Device per bundle for the model.
Entries refer to each other by urn:uuid fullUrls, so a FHIR server resolves the
references inside the transaction.

Models: fhir.resources' R4B package. FHIR R4B (4.3.0) left Observation, DiagnosticReport,
Patient, Practitioner, Device and Bundle as they are in R4 (4.0.1) - R4B changed the
medication-definition, evidence and subscription resources - so what validates here is
valid R4; fhir.resources has no R4 (4.0.1) package since version 7, and the last one with
it (6.x) is on pydantic 1 and no longer maintained (docs/lis.md).
"""
from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, Sequence

from batchwbc.outputs.lis import LisError
from batchwbc.outputs.lis.results import ReportedResult, RunFacts, reported_results, verified_at

if TYPE_CHECKING:
    from batchwbc.core.config import Settings
    from batchwbc.core.verification import PatientVerification

UCUM = "http://unitsofmeasure.org"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
IDENTIFIER_SYSTEM = "urn:batchwbc:patient-folder"  # the folder name is the only id batchwbc knows
_NS = uuid.UUID("6f1c1b9e-3b1e-4c55-9d55-2a8f0b7f3c21")  # fixed: the same inputs give the same urn:uuids


def _uid(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, chr(0).join(parts))}"


def _coding(code) -> dict[str, Any]:  # noqa: ANN001 - config.ResultCode
    return {"coding": [{"system": code.uri, "code": code.code, "display": code.display}], "text": code.display}


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _observation(r: ReportedResult, subject: str, performer: str, device: str, issued: str,
                 effective: str | None) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": _coding(r.code), "subject": {"reference": subject}, "issued": issued,
        "performer": [{"reference": performer}], "device": {"reference": device},
        "valueQuantity": {"value": round(r.value, r.decimals), "unit": r.unit[1], "system": UCUM, "code": r.unit[0]},
    }
    if effective:
        obs["effectiveDateTime"] = effective
    if r.reference is not None:
        low, high = r.reference
        obs["referenceRange"] = [{"low": {"value": low, "unit": "%", "system": UCUM, "code": "%"},
                                  "high": {"value": high, "unit": "%", "system": UCUM, "code": "%"}}]
    if r.interpretation:
        obs["interpretation"] = [{"coding": [{"system": INTERPRETATION_SYSTEM, "code": r.interpretation}]}]
    return obs


def build_bundle(patients: Sequence["PatientVerification"], settings: "Settings", facts: RunFacts,
                 classes: Sequence[str], now: datetime) -> dict[str, Any]:
    """The transaction Bundle (as JSON-ready dict) of the signed `patients`; LisError if one is unsigned."""
    entries: list[tuple[str, dict[str, Any], str]] = []  # (fullUrl, resource, request url)
    device = _uid("device", facts.model_sha256)
    entries.append((device, {
        "resourceType": "Device", "identifier": [{"system": "urn:batchwbc:model-sha256", "value": facts.model_sha256}],
        "deviceName": [{"name": f"batchwbc model {facts.model_file}".strip(), "type": "model-name"}],
        "version": [{"value": facts.model_version or "unknown"}, {"value": f"batchwbc {facts.batchwbc_version}"}],
    }, "Device"))
    effective = _iso(facts.run_started) if facts.run_started else None
    for p in patients:
        if not p.signed:
            raise LisError(f"patient {p.patient!r} is not signed ({p.status}); only signed results are final.")
        issued = _iso(verified_at(p).astimezone())  # an instant needs a zone: a naive time is local
        subject = _uid("patient", p.patient)
        performer = _uid("practitioner", p.verified_by)
        entries.append((subject, {"resourceType": "Patient",
                                  "identifier": [{"system": IDENTIFIER_SYSTEM, "value": p.patient}]}, "Patient"))
        if not any(u == performer for u, _, _ in entries):
            entries.append((performer, {"resourceType": "Practitioner", "name": [{"text": p.verified_by}]},
                            "Practitioner"))
        members = []
        for r in reported_results(p.post, settings, classes):
            url = _uid("observation", p.patient, r.key, p.verified_on)
            members.append({"reference": url})
            entries.append((url, _observation(r, subject, performer, device, issued, effective), "Observation"))
        panel = _uid("panel", p.patient, p.verified_on)
        panel_obs: dict[str, Any] = {
            "resourceType": "Observation", "status": "final", "code": _coding(settings.lis.code("panel")),
            "subject": {"reference": subject}, "issued": issued, "performer": [{"reference": performer}],
            "hasMember": members,
        }
        if p.post.flags:
            panel_obs["note"] = [{"text": f"{f.code}: {f.message}"} for f in p.post.flags]
        if effective:
            panel_obs["effectiveDateTime"] = effective
        entries.append((panel, panel_obs, "Observation"))
        report = {"resourceType": "DiagnosticReport", "status": "final", "code": _coding(settings.lis.code("panel")),
                  "subject": {"reference": subject}, "issued": issued, "performer": [{"reference": performer}],
                  "result": [{"reference": panel}]}
        if effective:
            report["effectiveDateTime"] = effective
        entries.append((_uid("report", p.patient, p.verified_on), report, "DiagnosticReport"))
    return {"resourceType": "Bundle", "type": "transaction", "timestamp": _iso(now.astimezone()),
            "entry": [{"fullUrl": u, "resource": res, "request": {"method": "POST", "url": kind}}
                      for u, res, kind in entries]}


def validate(bundle: dict[str, Any]) -> None:
    """Validate every resource with its fhir.resources R4B model, then the Bundle, then that
    every reference points at an entry of the bundle; LisError with one sentence."""
    from importlib import import_module

    urls = {e["fullUrl"] for e in bundle.get("entry", [])}
    for i, e in enumerate(bundle.get("entry", [])):
        kind = e["resource"]["resourceType"]
        model = getattr(import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)
        try:
            model.model_validate(e["resource"])
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, in one sentence
            raise LisError(f"FHIR entry {i} ({kind}) is not valid: {str(exc).splitlines()[0]}") from None
        for ref in _references(e["resource"]):
            if ref not in urls:
                raise LisError(f"FHIR entry {i} ({kind}) refers to {ref}, which is not in the bundle.")
    from fhir.resources.R4B.bundle import Bundle

    try:
        Bundle.model_validate(bundle)
    except Exception as exc:  # noqa: BLE001
        raise LisError(f"the FHIR bundle is not valid: {str(exc).splitlines()[0]}") from None


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return out + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def dumps(bundle: dict[str, Any]) -> str:
    return json.dumps(bundle, ensure_ascii=False, indent=2) + "\n"
