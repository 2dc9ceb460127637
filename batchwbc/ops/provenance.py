"""Where and how a run was made: the Run sheet's audit rows about the machine and the call.

An accredited lab must be able to say, for any report, which configuration produced its flags
(the file and its SHA-256, so an edited file is detected), on which computer, by which user
account, with which command line and which versions of Python, onnxruntime and the operating
system. Nothing here fails a run: a value that cannot be read is reported as "unknown".
"""
from __future__ import annotations

import getpass
import hashlib
import platform
import shlex
import socket
import sys
from pathlib import Path
from typing import Sequence

UNKNOWN = "unknown"


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks; raises OSError. The one hashing loop: the
    model's identity (engine.model), verify's --model check and the Run sheet's config hash."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes; "unknown (reason)" when it cannot be read (the Run sheet
    records what it can rather than failing a finished run)."""
    try:
        return sha256_of(path)
    except OSError as exc:
        return f"{UNKNOWN} ({exc.strerror or exc})"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in the environment or the password database
        return UNKNOWN


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except Exception:  # noqa: BLE001 - reported, never fatal
        return UNKNOWN
    return str(getattr(onnxruntime, "__version__", UNKNOWN))


def command_line(argv: Sequence[str] | None = None) -> str:
    """The full command line as a shell would take it back (arguments quoted where needed)."""
    return shlex.join(list(sys.argv if argv is None else argv))


def provenance_rows(config_path: str | Path | None, argv: Sequence[str] | None = None) -> dict[str, str]:
    """Run-sheet rows: config file and hash, host, user, command line, library and OS versions."""
    rows = {
        "Config file": "none (built-in defaults)" if config_path is None else str(Path(config_path).resolve()),
        "Config file sha256": "" if config_path is None else file_sha256(config_path),
        "Host": socket.gethostname() or UNKNOWN,
        "User": _user(),
        "Command line": command_line(argv),
        "Python version": f"{platform.python_version()} ({platform.python_implementation()})",
        "onnxruntime version": _onnxruntime_version(),
        "Operating system": platform.platform() or UNKNOWN,
    }
    return rows
