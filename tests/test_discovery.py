"""Discovery edge cases: what a lab's export folders really look like."""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from batchwbc.inputs import slide_folders
from batchwbc.inputs.slide_folders import DiscoveryError, discover, natural_key
from batchwbc.core.records import ROOT_GROUP

posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX symlinks / FIFOs")


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def rels(found) -> list[str]:
    return [c.rel for c in found.crops]


def test_patients_are_first_level_folders_in_natural_order_with_empty_ones(tmp_path):
    for name in ("P10", "P2", "p1", "Empty"):
        (tmp_path / name).mkdir()
    touch(tmp_path / "P10" / "a.jpg")
    touch(tmp_path / "P2" / "deep" / "er" / "b.png")
    touch(tmp_path / "p1" / "c.tif")
    found = discover(tmp_path)
    assert found.patients == ["Empty", "p1", "P2", "P10"]
    assert Counter(c.patient for c in found.crops) == {"P10": 1, "P2": 1, "p1": 1}
    assert "Empty" in found.patients and Counter(c.patient for c in found.crops)["Empty"] == 0
    assert rels(found) == ["p1/c.tif", "P2/deep/er/b.png", "P10/a.jpg"]
    assert found.errors == []


def test_extensions_in_any_case_and_ignored_files_are_counted(tmp_path):
    names = ["a.JPG", "b.Jpeg", "c.PNG", "d.tiff", "e.TIF", "f.bmp", "g.jpeg"]
    for n in names:
        touch(tmp_path / "P" / n)
    touch(tmp_path / "P" / "notes.txt")
    touch(tmp_path / "P" / "Thumbs.db")
    touch(tmp_path / "P" / ".hidden.jpg")
    touch(tmp_path / "P" / ".cache" / "x.jpg")  # hidden folder: skipped whole, counted once
    touch(tmp_path / ".DS_Store")
    found = discover(tmp_path)
    assert sorted(Path(r).name for r in rels(found)) == sorted(names)
    assert found.ignored[slide_folders.IGNORED_NOT_IMAGE] == 2
    assert found.ignored[slide_folders.IGNORED_HIDDEN] == 3
    assert found.ignored_total == 5


def test_files_directly_under_root_form_their_own_group_first(tmp_path):
    touch(tmp_path / "loose.jpg")
    touch(tmp_path / "A" / "a.jpg")
    found = discover(tmp_path)
    assert found.patients == [ROOT_GROUP, "A"]
    root_crops = [c for c in found.crops if c.patient == ROOT_GROUP]
    assert [c.rel for c in root_crops] == ["loose.jpg"]
    assert Path(root_crops[0].path).is_absolute()


def test_no_root_group_without_root_images(tmp_path):
    touch(tmp_path / "A" / "a.jpg")
    touch(tmp_path / "readme.txt")
    assert discover(tmp_path).patients == ["A"]


@posix_only
def test_symlink_loops_terminate_and_are_counted(tmp_path):
    touch(tmp_path / "A" / "sub" / "a.jpg")
    os.symlink(tmp_path / "A", tmp_path / "A" / "sub" / "up")  # loop to the patient folder
    os.symlink(tmp_path, tmp_path / "A" / "to_root")  # loop to the slides root
    os.symlink(".", tmp_path / "A" / "sub" / "self")  # loop to itself
    os.symlink(tmp_path, tmp_path / "rootlink")  # a "patient" that is the root again
    found = discover(tmp_path)
    assert rels(found) == ["A/sub/a.jpg"]
    assert found.patients == ["A"]
    assert found.ignored[slide_folders.IGNORED_REPEATED_FOLDER] == 4


@posix_only
def test_linked_patient_folder_and_linked_files_are_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere / "x.jpg")
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(elsewhere, slides / "P1")
    touch(slides / "P2" / "real.png")
    os.symlink(elsewhere / "x.jpg", slides / "P2" / "link.jpg")
    found = discover(slides)
    assert rels(found) == ["P1/x.jpg", "P2/link.jpg", "P2/real.png"]


@posix_only
def test_broken_link_is_an_error_row_and_fifo_is_skipped(tmp_path):
    (tmp_path / "P").mkdir()
    os.symlink(tmp_path / "missing.jpg", tmp_path / "P" / "gone.jpg")
    os.mkfifo(tmp_path / "P" / "pipe.jpg")  # opening it would block forever
    touch(tmp_path / "P" / "ok.jpg")
    found = discover(tmp_path)
    assert rels(found) == ["P/ok.jpg"]
    assert [(e.patient, e.file) for e in found.errors] == [("P", "P/gone.jpg")]
    assert "does not exist" in found.errors[0].reason
    assert found.ignored[slide_folders.IGNORED_NOT_REGULAR] == 1


def _remove_chain(top: Path) -> None:
    """Delete a d/d/d/... chain bottom-up without recursion (shutil.rmtree in Python 3.11
    recurses per level and would fail on it, breaking pytest's tmp cleanup for everyone)."""
    cwd = os.getcwd()
    os.chdir(top)
    depth = 0
    try:
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.unlink(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(cwd)


def test_deep_nesting_does_not_hit_the_recursion_limit(tmp_path):
    depth = sys.getrecursionlimit() + 50
    d = tmp_path / "P"
    d.mkdir()
    cwd = os.getcwd()
    try:
        os.chdir(d)  # build with short relative paths, so no single mkdir path gets too long
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
        Path("deep.jpg").write_bytes(b"x")
        os.chdir(cwd)
        found = discover(tmp_path)
    finally:
        os.chdir(cwd)
        _remove_chain(d)
    # Either found, or (on a platform with a path limit) reported - but never a crash.
    assert [Path(r).name for r in rels(found)] == ["deep.jpg"] or found.errors


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_unreadable_patient_folder_is_a_whole_patient_error(tmp_path):
    touch(tmp_path / "A" / "a.jpg")
    locked = tmp_path / "B"
    touch(locked / "b.jpg")
    locked.chmod(0)
    try:
        found = discover(tmp_path)
    finally:
        locked.chmod(0o755)
    assert rels(found) == ["A/a.jpg"]
    assert found.patients == ["A", "B"]
    assert [(e.patient, e.file) for e in found.errors] == [("B", "")]


def test_walk_is_deterministic(tmp_path):
    for i in range(30):
        touch(tmp_path / f"P{i % 4}" / f"s{i % 3}" / f"c{i}.jpg")
    a, b = discover(tmp_path), discover(tmp_path)
    assert rels(a) == rels(b) and a.patients == b.patients
    # files of a folder come before its subfolders, and c2 before c10 within a folder
    p0 = [r for r in rels(a) if r.startswith("P0/")]
    assert p0 == sorted(p0, key=lambda r: (r.count("/"), natural_key(r)))


def test_natural_key_orders_numbers_numerically():
    assert sorted(["S10", "S9", "s1", "S100"], key=natural_key) == ["s1", "S9", "S10", "S100"]


def test_missing_root_or_file_root_is_one_sentence(tmp_path):
    with pytest.raises(DiscoveryError, match="does not exist"):
        discover(tmp_path / "nope")
    f = touch(tmp_path / "file.jpg")
    with pytest.raises(DiscoveryError, match="not a folder"):
        discover(f)
