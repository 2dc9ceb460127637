"""Signed results to a laboratory information system: HL7 v2.5.1 ORU^R01 (files, MLLP) and FHIR R4.

This package only formats what verification already decided (batchwbc.core.verification:
each signed patient's verified differential and flags); it never recounts a cell or
re-evaluates a flag. hl7apy and fhir.resources are the optional extra `batchwbc[lis]`;
nothing here is imported unless `batchwbc verify` is asked for --hl7 or --fhir.
Details for a lab: docs/lis.md.
"""
from __future__ import annotations

#: The sentence a missing extra produces, for --hl7 / --fhir.
INSTALL_HINT = "install the LIS extra first: pip install 'batchwbc[lis]' (hl7apy, fhir.resources)"


class LisError(Exception):
    """A message that cannot be built for one patient; str(exc) is one sentence."""
