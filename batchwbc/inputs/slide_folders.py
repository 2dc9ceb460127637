"""Finding the crops of every patient below a slides folder.

The walk is iterative and remembers the real directories it has entered, so a symlink loop
or a pathologically deep tree can neither hang nor crash a nightly run; anything it cannot
use is counted (hidden / non-image files) or reported (unreadable folders, broken links),
never silently dropped. The order is deterministic so two runs over the same folder give the
same report.
"""
from __future__ import annotations

import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from batchwbc.core.records import ROOT_GROUP, FileError

# Reasons a file or folder was ignored (keys of Discovery.ignored).
IGNORED_HIDDEN = "hidden file or folder"
IGNORED_NOT_IMAGE = "not an image file"
IGNORED_NOT_REGULAR = "not a regular file"
IGNORED_REPEATED_FOLDER = "folder already visited (symlink loop or repeated link)"

_FILE_ATTRIBUTE_HIDDEN = 0x2  # Windows; the attribute only exists on Windows stat results


class DiscoveryError(Exception):
    """The slides folder itself cannot be used; str is one sentence for the user."""


@dataclass(frozen=True)
class Crop:
    """One image to classify; kept small because a run may list 50,000+ of them."""

    patient: str
    rel: str  # POSIX path relative to the slides root, as shown in the report
    path: str  # absolute path used to open the file (and as the cache key)


@dataclass
class Discovery:
    root: Path
    patients: list[str]  # report order; empty patient folders included
    crops: list[Crop]
    errors: list[FileError] = field(default_factory=list)  # folders that could not be read, broken links
    ignored: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def ignored_total(self) -> int:
        return sum(self.ignored.values())


def natural_key(name: str) -> tuple:
    """Sort 'P2' before 'P10' (how people number slides), ties broken by the exact name."""
    parts = re.split(r"(\d+)", name.casefold())
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "") + (name,)


def _is_hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name != "nt":  # the hidden attribute exists only on Windows; skip the extra stat
        return False
    try:
        attrs = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    except OSError:
        return False
    return bool(attrs & _FILE_ATTRIBUTE_HIDDEN)


def _real_id(path: str) -> tuple[int, int] | str:
    """Identity of a directory after following links (device+inode, or the real path where
    the platform reports no inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if st.st_ino:
        return (st.st_dev, st.st_ino)
    return os.path.realpath(path)


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'broken' (dangling link) or 'other' (fifo, socket, device...).

    FIFOs and devices must never reach a decoder: opening a FIFO blocks forever.
    """
    try:
        st = entry.stat(follow_symlinks=True)
    except FileNotFoundError:
        return "broken"
    except OSError:
        return "broken" if entry.is_symlink() else "other"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    return "other"


def _scan_sorted(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: natural_key(e.name))


def _folder_error(patient: str, rel: str, exc: OSError) -> FileError:
    """A whole patient folder that cannot be read is reported with file '' (records.FileError)."""
    why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
    if rel == patient:
        return FileError(patient, "", f"patient folder could not be read ({why}); none of its images were classified")
    return FileError(patient, rel, f"folder could not be read ({why}); the images in it were not classified")


def _sort_entry(entry: os.DirEntry, patient: str, rel: str, out: Discovery) -> bool:
    """File one directory entry into `out` (a crop, an error or an ignored count); True when
    it is a folder, which the caller may descend into. The one rule for every level."""
    from batchwbc.engine.preprocess import is_image_name  # lazy: discovery itself needs no image stack

    if _is_hidden(entry):
        out.ignored[IGNORED_HIDDEN] += 1
        return False
    kind = _entry_kind(entry)
    if kind == "dir":
        return True
    if not is_image_name(entry.name):
        out.ignored[IGNORED_NOT_IMAGE] += 1
    elif kind == "file":
        out.crops.append(Crop(patient, rel, os.path.abspath(entry.path)))
    elif kind == "broken":
        out.errors.append(FileError(patient, rel, "the file is a link to a file that does not exist"))
    else:
        out.ignored[IGNORED_NOT_REGULAR] += 1
    return False


def _walk_patient(patient: str, top: str, visited_root: object, out: Discovery) -> None:
    """Depth-first, iterative, sorted walk of one patient folder (any depth)."""
    visited = {visited_root, _real_id(top)}
    stack: list[tuple[str, str]] = [(top, patient)]  # (abs dir, rel dir)
    while stack:
        d_abs, d_rel = stack.pop()
        try:
            entries = _scan_sorted(d_abs)
        except OSError as exc:
            out.errors.append(_folder_error(patient, d_rel, exc))
            continue
        subdirs: list[tuple[str, str]] = []
        for entry in entries:
            rel = f"{d_rel}/{entry.name}"
            if not _sort_entry(entry, patient, rel, out):
                continue
            rid = _real_id(entry.path)
            if rid in visited:
                out.ignored[IGNORED_REPEATED_FOLDER] += 1
                continue
            visited.add(rid)
            subdirs.append((entry.path, rel))
        # Files of a folder first, then its subfolders in sorted order.
        stack.extend(reversed(subdirs))


def discover(root: str | os.PathLike) -> Discovery:
    """Patients are the first-level folders; images directly under root form ROOT_GROUP."""
    root_path = Path(root)
    if not root_path.exists():
        raise DiscoveryError(f"slides folder {root_path} does not exist.")
    if not root_path.is_dir():
        raise DiscoveryError(f"{root_path} is not a folder; give the folder that holds one folder per patient.")
    root_abs = os.path.abspath(root_path)
    try:
        entries = _scan_sorted(root_abs)
    except OSError as exc:
        why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
        raise DiscoveryError(f"slides folder {root_path} cannot be read ({why}).") from None

    out = Discovery(root=root_path, patients=[], crops=[])
    root_id = _real_id(root_abs)
    patient_dirs: list[os.DirEntry] = []
    for entry in entries:
        if not _sort_entry(entry, ROOT_GROUP, entry.name, out):
            continue
        if _real_id(entry.path) == root_id:
            out.ignored[IGNORED_REPEATED_FOLDER] += 1
        else:
            patient_dirs.append(entry)
    if out.crops or any(e.patient == ROOT_GROUP for e in out.errors):
        out.patients.append(ROOT_GROUP)
    for entry in patient_dirs:
        out.patients.append(entry.name)
        _walk_patient(entry.name, entry.path, root_id, out)
    return out
