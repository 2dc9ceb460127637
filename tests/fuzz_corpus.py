"""A hostile slides folder: every kind of bad input a lab PC's export folder can hold.

`build_corpus(root)` writes it (small: well under 1 MB, built in about a second) and returns
a manifest saying what a correct run must do with each file - classify it, report it in
Errors, or ignore it - and which patient groups the report must list. Valid images are
filled with a solid colour from `tinymodel.colour_for`, so where the format keeps colours
exactly the manifest also knows the class the tiny model must predict.

Huge images are *crafted*, never allocated: the PNG bombs are 1-bit images of zeros (a
20000x20000 one is ~50 KB on disk and would decode to 1.2 GB of BGR), the JPEG and BMP ones
are small real files whose header dimensions are patched.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import tinymodel
from batchwbc.core.records import ROOT_GROUP

CLASSIFY = "classify"
ERROR = "error"
IGNORE = "ignore"

# Patient folder names a spreadsheet would execute if written as formulas.
_HYPERLINK = '=HYPERLINK("evil.example","click")' if sys.platform != "win32" else "=HYPERLINK(1)"
FORMULA_PATIENTS = (_HYPERLINK, "+SUM(1,2)", "-2+3", "@cmd")
UNICODE_PATIENT = "Zoë Müller 患者 №7"


@dataclass(frozen=True)
class CorpusCase:
    rel: str  # POSIX path relative to the slides root
    patient: str
    expect: str  # CLASSIFY | ERROR | IGNORE
    note: str  # what the case exercises
    class_id: str | None = None  # the class the tiny model must predict, when the colour survives
    bomb: bool = False  # refused by the pixel limit (the reason must say so)
    shape: bool = False  # refused as too small or too elongated to be a cell crop
    greyscale: bool = False  # classified, but always sent to review as greyscale


@dataclass
class CorpusManifest:
    root: Path
    cases: list[CorpusCase] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)  # every group the report must list, empty ones too
    empty_patients: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # cases this platform could not create (e.g. symlinks)

    def of(self, expect: str) -> list[CorpusCase]:
        return [c for c in self.cases if c.expect == expect]

    def case(self, rel: str) -> CorpusCase:
        return next(c for c in self.cases if c.rel == rel)


# -- encoders -----------------------------------------------------------------------------
def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def _pil_bytes(arr_or_img, fmt: str, **kw) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr_or_img) if isinstance(arr_or_img, np.ndarray) else arr_or_img
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cv_bytes(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    import cv2

    ok, enc = cv2.imencode(ext, arr, params or [])
    assert ok, ext
    return enc.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A genuine, fully valid 1-bit greyscale PNG of zeros: tiny on disk, huge once decoded.
    Compressed row by row, so building it never holds the image in memory either."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 256) for _ in range(height // 256)]
    parts.append(comp.compress(row * (height % 256)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


def jpeg_with_header_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 frame header is patched to claim width x height."""
    data = bytearray(_pil_bytes(_solid(16, 16, (200, 100, 50)), "JPEG", quality=90))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def bmp_with_header_size(width: int, height: int) -> bytes:
    """A real small BMP whose BITMAPINFOHEADER is patched to claim width x height."""
    data = bytearray(_pil_bytes(_solid(4, 4, (10, 20, 30)), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def cmyk_jpeg(rgb: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image

    return _pil_bytes(Image.new("RGB", (size, size), rgb).convert("CMYK"), "JPEG", quality=90)


def tiff16(rgb: tuple[int, int, int], size: int = 40) -> bytes:
    bgr16 = (_solid(size, size, rgb)[:, :, ::-1].astype(np.uint16) * 257).astype(np.uint16)
    return _cv_bytes(".tif", bgr16)


def _noise_jpeg() -> bytes:
    arr = np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return _pil_bytes(arr, "JPEG", quality=90)


def cell_like(size: int = 96) -> np.ndarray:
    """A crop that looks like a stained smear: pinkish background, red cells, a purple
    leukocyte with a darker nucleus in the middle (RGB)."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (236, 220, 226)
    for cy, cx in ((0.2, 0.2), (0.8, 0.25), (0.25, 0.85), (0.85, 0.8)):
        img[(yy - cy * size) ** 2 + (xx - cx * size) ** 2 < (0.12 * size) ** 2] = (214, 150, 160)
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    img[r2 < (0.3 * size) ** 2] = (190, 160, 215)
    img[r2 < (0.18 * size) ** 2] = (95, 45, 140)
    return img


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB image (what a greyscale camera or export would keep)."""
    return (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)


def _noise_png() -> bytes:
    arr = np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return _pil_bytes(arr, "PNG")


# -- the corpus ---------------------------------------------------------------------------
def build_corpus(root: Path) -> CorpusManifest:
    """Write the hostile slides folder under `root` (created) and return its manifest."""
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    m = CorpusManifest(root=root)
    col = tinymodel.colour_for

    def add(rel: str, data: bytes | None, expect: str, note: str, class_id: str | None = None, bomb: bool = False,
            shape: bool = False, greyscale: bool = False) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        first = rel.split("/", 1)[0]
        patient = ROOT_GROUP if "/" not in rel else first
        m.cases.append(CorpusCase(rel, patient, expect, note, class_id, bomb, shape, greyscale))
        if patient not in m.patients:
            m.patients.append(patient)

    # Valid images in many encodings (patient "P001_formats").
    p = "P001_formats"
    add(f"{p}/neutrophil.jpg", _pil_bytes(_solid(48, 48, col("neutrophil_segmented")), "JPEG", quality=95), CLASSIFY, "plain JPEG", "neutrophil_segmented")
    add(f"{p}/lymph.png", _pil_bytes(_solid(40, 40, col("lymphocyte")), "PNG"), CLASSIFY, "plain PNG", "lymphocyte")
    grey = np.full((40, 40), 140, np.uint8)
    add(f"{p}/grey.png", _pil_bytes(grey, "PNG"), CLASSIFY, "8-bit greyscale PNG", greyscale=True)
    add(f"{p}/grey.jpg", _pil_bytes(grey, "JPEG", quality=90), CLASSIFY, "greyscale JPEG", greyscale=True)
    rgba = np.dstack([_solid(40, 40, col("myeloblast")), np.full((40, 40), 128, np.uint8)])
    add(f"{p}/rgba.png", _pil_bytes(rgba, "PNG"), CLASSIFY, "RGBA PNG (alpha dropped)", "myeloblast")
    add(f"{p}/palette.png", _pil_bytes(Image.new("RGB", (40, 40), col("platelet")).convert("P"), "PNG"), CLASSIFY, "palette PNG", "platelet")
    add(f"{p}/deep16.tif", tiff16(col("promyelocyte")), CLASSIFY, "16-bit RGB TIFF", "promyelocyte")
    add(f"{p}/grey16.png", _cv_bytes(".png", np.full((40, 40), 30000, np.uint16)), CLASSIFY, "16-bit greyscale PNG", greyscale=True)
    add(f"{p}/cmyk.jpg", cmyk_jpeg(col("erythroblast")), CLASSIFY, "CMYK JPEG", "erythroblast")
    add(f"{p}/bitmap.bmp", _pil_bytes(_solid(40, 40, col("myelocyte")), "BMP"), CLASSIFY, "BMP", "myelocyte")
    add(f"{p}/UPPER.JPG", _pil_bytes(_solid(40, 40, col("metamyelocyte")), "JPEG", quality=95), CLASSIFY, "upper-case .JPG", "metamyelocyte")
    add(f"{p}/Mixed.Png", _pil_bytes(_solid(40, 40, col("neutrophil_band")), "PNG"), CLASSIFY, "mixed-case .Png", "neutrophil_band")
    add(f"{p}/UPPER.TIFF", _cv_bytes(".tif", _solid(40, 40, col("lymphocyte"))[:, :, ::-1]), CLASSIFY, "upper-case .TIFF", "lymphocyte")
    add(f"{p}/q1.jpeg", _pil_bytes(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG", quality=1), CLASSIFY, "JPEG quality 1 (its chroma is quantised away: greyscale)", greyscale=True)
    add(f"{p}/noise.jpg", _noise_jpeg(), CLASSIFY, "textured JPEG")
    add(f"{p}/=1+1.png", _pil_bytes(_solid(40, 40, col("monocyte")), "PNG"), CLASSIFY, "formula-looking file name", "monocyte")
    add(f"{p}/name with spaces & ümlaut #1.png", _pil_bytes(_solid(40, 40, col("monocyte")), "PNG"), CLASSIFY, "spaces, unicode and # in a file name", "monocyte")
    if sys.platform != "win32":
        add(f"{p}/ctrl\x1bchar\x07.png", _pil_bytes(_solid(40, 40, col("monocyte")), "PNG"), CLASSIFY, "control characters in a file name (illegal in XLSX cells)", "monocyte")
    add(f"{p}/big_allowed.png", _pil_bytes(_solid(2500, 2500, col("basophil")), "PNG"), CLASSIFY, "6 MP image, under the pixel limit", "basophil")

    # Not a cell crop: too small or a strip (patient "P008_shapes"), Errors with a reason, never counted.
    g = "P008_shapes"
    add(f"{g}/one_pixel.png", _pil_bytes(_solid(1, 1, col("monocyte")), "PNG"), ERROR, "1x1 image", shape=True)
    add(f"{g}/tiny_8.jpg", _pil_bytes(_solid(8, 8, col("monocyte")), "JPEG", quality=95), ERROR, "8x8 JPEG", shape=True)
    add(f"{g}/w31.png", _pil_bytes(_solid(40, 31, col("monocyte")), "PNG"), ERROR, "31 px wide, one under the limit", shape=True)
    add(f"{g}/min32.png", _pil_bytes(_solid(32, 32, col("monocyte")), "PNG"), CLASSIFY, "32x32, the smallest accepted", "monocyte")
    add(f"{g}/strip_8000x3.png", _pil_bytes(_solid(3, 8000, col("platelet")), "PNG"), ERROR, "8000x3 strip", shape=True)
    add(f"{g}/tall.png", _pil_bytes(_solid(3000, 1, col("eosinophil")), "PNG"), ERROR, "1x3000 strip", shape=True)
    add(f"{g}/wide.png", _pil_bytes(_solid(1, 3000, col("basophil")), "PNG"), ERROR, "3000x1 strip", shape=True)
    add(f"{g}/aspect_3.png", _pil_bytes(_solid(40, 120, col("basophil")), "PNG"), CLASSIFY, "120x40, the widest accepted", "basophil")
    add(f"{g}/aspect_over_3.png", _pil_bytes(_solid(40, 121, col("basophil")), "PNG"), ERROR, "121x40, just too elongated", shape=True)
    add(f"{g}/tall_over_3.bmp", _pil_bytes(_solid(200, 50, col("lymphocyte")), "BMP"), ERROR, "50x200 BMP", shape=True)

    # Greyscale copies of a real-looking crop (patient "P009_greyscale"): classified, always reviewed.
    cell = cell_like()
    gy = "P009_greyscale"
    add(f"{gy}/colour.png", _pil_bytes(cell, "PNG"), CLASSIFY, "stained-looking colour crop")
    add(f"{gy}/colour.jpg", _pil_bytes(cell, "JPEG", quality=85), CLASSIFY, "stained-looking colour crop, JPEG")
    add(f"{gy}/grey_L.png", _pil_bytes(grey_of(cell), "PNG"), CLASSIFY, "greyscale copy, single-channel PNG", greyscale=True)
    add(f"{gy}/grey_L.jpg", _pil_bytes(grey_of(cell), "JPEG", quality=85), CLASSIFY, "greyscale copy, single-channel JPEG", greyscale=True)
    grey3 = np.repeat(grey_of(cell)[:, :, None], 3, axis=2)
    add(f"{gy}/grey_rgb.jpg", _pil_bytes(grey3, "JPEG", quality=85), CLASSIFY, "greyscale copy saved as colour JPEG", greyscale=True)
    add(f"{gy}/grey_rgb.tif", _cv_bytes(".tif", grey3), CLASSIFY, "greyscale copy saved as colour TIFF", greyscale=True)
    add(f"{gy}/grey_rgb_q20.jpg", _cv_bytes(".jpg", grey3, [1, 20]), CLASSIFY, "greyscale copy, colour JPEG quality 20", greyscale=True)
    near = grey3.astype(np.int16) + np.random.default_rng(11).integers(-1, 2, grey3.shape)
    add(f"{gy}/grey_near.png", _pil_bytes(np.clip(near, 0, 255).astype(np.uint8), "PNG"), CLASSIFY, "greyscale copy with +-1 channel noise", greyscale=True)
    add(f"{gy}/grey16.tif", _cv_bytes(".tif", grey_of(cell).astype(np.uint16) * 257), CLASSIFY, "greyscale copy, 16-bit TIFF", greyscale=True)

    # Invalid files (patient "P002_broken").
    b = "P002_broken"
    add(f"{b}/empty.jpg", b"", ERROR, "zero-byte .jpg")
    add(f"{b}/empty.PNG", b"", ERROR, "zero-byte .PNG")
    nj, npg = _noise_jpeg(), _noise_png()
    add(f"{b}/truncated.jpg", nj[: len(nj) * 6 // 10], ERROR, "JPEG cut at 60 %")
    add(f"{b}/truncated.png", npg[: len(npg) * 6 // 10], ERROR, "PNG cut at 60 %")
    add(f"{b}/header_only.jpg", nj[:200], ERROR, "JPEG headers only")
    add(f"{b}/text.jpg", b"Patient notes: please re-stain slide 4.\n" * 20, ERROR, "text saved as .jpg")
    add(f"{b}/page.png", b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n", ERROR, "HTML saved as .png")
    add(f"{b}/garbage.bmp", bytes(np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8)), ERROR, "random bytes as .bmp")
    add(f"{b}/fake.tif", b"II*\x00" + b"\x00" * 60, ERROR, "TIFF magic with no image")
    bad_crc = bytearray(_pil_bytes(_solid(20, 20, (1, 2, 3)), "PNG"))
    bad_crc[29:33] = b"\x00\x00\x00\x00"  # IHDR CRC
    add(f"{b}/bad_crc.png", bytes(bad_crc), ERROR, "PNG with a corrupt header checksum")

    # Decompression bombs (patient "P003_bombs"): refused by the pixel limit without allocating.
    z = "P003_bombs"
    add(f"{z}/bomb_20000.png", png_bomb(20000, 20000), ERROR, "valid 20000x20000 PNG (1.2 GB decoded)", bomb=True)
    add(f"{z}/bomb_10000.png", png_bomb(10000, 10000), ERROR, "valid 10000x10000 PNG (Pillow only warns at this size)", bomb=True)
    add(f"{z}/over_limit_7000.png", png_bomb(7000, 7000), ERROR, "valid 7000x7000 PNG, just over the limit", bomb=True)
    add(f"{z}/bomb_header.jpg", jpeg_with_header_size(30000, 30000), ERROR, "JPEG header claiming 30000x30000", bomb=True)
    add(f"{z}/bomb_header.bmp", bmp_with_header_size(25000, 25000), ERROR, "BMP header claiming 25000x25000", bomb=True)
    add(f"{z}/ok.png", _pil_bytes(_solid(40, 40, col("lymphocyte")), "PNG"), CLASSIFY, "valid image next to bombs", "lymphocyte")

    # Hostile patient folder names.
    for name in FORMULA_PATIENTS + (UNICODE_PATIENT,):
        add(f"{name}/cell.png", _pil_bytes(_solid(40, 40, col("neutrophil_segmented")), "PNG"), CLASSIFY, f"patient folder {name!r}", "neutrophil_segmented")

    # Nesting: everything under a patient folder belongs to that patient.
    deep = "P004_deep/" + "/".join(f"level{i}" for i in range(12))
    add(f"{deep}/cell.png", _pil_bytes(_solid(40, 40, col("eosinophil")), "PNG"), CLASSIFY, "image 12 folders deep", "eosinophil")
    add("P004_deep/folder.jpg/inside.png", _pil_bytes(_solid(40, 40, col("eosinophil")), "PNG"), CLASSIFY, "folder whose name looks like an image", "eosinophil")

    # An image directly under the slides root.
    add("loose_cell.png", _pil_bytes(_solid(40, 40, col("lymphocyte")), "PNG"), CLASSIFY, "image directly under the root", "lymphocyte")

    # Files that are not crops: ignored, never errors.
    add("P001_formats/notes.txt", b"not an image", IGNORE, "non-image file")
    add("P001_formats/Thumbs.db", b"\x00" * 100, IGNORE, "Windows thumbnail cache")
    add("P001_formats/.DS_Store", b"\x00" * 100, IGNORE, "macOS folder metadata")
    add("P001_formats/._neutrophil.jpg", b"\x00\x05\x16\x07" + b"\x00" * 80, IGNORE, "macOS AppleDouble file (hidden)")

    # Empty patients: listed with zero cells.
    for name in ("P005_empty", "P006_only_notes"):
        (root / name).mkdir()
        m.patients.append(name)
        m.empty_patients.append(name)
    (root / "P006_only_notes" / "readme.txt").write_text("nothing here")
    m.cases.append(CorpusCase("P006_only_notes/readme.txt", "P006_only_notes", IGNORE, "non-image file"))

    # Symlinks: loops must not hang discovery, broken links are reported.
    s = "P007_links"
    add(f"{s}/cell.png", _pil_bytes(_solid(40, 40, col("monocyte")), "PNG"), CLASSIFY, "real file next to links", "monocyte")
    try:
        os.symlink("..", root / s / "loop_to_parent", target_is_directory=True)
        os.symlink(".", root / s / "loop_to_self", target_is_directory=True)
        os.symlink("no_such_file.jpg", root / s / "dangling.jpg")
        os.symlink("ping.jpg", root / s / "pong.jpg")
        os.symlink("pong.jpg", root / s / "ping.jpg")
    except (OSError, NotImplementedError):
        m.skipped.append("symlinks")
    else:
        m.cases.append(CorpusCase(f"{s}/dangling.jpg", s, ERROR, "symlink to a missing file"))
        m.cases.append(CorpusCase(f"{s}/pong.jpg", s, ERROR, "symlink loop between two .jpg names"))
        m.cases.append(CorpusCase(f"{s}/ping.jpg", s, ERROR, "symlink loop between two .jpg names"))
    return m


if __name__ == "__main__":  # build a corpus by hand: python tests/fuzz_corpus.py /tmp/corpus
    import json

    out = build_corpus(Path(sys.argv[1] if len(sys.argv) > 1 else "fuzz-corpus"))
    print(json.dumps([c.__dict__ for c in out.cases], indent=1, ensure_ascii=False))


def large_crop_slides(base: Path, patients: int, per_patient: int, name: str = "P{:02d}") -> Path:
    """Slides of large crops (hard links to one 1600x1600 JPEG, copies where links fail): runs
    that take seconds, for interruption, concurrency and watchdog tests. Returns `base`."""
    yy, xx = np.mgrid[0:1600, 0:1600]
    img = np.dstack([(xx % 256), (yy % 256), ((xx + yy) % 256)]).astype(np.uint8)
    src = base.parent / "source.jpg"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(_pil_bytes(img, "JPEG", quality=90))
    for p in range(patients):
        d = base / name.format(p)
        d.mkdir(parents=True)
        for i in range(per_patient):
            try:
                os.link(src, d / f"c{i:03d}.jpg")
            except OSError:
                (d / f"c{i:03d}.jpg").write_bytes(src.read_bytes())
    return base

