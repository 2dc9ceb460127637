"""Logging and progress for a run that is watched by a person at night or by nobody at all.

A terminal gets a tqdm bar (cells/s, ETA); cron, Task Scheduler and redirected output get
plain timestamped lines instead, because a bar's carriage returns turn a log file into noise.
`--log-file` adds a persistent log with the same lines.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO

LOGGER = "batchwbc"
PROGRESS_LOGGER = "batchwbc.progress"
#: Plain progress lines at most this often (seconds), so a 50,000-cell night stays readable.
PROGRESS_EVERY_S = 30.0

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


class LogFileError(Exception):
    """The --log-file cannot be opened; str is one sentence."""


class _NotProgress(logging.Filter):
    """Keeps progress lines off stderr while a bar already shows progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(PROGRESS_LOGGER)


def stderr_is_terminal(stream: IO | None = None) -> bool:
    s = sys.stderr if stream is None else stream
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):
        return False


def setup_logging(quiet: bool, log_file: str | None, show_bar: bool) -> logging.Logger:
    """Configure the 'batchwbc' logger (idempotent: replaces handlers from a previous call,
    which matters when the CLI is invoked repeatedly in one process, e.g. by tests)."""
    logger = logging.getLogger(LOGGER)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    fmt = logging.Formatter(_FORMAT, _DATEFMT)

    console = _TqdmAwareHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(fmt)
    if show_bar:
        console.addFilter(_NotProgress())
    logger.addHandler(console)

    if log_file:
        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise LogFileError(f"log file {log_file} cannot be opened ({exc.strerror or exc}).") from None
        fh.setLevel(logging.DEBUG)  # tracebacks of unexpected failures go here, not to the terminal
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


class _TqdmAwareHandler(logging.StreamHandler):
    """Writes through tqdm when a bar is active so messages do not tear it apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _ACTIVE_BARS:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + self.terminator)
                self.flush()
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


_ACTIVE_BARS: list = []


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Counts finished cells; a bar on a terminal, periodic log lines otherwise."""

    def __init__(self, total: int, show_bar: bool, every_s: float = PROGRESS_EVERY_S):
        self.total = total
        self.done = 0
        self.every_s = every_s
        self._t0 = time.monotonic()
        self._last = self._t0
        self._log = logging.getLogger(PROGRESS_LOGGER)
        self._bar = None
        if show_bar:
            from tqdm import tqdm

            # A terminal reporting a 0x0 size (some ptys, serial consoles) would hide the bar.
            try:
                size = os.get_terminal_size(sys.stderr.fileno())
            except (OSError, ValueError, AttributeError):
                size = os.terminal_size((0, 0))
            known = size.columns > 0 and size.lines > 0
            self._bar = tqdm(total=total, unit="cell", file=sys.stderr, smoothing=0.1, dynamic_ncols=known,
                             ncols=None if known else 100, nrows=None if known else 24)
            _ACTIVE_BARS.append(self._bar)

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(1e-9, now - self._t0)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _fmt_duration(eta) if eta == eta else "unknown"
        return f"{self.done} of {self.total} cells ({pct:.0f}%), {rate:.1f} cells/s, ETA {eta_text}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            if self._bar in _ACTIVE_BARS:
                _ACTIVE_BARS.remove(self._bar)
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
