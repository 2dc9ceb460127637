"""Simulated patients: exact known compositions, held-out filtering, and the whole pipeline
reproducing the truth (exactly with the tiny colour model; within the model's error with the
bundled model on real cells)."""
from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc.core import catalogue
from batchwbc import simulate
from batchwbc.cli import main as cli_main
from batchwbc.engine.model import DEFAULT_MODEL_PATH
from batchwbc.simulate import PRESETS, SimulationError, allocate_counts, parse_composition

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture()
def colour_data(tmp_path) -> Path:
    """A labelled folder (generic <class_id>/ layout) whose crops the tiny model gets right."""
    root = tmp_path / "labelled"
    for cid in catalogue.CLASS_IDS:
        (root / cid).mkdir(parents=True)
        for i in range(30):
            img = np.zeros((40 + i % 7, 46, 3), np.uint8)  # at least 32 px a side: smaller is not a crop
            img[:] = tinymodel.colour_for(cid)[::-1]
            cv2.imwrite(str(root / cid / f"{cid}_{i:02d}.png"), img)
    return root


def read_truth_counts(out: Path) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for row in simulate.read_truth(out / "truth.csv"):
        counts.setdefault(row.patient, Counter())[row.class_id] += 1
    return counts


def test_parse_composition_normalises_and_rejects_nonsense():
    assert parse_composition("lymphocyte=1, monocyte=3") == {"lymphocyte": 25.0, "monocyte": 75.0}
    assert parse_composition("lymphocyte=30,lymphocyte=20,monocyte=50") == {"lymphocyte": 50.0, "monocyte": 50.0}
    for bad in ("blob=10", "lymphocyte", "lymphocyte=x", "lymphocyte=0", "lymphocyte=-5", "lymphocyte=nan"):
        with pytest.raises(SimulationError):
            parse_composition(bad)


def test_allocate_counts_is_exact_and_sums_to_n():
    rng = np.random.default_rng(3)
    for _ in range(200):
        k = int(rng.integers(1, 8))
        classes = list(rng.choice(catalogue.CLASS_IDS, size=k, replace=False))
        pct = {c: float(rng.uniform(0.1, 50)) for c in classes}
        n = int(rng.integers(1, 500))
        counts = allocate_counts(pct, n)
        assert sum(counts.values()) == n
        total = sum(pct.values())
        assert all(abs(counts.get(c, 0) - n * pct[c] / total) < 1 for c in classes)
    assert allocate_counts({"lymphocyte": 30, "monocyte": 70}, 200) == {"lymphocyte": 60, "monocyte": 140}


def test_presets_use_known_classes_and_sum_to_100():
    for name, comp in PRESETS.items():
        assert all(catalogue.is_known(c) for c in comp), name
        assert math.isclose(sum(comp.values()), 100.0), name


def test_build_writes_exact_compositions_with_anonymous_links(colour_data, tmp_path):
    out = tmp_path / "slides"
    comps = [("normal", PRESETS["normal"]), ("aml", PRESETS["aml"])]
    truth = simulate.simulate(colour_data, out, n_patients=3, cells=50, compositions=comps, seed=5)
    counts = read_truth_counts(out)
    assert sorted(counts) == ["SIM1_normal", "SIM2_aml", "SIM3_normal"]
    assert counts["SIM2_aml"] == Counter(allocate_counts(PRESETS["aml"], 50))
    assert counts["SIM1_normal"] == counts["SIM3_normal"] == Counter(allocate_counts(PRESETS["normal"], 50))
    doc = json.loads((out / "composition.json").read_text())
    assert doc["patients"]["SIM2_aml"]["counts"] == dict(counts["SIM2_aml"]) and doc["seed"] == 5
    for row in truth:
        f = out / row.file
        assert f.is_file() and Path(row.file).name.startswith("cell_")
        if os.name == "posix":
            assert f.is_symlink() and os.path.samefile(f, row.original)
    for p in counts:  # no image twice within a patient
        originals = [r.original for r in truth if r.patient == p]
        assert len(originals) == len(set(originals))


def test_copy_mode_and_seed_determinism(colour_data, tmp_path):
    comps = [("c", {"lymphocyte": 50, "monocyte": 50})]
    a = simulate.simulate(colour_data, tmp_path / "a", 2, 10, comps, seed=1, copy=True)
    b = simulate.simulate(colour_data, tmp_path / "b", 2, 10, comps, seed=1, copy=True)
    c = simulate.simulate(colour_data, tmp_path / "c", 2, 10, comps, seed=2, copy=True)
    assert [(r.file, r.original) for r in a] == [(r.file, r.original) for r in b]
    assert [(r.file, r.original) for r in a] != [(r.file, r.original) for r in c]
    assert not any((tmp_path / "a" / r.file).is_symlink() for r in a)


def test_split_and_exclude_filters_keep_training_images_out(colour_data, tmp_path):
    split_csv = tmp_path / "split.csv"
    test_files = set()
    with open(split_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "class_id", "source", "split"])
        for cid in ("lymphocyte", "monocyte"):
            for i, f in enumerate(sorted((colour_data / cid).iterdir())):
                split = "test" if i < 4 else "train"
                w.writerow([f.relative_to(colour_data).as_posix(), cid, "x", split])
                if split == "test":
                    test_files.add(os.path.abspath(f))
    comps = [("c", {"lymphocyte": 50, "monocyte": 50})]
    truth = simulate.simulate(colour_data, tmp_path / "s", 3, 8, comps, seed=0, split_csv=split_csv, only_split="test")
    assert {r.original for r in truth} <= test_files
    exclude = tmp_path / "exclude.csv"
    lymph = sorted((colour_data / "lymphocyte").iterdir())
    exclude.write_text("path\n" + "\n".join(str(p) for p in lymph[:-2]) + "\n")
    truth = simulate.simulate(colour_data, tmp_path / "e", 1, 2, [("l", {"lymphocyte": 100})], exclude_csv=exclude)
    assert {r.original for r in truth} == {os.path.abspath(p) for p in lymph[-2:]}


def test_impossible_requests_are_one_sentence(colour_data, tmp_path):
    with pytest.raises(SimulationError, match="only 30 are available"):
        simulate.simulate(colour_data, tmp_path / "x", 1, 40, [("l", {"lymphocyte": 100})])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(SimulationError, match="not empty"):
        simulate.simulate(colour_data, tmp_path / "full", 1, 5, [("l", {"lymphocyte": 100})])
    with pytest.raises(SimulationError):
        simulate.simulate(tmp_path / "nowhere", tmp_path / "y", 1, 5, [("l", {"lymphocyte": 100})])


def test_module_cli(colour_data, tmp_path, capsys):
    rc = simulate.main(["--data", str(colour_data), "--out", str(tmp_path / "s"), "--patients", "2",
                        "--cells", "10", "--composition", "lymphocyte=70,myeloblast=30", "--seed", "4"])
    assert rc == 0
    assert read_truth_counts(tmp_path / "s")["SIM1_custom1"] == Counter({"lymphocyte": 7, "myeloblast": 3})
    assert simulate.main(["--data", str(colour_data), "--out", str(tmp_path / "t"), "--composition", "x=1"]) == 2
    assert "unknown class" in capsys.readouterr().err


def run_and_count(slides: Path, model: Path, out_dir: Path, workers: str = "0") -> dict[str, Counter]:
    cells_csv = out_dir / "cells.csv"
    r = CliRunner().invoke(cli_main, ["run", str(slides), "--out", str(out_dir / "r.xlsx"), "--model", str(model),
                                      "--workers", workers, "--cells-csv", str(cells_csv), "--quiet"])
    assert r.exit_code == 0, r.stderr
    reported: dict[str, Counter] = {}
    with open(cells_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            reported.setdefault(row["patient"], Counter())[row["class"]] += 1
    return reported


def test_pipeline_reports_the_known_differential_exactly_with_a_perfect_model(colour_data, tmp_path):
    slides = tmp_path / "slides"
    simulate.simulate(colour_data, slides, 3, 40, [("aml", PRESETS["aml"]), ("nrbc", PRESETS["nrbc"])], seed=9)
    model = tinymodel.build(tmp_path / "tiny.onnx")
    assert run_and_count(slides, model, tmp_path) == read_truth_counts(slides)


def tolerance_pct(p: float, n: int, composition: dict[str, float], metrics: dict) -> float:
    """Allowed |reported - true| in percentage points for a class with true fraction p.

    Binomial sampling error (3 sigma) plus the share of this patient's cells the model is
    expected to misclassify: sum over true classes of their fraction x (1 - F1 on the test
    set), falling back to 1 - accuracy for classes without a per-class F1. A misclassified
    cell moves at most that much mass into or out of any one class.
    """
    f1 = metrics.get("f1_per_class") or {}
    default_err = 1.0 - float(metrics.get("accuracy", 0.9))
    mis = sum(frac * (1.0 - float(f1[c])) if c in f1 else frac * default_err for c, frac in composition.items())
    return 100.0 * (3.0 * math.sqrt(max(p * (1 - p), 1.0 / n) / n) + mis)


SOURCE_FOLDERS = {"PBC": "PBC_dataset_normal_DIB", "AML-LMU": "AML-Cytomorphology_LMU", "DeepAPL": "DeepAPL"}


def _model_sources_only(info, root: Path) -> Path:
    """A data folder holding only the sources the model was trained on (symlinks): cells from a
    source it never saw test generalisation, which the model card measures, not this test."""
    counts = (info.json_field("batchwbc.training_data") or {}).get("counts_class_source", {})
    sources = {key.split("|", 1)[1] for key in counts} or set(SOURCE_FOLDERS)
    root.mkdir()
    for source in sorted(sources):
        (root / SOURCE_FOLDERS[source]).symlink_to(SHARED_DATA / SOURCE_FOLDERS[source], target_is_directory=True)
    return root


@pytest.mark.slow
@pytest.mark.skipif(not DEFAULT_MODEL_PATH.is_file(), reason="the bundled model is not there yet (added by the training work)")
def test_bundled_model_recovers_simulated_real_patients(tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    from batchwbc.engine.model import Classifier

    info = Classifier(DEFAULT_MODEL_PATH, threads=1).info
    metrics = info.json_field("batchwbc.test_metrics") or {}
    # Only the model's held-out test images (default: the committed split of the bundled model).
    # Not all images: DeepAPL, a source the model never saw, is now rightly left unclassified in
    # part (ADR 0011), and the training images would flatter the model.
    split_csv = os.environ.get("BATCHWBC_SPLIT_CSV") or str(REPO / "docs" / "model" / "test-split.csv")
    slides = tmp_path / "slides"
    n = 150
    comps = [(name, PRESETS[name]) for name in ("normal", "aml", "left_shift")]
    simulate.simulate(_model_sources_only(info, tmp_path / "data"), slides, len(comps), n, comps, seed=11,
                      split_csv=split_csv, only_split="test" if split_csv else None)
    truth = read_truth_counts(slides)
    reported = run_and_count(slides, DEFAULT_MODEL_PATH, tmp_path, workers="2")
    for name, comp in comps:
        patient = next(p for p in truth if p.endswith("_" + name))
        true_frac = {c: k / n for c, k in truth[patient].items()}
        got = reported.get(patient, Counter())
        assert sum(got.values()) == n
        for cid in catalogue.CLASS_IDS:
            p = true_frac.get(cid, 0.0)
            err = abs(100.0 * got.get(cid, 0) / n - 100.0 * p)
            tol = tolerance_pct(p, n, true_frac, metrics)
            assert err <= tol, f"{patient}: {cid} reported {100 * got.get(cid, 0) / n:.1f}% vs true {100 * p:.1f}% (tolerance {tol:.1f})"


def test_help_explains_every_option_and_the_default_shows_every_preset(capsys):
    """Issue 19: --patients and --seed had no help, and the default of 4 patients never used the
    NRBC preset."""
    with pytest.raises(SystemExit):
        simulate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--patients", "--seed"):
        after = text.split(option, 2)[-1][:60]
        assert len(after.strip().split()) > 3, f"{option} has no help"
    assert f"default {len(simulate.PRESETS)}" in text and "nrbc" in simulate.PRESETS


def test_help_is_complete_on_its_own(capsys):
    """Issue 19: the --help said what the options are, not what the tool writes, which folders
    --data takes, what the presets hold, the default cell count or what an exit code means."""
    with pytest.raises(SystemExit):
        simulate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, composition in simulate.PRESETS.items():  # every preset with its composition
        assert name in text and all(cid in text for cid in composition), name
    for needed in ("truth.csv", "composition.json", "symlink", "default 200", "Exit codes", "PBC",
                   "python -m batchwbc.simulate --data", "batchwbc run"):
        assert needed in text, needed
