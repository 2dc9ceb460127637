"""`python -m export` runs the export in stages with a typed config (issue 20); its command
line is unchanged. These parts need no TensorFlow: the CLI's mapping, the refusal of an
unfinished run, and the metadata the runtime reads."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from batchwbc.core import catalogue
from batchwbc.engine import model_metadata as keys
from batchwbc.engine.preprocess import PREPROCESSING_CELL


def test_the_command_line_maps_onto_the_export_config(tmp_path, monkeypatch):
    import export.convert as convert
    from export.__main__ import main

    seen = []
    monkeypatch.setattr(convert, "export_run", lambda cfg: seen.append(cfg) or True)
    r = CliRunner().invoke(main, [str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert seen == [convert.ExportConfig(tmp_path / "run", tmp_path / "m.onnx", None, None, 64, 1e-4, "none", 17)]
    r = CliRunner().invoke(main, [str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx"), "--data", "/d",
                                  "--model-version", "v9", "--parity-images", "8", "--tolerance", "0.01",
                                  "--quantize", "int8", "--opset", "13"])
    assert r.exit_code == 0, r.output
    assert seen[-1] == convert.ExportConfig(tmp_path / "run", tmp_path / "m.onnx", "/d", "v9", 8, 0.01, "int8", 13)
    monkeypatch.setattr(convert, "export_run", lambda cfg: False)  # the parity check failed
    assert CliRunner().invoke(main, [str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]).exit_code == 1


def test_an_unfinished_run_is_refused_in_one_sentence_with_exit_code_2(tmp_path):
    from export.__main__ import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    r = CliRunner().invoke(main, [str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2
    assert "is not a finished training run (run.json and model.keras are needed)" in r.output


def test_model_metadata_states_the_contract_and_the_shipped_format(tmp_path):
    from export.convert import ATTRIBUTION, Chosen, ExportConfig, TrainedRun, model_metadata

    run_dir = tmp_path / "lite0-160"
    run_dir.mkdir()
    record = {"review_threshold": 0.6, "options": {"backbone": "effnet_lite0", "seed": 7}, "counts": {"a|b": 3},
              "split_sizes": {"train": 3}, "dropped": 1, "test_ece": 0.01234}
    run = TrainedRun(record, 160, PREPROCESSING_CELL, 1.5, tmp_path, core=None)
    f1 = {c: 0.5 for c in catalogue.CLASS_IDS}
    chosen = Chosen(tmp_path / "x.onnx", {"n": 10, "accuracy": 0.91234, "paper10_accuracy": 0.9, "paper10_macro_f1": 0.8,
                                          "macro_f1": 0.7, "f1_per_class": f1}, "float32")
    meta = model_metadata(ExportConfig(run_dir, tmp_path / "m.onnx"), run, chosen)
    assert meta[keys.KEY_MODEL_VERSION] == "lite0-160"  # the run folder's name unless --model-version
    assert (meta[keys.KEY_INPUT_SIZE], meta[keys.KEY_TEMPERATURE], meta[keys.KEY_REVIEW_THRESHOLD]) == \
        ("160", "1.500000", "0.60")
    assert meta[keys.KEY_NUMERIC_FORMAT] == "float32" and keys.KEY_REVIEW_SHARE not in meta  # no logits.npz
    assert json.loads(meta[keys.KEY_CLASSES]) == list(catalogue.CLASS_IDS)
    assert json.loads(meta[keys.KEY_TRAINING_DATA])["attribution"] == ATTRIBUTION
    assert json.loads(meta[keys.KEY_TEST_METRICS])["accuracy"] == 0.9123
    np.savez(run_dir / "logits.npz", val=np.array([[4.0, 0.0], [0.1, 0.0]]))
    meta = model_metadata(ExportConfig(run_dir, tmp_path / "m.onnx", model_version="v2"), run, chosen)
    assert meta[keys.KEY_MODEL_VERSION] == "v2" and meta[keys.KEY_REVIEW_SHARE] == "50.0"
