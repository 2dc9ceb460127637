"""Out-of-distribution crops become 'unclassified' and shifted batches raise DATA_SHIFT (issue 12, parts 1-2).

The tiny model classifies by mean colour and its embedding IS the mean colour, so a grey crop
lies far from every class colour: the model still gives it a class (softmax always does), but
the OOD reference must label it unclassified, send it to review with the reason, and keep it
out of the differential. Noise and background corners must not reach the differential with the
bundled model either.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

import tinymodel
from batchwbc.engine import data_shift, ood
from batchwbc.core import flags
from batchwbc.core.config import Settings
from batchwbc.core.differential import summarize
from batchwbc.inputs.slide_folders import discover
from batchwbc.engine.model import Classifier, ModelError
from batchwbc.engine.pipeline import Pipeline

GREY = (128, 128, 128)


def write(path: Path, rgb, shape=(40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((*shape, 3), np.uint8)
    img[:] = rgb[::-1]
    cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def ood_model(tmp_path_factory) -> Path:
    return tinymodel.build_with_ood(tmp_path_factory.mktemp("m") / "tiny-ood.onnx")


@pytest.fixture(scope="module")
def clf(ood_model):
    return Classifier(ood_model, threads=1)


def run(clf, root, **kw):
    found = discover(root)
    return Pipeline(clf.info.input_size, clf, clf.info.review_threshold, workers=0, **kw).run(found.crops)


def test_reference_round_trips_through_metadata(clf):
    ref = clf.ood
    assert ref is not None and ref.shift is not None
    again = ood.from_metadata({ood.KEY_OOD: ood.to_metadata(ref)})
    np.testing.assert_allclose(again.projection, ref.projection, rtol=1e-3, atol=1e-3)
    assert again.threshold == ref.threshold and again.shift.threshold == ref.shift.threshold
    assert any(c.startswith(ood.REJECT_PREFIX) for c in ref.classes)


def test_far_away_crop_is_unclassified_reviewed_and_not_counted(clf, tmp_path):
    root = tmp_path / "slides"
    write(root / "P" / "lym1.png", tinymodel.colour_for("lymphocyte"))
    write(root / "P" / "lym2.png", tinymodel.colour_for("lymphocyte"))
    write(root / "P" / "grey.png", GREY)
    # (grey.png is also a greyscale crop: its review reason names both)
    write(root / "P" / "pale.png", tinymodel.BACKGROUND_COLOUR)
    # without the reference the grey crop gets some class: the softmax cannot say "none"
    assert clf.predict(np.full((1, 32, 32, 3), 128, np.uint8)).max() > 0
    cells = {Path(c.file).name: c for c in run(clf, root).cells}
    assert cells["lym1.png"].class_id == "lymphocyte" and not cells["lym1.png"].review
    for name in ("grey.png", "pale.png"):
        c = cells[name]
        assert c.class_id == ood.UNCLASSIFIED, name
        assert c.review and c.review_reason.startswith(ood.UNCLASSIFIED_REASON) and c.thumbnail_jpeg
        assert c.second_class in clf.info.classes  # the model's nearest class, for the reviewer
    assert cells["grey.png"].ood_score > clf.ood.threshold > cells["lym1.png"].ood_score
    d = summarize(list(cells.values()))
    assert d.n_cells == 4 and d.unclassified == 2 and d.wbc == 2 and d.percent["lymphocyte"] == 100.0
    assert d.n_review == 2


def test_model_without_reference_scores_nothing(tmp_path):
    clf = Classifier(tinymodel.build(tmp_path / "plain.onnx"), threads=1)
    write(tmp_path / "s" / "P" / "grey.png", GREY)
    (cell,) = run(clf, tmp_path / "s").cells
    assert clf.ood is None and cell.ood_score is None and cell.class_id != ood.UNCLASSIFIED


def test_cache_keeps_the_unclassified_label(clf, tmp_path):
    from batchwbc.engine.result_cache import ResultCache

    write(tmp_path / "s" / "P" / "grey.png", GREY)
    write(tmp_path / "s" / "P" / "red.png", tinymodel.colour_for("basophil"))
    with ResultCache(tmp_path / "c.sqlite", clf.info.sha256) as cache:
        first = run(clf, tmp_path / "s", cache=cache)
    with ResultCache(tmp_path / "c.sqlite", clf.info.sha256) as cache:
        second = run(clf, tmp_path / "s", cache=cache)
    assert second.cached == 2
    key = lambda out: sorted((c.file, c.class_id, c.review, round(c.ood_score, 3)) for c in out.cells)  # noqa: E731
    assert key(first) == key(second)
    assert any(c.class_id == ood.UNCLASSIFIED for c in second.cells)


def test_corrupt_reference_refuses_the_model(tmp_path):
    import onnx

    path = tinymodel.build_with_ood(tmp_path / "m.onnx")
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == ood.KEY_OOD:
            body = json.loads(p.value)
            body["projection"]["base64"] = "not base64!"
            p.value = json.dumps(body)
    onnx.save(m, str(path))
    with pytest.raises(ModelError, match="unreadable 'projection'"):
        Classifier(path)


# ----------------------------------------------------------------------------- DATA_SHIFT

def test_data_shift_raised_for_shifted_batch_not_for_in_distribution(clf):
    ref = clf.ood
    rng = np.random.default_rng(3)
    cols = np.array([tinymodel.COLOURS[i] for i in range(len(clf.info.classes))], np.float32) / 255.0
    normal = cols[rng.integers(0, len(cols), 150)] + rng.normal(0, 0.01, (150, 3))
    shifted = cols[rng.integers(0, len(cols), 150)] * 0.85 + 0.1 + rng.normal(0, 0.01, (150, 3))  # another "stain"
    ok = data_shift.decide(ref, ood.score(ref, normal.astype(np.float32)))
    bad = data_shift.decide(ref, ood.score(ref, shifted.astype(np.float32)))
    assert ok.decided and not ok.raised
    assert bad.decided and bad.raised and data_shift.MESSAGE in bad.text()
    # too few cells: no decision either way
    few = data_shift.decide(ref, ood.score(ref, shifted[:data_shift.MIN_CELLS - 1].astype(np.float32)))
    assert not few.decided and not few.raised


def test_data_shift_says_one_plain_sentence_with_the_next_step():
    """Issue 19: the terminal repeated its sentence and printed "lower 95% bound 78.4% > 36.1%"."""
    raised = data_shift.ShiftDecision(True, True, 200, 160, 0.738, 0.361)
    text = raised.text()
    assert text.startswith("80% of cells (160 of 200) are unlike the model's validation data")
    assert "bound" not in text and "36.1" not in text
    assert "73.8%" in raised.detail() and "36.1%" in raised.detail()  # the statistic stays for the Run sheet
    line = data_shift.log_line({"A": raised, "B": data_shift.ShiftDecision(False, True, 50, 10, 0.1, 0.361)}, raised)
    assert line.count("unlike") == 1 and line.count(". ") == 0 and line.endswith(".")
    assert "80% of this run's cells" in line and "1 of 2 patients checked (A)" in line
    assert "batchwbc evaluate" in line and "batchwbc adapt" in line and "bound" not in line


def test_run_alert_names_data_shift_and_unsuited_patients_with_the_next_step():
    from batchwbc.core.records import CellResult
    from batchwbc.core.summary import run_alert, summarize_groups

    quiet = data_shift.ShiftDecision(False, True, 100, 20, 0.13, 0.361)
    raised = data_shift.ShiftDecision(True, True, 100, 90, 0.8, 0.361)
    cells = [CellResult("A", f"A/{i}.png", "lymphocyte", 0.99, "monocyte", 0.01, False) for i in range(100)]
    plain = summarize_groups(["A"], cells, [], Settings(), {"A": quiet})
    assert run_alert(plain, quiet) is None
    shifted = summarize_groups(["A"], cells, [], Settings(), {"A": raised})
    text = run_alert(shifted, raised)
    assert text.startswith("Results unreliable: 90% of this run's cells and the cells of 1 of 1 patient are unlike")
    assert "batchwbc evaluate" in text and "batchwbc adapt" in text and "docs/adaptation.md" in text
    review = [CellResult("B", f"B/{i}.png", "lymphocyte", 0.3, "monocyte", 0.2, True) for i in range(90)]
    unsuited = summarize_groups(["A", "B"], cells + review, [], Settings())
    assert "for 1 of 2 patients the model recognised few crops or is unsure of most cells" in run_alert(unsuited)
    # a model `batchwbc adapt` wrote: not "adapt it" again, but the lab's own count and more cells
    assert "adapt it to your images" in text and "already adapted" not in text
    adapted = run_alert(shifted, raised, adapted=True)
    assert "already adapted to your lab" in adapted and "adapt it to your images" not in adapted
    assert "count these patients' cells yourself" in adapted and "batchwbc evaluate" in adapted


def test_the_next_step_knows_an_adapted_model_by_its_version():
    from batchwbc.engine.model_metadata import ADAPTED_VERSION_MARKER, is_adapted_version

    assert is_adapted_version(f"wbc13-lite0-144-v8c{ADAPTED_VERSION_MARKER}20261204-d18873e7")
    assert not is_adapted_version("wbc13-lite0-144-v8c") and not is_adapted_version("")
    raised = data_shift.ShiftDecision(True, True, 200, 160, 0.738, 0.361)
    assert data_shift.NEXT_STEP in data_shift.log_line({"A": raised}, raised)
    assert data_shift.NEXT_STEP_ADAPTED in data_shift.log_line({"A": raised}, raised, adapted=True)


def test_data_shift_flag_is_raised_only_from_a_raised_decision():
    d = summarize([])
    raised = data_shift.ShiftDecision(True, True, 100, 90, 0.8, 0.26)
    quiet = data_shift.ShiftDecision(False, True, 100, 20, 0.13, 0.26)
    codes = lambda s: [f.code for f in flags.evaluate(d, Settings(), shift=s)]  # noqa: E731
    assert flags.DATA_SHIFT in codes(raised)
    assert flags.DATA_SHIFT not in codes(quiet) and flags.DATA_SHIFT not in codes(None)
    (f,) = [f for f in flags.evaluate(d, Settings(), shift=raised) if f.code == flags.DATA_SHIFT]
    assert data_shift.MESSAGE in f.message


def test_report_shows_unclassified_count_and_data_shift(clf, tmp_path):
    from openpyxl import load_workbook

    from batchwbc.outputs.workbook import write_workbook
    from batchwbc.core.records import RunData
    from datetime import datetime

    root = tmp_path / "slides"
    for i in range(30):  # a patient whose crops are all unlike the training colours
        write(root / "SHIFTED" / f"g{i}.png", (110 + i, 120, 130))
    for i in range(30):
        write(root / "NORMAL" / f"c{i}.png", tinymodel.COLOURS[i % 12])
    found = discover(root)
    out = Pipeline(clf.info.input_size, clf, 0.6, workers=0).run(found.crops)
    now = datetime.now()
    from batchwbc.engine.data_shift import decide_all
    from batchwbc.outputs.workbook import HEADER_ROWS
    from batchwbc.core.summary import summarize_run

    shifts, run_shift = decide_all(clf.info.metadata, out.cells)
    run_data = RunData(str(root), list(found.patients), out.cells, [], clf.info, 0.6, now, now, "test",
                       data_shift=run_shift)
    write_workbook(run_data, summarize_run(run_data, Settings(), shifts), Settings(), tmp_path / "r.xlsx")
    wb = load_workbook(tmp_path / "r.xlsx")
    rows = list(wb["Summary"].iter_rows(values_only=True))[HEADER_ROWS["Summary"] - 1:]  # row 1: the banner
    head = rows[0]
    by = {r[0]: dict(zip(head, r)) for r in rows[1:]}
    assert by["SHIFTED"]["Unclassified"] == 30 and by["SHIFTED"]["WBC"] == 0
    assert "DATA_SHIFT" in by["SHIFTED"]["Flag codes"] and "DATA_SHIFT" not in (by["NORMAL"]["Flag codes"] or "")
    assert by["NORMAL"]["Unclassified"] == 0
    items = {r[0]: r[1] for r in wb["Run"].iter_rows(values_only=True)}
    assert items["Unclassified cells (not recognised as a cell the model knows; in no count)"] == 30
    assert "DATA_SHIFT" in items["Data shift (whole run, compared with the model's own validation data)"]
    # issue 19: impossible to miss, and it says what to do next
    banner = wb["Summary"].cell(row=1, column=2).value  # column A repeats on every printed block: no text
    assert "DATA_SHIFT" in banner and "batchwbc evaluate" in banner and "batchwbc adapt" in banner
    # every printed column block starts with the banner's first line; the row stays low enough
    # that the first patient prints on the first page of each block
    from batchwbc.outputs import workbook

    summary = wb["Summary"]
    starts = [r.min_col for r in summary.merged_cells.ranges if r.min_row == 1]
    assert starts and all(summary.cell(1, c).value.startswith(workbook.BANNER) for c in starts)
    assert summary.row_dimensions[1].height <= (workbook.BANNER_MAX_LINES + 1) * workbook._BANNER_LINE_PT
    assert "docs/adaptation.md" in banner and "lower 95% bound" not in banner
    assert all(wb["Summary"].cell(row=1, column=c).fill.fgColor.rgb.endswith("E4D2F0") for c in (1, 2))
    assert "batchwbc evaluate" in items["Results unreliable (the Summary's banner)"]
    review = list(wb["Review"].iter_rows(values_only=True))
    assert any(ood.UNCLASSIFIED_REASON in str(r[3]) for r in review[1:])


# ----------------------------------------------------------------------------- export.ood_reference

def test_export_ood_reference_fits_on_training_cells_only(tmp_path):
    """The TF-free command a lab or the export runs: training cells in, test-split cells out."""
    from click.testing import CliRunner

    from export.ood_reference import main

    model = tmp_path / "plain.onnx"
    tinymodel.build(model)
    import onnx

    from batchwbc.engine.onnx_graph import add_embedding_output

    onnx.save(add_embedding_output(onnx.load(str(model))), str(model))
    data = tmp_path / "data"
    rng = np.random.default_rng(5)
    rows = ["path,class_id,source,split"]
    classes = Classifier(model).info.classes
    for k, class_id in enumerate(classes):
        for i in range(44):
            rgb = np.clip(np.array(tinymodel.COLOURS[k]) + rng.normal(0, 3, 3), 0, 255).astype(int)
            rel = f"{class_id}/c{i}.png"
            write(data / rel, tuple(int(v) for v in rgb), shape=(48, 48))
            if i < 12:  # test-split cells are grey: had they been used, grey would look familiar
                write(data / rel, GREY, shape=(48, 48))
                rows.append(f"{rel},{class_id},generic,test")
    split = tmp_path / "split.csv"
    split.write_text("\n".join(rows) + "\n")
    out = tmp_path / "with-ood.onnx"
    res = CliRunner().invoke(main, [str(model), "--data", str(data), "--split", str(split), "--out", str(out),
                                    "--n-ref", "120", "--n-held", "230"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    clf = Classifier(out, threads=1)
    assert clf.ood is not None and "120 training cells" in clf.ood.info["fitted_on"]
    probs, scores, flagged = clf.predict_scored(np.stack([
        np.full((32, 32, 3), tinymodel.colour_for("monocyte"), np.uint8),
        np.full((32, 32, 3), GREY, np.uint8)]))
    assert not flagged[0] and flagged[1]  # grey = only the test-split cells, which were left out
    # the stain-colour envelope travels in the same reference, fitted on the same training cells
    env = clf.ood.colour
    assert env is not None and len(env.groups) == 1 and env.info["fit_cells"] == 120
    assert env.info["held_out_cells"] == 230 and env.info["held_out_outside"] <= 0.005
    assert not flagged[0] & ood.BY_COLOUR  # a training colour is inside


def test_export_ood_reference_refuses_a_model_without_embedding(tmp_path):
    from click.testing import CliRunner

    from export.ood_reference import main

    model = tinymodel.build(tmp_path / "plain.onnx")
    (tmp_path / "d" / "monocyte").mkdir(parents=True)
    split = tmp_path / "s.csv"
    split.write_text("path,class_id,source,split\n")
    res = CliRunner().invoke(main, [str(model), "--data", str(tmp_path / "d"), "--split", str(split), "--out",
                                    str(tmp_path / "o.onnx")])
    assert res.exit_code == 2 and "no embedding output" in res.output


def test_huge_whitening_is_stored_in_float32_not_lost(clf):
    """A degenerate covariance (a tiny training run) can make the projection exceed float16."""
    big = replace(clf.ood, projection=clf.ood.projection * 1e6)
    again = ood.from_metadata({ood.KEY_OOD: ood.to_metadata(big)})
    np.testing.assert_allclose(again.projection, big.projection, rtol=1e-6)


def test_the_data_shift_cell_cut_is_the_highest_of_the_sources_own_quantiles():
    """A source whose cells score higher (another analyzer) must not make every pseudo-patient of
    it look shifted: the cut is its own 80th percentile, not the pooled one."""
    import numpy as np

    from export.ood_reference import shift_cell_cut

    low, high = np.linspace(0.0, 1.0, 101), np.linspace(2.0, 3.0, 101)
    cut = shift_cell_cut(np.concatenate([low, high]), ["A"] * 101 + ["B"] * 101, 0.8)
    assert cut == pytest.approx(np.quantile(high, 0.8))
    assert cut > np.quantile(np.concatenate([low, high]), 0.8)
    assert (high > cut).mean() <= 0.2 and (low > cut).mean() == 0
    with pytest.raises(ValueError):
        shift_cell_cut(np.array([1.0]), ["A", "B"])


def _cell(patient: str, score: float, class_id: str = "lymphocyte"):
    from batchwbc.core.records import CellResult

    return CellResult(patient, f"{patient}/{score}-{class_id}.png", class_id, 0.9, "monocyte", 0.05, False, ood_score=score)


def test_data_shift_counts_set_apart_cells_only_where_the_reference_says_so(clf):
    """A new hospital's cells fell nearer the reject centres, not beyond the score cut (ADR 0011):
    with counts_set_apart a patient whose cells are set apart raises DATA_SHIFT even when every
    score is below the cut; an older reference (flag absent) keeps counting scores only."""
    base = clf.ood
    low = base.shift.cell_cut / 2  # every score well inside the cut
    cells = ([_cell("NEWLAB", low, ood.UNCLASSIFIED) for _ in range(30)] + [_cell("NEWLAB", low) for _ in range(30)]
             + [_cell("HOME", low) for _ in range(60)])
    for counts, expect in ((True, True), (False, False)):
        ref = replace(base, shift=replace(base.shift, counts_set_apart=counts))
        meta = {**clf.info.metadata, ood.KEY_OOD: ood.to_metadata(ref)}
        per_patient, _ = data_shift.decide_all(meta, cells)
        assert per_patient["NEWLAB"].raised is expect and per_patient["NEWLAB"].unusual == (30 if counts else 0)
        assert per_patient["HOME"].decided and not per_patient["HOME"].raised
    with pytest.raises(ValueError):
        data_shift.shift_scores(base, [1.0, 2.0], [True])


def test_counts_set_apart_round_trips_and_older_files_read_as_false(clf):
    ref = replace(clf.ood, shift=replace(clf.ood.shift, counts_set_apart=True))
    body = json.loads(ood.to_metadata(ref))
    assert body["data_shift"]["counts_set_apart"] is True
    assert ood.from_metadata({ood.KEY_OOD: json.dumps(body)}).shift.counts_set_apart is True
    del body["data_shift"]["counts_set_apart"]  # a file written before the flag existed
    assert ood.from_metadata({ood.KEY_OOD: json.dumps(body)}).shift.counts_set_apart is False
    body["data_shift"]["counts_set_apart"] = "yes"
    with pytest.raises(ood.OodReferenceError):
        ood.from_metadata({ood.KEY_OOD: json.dumps(body)})


def test_export_derives_the_threshold_with_set_apart_held_out_cells_counted(monkeypatch):
    """The threshold must come from the statistic the runtime computes: held-out cells that the
    embedding sets apart count as unusual in the pseudo-patients too, so a model whose own
    held-out cells are often set apart gets a higher threshold instead of raising DATA_SHIFT
    for its own data."""
    from export.ood_reference import fit_with_thresholds

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 8)).astype(np.float32)
    lab = rng.integers(0, 3, 900)
    emb = centres[lab] + rng.normal(0, 1, (900, 8)).astype(np.float32)
    bg = rng.normal(0, 0.3, (40, 8)).astype(np.float32) + 20

    def fit():
        return fit_with_thresholds(emb[:600], [f"c{i}" for i in lab[:600]], bg, emb[600:], [f"c{i}" for i in lab[600:]],
                                   ["A"] * 300, np.random.default_rng(1), k=4)

    plain = fit()
    assert plain.shift.counts_set_apart and "set apart" in plain.shift.info["statistic"]
    real = ood.score_and_flag

    def half_set_apart(ref, e):  # as if the reject rule set apart every other held-out cell
        score, flagged = real(ref, e)
        return score, flagged | (np.arange(len(e)) % 2 == 0)

    monkeypatch.setattr(ood, "score_and_flag", half_set_apart)
    assert fit().shift.threshold > plain.shift.threshold + 0.2

