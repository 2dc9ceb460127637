"""Keep onnxruntime silent on stderr: a nightly run prints batchwbc's own lines and nothing else.

Why: onnxruntime logs through its own C++ logger straight to stderr, with ANSI colour codes,
at WARNING and above by default. On Windows, for service accounts (Task Scheduler), it warns
that telemetry cannot be started, even with `--quiet`; a model with an unused initializer
gets "Removing initializer ..." warnings. Those lines land in cron mails and scheduler logs
as unreadable escape codes and say nothing a technologist can act on. So, before any session
exists (the logging environment is created with the first one):

* the default logger only reports errors (severity 3; 0 verbose, 1 info, 2 warning, 4 fatal),
* every session's own logger likewise,
* telemetry events are disabled where this onnxruntime has the switch (its Windows builds
  send ETW events; other builds ignore it).

Real failures still surface: they raise Python exceptions, which batchwbc reports itself.
"""
from __future__ import annotations

from typing import Any

#: onnxruntime's ERROR severity: warnings and below are dropped.
ORT_SEVERITY_ERROR = 3


def quiet_onnxruntime() -> None:
    """Set onnxruntime's process-wide logger to errors only and switch telemetry off (idempotent)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_SEVERITY_ERROR)
    disable = getattr(ort, "disable_telemetry_events", None)  # absent in some builds/versions
    if disable is not None:
        disable()


def quiet_session_options() -> Any:
    """onnxruntime.SessionOptions whose session logger reports errors only; calls quiet_onnxruntime()."""
    import onnxruntime as ort

    quiet_onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = ORT_SEVERITY_ERROR
    return opts
