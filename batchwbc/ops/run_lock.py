"""A lock file next to the report, so two runs can never write the same workbook at once.

Why a lock *file* (`<report>.lock`, created with O_CREAT|O_EXCL) rather than an OS lock:
it works the same on Windows and POSIX and on network shares, and a person can read who
holds it. Its weakness - a killed run leaves it behind - is handled by stale detection:

* the holder's pid is no longer alive on this host (or the pid now belongs to another
  process: on Linux the process start time is recorded and compared), or
* the file is unreadable/garbage and older than GARBAGE_STALE_AFTER_S (a fresh garbage
  file may be a run that is writing it right now), or
* it was written by another host more than FOREIGN_STALE_AFTER_S ago (we cannot check a
  pid there, and no nightly run lasts a day).

A stale lock is logged as a warning and replaced; anything else raises LockedError.

Checking whether a pid is alive: POSIX uses os.kill(pid, 0). Windows must NOT use it (there
signal 0 is CTRL_C_EVENT, and other values terminate the process), so it asks the kernel
through OpenProcess/GetExitCodeProcess via ctypes instead - no extra dependency.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: An unreadable lock file younger than this may be one being written right now.
GARBAGE_STALE_AFTER_S = 300.0
#: A lock written by another computer is trusted for this long (its pid cannot be checked).
FOREIGN_STALE_AFTER_S = 24 * 3600.0
#: A leftover `.lock.break` guard (a run killed while breaking a stale lock) is ignored after this.
_BREAK_GUARD_STALE_S = 60.0


class LockedError(Exception):
    """The report is locked by another run (or the lock cannot be created); str(exc) is one sentence."""


class LockFileError(LockedError):
    """The lock file itself cannot be created (e.g. no permission in the output folder)."""


def lock_path_for(target: str | os.PathLike) -> Path:
    t = Path(target)
    return t.with_name(t.name + ".lock")


def _hostname() -> str:
    return socket.gethostname() or "unknown-host"


def _process_start_token(pid: int) -> str | None:
    """Something that changes when a pid is reused (Linux: start time in clock ticks)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("ascii", "replace")
        # The command name (field 2) may contain spaces/parens: split after the last ')'.
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    process_query_limited_information = 0x1000
    still_active = 259
    error_access_denied = 5
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() == error_access_denied  # exists, but not ours to inspect
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    except OSError:
        return False
    return True


def _describe(info: dict[str, Any]) -> str:
    return f"process {info.get('pid', '?')} on {info.get('hostname', '?')}, started {info.get('started', '?')}"


class RunLock:
    """`with RunLock(report_path): ...` - hold `<report>.lock` for the duration of a run."""

    def __init__(
        self,
        target_path: str | os.PathLike,
        garbage_stale_after_s: float = GARBAGE_STALE_AFTER_S,
        foreign_stale_after_s: float = FOREIGN_STALE_AFTER_S,
    ):
        self.target = Path(target_path)
        self.path = lock_path_for(self.target)
        self.garbage_stale_after_s = garbage_stale_after_s
        self.foreign_stale_after_s = foreign_stale_after_s
        self.replaced_stale: str | None = None  # why a stale lock was replaced, for the run log
        self._token: str | None = None

    # -- acquire -------------------------------------------------------------------------
    def _content(self) -> bytes:
        pid = os.getpid()
        info = {
            "tool": "batchwbc",
            "pid": pid,
            "hostname": _hostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "process_start": _process_start_token(pid),
            "token": self._token,
        }
        return (json.dumps(info, indent=1) + "\n").encode("utf-8")

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise LockFileError(
                f"cannot create the lock file {self.path} ({exc.strerror or exc}); check that the output folder exists and is writable."
            ) from None
        try:
            os.write(fd, self._content())
        finally:
            os.close(fd)
        return True

    def _read(self) -> tuple[bytes | None, float | None]:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
            return raw, os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None, None
        except OSError:
            try:
                return b"", os.stat(self.path).st_mtime
            except OSError:
                return None, None

    def stale_reason(self, raw: bytes, mtime: float, now: float | None = None) -> str | None:
        """Why an existing lock may be replaced, or None if it must be respected."""
        now = time.time() if now is None else now
        age = max(0.0, now - mtime)
        try:
            info = json.loads(raw.decode("utf-8"))
            pid = int(info["pid"])
            host = str(info["hostname"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if age >= self.garbage_stale_after_s:
                return f"the lock file is unreadable and {age / 60:.0f} minutes old"
            return None
        if host != _hostname():
            if age >= self.foreign_stale_after_s:
                return f"it was written by {host} {age / 3600:.0f} hours ago"
            return None
        if not pid_alive(pid):
            return f"{_describe(info)} is no longer running"
        recorded, current = info.get("process_start"), _process_start_token(pid)
        if recorded and current and recorded != current:
            return f"{_describe(info)} has ended (its pid now belongs to another process)"
        return None

    def _locked_error(self, raw: bytes) -> LockedError:
        try:
            info = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            info = None
        if not isinstance(info, dict):
            return LockedError(
                f"{self.target.name} is locked by {self.path}, which cannot be read; another run may be "
                f"starting - try again in a few minutes, or delete {self.path} if no batchwbc run is active."
            )
        return LockedError(
            f"another batchwbc run ({_describe(info)}) is writing {self.target.name}; wait for it to finish, "
            f"or delete {self.path} if that run no longer exists."
        )

    def _break(self, seen: bytes) -> None:
        """Remove the stale lock we saw, unless someone replaced it meanwhile (guarded so two
        runs breaking the same stale lock cannot delete each other's fresh lock)."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(guard).st_mtime > _BREAK_GUARD_STALE_S:
                    os.unlink(guard)
            except OSError:
                pass
            time.sleep(0.05)
            return
        except OSError:
            return
        try:
            raw, _ = self._read()
            if raw == seen:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)
            try:
                os.unlink(guard)
            except OSError:
                pass

    def acquire(self) -> None:
        self._token = uuid.uuid4().hex
        for _ in range(50):
            if self._try_create():
                return
            raw, mtime = self._read()
            if raw is None:  # vanished between our create and read: try again
                continue
            reason = self.stale_reason(raw, mtime or 0.0)
            if reason is None:
                self._token = None
                raise self._locked_error(raw)
            log.warning("Replacing stale lock %s: %s.", self.path, reason)
            self.replaced_stale = reason
            self._break(raw)
        self._token = None
        raise LockedError(f"could not take the lock {self.path} (it keeps changing); is another run starting?")

    # -- release -------------------------------------------------------------------------
    def release(self) -> None:
        """Remove the lock only if it is still ours (never someone else's after a takeover)."""
        if self._token is None:
            return
        raw, _ = self._read()
        try:
            if raw is not None and json.loads(raw.decode("utf-8")).get("token") == self._token:
                os.unlink(self.path)
        except (ValueError, UnicodeDecodeError, AttributeError, OSError) as exc:
            log.warning("Could not remove lock file %s (%s).", self.path, exc)
        finally:
            self._token = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
