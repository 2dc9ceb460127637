"""Decode workers end as soon as the run that started them is gone, even after `kill -9`.

Why: SIGKILL, a power-management kill or Task Scheduler's "Stop the task" end the main
process without any cleanup. Its decode workers then sit in the pool waiting for work that
never comes (or keep decoding a long task), holding CPU, memory and open files on the share
for minutes. Each worker therefore watches its parent:

* Linux: `prctl(PR_SET_PDEATHSIG, SIGKILL)` makes the kernel kill the worker the moment the
  parent dies. (It fires when the *thread* that started the worker ends; the pool starts its
  workers from the run's main thread, and the watchdog below covers any other case.)
* every POSIX system: a daemon thread polls `os.getppid()`; when the parent dies the worker is
  re-parented (to init or a subreaper), the pid changes, and the worker exits.
* Windows: a daemon thread holds a handle to the parent process and waits on it; the wait
  returns when the parent ends (a handle, unlike a pid, cannot be reused by another process).

The worker leaves with `os._exit`, skipping cleanup that could block on a dead parent's pipes.
"""
from __future__ import annotations

import os
import sys
import threading
import time

#: How often the POSIX watchdog looks at its parent: a dead run's workers are gone within this.
POLL_SECONDS = 0.5
#: Exit status of a worker that left because its parent died (nobody is left to read it).
ORPHAN_EXIT = 3


def _exit_orphaned() -> None:
    os._exit(ORPHAN_EXIT)


def _linux_pdeathsig() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (best effort)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (musl without it, sandboxes): the thread remains
        pass


def _poll_ppid(parent_pid: int, interval: float) -> None:
    while True:
        if os.getppid() != parent_pid:
            _exit_orphaned()
        time.sleep(interval)


def _windows_wait(parent_pid: int) -> None:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    kernel32.WaitForSingleObject.restype = wintypes.DWORD
    kernel32.WaitForSingleObject.argtypes = (wintypes.HANDLE, wintypes.DWORD)
    synchronize, infinite = 0x00100000, 0xFFFFFFFF
    handle = kernel32.OpenProcess(synchronize, False, parent_pid)
    if not handle:
        _exit_orphaned()  # the parent is already gone (or cannot be watched: then it never could)
    kernel32.WaitForSingleObject(handle, infinite)
    _exit_orphaned()


def watch_parent(parent_pid: int, interval: float = POLL_SECONDS) -> None:
    """Make this process exit when `parent_pid` (the process that started it) ends.

    Call once, early in the child (the pool initializer). Returns at once; the watch runs in a
    daemon thread.
    """
    if sys.platform == "win32":
        target, args = _windows_wait, (parent_pid,)
    else:
        if sys.platform.startswith("linux"):
            _linux_pdeathsig()
        if os.getppid() != parent_pid:  # died before the death signal was armed
            _exit_orphaned()
        target, args = _poll_ppid, (parent_pid, interval)
    threading.Thread(target=target, args=args, name="batchwbc-parent-watch", daemon=True).start()
