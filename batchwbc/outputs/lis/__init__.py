"""Signed results to a laboratory information system: HL7 v2.5.1 ORU^R01 (files, MLLP) and FHIR R4.

This package only formats what verification already decided (batchwbc.core.verification:
each signed patient's verified differential and flags); it never recounts a cell or
re-evaluates a flag. hl7apy and fhir.resources are the optional extra `batchwbc[lis]`;
nothing here is imported unless `batchwbc verify` is asked for --hl7 or --fhir.
Details for a lab: docs/lis.md.
"""
from __future__ import annotations

from pathlib import Path

#: The sentence a missing extra produces, for --hl7 / --fhir.
INSTALL_HINT = "install the LIS extra first: pip install 'batchwbc[lis]' (hl7apy, fhir.resources)"


class LisError(Exception):
    """A message that cannot be built for one patient; str(exc) is one sentence."""


def destination_problem(hl7_dir: Path | None, mllp: str | None, fhir_path: Path | None = None) -> str | None:
    """The one sentence that stops --hl7 / --mllp / --fhir before anything is classified or
    written (None when they can be used): --mllp without --hl7, an unreadable address, an --hl7
    path that is a file, a missing optional library. Shared by `run` and `verify`."""
    import importlib.util

    if mllp is not None and hl7_dir is None:
        return "--mllp sends the --hl7 messages: give --hl7 DIR as well."
    if mllp is not None:
        from batchwbc.outputs.lis.mllp import parse_address

        try:
            parse_address(mllp)
        except ValueError as exc:
            return str(exc)
    if hl7_dir is not None and hl7_dir.exists() and not hl7_dir.is_dir():
        return f"--hl7 {hl7_dir} exists and is not a folder."
    for flag, wanted, module in (("--hl7", hl7_dir, "hl7apy"), ("--fhir", fhir_path, "fhir.resources")):
        if wanted is not None and importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{flag} needs {module}, which is not installed; {INSTALL_HINT}."
    return None

