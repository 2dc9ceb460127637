"""`python -m train.experiments` (formerly train.diagnose) on a tiny saved model and a few real crops."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_data):
    from batchwbc.core.catalogue import CLASS_IDS
    from batchwbc.inputs.public_datasets import read_any
    from train.models import build_core
    from train.split import write_split_csv

    d = tmp_path_factory.mktemp("diag")
    items = sorted(read_any(shared_data).items, key=lambda it: it.path.as_posix())
    by_class: dict[str, list] = {}
    for it in items:
        by_class.setdefault(it.class_id, []).append(it)
    rows = []
    for cid, group in sorted(by_class.items()):
        for i, it in enumerate(group[:4]):
            rows.append((it.path.relative_to(shared_data).as_posix(), cid, it.source, "train" if i < 2 else "val"))
    write_split_csv(d / "split.csv", rows)
    for name in ("a", "b"):
        core, _ = build_core("mobilenet_025", 32, len(CLASS_IDS))
        core.save(d / f"{name}.keras")
    return d, len(rows)


def _invoke(*args):
    from click.testing import CliRunner

    from train.experiments.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def _accuracies(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"(?:accuracy|paper-10) (\d\.\d+)", text)]


def test_fit_reports_train_and_validation(tiny_run, shared_data):
    d, _ = tiny_run
    out = _invoke("fit", d / "a.keras", "--data", shared_data, "--split", d / "split.csv", "--size", 32)
    assert out.startswith("train") and "\nval" in out
    acc = _accuracies(out)
    assert len(acc) == 4 and all(0 <= a <= 1 for a in acc)


def test_soup_tta_and_margin_print_one_line_per_variant(tiny_run, shared_data):
    d, _ = tiny_run
    common = ["--data", shared_data, "--split", d / "split.csv", "--size", 32]
    soup = _invoke("soup", d / "a.keras", d / "b.keras", *common, "--save", d / "soup" / "model.keras")
    assert "weight average of 2" in soup and len(_accuracies(soup)) == 6
    assert (d / "soup" / "model.keras").is_file()
    tta = _invoke("tta", d / "a.keras", *common)
    assert len(_accuracies(tta)) == 8
    margin = _invoke("margin", d / "a.keras", *common, "--margins", "1.5,1.8")
    assert "margin 1.50" in margin and "margin 1.80" in margin
    from batchwbc.engine import preprocess

    assert preprocess.CELL_MARGIN == 1.8  # the contract's constant is restored afterwards


def test_soup_of_linear_head_models_averages_every_weight(tiny_run, shared_data):
    """Models with the logits straight on the pooled features (--head-dense 0, the bundled
    Lite0's head) are rebuilt as such: a rebuilt 256-wide head could not take their weights."""
    import numpy as np

    from batchwbc.core.catalogue import CLASS_IDS
    from train.experiments.common import load_keras as load_core
    from train.models import build_core

    d, _ = tiny_run
    paths = []
    for name, seed in (("lin-a", 1), ("lin-b", 2)):
        core, _ = build_core("mobilenet_025", 32, len(CLASS_IDS), dense=0)
        rng = np.random.default_rng(seed)
        core.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in core.get_weights()])
        core.save(d / f"{name}.keras")
        paths.append(d / f"{name}.keras")
    out = _invoke("soup", *paths, "--data", shared_data, "--split", d / "split.csv", "--size", 32,
                  "--save", d / "lin-soup" / "model.keras")
    assert "weight average of 2" in out
    soup = load_core(d / "lin-soup" / "model.keras")
    assert not any(layer.name == "head_dense" for layer in soup.layers)
    a, b = (load_core(p).get_weights() for p in paths)
    for got, wa, wb in zip(soup.get_weights(), a, b):
        np.testing.assert_allclose(got, (wa + wb) / 2, rtol=1e-5, atol=1e-6)


def test_ensemble_and_bias_commands(tiny_run, shared_data):
    d, _ = tiny_run
    common = ["--data", shared_data, "--split", d / "split.csv"]
    out = _invoke("ensemble", d / "a.keras", d / "b.keras", *common, "--views", "8")
    assert "average of 2" in out and "32 px, 8 view(s)" in out and len(_accuracies(out)) == 6
    out = _invoke("bias", d / "a.keras", *common, "--size", 32, "--folds", "2")
    assert "2-fold fitted biases" in out and len(_accuracies(out)) == 4


def test_fitted_biases_undo_a_known_class_shift():
    """Logits that favour class 0 by a constant: the fitted offsets must remove it, and the
    cross-validated predictions must then beat the shifted ones."""
    import numpy as np

    from train.calibration import log_softmax
    from train.experiments.bias import cross_validated_bias_predictions, fit_temperature_and_bias

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    clean = rng.normal(0, 1, (2000, 4)) + 2.0 * np.eye(4)[y]
    shifted = clean + np.array([2.0, 0, 0, 0])
    t, b = fit_temperature_and_bias(shifted, y)
    assert 0.1 < t < 5.0 and b[0] - b[1:].mean() < -0.6 * 2.0 / t  # offsets act on logits / t
    assert np.mean(cross_validated_bias_predictions(shifted, y) == y) > np.mean(shifted.argmax(1) == y) + 0.05
    assert np.allclose(np.exp(log_softmax(clean)).sum(1), 1.0)


def test_bad_margins_are_a_usage_error(tmp_path):
    from click.testing import CliRunner

    from train.experiments.cli import main

    for name in ("m.keras", "s.csv"):
        (tmp_path / name).write_text("")
    r = CliRunner().invoke(main, ["margin", str(tmp_path / "m.keras"), "--data", str(tmp_path), "--split",
                                  str(tmp_path / "s.csv"), "--size", "32", "--margins", "1.4,wide"])
    assert r.exit_code == 2 and "--margins" in r.output and "Traceback" not in r.output, r.output
