"""A lab's labelled cells: LABELLED/<class_id>/[<patient>/...]<crop>, the verify-export format.

`batchwbc verify --export-labelled` writes this layout and `batchwbc evaluate` / `batchwbc adapt`
read it. A folder directly below a class folder names the patient (or slide), so that
cross-validation can keep each patient's cells together; crops directly in the class folder
get no patient. Folders that are not class ids are counted and skipped, never guessed.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from batchwbc.inputs.public_datasets import LabelledImage, _classify_file, _files

#: Written beside the class folders by `verify --export-labelled`; never read as an image.
LABELS_CSV = "labels.csv"


class LabelledError(Exception):
    """A labelled folder that cannot be used; str is one sentence."""


@dataclass
class LabelledSet:
    items: list[LabelledImage] = field(default_factory=list)
    unknown_folders: Counter = field(default_factory=Counter)  # folder name -> images skipped
    skipped: Counter = field(default_factory=Counter)  # reason -> count (hidden, not an image)

    def class_counts(self) -> Counter:
        return Counter(it.class_id for it in self.items)


def read_labelled(root: str | os.PathLike, known_classes: tuple[str, ...] | list[str]) -> LabelledSet:
    """Read root/<class_id>/... for the given class ids (usually the model's own classes)."""
    root = Path(root)
    if not root.is_dir():
        raise LabelledError(f"labelled folder {root} does not exist or is not a folder.")
    known = set(known_classes)
    out = LabelledSet()
    source = root.name
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        scan_skips: Counter = Counter()
        for path in _files(folder):
            holder = _SkipSink()
            if not _classify_file(path, holder, source):
                scan_skips.update(reason for (_, reason) in holder.skipped)
                continue
            if folder.name not in known:
                out.unknown_folders[folder.name] += 1
                continue
            rel = path.relative_to(folder).parts
            patient = rel[0] if len(rel) > 1 else None
            out.items.append(LabelledImage(path, folder.name, source, patient))
        out.skipped.update(scan_skips)
    return out


class _SkipSink:
    """The minimal scan object `_classify_file` counts skips into."""

    def __init__(self) -> None:
        self.skipped: Counter = Counter()
