"""Refuse a run whose files would overwrite one another, before anything is opened.

Why: `--out X --cache X` turns the report into a database (or the cache into a workbook),
`--log-file X --out X` appends log lines to last night's report, and so on: each loses data
silently. A run writes more files than it names - the report's lock file, the cache's SQLite
journals, the hidden temp files of the atomic writes - so those are compared too. The temp
files (`.<name>.<pid>-<random>.tmp`) carry a random part and cannot meet another name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


class OutputCollision(ValueError):
    """Two of a run's files are the same file; str(exc) is one sentence for the user."""


def companion_files(option: str, path: Path) -> list[tuple[str, Path]]:
    """Files a run writes beside a named one (pure): the lock of the report, SQLite's journals."""
    if option == "--out":
        from batchwbc.ops.run_lock import lock_path_for

        return [(f"the lock file of {option}", lock_path_for(path))]
    if option == "--cache":
        return [(f"the journal of {option}", path.with_name(path.name + suffix)) for suffix in ("-wal", "-shm", "-journal")]
    return []


def _key(path: Path) -> str:
    """One spelling per file: absolute, symlinks and '..' resolved, case folded where the
    file system ignores case (Windows)."""
    return os.path.normcase(str(Path(path).expanduser().resolve(strict=False)))


def _same_file(a: Path, b: Path) -> bool:
    """Also catches two names of one existing file (a hard link, another drive mapping)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_outputs(outputs: Mapping[str, Path | None], inputs: Mapping[str, Path | None] | None = None) -> None:
    """Raise OutputCollision when two written files, or a written and a read file, coincide.

    `outputs` maps an option name (e.g. "--out") to the file it writes, None when unused;
    `inputs` maps read-only options (e.g. "--model") that no output may replace.
    """
    named: list[tuple[str, Path, bool]] = []  # (what, path, is_output)
    for option, path in outputs.items():
        if path is None:
            continue
        named.append((option, Path(path), True))
        named.extend((what, p, True) for what, p in companion_files(option, Path(path)))
    for option, path in (inputs or {}).items():
        if path is not None:
            named.append((option, Path(path), False))
    for i, (what_a, a, out_a) in enumerate(named):
        for what_b, b, out_b in named[i + 1:]:
            if not (out_a or out_b):
                continue  # two inputs may well be one file
            if _key(a) == _key(b) or _same_file(a, b):
                raise OutputCollision(
                    f"{what_a} and {what_b} are the same file ({b}); give each its own file name so that neither overwrites the other."
                )
