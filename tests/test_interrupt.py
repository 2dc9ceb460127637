"""signals_as_interrupt: SIGTERM/SIGINT become RunInterrupted, handlers are restored."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from batchwbc.ops.signals import RunInterrupted, signals_as_interrupt

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="os.kill(SIGTERM) on Windows terminates")


@posix_only
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_raises_run_interrupted(sig):
    with pytest.raises(RunInterrupted) as ei:
        with signals_as_interrupt():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this
    assert ei.value.signal_name == sig.name
    assert sig.name in str(ei.value)


def test_not_swallowed_by_except_exception():
    assert not issubclass(RunInterrupted, Exception)
    assert issubclass(RunInterrupted, KeyboardInterrupt)


@posix_only
def test_handlers_restored():
    before_term = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    with signals_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not before_term
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert signal.getsignal(signal.SIGINT) is before_int


@posix_only
def test_second_signal_does_not_abort_cleanup():
    cleaned = []
    with signals_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except RunInterrupted:
            os.kill(os.getpid(), signal.SIGTERM)  # impatient operator
            time.sleep(0.05)
            cleaned.append(True)
    assert cleaned == [True]


def test_noop_outside_main_thread():
    out = []

    def body():
        with signals_as_interrupt():
            out.append(signal.getsignal(signal.SIGTERM))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out == [signal.getsignal(signal.SIGTERM)]


@posix_only
def test_sigterm_to_subprocess_runs_finally():
    """The real use: a process killed by cron's SIGTERM still runs its cleanup."""
    code = textwrap.dedent("""
        import sys, time
        from batchwbc.ops.signals import RunInterrupted, signals_as_interrupt
        try:
            with signals_as_interrupt():
                print("ready", flush=True)
                time.sleep(30)
        except RunInterrupted as exc:
            print("cleaned up after", exc.signal_name, flush=True)
            sys.exit(130)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130
    assert "cleaned up after SIGTERM" in out
