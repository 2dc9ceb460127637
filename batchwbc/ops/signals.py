"""Turn SIGTERM/SIGINT/SIGBREAK into one exception, so an interrupted run cleans up.

cron, systemd and Task Scheduler stop a job with SIGTERM (or CTRL_BREAK on Windows), whose
default action kills Python without running `finally` blocks - the temp workbook would be
left behind and the log would not say where the run stopped. Inside
`signals_as_interrupt()` each of those signals raises RunInterrupted in the main thread.

RunInterrupted derives from KeyboardInterrupt, i.e. from BaseException and *not* Exception,
on purpose: the per-file `except Exception` handlers that keep bad images from crashing a
run must not swallow a stop request and record it as an "unreadable file". Code that
already handles Ctrl+C (KeyboardInterrupt) therefore handles SIGTERM the same way. The CLI
should catch it around the whole run, remove temp files, log where it stopped and exit
with exit_codes.INTERRUPTED.

Only the first signal raises; later ones while cleaning up are logged and ignored, so a
second Ctrl+C cannot abort the cleanup half-way. Previous handlers are restored on exit.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """Raised in the main thread when the run is asked to stop; `.signal_name` says by what."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"


def _handled_signals() -> list[signal.Signals]:
    names = ("SIGINT", "SIGTERM", "SIGBREAK")  # SIGBREAK exists on Windows only
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Within this block, SIGINT/SIGTERM/SIGBREAK raise RunInterrupted in the main thread.

    Outside the main thread (where Python forbids installing handlers) it does nothing, so
    library callers and test runners in threads still work.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if fired:
            log.warning("Received %s again while stopping; still cleaning up.", name)
            return
        fired.append(name)
        raise RunInterrupted(name)

    previous = {}
    try:
        for sig in _handled_signals():
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
