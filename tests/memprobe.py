"""Peak resident memory of the current process, for the memory tests that run in a subprocess.

VmHWM rather than ru_maxrss: after fork, ru_maxrss starts at the (large) pytest parent's RSS.
Writing 5 to clear_refs resets the high-water mark to the current RSS (Linux >= 4.0)."""
from __future__ import annotations

import resource


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_kib() -> int:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
