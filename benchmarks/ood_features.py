"""Probabilities and embeddings of one model on every image set the OOD measurement needs.

Shared by `benchmarks/ood_eval.py` (which compares scores) and kept apart from it because it
is the slow part: every set is decoded through the runtime's own preprocessing and cached as
one .npz per set, so changing a score or a threshold costs seconds, not minutes.

Sets (all from `--data`, read-only):
  ref       PBC + Munich cells NOT in the test split (= v4's train/val), sample A: fits the reference
  ref_background  background corners cut from `ref` crops: the reference's "not a cell" examples
  held      PBC + Munich cells NOT in the test split, sample B (disjoint from A): chooses thresholds
  test      the test split (docs/model/test-split.csv): only ever reported on
  deepapl   every DeepAPL cell the reader maps to a class (an unseen source), with its patient
  plasma    DeepAPL "Plasma cells" (a class the model lacks; the reader skips them)
  noise_uniform, noise_gaussian, noise_blobs, background, defocus, greyscale, restain:
            crops that are not usable leukocyte images, made from test-split crops or from nothing
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTHETIC = ("noise_uniform", "noise_gaussian", "noise_blobs", "background", "defocus", "greyscale", "restain")


@dataclass
class FeatureSet:
    probs: np.ndarray  # [N, K] calibrated probabilities
    emb: np.ndarray  # [N, D] embedding (input of the last layer)
    labels: list[str]  # class id, or the kind for synthetic sets
    sources: list[str]
    patients: list[str]
    colour: np.ndarray  # [N, 6] mean and sd of R, G, B of the model input (0..255)


def read_test_paths(split_csv: Path, data_root: Path) -> set[str]:
    with open(split_csv, newline="", encoding="utf-8") as fh:
        return {str((data_root / r["path"]).resolve()) for r in csv.DictReader(fh) if r["split"] == "test"}


def colour_stats(x: np.ndarray) -> np.ndarray:
    f = x.reshape(len(x), -1, 3).astype(np.float32)
    return np.concatenate([f.mean(axis=1), f.std(axis=1)], axis=1)


def embed(classifier, arrays: Sequence[np.ndarray], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    probs, embs = [], []
    for i in range(0, len(arrays), batch):
        p, e = classifier.predict_with_embedding(np.stack(arrays[i : i + batch]))
        probs.append(p)
        embs.append(e)
    return np.concatenate(probs), np.concatenate(embs)


def _transforms(rng: np.random.Generator) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Decoded RGB crop -> an unusable version, as a file of that kind would decode."""
    import cv2

    def background(rgb):
        from export.ood_reference import background_corner

        return background_corner(rgb, rng)

    def defocus(rgb):
        return cv2.GaussianBlur(rgb, (0, 0), 8.0)

    def greyscale(rgb):
        g = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(np.repeat(g[..., None], 3, axis=2))

    def restain(rgb):
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + 60) % 180).astype(np.uint8)  # hue +120 degrees
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)

    return {"background": background, "defocus": defocus, "greyscale": greyscale, "restain": restain}


def _noise(kind: str, rng: np.random.Generator) -> np.ndarray:
    import cv2

    shape = (360, 363, 3)
    if kind == "noise_uniform":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "noise_gaussian":
        return np.clip(rng.normal(128, 50, shape), 0, 255).astype(np.uint8)
    # blobs: smooth coloured noise, the closest noise comes to stained shapes
    g = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), 6.0)
    g = (g - g.min()) / max(1e-6, float(g.max() - g.min()))
    return (g * 255).astype(np.uint8)


def build_sets(data_root: Path, split_csv: Path, n_ref: int, n_held: int, n_synth: int, seed: int, n_reject: int = 600):
    """name -> (list of loaders, labels, sources, patients); a loader returns a decoded RGB array."""
    from batchwbc.inputs import public_datasets
    from batchwbc.engine.preprocess import decode_rgb, read_bytes

    from export.ood_reference import background_corner, sample_cells

    rng = np.random.default_rng(seed)
    scan = public_datasets.read_any(data_root)
    indist = [it for it in scan.items if it.source in ("PBC", "AML-LMU")]
    # the same seeded samples as `python -m export.ood_reference` draws
    ref, held, test = sample_cells(indist, read_test_paths(split_csv, data_root), rng, n_ref, n_held)
    deepapl = [it for it in scan.items if it.source == "DeepAPL"]
    plasma = sorted(Path(data_root, "DeepAPL", "All").glob("*/**/Plasma cells/*.jpg"))

    def load(path):
        return lambda: decode_rgb(read_bytes(path))

    sets = {
        "ref": ([load(it.path) for it in ref], [it.class_id for it in ref], [it.source for it in ref], ["" for _ in ref]),
        "held": ([load(it.path) for it in held], [it.class_id for it in held], [it.source for it in held], ["" for _ in held]),
        "test": ([load(it.path) for it in test], [it.class_id for it in test], [it.source for it in test], ["" for _ in test]),
        "deepapl": ([load(it.path) for it in deepapl], [it.class_id for it in deepapl], ["DeepAPL"] * len(deepapl),
                    [it.patient or "" for it in deepapl]),
        "plasma": ([load(p) for p in plasma], ["plasma_cell"] * len(plasma), ["DeepAPL"] * len(plasma),
                   [p.relative_to(Path(data_root, "DeepAPL", "All")).parts[0] for p in plasma]),
    }
    tf = _transforms(rng)
    donors = [test[i] for i in rng.permutation(len(test))[:n_synth]]
    for kind in SYNTHETIC:
        if kind in tf:
            fn = tf[kind]
            loaders = [(lambda p=it.path, f=fn: f(decode_rgb(read_bytes(p)))) for it in donors]
        else:
            loaders = [(lambda k=kind: _noise(k, rng)) for _ in range(n_synth)]
        sets[kind] = (loaders, [kind] * len(loaders), ["synthetic"] * len(loaders), [""] * len(loaders))
    # Background corners of TRAINING crops: what the reference learns "not a cell" from (never
    # test crops); its own generator, so adding it changed none of the other sets.
    rng_bg = np.random.default_rng(seed + 7)
    corner = _transforms(rng_bg)["background"]  # as export.ood_reference.build draws them
    bg_donors = [ref[i] for i in rng_bg.permutation(len(ref))[:n_reject]]
    sets["ref_background"] = ([(lambda p=it.path: corner(decode_rgb(read_bytes(p)))) for it in bg_donors],
                              ["background"] * len(bg_donors), ["synthetic"] * len(bg_donors), [""] * len(bg_donors))
    return sets


def graph_sha256(path: Path) -> str:
    """Hash of the model without its metadata: storing a reference does not change the features."""
    import hashlib

    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    return hashlib.sha256(m.SerializeToString()).hexdigest()


def compute(model: Path | None, data_root: Path, split_csv: Path, cache: Path, n_ref: int = 3000, n_held: int = 1500,
            n_synth: int = 300, seed: int = 0, only: Sequence[str] | None = None) -> dict[str, FeatureSet]:
    """Every set's features, from `cache` where present (delete the folder to recompute)."""
    from batchwbc.engine.model import Classifier
    from batchwbc.engine.preprocess import UnreadableImage, to_model_input

    cache.mkdir(parents=True, exist_ok=True)
    clf = Classifier(model, threads=1)
    key = {"graph": graph_sha256(clf.info.path), "n_ref": n_ref, "n_held": n_held, "n_synth": n_synth, "seed": seed}
    stamp = cache / "key.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        raise SystemExit(f"{cache} holds features of another model or sampling; use another --cache folder.")
    stamp.write_text(json.dumps(key))
    sets = None
    out: dict[str, FeatureSet] = {}
    names = list(only) if only else ["ref", "held", "test", "deepapl", "plasma", *SYNTHETIC, "ref_background"]
    for name in names:
        f = cache / f"{name}.npz"
        if not f.is_file():
            if sets is None:
                sets = build_sets(data_root, split_csv, n_ref, n_held, n_synth, seed)
            loaders, labels, sources, patients = sets[name]
            print(f"  embedding {name}: {len(loaders)} crops", file=sys.stderr, flush=True)
            parts, kept = [], []
            for i in range(0, len(loaders), 256):  # bounded memory: 256 inputs at a time
                arrays = []
                for j, load in enumerate(loaders[i : i + 256], start=i):
                    try:
                        arrays.append(to_model_input(load(), clf.info.input_size, clf.info.preprocessing))
                    except UnreadableImage:  # a damaged file in a public set: left out, as the runtime would
                        continue
                    kept.append(j)
                parts.append((*embed(clf, arrays), colour_stats(np.stack(arrays))))
            probs, emb, colour = (np.concatenate([p[j] for p in parts]) for j in range(3))
            labels, sources, patients = ([seq[j] for j in kept] for seq in (labels, sources, patients))
            if len(kept) < len(loaders):
                print(f"  {len(loaders) - len(kept)} unreadable files left out of {name}", file=sys.stderr)
            np.savez(f, probs=probs, emb=emb, labels=np.array(labels), sources=np.array(sources),
                     patients=np.array(patients), colour=colour)
        z = np.load(f)
        out[name] = FeatureSet(z["probs"], z["emb"], list(z["labels"]), list(z["sources"]), list(z["patients"]), z["colour"])
    return out
