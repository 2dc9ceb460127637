"""The one class catalogue shared by training, export, the model metadata and the reports.

Order matters: a class's position here is its id in training labels, but the runtime
always maps model outputs through the class list stored in the ONNX metadata, so a model
trained on a subset or in another order is still reported correctly.
"""
from __future__ import annotations

from dataclasses import dataclass

# Report groups used for the immature-cell fractions.
BLAST = "blast"
IMMATURE_GRANULOCYTE = "immature_granulocyte"
BAND = "band"
MATURE = "mature"
NON_LEUKOCYTE = "non_leukocyte"
SMUDGE = "smudge"  # reported apart: a count and % of all cells, never in the WBC denominator


@dataclass(frozen=True)
class CellClass:
    """One cell type: why each field exists is how the report treats it."""

    id: str
    display: str
    lineage: str
    immature: bool
    counts_in_wbc: bool  # leukocytes form the differential's denominator; NRBC and platelets do not
    group: str  # BLAST / IMMATURE_GRANULOCYTE / BAND / MATURE / NON_LEUKOCYTE / SMUDGE


CLASSES: tuple[CellClass, ...] = (
    CellClass("basophil", "Basophil", "granulocytic", False, True, MATURE),
    CellClass("eosinophil", "Eosinophil", "granulocytic", False, True, MATURE),
    CellClass("lymphocyte", "Lymphocyte (incl. reactive/variant)", "lymphoid", False, True, MATURE),
    CellClass("monocyte", "Monocyte", "monocytic", False, True, MATURE),
    CellClass("neutrophil_segmented", "Segmented neutrophil", "granulocytic", False, True, MATURE),
    CellClass("neutrophil_band", "Band neutrophil", "granulocytic", True, True, BAND),
    CellClass("myeloblast", "Blast (incl. promonocytes)", "granulocytic", True, True, BLAST),
    CellClass("promyelocyte", "Promyelocyte", "granulocytic", True, True, IMMATURE_GRANULOCYTE),
    CellClass("myelocyte", "Myelocyte", "granulocytic", True, True, IMMATURE_GRANULOCYTE),
    CellClass("metamyelocyte", "Metamyelocyte", "granulocytic", True, True, IMMATURE_GRANULOCYTE),
    CellClass("erythroblast", "Erythroblast (NRBC)", "erythroid", True, False, NON_LEUKOCYTE),
    CellClass("platelet", "Platelet", "megakaryocytic", False, False, NON_LEUKOCYTE),
    CellClass("smudge", "Smudge cell", "unknown", False, False, SMUDGE),
)

CLASS_IDS: tuple[str, ...] = tuple(c.id for c in CLASSES)
#: The ten leukocyte classes of the paper this project starts from; its accuracy is quoted on these.
PAPER_CLASS_IDS: tuple[str, ...] = CLASS_IDS[:10]
WBC_CLASS_IDS: tuple[str, ...] = tuple(c.id for c in CLASSES if c.counts_in_wbc)

_BY_ID = {c.id: c for c in CLASSES}


def get(class_id: str) -> CellClass:
    """Look a class up by id; a KeyError names the unknown id."""
    try:
        return _BY_ID[class_id]
    except KeyError:
        raise KeyError(f"unknown cell class {class_id!r}; known: {', '.join(CLASS_IDS)}") from None


def is_known(class_id: str) -> bool:
    return class_id in _BY_ID


def ids_in_group(group: str) -> tuple[str, ...]:
    return tuple(c.id for c in CLASSES if c.group == group)
