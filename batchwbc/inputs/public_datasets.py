"""Readers for labelled single-cell folders in their public layouts.

They live in the runtime package (they need no TensorFlow) because both training and the
simulated-patient builder use them. Nothing is guessed: an unspecified subtype (IG_,
NEUTROPHIL_), an unknown prefix or code, a hidden or non-image file is skipped and counted,
so a reader never silently mislabels a cell.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from batchwbc.engine.preprocess import is_image_name

PBC_SOURCE = "PBC"  # Acevedo et al. 2020, CellaVision DM96, Barcelona
LMU_SOURCE = "AML-LMU"  # Matek et al. 2019, M8 scanner, Munich
DEEPAPL_SOURCE = "DeepAPL"  # Sidhom et al. 2021, CellaVision, Johns Hopkins (Discovery cohort)

# PBC_dataset_normal_DIB: folder -> {file-name prefix -> class id or None (= unspecified, skip)}
PBC_PREFIXES: dict[str, dict[str, str | None]] = {
    "basophil": {"BA": "basophil"},
    "eosinophil": {"EO": "eosinophil"},
    "lymphocyte": {"LY": "lymphocyte"},
    "monocyte": {"MO": "monocyte"},
    "neutrophil": {"SNE": "neutrophil_segmented", "BNE": "neutrophil_band", "NEUTROPHIL": None},
    "ig": {"PMY": "promyelocyte", "MY": "myelocyte", "MMY": "metamyelocyte", "IG": None},
    "erythroblast": {"ERB": "erythroblast"},
    "platelet": {"PLATELET": "platelet"},
}

# AML-Cytomorphology_LMU folder codes -> class id or None (a cell type outside the catalogue)
LMU_CODES: dict[str, str | None] = {
    "MYO": "myeloblast", "PMO": "promyelocyte", "MYB": "myelocyte", "MMZ": "metamyelocyte",
    "NGB": "neutrophil_band", "NGS": "neutrophil_segmented", "LYT": "lymphocyte",
    "MON": "monocyte", "EOS": "eosinophil", "BAS": "basophil", "EBO": "erythroblast",
    "KSC": None, "LYA": None, "MOB": None, "PMB": None,
}

# DeepAPL "Signed slides" label folders -> class id or None (outside the catalogue: skipped).
# Why each mapping: docs/decisions/0009-deepapl-labels-and-smudge-cells.md.
DEEPAPL_LABELS: dict[str, str | None] = {
    "Blast, no lineage spec": "myeloblast",
    "Promonocyte": "myeloblast",  # a blast equivalent in WHO 2022 / ICC 2022 AML blast counts
    "Promyelocyte": "promyelocyte",
    "Myelocyte": "myelocyte",
    "Metamyelocyte": "metamyelocyte",
    "Band neutrophils": "neutrophil_band",
    "Segmented neutrophils": "neutrophil_segmented",
    "Lymphocyte": "lymphocyte",
    "Lymphocyte, variant": "lymphocyte",  # reactive lymphocytes are counted as lymphocytes (ICSH 2015)
    "Monocyte": "monocyte",
    "Eosinophils": "eosinophil",
    "Basophil": "basophil",
    "Erythroblast": "erythroblast",
    "Giant thrombocyte": "platelet",
    "Thrombocyte aggregation": "platelet",
    "Smudge cells": "smudge",
    "Plasma cells": None,  # no class: too few to learn; the out-of-distribution check must catch them
    "Prolymphocyte": None,
}
DEEPAPL_SIGNED = "Signed slides"

_PREFIX_RE = re.compile(r"^([A-Za-z]+)_[^/\\]+$")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    class_id: str
    source: str
    patient: str | None = None  # known only where the layout records it (DeepAPL); splits group by it


@dataclass
class DatasetScan:
    """Result of reading one or more labelled folders."""

    items: list[LabelledImage] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # (source, reason) -> count

    def extend(self, other: "DatasetScan") -> None:
        self.items.extend(other.items)
        self.skipped.update(other.skipped)

    def counts(self) -> Counter:
        """(class_id, source) -> number of images."""
        return Counter((it.class_id, it.source) for it in self.items)


class DatasetError(Exception):
    """A data folder that cannot be read as any known layout; str is one sentence."""


def _files(folder: Path) -> list[Path]:
    """All non-hidden regular files below folder, sorted, following no directory symlinks."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames))
    return out


def _classify_file(path: Path, scan: DatasetScan, source: str) -> bool:
    """Count hidden / non-image files as skipped; True if the file is a candidate image."""
    if path.name.startswith("."):
        scan.skipped[(source, "hidden file")] += 1
        return False
    if not is_image_name(path.name):
        scan.skipped[(source, "not an image file")] += 1
        return False
    return True


def is_pbc_layout(root: Path) -> bool:
    return root.is_dir() and (root / "ig").is_dir() and (root / "neutrophil").is_dir()


def is_lmu_layout(root: Path) -> bool:
    if not root.is_dir():
        return False
    subs = [p.name for p in root.iterdir() if p.is_dir()]
    return bool(subs) and all(s in LMU_CODES for s in subs)


def read_pbc(root: Path, source: str = PBC_SOURCE) -> DatasetScan:
    """PBC_dataset_normal_DIB: class = folder, refined by the file-name prefix."""
    scan = DatasetScan()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        prefixes = PBC_PREFIXES.get(folder.name.lower())
        for path in _files(folder):
            if not _classify_file(path, scan, source):
                continue
            if prefixes is None:
                scan.skipped[(source, f"unknown folder {folder.name}")] += 1
                continue
            m = _PREFIX_RE.match(path.name)
            prefix = m.group(1).upper() if m else None
            if prefix not in prefixes:
                scan.skipped[(source, "unknown or malformed file-name prefix")] += 1
            elif prefixes[prefix] is None:
                scan.skipped[(source, f"subtype not given ({prefix}_)")] += 1
            else:
                scan.items.append(LabelledImage(path, prefixes[prefix], source))
    return scan


def read_lmu(root: Path, source: str = LMU_SOURCE) -> DatasetScan:
    """AML-Cytomorphology_LMU: class = the code folder, any image extension (TIFF in the original)."""
    scan = DatasetScan()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        class_id = LMU_CODES.get(folder.name)
        for path in _files(folder):
            if not _classify_file(path, scan, source):
                continue
            if class_id is None:
                scan.skipped[(source, f"cell type {folder.name} not in the catalogue")] += 1
            else:
                scan.items.append(LabelledImage(path, class_id, source))
    return scan


def is_deepapl_layout(root: Path) -> bool:
    return root.is_dir() and (root / "All").is_dir() and (root / "master.csv").is_file()


def read_deepapl(root: Path, source: str = DEEPAPL_SOURCE) -> DatasetScan:
    """DeepAPL: All/<patient>/[<slide>/]Signed slides/<label>/<file>; the patient id is kept.

    The label is the folder the technologist signed the cell into; a file anywhere else
    (outside a "Signed slides" label folder) is skipped and counted, never guessed.
    """
    scan = DatasetScan()
    for patient_dir in sorted(p for p in (root / "All").iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in _files(patient_dir):
            if not _classify_file(path, scan, source):
                continue
            label = path.parent.name
            if path.parent.parent.name != DEEPAPL_SIGNED:
                scan.skipped[(source, "not inside a Signed slides label folder")] += 1
            elif label not in DEEPAPL_LABELS:
                scan.skipped[(source, f"unknown label {label}")] += 1
            elif DEEPAPL_LABELS[label] is None:
                scan.skipped[(source, f"label {label} not in the catalogue")] += 1
            else:
                scan.items.append(LabelledImage(path, DEEPAPL_LABELS[label], source, patient_dir.name))
    return scan


def read_generic(root: Path, source: str | None = None) -> DatasetScan:
    """A lab's own folders: root/<class_id>/**/image; folders that are not class ids are skipped."""
    from batchwbc.core import catalogue

    source = source or root.name
    scan = DatasetScan()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in _files(folder):
            if not _classify_file(path, scan, source):
                continue
            if catalogue.is_known(folder.name):
                scan.items.append(LabelledImage(path, folder.name, source))
            else:
                scan.skipped[(source, f"folder {folder.name} is not a class id")] += 1
    return scan


def is_generic_layout(root: Path) -> bool:
    from batchwbc.core import catalogue

    return root.is_dir() and any(p.is_dir() and catalogue.is_known(p.name) for p in root.iterdir())


#: The layouts read_any knows, tried in this order (the generic <class_id>/ layout last: the
#: others would also pass for it). A new public dataset is one (detector, reader) row here.
LAYOUTS: tuple[tuple[Callable[[Path], bool], Callable[[Path], DatasetScan]], ...] = (
    (is_pbc_layout, read_pbc),
    (is_lmu_layout, read_lmu),
    (is_deepapl_layout, read_deepapl),
    (is_generic_layout, read_generic),
)


def read_any(root: str | os.PathLike) -> DatasetScan:
    """Read a folder in any known layout, or a folder of such folders (like ../shared/data)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist or is not a folder.")

    def one(folder: Path) -> DatasetScan | None:
        for detect, read in LAYOUTS:
            if detect(folder):
                return read(folder)
        return None

    direct = one(root)
    if direct is not None:
        return direct
    scan = DatasetScan()
    found = False
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        part = one(sub)
        if part is not None:
            scan.extend(part)
            found = True
    if not found:
        raise DatasetError(
            f"{root} holds no labelled images in a known layout "
            "(PBC_dataset_normal_DIB, AML-Cytomorphology_LMU, DeepAPL, or <class_id>/ folders)."
        )
    return scan
