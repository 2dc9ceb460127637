"""Verified cells become labelled data: DIR/<class_id>/<patient>/<file> plus DIR/labels.csv.

This is the layout batchwbc.inputs.labelled_folders.read_labelled reads (for `batchwbc evaluate` and
`batchwbc adapt`) and the training side's generic reader: one folder per class id, one
sub-folder per patient so cross-validation can keep a patient's cells together.

Which cells (batchwbc.core.verification.is_exported): every cell of a signed patient, confirmed
or corrected; of a patient not signed, only the cells a person explicitly classified. Names
come from the lab's disk, so they are made safe on every file system (Windows included) and
unique within their folder; labels.csv maps each exported file back to the original.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Sequence

from batchwbc.outputs.workbook import atomic_output, csv_text
from batchwbc.core.verification import PatientVerification, VerifiedCell, is_exported

LABELS_COLUMNS = ("patient", "original_file", "machine_class", "confidence", "verified_class", "reviewer",
                  "corrected", "signed", "exported_file")
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f]')
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_MAX_NAME = 120  # characters: keeps DIR/class/patient/file well under Windows' 260-character path limit


class ExportError(Exception):
    """The export folder cannot be used; str is one sentence."""


@dataclass
class ExportResult:
    exported: int = 0
    missing: list[str] = field(default_factory=list)  # one sentence per crop that could not be copied


def safe_name(name: str) -> str:
    """A file or folder name valid on Windows, macOS and Linux, never hidden, never empty."""
    s = _UNSAFE.sub("_", name).strip().rstrip(". ")
    if s.startswith("."):
        s = "_" + s[1:]
    if s.split(".")[0].lower() in _RESERVED:
        s = "_" + s
    if len(s) > _MAX_NAME:
        base, ext = os.path.splitext(s)
        s = base[: _MAX_NAME - len(ext)] + ext
    return s or "_"


class _Namer:
    """Unique safe names within one folder; case-insensitively, as Windows and macOS compare."""

    def __init__(self) -> None:
        self.used: dict[str, set[str]] = {}

    def name(self, folder: str, wanted: str) -> str:
        taken = self.used.setdefault(folder, set())
        base, ext = os.path.splitext(safe_name(wanted))
        candidate, n = base + ext, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{base}-{n}{ext}"
        taken.add(candidate.lower())
        return candidate


def leaves_root(file: str) -> bool:
    """True when a report's relative crop path could point outside the slides folder by its
    own text: absolute, a drive, or a '..' part. Only such a path is refused; a symbolic link
    inside the slides folder is followed, as `batchwbc run` followed it when it read the crop
    (`python -m batchwbc.simulate` makes links by default, and every one was once refused)."""
    posix, win = PurePosixPath(file), PureWindowsPath(file)
    return posix.is_absolute() or bool(win.drive) or win.is_absolute() or ".." in posix.parts or ".." in win.parts


def check_export_folder(out_dir: Path) -> None:
    """Fail before any work when the folder cannot take a fresh export."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--export-labelled {out_dir} exists and is not a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"--export-labelled folder {out_dir} is not empty; choose a new folder so exports never mix.")
    if not out_dir.parent.is_dir():
        raise ExportError(f"the folder {out_dir.parent} for --export-labelled does not exist.")


def export_labelled(patients: Sequence[PatientVerification], cells: Sequence[VerifiedCell], crops_root: Path,
                    out_dir: Path, fallback_reviewer: str = "") -> ExportResult:
    """Copy the exported cells' crops into out_dir and write labels.csv; a crop that cannot be
    found or copied is reported in the result and skipped, the rest are exported."""
    from batchwbc.inputs.labelled_folders import LABELS_CSV  # here: batchwbc.inputs.labelled_folders's readers load the image stack

    check_export_folder(out_dir)
    out_dir.mkdir(exist_ok=True)
    by_patient = {p.patient: p for p in patients}
    patient_names, file_names = _Namer(), _Namer()
    patient_dirs: dict[str, str] = {}
    result = ExportResult()
    lines = []
    for vc in cells:
        pv = by_patient.get(vc.cell.patient)
        if pv is None or not is_exported(vc, pv):
            continue
        c = vc.cell
        if leaves_root(c.file):
            result.missing.append(f"the crop path {c.file} of patient {c.patient} points outside {crops_root}, "
                                  "so it was not exported.")
            continue
        source = crops_root / c.file  # what `run` read: a link is followed, not resolved and judged by its target
        if not source.is_file():
            result.missing.append(f"the crop {c.file} of patient {c.patient} is not in {crops_root} "
                                  "(moved or deleted), so it was not exported.")
            continue
        if c.patient not in patient_dirs:
            patient_dirs[c.patient] = patient_names.name("", c.patient)
        folder = f"{vc.final}/{patient_dirs[c.patient]}"
        within = c.file[len(c.patient) + 1:] if c.file.startswith(c.patient + "/") else c.file
        name = file_names.name(folder, within.replace("/", "__"))  # sub-folders flattened, names kept
        target = out_dir / vc.final / patient_dirs[c.patient] / name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as exc:
            result.missing.append(f"the crop {c.file} of patient {c.patient} could not be copied "
                                  f"({exc.strerror or exc}), so it was not exported.")
            continue
        result.exported += 1
        lines.append([csv_text(c.patient), csv_text(c.file), c.class_id, f"{c.confidence:.4f}", vc.final,
                      csv_text(pv.verified_by or fallback_reviewer), "yes" if vc.corrected else "no",
                      "yes" if pv.signed else "no", f"{folder}/{name}"])
    with atomic_output(out_dir / LABELS_CSV) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(LABELS_COLUMNS)
            writer.writerows(lines)
    return result
