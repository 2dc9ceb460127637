"""The training run's config: one typed value, every option checked in one place in one
sentence, the CLI's options and defaults taken from it, and checks that hold under python -O."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from train.config import TrainConfig, TrainingError


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg.endswith(".") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "options, message",
    [
        ({"split_spec": "0.8,0.2"}, "--split must be three positive fractions"),
        ({"split_spec": "0.5,0.5,0.5"}, "--split must be three positive fractions"),
        ({"split_spec": "1,0,0"}, "--split must be three positive fractions"),
        ({"split_spec": "a,b,c"}, "--split must be three positive fractions"),
        ({"degrade_defocus": 2.0}, "needs --degrade"),
        ({"degrade": 0.5, "degrade_defocus": -1.0}, ">= 0"),
        ({"degrade_recolour": 0.5}, "needs --degrade"),
        ({"degrade": 0.5, "degrade_recolour": 1.5}, "between 0 and 1"),
        ({"zoom_out_source": "AML-LMU:0.8:0.5"}, "SOURCE:LOW:HIGH"),
        ({"zoom_out_source": "AML-LMU"}, "SOURCE:LOW:HIGH"),
        ({"degrade": 0.5, "teacher_logits": "t.npz"}, "--degrade cannot be combined with --teacher-logits"),
        ({"zoom_out_source": "AML-LMU:0.55:0.75", "teacher_logits": "t.npz"}, "cannot be combined with --zoom-out-source"),
        ({"tf_threads": "2"}, "--tf-threads must be two thread counts"),
        ({"tf_threads": "2,-1"}, "--tf-threads must be two thread counts"),
        ({"tf_threads": "two,2"}, "--tf-threads must be two thread counts"),
        ({"freeze_blocks": -1}, "--freeze-blocks must be"),
        ({"freeze_blocks": 5, "backbone": "mobilenet_025"}, "--freeze-blocks needs --backbone efficientnet_lite0"),
        ({"head_dense": -3}, "--head-dense must be"),
        ({"augment_workers": 0}, "--augment-workers must be"),
        ({"pack_to": "pack.zip"}, "--pack-to must name an .npz file"),
        ({"pack_to": "p.npz", "train_only": True}, "cannot be combined with --train-only"),
        ({"pack_to": "p.npz", "resume": "m.keras"}, "cannot be combined with --train-only or --resume"),
    ],
)
def test_bad_values_and_combinations_are_refused_when_the_config_is_built(options, message):
    with pytest.raises(TrainingError) as exc:
        TrainConfig("data", "out", **options)
    assert message in _one_sentence(exc)


def test_a_good_config_derives_what_the_stages_need():
    c = TrainConfig("data", "runs/x", split_spec="0.7,0.2,0.1", zoom_out_source="AML-LMU:0.55:0.75", degrade=0.5)
    assert c.fractions == (0.7, 0.2, 0.1) and c.zoom_out == ("AML-LMU", 0.55, 0.75) and not c.distill
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 1  # type: ignore[misc]


def test_the_stage_variants_follow_the_options():
    from train.extend import Degrade, ZoomOut, variants

    assert variants(TrainConfig("d", "o")) == []
    chosen = variants(TrainConfig("d", "o", zoom_out_source="AML-LMU:0.55:0.75", degrade=0.3, degrade_mode="add",
                                  degrade_defocus=2.0))
    assert chosen == [ZoomOut("AML-LMU", 0.55, 0.75), Degrade(0.3, "add", 2.0, 0.0)]


def test_variants_extend_the_training_set_and_keep_the_crops_first(tmp_path):
    """Zoomed-out copies are appended for one source only, and the originals stay in front."""
    from train.extend import Crops, ZoomOut, extend

    images = np.full((5, 16, 16, 3), 200, np.uint8)
    images[:, 4:12, 4:12] = 40
    crops = Crops(all_images=images, index=np.array([0, 2, 3, 4]), labels=np.array([1, 2, 3, 4]),
                  sources=["A", "B", "B", "A"], paths=["a", "b", "c", "d"], data_root=tmp_path, size=16,
                  preprocessing="p", seed=0, workers=1)
    ts = extend(crops, [ZoomOut("B", 0.5, 0.5)])
    assert ts.x.shape == (6, 16, 16, 3) and list(ts.y) == [1, 2, 3, 4, 2, 3]
    assert np.array_equal(ts.x[:4], images[[0, 2, 3, 4]])
    assert (ts.x[4] < 100).sum() < (images[2] < 100).sum()  # the copy's cell is smaller
    with pytest.raises(TrainingError, match="no training images come from source 'C'"):
        extend(crops, [ZoomOut("C", 0.5, 0.6)])


def test_inputs_are_checked_on_the_file_system(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        TrainConfig.from_options({"data_root": str(tmp_path / "nope"), "out_dir": "o"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        TrainConfig.from_options({"data_root": str(tmp_path / "empty"), "out_dir": "o"})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"")
    with pytest.raises(TrainingError, match="weights file"):
        TrainConfig.from_options({"data_root": str(tmp_path / "d"), "out_dir": "o", "weights": "/no/such.h5"})
    assert TrainConfig.from_options({"data_root": str(tmp_path / "d"), "out_dir": "o"}).data == tmp_path / "d"


def test_cli_options_are_the_config_fields_with_its_defaults():
    """One option per field, in order, with the field's default: run.json's "options" keep
    the CLI's names, and a default is written in one place."""
    from train.__main__ import main

    fields = dataclasses.fields(TrainConfig)
    assert [p.name for p in main.params] == [f.name for f in fields]
    ctx = main.make_context("train", ["--data", "d", "--out", "o"])
    assert ctx.params == TrainConfig("d", "o").options()
    assert list(ctx.params) == [f.name for f in fields]


def _run_optimized(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-O", *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def test_checks_hold_under_python_O():
    """`assert` vanishes under -O; these checks must not (they used to be asserts)."""
    code = (
        "import numpy as np\n"
        "from train.rescale import parse_spec\n"
        "from train.config import TrainConfig, TrainingError\n"
        "assert False, 'asserts are not stripped'\n"  # proves this interpreter runs with -O
    )
    checks = (
        "for bad in ['AML-LMU:0.8:0.5', 'AML-LMU:0:1', ':0.5:0.6']:\n"
        "    try:\n"
        "        parse_spec(bad)\n"
        "        print('accepted', bad)\n"
        "    except ValueError:\n"
        "        pass\n"
        "for spec in ['0.5,0.5,0.5', '0.9,0.2,-0.1', '1']:\n"
        "    try:\n"
        "        TrainConfig('d', 'o', split_spec=spec)\n"
        "        print('accepted', spec)\n"
        "    except TrainingError:\n"
        "        pass\n"
        "print('done')\n"
    )
    r = _run_optimized("-c", code + checks)
    assert r.returncode == 0 and r.stdout.strip() == "done", r.stdout + r.stderr[-1500:]


def test_cli_misuse_exits_2_in_one_sentence_under_python_O(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.jpg").write_bytes(b"")
    for args, message in ((["--split", "0.5,0.5,0.5"], "--split must be three positive fractions"),
                          (["--zoom-out-source", "AML-LMU:0.9:0.5"], "SOURCE:LOW:HIGH"),
                          (["--degrade", "0.5", "--teacher-logits", str(tmp_path / "d" / "x.jpg")], "cannot be combined")):
        r = _run_optimized("-m", "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), *args)
        assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
        err = r.stderr.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_failed_jpeg_encode_is_an_error_not_a_stripped_assert(tmp_path, monkeypatch):
    import cv2

    from train import packed
    from train.split import write_split_csv

    write_split_csv(tmp_path / "s.csv", [("a.png", "basophil", "X", "train")])
    cv2.imwrite(str(tmp_path / "a.png"), np.full((40, 40, 3), 128, np.uint8))
    monkeypatch.setattr(cv2, "imencode", lambda *a, **k: (False, None))
    with pytest.raises(packed.PackError) as exc:
        packed.pack(tmp_path, tmp_path / "s.csv", tmp_path / "p.npz", 32, 85)
    assert "a.png" in _one_sentence(exc)
    assert not (tmp_path / "p.npz").exists()
