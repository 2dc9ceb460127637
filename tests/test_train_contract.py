"""Which preprocessing contract a training run decodes with, above all when it resumes a model."""
from __future__ import annotations

import json

import pytest

from batchwbc.engine.preprocess import PREPROCESSING_CELL, PREPROCESSING_ID, PREPROCESSING_WHOLE
from train.config import TrainingError, resolve_preprocessing


def _run_folder(tmp_path, record: dict | None):
    (tmp_path / "model.keras").write_bytes(b"")
    if record is not None:
        (tmp_path / "run.json").write_text(json.dumps(record))
    return str(tmp_path / "model.keras")


def test_fresh_run_uses_the_default_or_the_choice():
    assert resolve_preprocessing(None, None) == PREPROCESSING_ID
    assert resolve_preprocessing(PREPROCESSING_WHOLE, None) == PREPROCESSING_WHOLE


@pytest.mark.parametrize("recorded", [PREPROCESSING_WHOLE, PREPROCESSING_CELL])
def test_resume_takes_the_contract_the_model_was_trained_with(tmp_path, recorded):
    model = _run_folder(tmp_path, {"preprocessing": recorded})
    assert resolve_preprocessing(None, model) == recorded
    assert resolve_preprocessing(recorded, model) == recorded


def test_resume_of_a_train_only_run_reads_its_options(tmp_path):
    model = _run_folder(tmp_path, {"options": {"preprocessing": PREPROCESSING_WHOLE}})
    assert resolve_preprocessing(None, model) == PREPROCESSING_WHOLE


def test_resume_of_a_run_from_before_contracts_were_recorded_is_v1(tmp_path):
    model = _run_folder(tmp_path, {"input_size": 128})
    assert resolve_preprocessing(None, model) == PREPROCESSING_WHOLE


def test_resume_without_a_record_falls_back_to_the_default(tmp_path):
    model = _run_folder(tmp_path, None)
    assert resolve_preprocessing(None, model) == PREPROCESSING_ID


def test_contradicting_the_resumed_run_is_refused_in_one_sentence(tmp_path):
    model = _run_folder(tmp_path, {"preprocessing": PREPROCESSING_WHOLE})
    with pytest.raises(TrainingError) as exc:
        resolve_preprocessing(PREPROCESSING_CELL, model)
    msg = str(exc.value)
    assert PREPROCESSING_WHOLE in msg and msg.count(".") >= 1 and "\n" not in msg


def test_distillation_targets_mix_teacher_and_label_by_path(tmp_path):
    import numpy as np

    from train.fit import soft_targets

    npz = tmp_path / "t.npz"
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 0.0, 10.0]], dtype=np.float32)
    np.savez(npz, paths=np.array(["a.jpg", "b.jpg"]), logits=logits)
    y = soft_targets(str(npz), ["b.jpg", "a.jpg"], np.array([1, 0]), 3, alpha=0.5)
    assert y.shape == (2, 3) and np.allclose(y.sum(axis=1), 1)
    assert y[0, 2] == pytest.approx(0.5, abs=1e-3) and y[0, 1] == pytest.approx(0.5, abs=1e-3)  # b: teacher says 2, label 1
    assert y[1, 0] == pytest.approx(1.0, abs=1e-3)  # a: teacher and label agree
    with pytest.raises(TrainingError, match="no teacher logits for 1"):
        soft_targets(str(npz), ["a.jpg", "c.jpg"], np.array([0, 0]), 3, alpha=0.5)
