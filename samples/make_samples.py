"""Render the demo slides folder (samples/slides/) from scratch.

The images are synthetic drawings - a pink background with red cells and one stained
"leukocyte" whose nucleus shape, size and colour loosely follow its intended class - so the
README's first command runs the whole job on a fresh machine without shipping anyone's
patient data. They only exercise the pipeline: the real model was never trained on such
drawings and its answers on them mean nothing clinically.

    python samples/make_samples.py            # rewrites samples/slides/ (deterministic)
    python samples/make_samples.py --out DIR  # somewhere else
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import cv2
import numpy as np

RENDER = 192  # drawn at this size, then shrunk with INTER_AREA for smooth edges
SAVE = 128  # saved edge in pixels: small JPEGs keep the committed folder well under 2 MB
JPEG_QUALITY = 85

# Patients (folder names) and the cells drawn for each: class id -> count.
PATIENTS: dict[str, dict[str, int]] = {
    "S001_normal": {"neutrophil_segmented": 16, "lymphocyte": 9, "monocyte": 3, "eosinophil": 2, "basophil": 1},
    "S002_left_shift": {"neutrophil_segmented": 10, "neutrophil_band": 8, "metamyelocyte": 4, "myelocyte": 4,
                        "promyelocyte": 2, "lymphocyte": 4},
    "S003_many_blasts": {"myeloblast": 18, "neutrophil_segmented": 6, "lymphocyte": 5, "monocyte": 2, "promyelocyte": 2},
    "S004_nrbc_platelets": {"neutrophil_segmented": 12, "lymphocyte": 8, "erythroblast": 5, "platelet": 3, "monocyte": 2},
}
# S002 keeps its crops in two sub-folders, as some analyzers export per slide region.
NESTED = {"S002_left_shift": ("region_A", "region_B")}

# Colours in RGB (converted when saving).
BACKGROUND = (236, 214, 222)
RBC = (222, 160, 170)
NUCLEUS = (92, 48, 130)
CYTO = {
    "neutral": (226, 196, 214), "blue": (170, 180, 222), "grey": (196, 190, 214),
    "orange": (236, 186, 170), "pink": (230, 190, 205),
}


def _rgb(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return (c[2], c[1], c[0])  # cv2 draws in BGR


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in colour)  # type: ignore[return-value]


def _background(rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((RENDER, RENDER, 3), np.uint8)
    img[:] = _rgb(_jitter(rng, BACKGROUND, 6))
    for _ in range(int(rng.integers(5, 10))):  # red cells around the leukocyte
        c = (int(rng.integers(0, RENDER)), int(rng.integers(0, RENDER)))
        r = int(rng.integers(16, 22))
        cv2.circle(img, c, r, _rgb(_jitter(rng, RBC)), -1, cv2.LINE_AA)
        cv2.circle(img, c, r // 2, _rgb(_jitter(rng, BACKGROUND, 6)), -1, cv2.LINE_AA)  # central pallor
    return img


def _granules(img, rng, centre, radius, colour, n, size=2):
    for _ in range(n):
        a, d = rng.uniform(0, 2 * math.pi), radius * math.sqrt(rng.uniform(0, 1))
        p = (int(centre[0] + d * math.cos(a)), int(centre[1] + d * math.sin(a)))
        cv2.circle(img, p, size, _rgb(_jitter(rng, colour, 15)), -1, cv2.LINE_AA)


def _lobes(img, rng, centre, n, spread, r, colour):
    """A chain of round lobes joined by thin strands: segmented nuclei."""
    a0 = rng.uniform(0, 2 * math.pi)
    pts = []
    for k in range(n):
        a = a0 + k * (2 * math.pi / max(n, 3)) * 0.8
        pts.append((int(centre[0] + spread * math.cos(a)), int(centre[1] + spread * math.sin(a))))
    for p, q in zip(pts, pts[1:]):
        cv2.line(img, p, q, _rgb(colour), 3, cv2.LINE_AA)
    for p in pts:
        cv2.circle(img, p, r, _rgb(colour), -1, cv2.LINE_AA)


def draw_cell(class_id: str, rng: np.random.Generator) -> np.ndarray:
    img = _background(rng)
    c = (RENDER // 2 + int(rng.integers(-8, 9)), RENDER // 2 + int(rng.integers(-8, 9)))
    nuc = _jitter(rng, NUCLEUS)
    angle = float(rng.uniform(0, 180))

    def body(radius, cyto):
        cv2.circle(img, c, radius, _rgb(_jitter(rng, CYTO[cyto])), -1, cv2.LINE_AA)

    if class_id == "neutrophil_segmented":
        body(44, "neutral")
        _granules(img, rng, c, 40, (210, 170, 200), 40, 1)
        _lobes(img, rng, c, int(rng.integers(3, 5)), 20, 11, nuc)
    elif class_id == "neutrophil_band":
        body(44, "neutral")
        cv2.ellipse(img, c, (24, 20), angle, 20, 300, _rgb(nuc), 11, cv2.LINE_AA)
    elif class_id == "eosinophil":
        body(46, "orange")
        _granules(img, rng, c, 42, (230, 120, 80), 140, 3)
        _lobes(img, rng, c, 2, 16, 13, nuc)
    elif class_id == "basophil":
        body(40, "grey")
        cv2.circle(img, c, 20, _rgb(nuc), -1, cv2.LINE_AA)
        _granules(img, rng, c, 36, (50, 20, 80), 120, 3)
    elif class_id == "lymphocyte":
        body(30, "blue")
        cv2.circle(img, (c[0] + 3, c[1]), 25, _rgb(_jitter(rng, (70, 36, 110))), -1, cv2.LINE_AA)
    elif class_id == "monocyte":
        body(56, "grey")
        cv2.ellipse(img, c, (34, 22), angle, 0, 360, _rgb(nuc), -1, cv2.LINE_AA)
        cv2.ellipse(img, (c[0] + 14, c[1] - 4), (12, 10), angle, 0, 360, _rgb(_jitter(rng, CYTO["grey"])), -1, cv2.LINE_AA)
    elif class_id == "myeloblast":
        body(50, "blue")
        cv2.circle(img, c, 42, _rgb(_jitter(rng, (130, 80, 160))), -1, cv2.LINE_AA)  # fine, pale chromatin
        for _ in range(int(rng.integers(2, 4))):  # nucleoli
            p = (c[0] + int(rng.integers(-18, 19)), c[1] + int(rng.integers(-18, 19)))
            cv2.circle(img, p, 6, _rgb((170, 150, 200)), -1, cv2.LINE_AA)
    elif class_id == "promyelocyte":
        body(54, "blue")
        cv2.circle(img, (c[0] - 10, c[1]), 32, _rgb(_jitter(rng, (120, 70, 150))), -1, cv2.LINE_AA)
        _granules(img, rng, c, 50, (150, 40, 110), 70, 2)
    elif class_id == "myelocyte":
        body(48, "pink")
        cv2.ellipse(img, (c[0] - 8, c[1]), (26, 22), angle, 0, 360, _rgb(nuc), -1, cv2.LINE_AA)
        _granules(img, rng, c, 44, (210, 160, 190), 30, 1)
    elif class_id == "metamyelocyte":
        body(46, "pink")
        cv2.ellipse(img, c, (26, 18), angle, 0, 360, _rgb(nuc), -1, cv2.LINE_AA)
        cv2.circle(img, (c[0] + 16, c[1]), 10, _rgb(_jitter(rng, CYTO["pink"])), -1, cv2.LINE_AA)  # kidney notch
    elif class_id == "erythroblast":
        body(30, "pink")
        cv2.circle(img, c, 17, _rgb(_jitter(rng, (40, 20, 60))), -1, cv2.LINE_AA)
    elif class_id == "platelet":
        for _ in range(int(rng.integers(3, 7))):
            p = (c[0] + int(rng.integers(-20, 21)), c[1] + int(rng.integers(-20, 21)))
            cv2.circle(img, p, int(rng.integers(4, 8)), _rgb(_jitter(rng, (150, 100, 180))), -1, cv2.LINE_AA)
    else:
        raise ValueError(f"no drawing for class {class_id!r}")
    img = cv2.GaussianBlur(img, (3, 3), 0.8)
    noise = rng.normal(0, 3, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def render(out: Path, seed: int = 20240601) -> int:
    """(Re)write out/<patient>/... and return the number of images."""
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    n = 0
    for patient, counts in PATIENTS.items():
        cells = [cid for cid, k in counts.items() for _ in range(k)]
        order = rng.permutation(len(cells))  # analyzers export in scan order, not by class
        subfolders = NESTED.get(patient, ("",))
        for i, j in enumerate(order):
            folder = out / patient / subfolders[i % len(subfolders)]
            folder.mkdir(parents=True, exist_ok=True)
            img = cv2.resize(draw_cell(cells[j], rng), (SAVE, SAVE), interpolation=cv2.INTER_AREA)
            ok = cv2.imwrite(str(folder / f"cell_{i + 1:03d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise OSError(f"could not write {folder}")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "slides")
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    n = render(args.out, args.seed)
    print(f"wrote {n} synthetic crops to {args.out}")


if __name__ == "__main__":
    main()
