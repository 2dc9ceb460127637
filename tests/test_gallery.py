"""The HTML gallery: hostile names stay text, every cell is on its patient's page, thumbnails are
small and exist, the folder is replaced atomically, and a real headless browser agrees."""
from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

import tinymodel
from batchwbc.ops import exit_codes
from batchwbc.outputs import gallery
from batchwbc.core.config import DEFAULT_SETTINGS
from batchwbc.core.differential import summarize
from batchwbc.core.flags import WARNING, Flag, evaluate
from batchwbc.outputs.gallery_thumbs import EDGE, crop_path, thumbnail_name
from batchwbc.core.records import CellResult, FileError

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "slides"
SCRIPT = "<script>alert(1)</script>"
# Names a Linux disk can hold (no "/"); the patient SCRIPT itself only exists in the records.
HOSTILE_FILES = ['"><img src=x onerror=alert(2)>.png', "it's & <b>bold</b>.png", "zellé ü 細胞.png",
                 "javascript:alert(3).png"]
GREEN = (0, 200, 0)  # RGB of every test crop: easy to find in a screenshot


class Summary(NamedTuple):
    """What the run computes once per patient (summary.PatientSummary has the same fields)."""

    patient: str
    differential: object
    flags: list
    errors: list


def _write_png(path: Path, rgb=GREEN, size=(150, 120)) -> None:
    img = np.zeros((size[1], size[0], 3), np.uint8)
    img[:] = rgb[::-1]
    ok, buf = cv2.imencode(".png", img)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    buf.tofile(str(path))


def _cell(patient: str, file: str, cls: str, conf: float, review: bool = False, thumb: bytes | None = None):
    return CellResult(patient, file, cls, conf, "monocyte", round(1 - conf, 3), review, thumb)


def _summaries(patients, cells_by, errors_by=None):
    errors_by = errors_by or {}
    out = {}
    for p in patients:
        d = summarize(cells_by.get(p, []))
        out[p] = Summary(p, d, evaluate(d, DEFAULT_SETTINGS), errors_by.get(p, []))
    return out


def _info(classes=None):
    from batchwbc.core import catalogue

    return gallery.GalleryRunInfo(datetime(2025, 2, 1, 2, 0, tzinfo=timezone.utc), "0.test", "/srv/slides",
                                  "m.onnx", "v1", "ab" * 32, 0.8, tuple(classes or catalogue.CLASS_IDS))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A gallery of 3 patients: a normal one, a hostile one (names, a missing and an unreadable
    crop, a '..' path) and one with zero cells."""
    root = tmp_path_factory.mktemp("slides")
    normal, hostile, empty = "P1", SCRIPT, "P3 & <i>empty</i>"
    cells = []
    classes = ["lymphocyte", "neutrophil_segmented", "monocyte", "neutrophil_band", "myeloblast"]
    for i in range(30):
        rel = f"P1/cell_{i:03d}.png"
        _write_png(root / rel, size=(150 + i, 120))
        conf = 0.5 + (i * 7 % 30) / 60
        cells.append(_cell(normal, rel, classes[i % len(classes)], conf, review=conf < 0.8))
    hdir = "hostile"  # the folder on disk; the records carry the hostile patient name
    for i, name in enumerate(HOSTILE_FILES):
        _write_png(root / hdir / name)
        cells.append(_cell(hostile, f"{hdir}/{name}", "lymphocyte", 0.6 + i / 10, review=i == 0))
    (root / hdir / "broken.png").write_bytes(b"not an image")
    cells.append(_cell(hostile, f"{hdir}/broken.png", "monocyte", 0.9))
    ok, fallback = cv2.imencode(".jpg", np.full((80, 80, 3), 128, np.uint8))
    cells.append(_cell(hostile, f"{hdir}/gone.png", "monocyte", 0.7, review=True, thumb=fallback.tobytes()))
    cells.append(_cell(hostile, "../outside.png", "monocyte", 0.95))
    _write_png(root.parent / "outside.png")  # exists, but must never be read through '..'
    cells.append(_cell(hostile, f"{hdir}/ctl\x07\udcff.png", "monocyte", 0.99))
    patients = [normal, hostile, empty]
    cells_by = {p: [c for c in cells if c.patient == p] for p in patients}
    errors_by = {hostile: [FileError(hostile, f"{hdir}/<b>x</b>.png", "not a readable image <b>")],
                 empty: [FileError(empty, "", "folder <could not> be read")]}
    summaries = _summaries(patients, cells_by, errors_by)
    out = tmp_path_factory.mktemp("html") / "gallery"
    res = gallery.write_gallery(out, patients, cells_by, summaries, _info(), root, threads=2)
    return out, patients, cells_by, summaries, res


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(text: str) -> _Tags:
    p = _Tags()
    p.feed(text)
    return p


def pages(out: Path) -> list[Path]:
    return sorted(out.glob("*.html"))


SAFE_URL = re.compile(r"^(index\.html|patient-\d{4}\.html|#c\d+|thumbs/[0-9a-f]{24}\.jpg)$")
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "a", "table", "thead", "tbody",
                "tr", "th", "td", "ul", "li", "span", "small", "br", "nav", "section", "div", "figure", "img",
                "figcaption", "b"}


def test_pages_and_result(built):
    out, patients, cells_by, _, res = built
    assert [p.name for p in pages(out)] == ["index.html", "patient-0001.html", "patient-0002.html", "patient-0003.html"]
    assert (out / gallery.MARKER).is_file()
    assert res.pages == 3 and res.cells == sum(len(c) for c in cells_by.values())


def test_hostile_names_never_become_markup(built):
    out = built[0]
    for page in pages(out):
        text = page.read_text(encoding="utf-8")
        parsed = parse(text)
        tags = {t for t, _ in parsed.tags}
        assert tags <= ALLOWED_TAGS, (page.name, tags - ALLOWED_TAGS)
        assert "script" not in tags and "<script" not in text.lower() and "<i>" not in text and "<b>bold" not in text
        for tag, attrs in parsed.tags:
            assert not any(k.startswith("on") for k in attrs), (page.name, tag, attrs)
            for key in ("href", "src"):
                if key in attrs:
                    assert SAFE_URL.match(attrs[key]), (page.name, attrs[key])
        assert "\x07" not in text and "\udcff" not in text  # control characters and lone surrogates replaced
    index = (out / "index.html").read_text(encoding="utf-8")
    assert html.escape(SCRIPT, quote=True) in index  # shown as text, escaped
    assert SCRIPT in "".join(parse(index).text)  # ...which a browser reads back as the name
    hostile_page = (out / "patient-0002.html").read_text(encoding="utf-8")
    for name in HOSTILE_FILES:
        assert f'data-file="{html.escape("hostile/" + name, quote=True)}"' in hostile_page
        assert 'alt="' + html.escape("hostile/" + name, quote=True) + '"' in hostile_page


def test_every_page_has_the_content_security_policy(built):
    for page in pages(built[0]):
        metas = [a for t, a in parse(page.read_text(encoding="utf-8")).tags if t == "meta"]
        csp = [a["content"] for a in metas if a.get("http-equiv", "").lower() == "content-security-policy"]
        assert csp == ["default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"], page.name
        assert any(a.get("charset") == "utf-8" for a in metas)


def figures(page: Path) -> list[dict]:
    return [a for t, a in parse(page.read_text(encoding="utf-8")).tags if t == "figure"]


def test_every_cell_is_on_its_patient_page_by_class_lowest_confidence_first(built):
    from batchwbc.core import catalogue

    out, patients, cells_by, _, _ = built
    for i, p in enumerate(patients):
        figs = figures(out / gallery.patient_page_name(i))
        assert sorted(f["data-file"] for f in figs) == sorted(c.file.replace("\x07", "\ufffd").replace("\udcff", "\ufffd")
                                                              for c in cells_by[p])
        by_file = {c.file: c for c in cells_by[p]}
        shown = [by_file[f["data-file"]] for f in figs if f["data-file"] in by_file]
        order = [catalogue.CLASS_IDS.index(c.class_id) for c in shown]
        assert order == sorted(order)  # class sections in catalogue order
        for cid in set(c.class_id for c in shown):
            confs = [c.confidence for c in shown if c.class_id == cid]
            assert confs == sorted(confs)  # lowest confidence first
        for f in figs:
            c = by_file.get(f["data-file"])
            if c is not None:  # review marked by class (border) and text, second class on hover
                assert ("review" in f["class"].split()) == c.review
                assert "REVIEW" in f["title"] if c.review else "REVIEW" not in f["title"]
                assert f"2nd Monocyte {c.second_prob:.2f}" in f["title"]


def test_review_cells_carry_a_visible_text_tag(built):
    out = built[0]
    text = (out / "patient-0001.html").read_text(encoding="utf-8")
    n_review = sum(c.review for c in built[2]["P1"])
    assert n_review > 0 and text.count('<figcaption><span class="tag">REVIEW</span> ') == n_review
    assert text.count("<small>2nd Monocyte") == len(built[2]["P1"])  # second class visible, not only on hover


def test_thumbnails_exist_are_small_and_placeholders_cover_the_rest(built):
    out, patients, cells_by, _, res = built
    srcs = [a["src"] for page in pages(out) for t, a in parse(page.read_text(encoding="utf-8")).tags if t == "img"]
    assert len(srcs) == len(set(srcs)) == res.thumbnails
    for src in srcs:
        data = (out / src).read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and len(data) < 8000
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert max(img.shape[:2]) <= EDGE
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == sorted(s.split("/")[1] for s in srcs)
    hostile = (out / "patient-0002.html").read_text(encoding="utf-8")
    # broken.png, '../outside.png' and the control-character name have no readable crop: placeholders
    assert hostile.count('<div class="noimg">no image</div>') == 3
    # gone.png is missing on disk but had a review thumbnail from the run: that one is used
    assert f'thumbs/{thumbnail_name(SCRIPT, "hostile/gone.png")}' in hostile
    assert f'thumbs/{thumbnail_name(SCRIPT, "../outside.png")}' not in hostile


def test_gallery_formats_the_summaries_it_is_given(built, tmp_path):
    """It never recomputes: a flag handed in is shown verbatim, even one the cells do not explain."""
    _, patients, cells_by, summaries, _ = built
    fake = dict(summaries)
    fake["P1"] = summaries["P1"]._replace(flags=[Flag("TEST_ONLY", "made-up flag <x>", WARNING)])
    out = tmp_path / "g"
    gallery.write_gallery(out, patients, cells_by, fake, _info(), None, threads=1)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "made-up flag &lt;x&gt;" in index and "TEST_ONLY" in index
    assert "LOW_WBC" not in index.split("P1</a>")[1].split("</tr>")[0]  # P1's real flag is not re-derived
    # no crops root: no image anywhere, except the cell with its own review thumbnail
    assert len(list((out / "thumbs").iterdir())) == 1


SIGNOFF_WORDS = re.compile(r"sign", re.IGNORECASE)  # Signed / Not signed / Sign-off / signature


def _index_row(index: str, patient: str) -> str:
    """The index row of one patient (from its escaped name to the end of its row)."""
    return index.split(f">{html.escape(patient, quote=True)}</a>")[1].split("</tr>")[0]


def test_run_gallery_index_makes_no_sign_off_claim(built):
    """Nothing is signed at run time: the run's index has no sign-off column and no such words."""
    index = (built[0] / "index.html").read_text(encoding="utf-8")
    shown = "".join(parse(index.split("</head>", 1)[1]).text)  # the page's text, not its stylesheet
    assert "Patient" in shown and not SIGNOFF_WORDS.search(shown), "sign-off text in a run gallery"
    assert "<th>Sign-off</th>" not in index and 'class="signed"' not in index and 'class="unsigned"' not in index


def test_index_shows_the_sign_off_it_is_given_escaped(built, tmp_path):
    """verify --html: each row says who signed and when, or plainly "Not signed" and why, as
    handed in (the gallery does not decide who is signed), with hostile names kept as text."""
    _, patients, cells_by, summaries, _ = built
    signer = "Dr. <script>alert(4)</script> & Co"
    signoffs = {"P1": gallery.SignOff(True, signer, "2025-02-03 10:15+01:00"),
                SCRIPT: gallery.SignOff(False, reason="1 of 3 review cells without a Verified class <b>"),
                "P3 & <i>empty</i>": gallery.SignOff(False)}
    out = tmp_path / "g"
    gallery.write_gallery(out, patients, cells_by, summaries, _info(), None, threads=1, signoffs=signoffs)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert "<th>Sign-off</th>" in index
    p1 = _index_row(index, "P1")
    assert f"Signed by {html.escape(signer, quote=True)} on 2025-02-03 10:15+01:00" in p1
    assert "Not signed" not in p1
    hostile = _index_row(index, SCRIPT)
    assert "Not signed" in hostile and "Signed by" not in hostile
    assert "1 of 3 review cells without a Verified class &lt;b&gt;" in hostile
    empty = _index_row(index, "P3 & <i>empty</i>")
    assert "Not signed" in empty and "Signed by" not in empty
    parsed = parse(index)
    assert "script" not in {t for t, _ in parsed.tags} and "<script" not in index.lower()
    assert f"Signed by {signer} on" in "".join(parsed.text)  # a browser shows the name as typed
    for page in pages(out):  # the patient pages are as in a run: no sign-off there
        if page.name != "index.html":
            assert "Signed by" not in page.read_text(encoding="utf-8")


def test_sign_off_must_cover_every_patient_and_a_signature_needs_name_and_date(tmp_path):
    patients, cells_by, summaries = _small(tmp_path)
    with pytest.raises(ValueError, match="no sign-off for patient 'P1'"):
        gallery.write_gallery(tmp_path / "g", patients, cells_by, summaries, _info(), None, signoffs={})
    assert not (tmp_path / "g").exists()
    with pytest.raises(ValueError, match="no sign-off for patient 'P1'"):
        gallery.render_index(patients, cells_by, summaries, _info(), {})
    for by, on in (("", "2025-02-03"), ("A. Tech", ""), ("  ", "2025-02-03")):
        with pytest.raises(ValueError, match="needs both a name and a date"):
            gallery.SignOff(True, by, on)
    assert not gallery.SignOff(False, "A. Tech").signed  # a name alone is not a signature


def test_differential_table_shows_the_summary_numbers(built):
    out, _, _, summaries, _ = built
    text = (out / "patient-0001.html").read_text(encoding="utf-8")
    d = summaries["P1"].differential
    from batchwbc.core import catalogue

    lymphocyte = html.escape(catalogue.get("lymphocyte").display)
    assert f"<td>{lymphocyte}</td><td class=\"n\">{d.counts['lymphocyte']}</td>" in text
    assert f"{d.percent['lymphocyte']:.1f}" in text
    lo, hi = d.ci["lymphocyte"]
    assert f"{lo:.1f}&ndash;{hi:.1f}" in text


def test_crop_path_refuses_escaping_paths(tmp_path):
    assert crop_path(tmp_path, "P1/a.jpg") == tmp_path / "P1" / "a.jpg"
    for bad in ("../x.jpg", "P1/../../x.jpg", "/etc/passwd", "C:\\x.jpg", "\\\\server\\share\\x.jpg", "P1\\..\\..\\x", ""):
        assert crop_path(tmp_path, bad) is None, bad
    assert crop_path(None, "P1/a.jpg") is None


def test_thumbnail_names_are_hashes():
    a = thumbnail_name("P1", "a.jpg")
    assert re.fullmatch(r"[0-9a-f]{24}\.jpg", a)
    assert a == thumbnail_name("P1", "a.jpg") != thumbnail_name("P1", "b.jpg") != thumbnail_name("P2", "a.jpg")
    assert re.fullmatch(r"[0-9a-f]{24}\.jpg", thumbnail_name("\udcff", "\x00"))


# ------------------------------------------------------------------ atomic replacement

def _small(tmp_path, root=None):
    cells = [_cell("P1", "P1/a.png", "lymphocyte", 0.9)]
    if root is not None:
        _write_png(root / "P1" / "a.png")
    return ["P1"], {"P1": cells}, _summaries(["P1"], {"P1": cells})


def test_an_earlier_gallery_is_replaced_whole(tmp_path):
    out = tmp_path / "g"
    patients, cells_by, summaries = _small(tmp_path)
    gallery.write_gallery(out, ["A", "B"], {}, _summaries(["A", "B"], {}), _info(), None)
    assert (out / "patient-0002.html").exists()
    gallery.write_gallery(out, patients, cells_by, summaries, _info(), None)
    assert sorted(p.name for p in pages(out)) == ["index.html", "patient-0001.html"]  # no stale page left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temp or old folders


def test_a_failure_keeps_the_previous_gallery_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    out = tmp_path / "g"
    patients, cells_by, summaries = _small(tmp_path)
    gallery.write_gallery(out, patients, cells_by, summaries, _info(), None)
    before = (out / "index.html").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery, "render_index", boom)
    with pytest.raises(KeyboardInterrupt):
        gallery.write_gallery(out, ["X"], {}, _summaries(["X"], {}), _info(), None)
    assert (out / "index.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_a_folder_that_is_not_a_gallery_is_never_replaced(tmp_path):
    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.docx").write_text("x")
    with pytest.raises(gallery.GalleryError, match="not empty and is not a batchwbc gallery"):
        gallery.check_target(precious)
    patients, cells_by, summaries = _small(tmp_path)
    with pytest.raises(gallery.GalleryError):
        gallery.write_gallery(precious, patients, cells_by, summaries, _info(), None)
    assert [p.name for p in precious.iterdir()] == ["thesis.docx"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(gallery.GalleryError, match="not a folder"):
        gallery.check_target(tmp_path / "afile")
    with pytest.raises(gallery.GalleryError, match="does not exist"):
        gallery.check_target(tmp_path / "missing" / "g")
    (tmp_path / "empty").mkdir()
    gallery.check_target(tmp_path / "empty")  # an empty folder is fine


# ------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("model") / "tiny.onnx")


def test_run_html_writes_the_gallery_for_every_crop(tiny, tmp_path):
    from batchwbc.cli import main
    from batchwbc.inputs.slide_folders import discover

    out = tmp_path / "gallery"
    r = CliRunner().invoke(main, ["run", str(SAMPLES), "--out", str(tmp_path / "r.xlsx"), "--model", str(tiny),
                                  "--workers", "0", "--html", str(out)], catch_exceptions=False)
    assert r.exit_code == exit_codes.OK, r.stderr
    assert "HTML gallery: 4 patient pages" in r.stderr
    crops = discover(SAMPLES).crops
    shown = [f["data-file"] for page in pages(out) for f in figures(page)]
    assert sorted(shown) == sorted(c.rel for c in crops)
    assert len(list((out / "thumbs").iterdir())) == len(crops)
    index = (out / "index.html").read_text(encoding="utf-8")
    assert not SIGNOFF_WORDS.search("".join(parse(index.split("</head>", 1)[1]).text))  # nothing signed at run time


def test_run_html_into_a_foreign_folder_is_refused_before_classifying(tiny, tmp_path):
    from batchwbc.cli import main

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, ["run", str(SAMPLES), "--out", str(tmp_path / "r.xlsx"), "--model", str(tiny),
                                  "--workers", "0", "--html", str(foreign)], catch_exceptions=False)
    assert r.exit_code == exit_codes.USAGE
    assert "not a batchwbc gallery" in r.stderr and "found" not in r.stderr  # nothing was even discovered
    assert not (tmp_path / "r.xlsx").exists()


def test_interrupt_while_writing_the_gallery_keeps_the_workbook_and_the_old_gallery(tiny, tmp_path, monkeypatch):
    from batchwbc.cli import main

    out, xlsx = tmp_path / "gallery", tmp_path / "r.xlsx"
    args = ["run", str(SAMPLES), "--out", str(xlsx), "--model", str(tiny), "--workers", "0", "--html", str(out)]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == exit_codes.OK
    before = (out / "index.html").read_bytes()
    xlsx.unlink()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gallery, "render_index", interrupted)
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == exit_codes.INTERRUPTED
    assert "while writing the HTML gallery; the report was written; the previous HTML gallery is untouched" in r.stderr
    assert xlsx.is_file() and (out / "index.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".gallery")) == []


def test_run_help_lists_html():
    from batchwbc.cli import main

    assert "--html" in CliRunner().invoke(main, ["run", "--help"]).output


# ------------------------------------------------------------------ a real browser

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium/chrome on PATH (.ci/run installs Debian's chromium); the browser test needs one")


def _browser(args: list[str], page: Path, tmp: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})


def test_headless_browser_shows_every_cell_and_the_script_name_as_text(built, tmp_path):
    out, patients, cells_by, _, _ = built
    index = _browser(["--dump-dom"], out / "index.html", tmp_path)
    assert index.returncode == 0, index.stderr[-2000:]
    dom = parse(index.stdout)
    assert "script" not in {t for t, _ in dom.tags}  # the hostile name did not become an element
    assert SCRIPT in "".join(dom.text)  # ...it is shown as text
    links = [a["href"] for t, a in dom.tags if t == "a"]
    assert links == [gallery.patient_page_name(i) for i in range(len(patients))]

    page = out / links[1]  # the hostile patient
    r = _browser(["--dump-dom"], page, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = parse(r.stdout)
    assert "script" not in {t for t, _ in dom.tags}
    files = sorted(a["data-file"] for t, a in dom.tags if t == "figure")
    assert files == sorted(c.file.replace("\x07", "\ufffd").replace("\udcff", "\ufffd") for c in cells_by[SCRIPT])
    h1 = r.stdout.split("<h1>")[1].split("</h1>")[0]
    assert html.unescape(h1) == SCRIPT


def test_headless_browser_screenshot_shows_the_thumbnails(built, tmp_path):
    """The CSP's img-src 'self' must still let file:// pages show their own thumbnails."""
    out = built[0]
    shot = tmp_path / "p1.png"
    r = _browser([f"--screenshot={shot}", "--window-size=1200,1600"], out / "patient-0001.html", tmp_path)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = cv2.imread(str(shot))
    b, g, rr = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    green = (g > 150) & (rr < 60) & (b < 60)  # the test crops are pure green
    assert green.sum() > 20 * 60 * 60, f"only {green.sum()} green pixels: thumbnails did not load"


def test_pending_review_flags_are_labelled_and_marked_as_such():
    from batchwbc.outputs import gallery
    from batchwbc.core.flags import REVIEW, WARNING, Flag

    pending = Flag("NRBC_PENDING_REVIEW", "NRBC: 1 possible erythroblast, pending review", REVIEW)
    html = gallery._flags_html([pending])
    assert "Pending review:</span>" in html and "sev-review" in html and "(NRBC_PENDING_REVIEW)" in html
    assert gallery._row_class([pending]) == ' class="review"'
    assert gallery._row_class([pending, Flag("IG_HIGH", "x", WARNING)]) == ' class="warning"'


def test_possible_critical_and_unreliable_flags_stand_out():
    """Issue 19: a possible critical finding and DATA_SHIFT each get their own loud label and row colour."""
    from batchwbc.outputs import gallery
    from batchwbc.core.flags import NOTE, POSSIBLE_CRITICAL, UNRELIABLE, WARNING, Flag

    possible = Flag("BLASTS_HIGH_PENDING_REVIEW", "Blasts: possibly 33.7%", POSSIBLE_CRITICAL)
    shift = Flag("DATA_SHIFT", "Data shift: 80% of cells unlike", UNRELIABLE)
    html = gallery._flags_html([possible, shift, Flag("LOW_WBC", "Only 50 WBC", NOTE)])
    assert "Possible critical, pending review:</span>" in html and "sev-possible_critical" in html
    assert "Results unreliable:</span>" in html and "sev-unreliable" in html
    assert ".sev-possible_critical{" in gallery._CSS and "tr.unreliable td:first-child" in gallery._CSS
    assert gallery._row_class([Flag("IG_HIGH", "x", WARNING), possible]) == ' class="possible_critical"'


def test_index_opens_with_the_unreliable_results_banner(tmp_path):
    """Issue 19: the whole-run DATA_SHIFT verdict was only on the Run sheet; the gallery index
    now opens with it, in plain words, with the next step."""
    from dataclasses import replace

    patients, cells_by, summaries = _small(tmp_path)
    plain = gallery.render_index(patients, cells_by, summaries, _info())
    assert 'class="alert"' not in plain
    alert = "Results unreliable: 80% of this run's cells are unlike ... see docs/adaptation.md."
    index = gallery.render_index(patients, cells_by, summaries, replace(_info(), alert=alert))
    assert index.index('class="alert"') < index.index("<table>")
    assert html.escape(alert) in index


def test_confidence_is_rounded_the_way_the_threshold_compares():
    """Issue 19: a cell at 0.7969 showed "REVIEW 0.80" beside a non-review "0.80"."""
    assert gallery.confidence_text(0.7969) == "0.79"
    assert gallery.confidence_text(0.80) == "0.80" and gallery.confidence_text(0.29) == "0.29"
    assert gallery.confidence_text(1.0) == "1.00" and gallery.confidence_text(0.0) == "0.00"
    cell = CellResult("P", "P/a.png", "lymphocyte", 0.7969, "monocyte", 0.1, True)
    assert "0.80" not in gallery._cell_html(cell, set(), 0.8)


def test_patient_names_do_not_wrap_mid_word():
    """Issue 19: patient names broke mid-word (overflow-wrap:anywhere)."""
    rule = re.search(r"td\.name\{([^}]*)\}", gallery._CSS).group(1)
    assert "anywhere" not in rule and "break-word" in rule
