"""The shared preprocessing against every hostile corpus case, plus the bomb guard's memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import fuzz_corpus
import tinymodel
from batchwbc.engine import preprocess as pp
from batchwbc.engine.crop_checks import check_crop_shape

SIZE = 32
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fuzz_corpus.build_corpus(tmp_path_factory.mktemp("corpus") / "slides")


def test_corpus_is_small_and_complete(corpus):
    total = sum(f.stat().st_size for f in corpus.root.rglob("*") if f.is_file() and not f.is_symlink())
    assert total < 5_000_000
    assert len(corpus.of(fuzz_corpus.CLASSIFY)) >= 20 and len(corpus.of(fuzz_corpus.ERROR)) >= 10
    assert sum(c.bomb for c in corpus.cases) >= 4
    for c in corpus.cases:
        assert (corpus.root / c.rel).is_symlink() or (corpus.root / c.rel).exists(), c.rel


def test_valid_cases_give_model_input(corpus):
    bad = []
    for c in corpus.of(fuzz_corpus.CLASSIFY):
        try:
            arr = pp.prepare_file(corpus.root / c.rel, SIZE, check=check_crop_shape)
        except pp.UnreadableImage as exc:
            bad.append(f"{c.rel}: refused ({exc})")
            continue
        if arr.shape != (SIZE, SIZE, 3) or arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            bad.append(f"{c.rel}: shape {arr.shape} dtype {arr.dtype}")
        elif c.class_id is not None:
            want = np.array(tinymodel.colour_for(c.class_id), float)
            got = arr.reshape(-1, 3).mean(axis=0)
            if np.abs(got - want).max() > 16:  # colour (and so RGB channel order) preserved
                bad.append(f"{c.rel}: mean colour {got.round()} != {want}")
    assert not bad, "\n".join(bad)


def test_invalid_cases_raise_a_readable_reason(corpus):
    bad = []
    for c in corpus.of(fuzz_corpus.ERROR):
        try:  # with the runtime's crop check, as batchwbc.engine.pipeline.decode_one calls it
            pp.prepare_file(corpus.root / c.rel, SIZE, check=check_crop_shape)
        except pp.UnreadableImage as exc:
            reason = str(exc)
            if not reason or "\n" in reason or len(reason) < 10 or "Traceback" in reason or "cv2" in reason:
                bad.append(f"{c.rel}: unhelpful reason {reason!r}")
            if c.bomb and "pixel safety limit" not in reason:
                bad.append(f"{c.rel}: bomb refused for another reason: {reason!r}")
            if c.shape and "pixels" not in reason:
                bad.append(f"{c.rel}: odd shape refused for another reason: {reason!r}")
        else:
            bad.append(f"{c.rel}: accepted but must be refused ({c.note})")
    assert not bad, "\n".join(bad)


def test_shape_check_is_runtime_policy_not_the_contract(corpus):
    """Training decodes through prepare_file without the check: the contract itself accepts any size."""
    assert pp.prepare_file(corpus.root / "P008_shapes/one_pixel.png", SIZE).shape == (SIZE, SIZE, 3)


def test_reasons_distinguish_causes(corpus):
    def reason(rel):
        with pytest.raises(pp.UnreadableImage) as ei:
            pp.prepare_file(corpus.root / rel, SIZE)
        return str(ei.value)

    assert "empty" in reason("P002_broken/empty.jpg")
    assert "truncated" in reason("P002_broken/truncated.jpg")
    assert "not a readable image" in reason("P002_broken/text.jpg")
    assert "7000x7000" in reason("P003_bombs/over_limit_7000.png")
    assert "far larger than" in reason("P003_bombs/bomb_20000.png")
    assert "not a file" in reason("P004_deep/folder.jpg")
    with pytest.raises(pp.UnreadableImage, match="disappeared"):
        pp.prepare_file(corpus.root / "no-such.jpg", SIZE)


def test_no_pillow_bomb_warning(corpus):
    """Between Pillow's warning and error thresholds, our guard refuses quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(pp.UnreadableImage, match="10000x10000"):
            pp.prepare_file(corpus.root / "P003_bombs/bomb_10000.png", SIZE)


def test_guard_is_configurable():
    png = fuzz_corpus.png_bomb(300, 200)
    assert pp.prepare_bytes(png, SIZE).shape == (SIZE, SIZE, 3)
    with pytest.raises(pp.UnreadableImage, match="300x200 pixels"):
        pp.prepare_bytes(png, SIZE, max_pixels=50_000)


_RSS_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from memprobe import peak_kib as peak, reset_peak
    from batchwbc.engine import preprocess as pp
    reset_peak()
    files = sys.argv[2:]
    pp.prepare_bytes(open(files[-1], "rb").read(), 32)  # warm up cv2/Pillow code paths
    before = peak()
    reasons = []
    for f in files[:-1]:
        try:
            pp.prepare_file(f, 32)
            reasons.append(None)
        except pp.UnreadableImage as e:
            reasons.append(str(e))
    after_bombs = peak()
    big = np.ones(400 * 1024 * 1024, np.uint8)  # calibration: the instrument does see this
    after_alloc = peak()
    print(json.dumps({"bombs_kib": after_bombs - before, "alloc_kib": after_alloc - after_bombs, "reasons": reasons}))
""")


@pytest.mark.skipif(sys.platform not in ("linux",), reason="ru_maxrss units/semantics are Linux-specific")
def test_bomb_refused_without_allocating(corpus):
    bombs = [str(corpus.root / c.rel) for c in corpus.cases if c.bomb]
    ok = str(corpus.root / "P003_bombs/ok.png")
    r = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(Path(__file__).parent), *bombs, ok], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert all(reason and "safety limit" in reason for reason in out["reasons"]), out["reasons"]
    assert out["alloc_kib"] > 200 * 1024, "peak-RSS measurement does not work here"
    assert out["bombs_kib"] < 30 * 1024, f"peak RSS grew by {out['bombs_kib'] / 1024:.0f} MB while refusing bombs"


def test_resize_square_extremes():
    for shape in [(1, 1, 3), (1, 5000, 3), (5000, 1, 3), (SIZE, SIZE, 3), (33, 31, 3)]:
        out = pp.resize_square(np.zeros(shape, np.uint8), SIZE)
        assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_non_ascii_path(tmp_path):
    d = tmp_path / "Zoë 患者"
    d.mkdir()
    f = d / "zelle ü.png"
    f.write_bytes(fuzz_corpus._pil_bytes(np.zeros((8, 8, 3), np.uint8), "PNG"))
    assert pp.prepare_file(f, SIZE).shape == (SIZE, SIZE, 3)


def test_is_image_name():
    assert pp.is_image_name("A.JPG") and pp.is_image_name("b.Tiff") and pp.is_image_name("c.bmp")
    assert not pp.is_image_name("notes.txt") and not pp.is_image_name("Thumbs.db") and not pp.is_image_name("jpg")


def _real_images(n: int) -> list[Path]:
    if not DATA.is_dir():
        pytest.skip(f"real data not available at {DATA}")
    files = sorted((DATA / "PBC_dataset_normal_DIB" / "neutrophil").glob("[!.]*.jpg"))[:n]  # the real data holds hidden .DS_*.jpg junk
    if not files:
        pytest.skip("no real neutrophil images found")
    return files


def test_real_crops_and_their_truncations(tmp_path):
    for src in _real_images(3):
        arr = pp.prepare_file(src, SIZE)
        assert arr.shape == (SIZE, SIZE, 3) and arr.std() > 1  # a real, non-flat image
        cut = tmp_path / src.name
        data = src.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(pp.UnreadableImage, match="truncated"):
            pp.prepare_file(cut, SIZE)


def _mixed_real_images(per_source: int) -> list[Path]:
    """A few crops from each public source: different analyzers, sizes and framings."""
    if not DATA.is_dir():
        pytest.skip(f"real data not available at {DATA}")
    files = []
    for source in sorted(p for p in DATA.iterdir() if p.is_dir()):
        found = sorted(f for f in source.rglob("[!.]*") if f.is_file() and pp.is_image_name(f.name))
        files += found[:: max(1, len(found) // per_source)][:per_source]
    if not files:
        pytest.skip("no real crops found")
    return files


def test_bgr_path_gives_the_same_pixels_as_the_rgb_contract(corpus):
    """The runtime frames in BGR (prepare_bytes) and training/evaluation in RGB (to_model_input):
    both must give bit-identical model inputs, for both contracts and the sizes models use."""
    sources = [corpus.root / c.rel for c in corpus.of(fuzz_corpus.CLASSIFY)]
    real = _mixed_real_images(20) if DATA.is_dir() else []
    for path in sources + real:
        data = Path(path).read_bytes()
        rgb = pp.decode_rgb(data)
        for contract in (pp.PREPROCESSING_CELL, pp.PREPROCESSING_WHOLE):
            for size in (SIZE, 128, 144):
                want = pp.to_model_input(rgb, size, contract)
                assert np.array_equal(pp.prepare_bytes(data, size, preprocessing=contract), want), (path, contract, size)
        assert pp.cell_square(rgb) == pp.cell_square(np.ascontiguousarray(rgb[..., ::-1]), bgr=True), path
