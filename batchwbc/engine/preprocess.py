"""The one preprocessing contract shared by training, export parity checks and the runtime.

Training decodes its dataset through exactly these functions and the runtime calls them
for every crop, so a model never sees pixels prepared differently from how it was trained.
Normalisation is *not* here: it lives inside the ONNX graph, so the runtime only has to
produce uint8 RGB squares.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable

import numpy as np

#: Refuse images above this many pixels before decoding them (decompression-bomb guard).
#: 40 MP is ~16x the largest single-cell crop an analyzer exports (a 400x400 crop is 0.16 MP)
#: and keeps a decoded RGB frame under ~120 MB, so a worker can never be pushed into swap.
DEFAULT_MAX_PIXELS = 40_000_000

# OpenCV's own decoder limit (read by imdecode): a second guard for formats the header probe
# cannot identify. It must be set before cv2 is first imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
# Damaged files are reported as UnreadableImage with a reason; OpenCV's own "[ WARN ...]" lines
# about them would only clutter the nightly log.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")

#: Preprocessing contracts this runtime can feed; the id is stored in the ONNX metadata and
#: the runtime refuses a model expecting any other (ADR 0001, ADR 0005).
PREPROCESSING_WHOLE = "batchwbc-rgb-uint8-area-v1"
PREPROCESSING_CELL = "batchwbc-rgb-uint8-cellcrop-v2"
#: What new models are trained with.
PREPROCESSING_ID = PREPROCESSING_CELL
_COMMON = (
    "Decode with OpenCV (EXIF orientation applied; grey, 16-bit, RGBA and CMYK converted to "
    "8-bit colour), convert BGR to RGB, "
)
PREPROCESSING_DESCRIPTIONS = {
    PREPROCESSING_WHOLE: _COMMON + "resize the whole crop to SxS with INTER_AREA "
    "(no crop, no padding), uint8 NHWC; scaling/normalisation is inside the model graph.",
    PREPROCESSING_CELL: _COMMON + "find the stained cell nearest the centre (Otsu threshold on "
    "blue minus green at 96 px), cut a square 1.8x the cell's larger side around it (at least "
    "0.35 of the crop's short side, at most all of it, shifted to stay inside; the whole crop "
    "when no cell is found), resize it to SxS with INTER_AREA, uint8 NHWC; "
    "scaling/normalisation is inside the model graph.",
}
PREPROCESSING_DESCRIPTION = PREPROCESSING_DESCRIPTIONS[PREPROCESSING_ID]

#: Cell-centred framing (v2): square side as a multiple of the cell's bounding box, and the
#: smallest square as a fraction of the crop's short side (platelets are ~0.1 of it).
CELL_MARGIN = 1.8
CELL_MIN_FRACTION = 0.35
_WORK_EDGE = 96

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"})


class UnreadableImage(Exception):
    """An image that cannot be classified; str(exc) is a reason a technologist understands."""


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def read_bytes(path: str | os.PathLike) -> bytes:
    """Read a file whole; np.fromfile-style reading also works for non-ASCII paths on Windows."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise UnreadableImage("file disappeared before it could be read") from None
    except IsADirectoryError:
        raise UnreadableImage("not a file") from None
    except PermissionError:
        raise UnreadableImage("permission denied when reading the file") from None
    except OSError as exc:
        raise UnreadableImage(f"file could not be read ({exc.strerror or exc})") from None


#: probe_size's answer for an image Pillow itself refuses as a bomb (its real size is not reported).
FAR_TOO_LARGE = (1 << 20, 1 << 20)


def probe_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone (no pixel allocation), or None if unidentifiable."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Our own, stricter limit decides; Pillow's warning would only be log noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return int(im.size[0]), int(im.size[1])
    except Image.DecompressionBombError:
        # Pillow refuses before reading the size back to us; treat as far too large.
        return FAR_TOO_LARGE
    except Exception:  # noqa: BLE001 - any parser failure just means "let OpenCV decide"
        return None


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to an HxWx3 uint8 RGB array, or raise UnreadableImage."""
    import cv2

    return cv2.cvtColor(decode_bgr(data, max_pixels), cv2.COLOR_BGR2RGB)


def decode_bgr(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """decode_rgb in OpenCV's own channel order: the runtime frames and resizes in BGR and
    converts only the small model input, which spares a full-size colour conversion per crop
    (the result is bit-identical: resizing treats each channel alike)."""
    import cv2

    if len(data) == 0:
        raise UnreadableImage("empty file (0 bytes)")
    size = probe_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        dims = "far larger than" if size == FAR_TOO_LARGE else f"{size[0]}x{size[1]} pixels, above"
        raise UnreadableImage(f"image is {dims} the {max_pixels:,}-pixel safety limit for single-cell crops")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.size == 0:
        if size is None:
            raise UnreadableImage("not a readable image (unknown format or damaged file)")
        raise UnreadableImage("image data is damaged or truncated and could not be decoded")
    if bgr.ndim == 2:
        bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
    if bgr.dtype != np.uint8:  # defensive: IMREAD_COLOR already yields 8 bit
        bgr = cv2.convertScaleAbs(bgr, alpha=255.0 / max(1.0, float(bgr.max())))
    return bgr


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the whole crop to size x size (INTER_AREA), keeping uint8 RGB."""
    import cv2

    if rgb.shape[0] == size and rgb.shape[1] == size:
        return np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if (h >= size and w >= size) else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp)


def cell_square(rgb: np.ndarray, margin: float = CELL_MARGIN, bgr: bool = False) -> tuple[int, int, int] | None:
    """(x0, y0, side) of the square that frames the cell, or None when no cell stands out.
    `bgr=True` reads the image in OpenCV's channel order (the runtime's decode_bgr).

    `margin` is the square's side as a multiple of the cell's larger side; the contract's
    value is the default, and only experiments (`python -m train.experiments margin`) pass
    another, as an argument rather than by patching the module constant, so it holds in any
    thread or worker process.

    Why: exported crops frame the cell differently per analyzer (a Barcelona cell fills ~40 %
    of its crop, a Munich one ~55 %), so a whole-crop resize both wastes most input pixels on
    background and lets a model learn the scanner's magnification instead of the cell
    (docs/model-card.md, shortcut probe). Framing every cell the same way fixes both.
    May-Gruenwald-Giemsa nuclei and cytoplasm are bluer than they are green, red cells and
    background are not, so Otsu on (B - G) separates leukocytes on both scanners.
    """
    import cv2

    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        return None
    scale = _WORK_EDGE / max(h, w)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    blue = 0 if bgr else 2
    bg = cv2.subtract(small[..., blue], small[..., 1])  # saturating uint8 B - G
    if int(bg.max()) - int(bg.min()) < 12:  # flat image: nothing to find
        return None
    _, mask = cv2.threshold(bg, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    kernel = np.ones((3, 3), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    min_area = max(4, int(0.002 * sw * sh))
    cx, cy = sw / 2.0, sh / 2.0
    best, best_key = None, None
    for k in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[k])
        if area < min_area or area > 0.9 * sw * sh:
            continue
        covers_centre = x <= cx <= x + bw and y <= cy <= y + bh
        dist = float(np.hypot(centroids[k][0] - cx, centroids[k][1] - cy))
        key = (0 if covers_centre else 1, -area if covers_centre else dist)
        if best_key is None or key < best_key:
            best, best_key = k, key
    if best is None:
        return None
    x, y, bw, bh, _ = (int(v) for v in stats[best])
    # back to full resolution
    bx0, by0 = x / scale, y / scale
    bx1, by1 = (x + bw) / scale, (y + bh) / scale
    short = min(h, w)
    side = int(round(min(short, max(CELL_MIN_FRACTION * short, margin * max(bx1 - bx0, by1 - by0)))))
    x0 = int(round((bx0 + bx1) / 2 - side / 2))
    y0 = int(round((by0 + by1) / 2 - side / 2))
    x0 = min(max(0, x0), w - side)
    y0 = min(max(0, y0), h - side)
    return x0, y0, side


def to_model_input(
    rgb: np.ndarray, size: int, preprocessing: str = PREPROCESSING_ID, margin: float = CELL_MARGIN
) -> np.ndarray:
    """Decoded RGB -> size x size model input under the named contract (pure); `margin` as in
    cell_square (ignored by the whole-crop contract)."""
    return _frame(rgb, size, preprocessing, margin, bgr=False)


def bgr_to_model_input(
    bgr: np.ndarray, size: int, preprocessing: str = PREPROCESSING_ID, margin: float = CELL_MARGIN
) -> np.ndarray:
    """to_model_input for an image in OpenCV's BGR order (decode_bgr): frames and resizes in BGR
    and converts only the size x size result to RGB. Same pixels as
    `to_model_input(decode_rgb(...))` (tests/test_preprocess.py holds it on real crops), at one
    full-size colour conversion less per crop."""
    import cv2

    return cv2.cvtColor(_frame(bgr, size, preprocessing, margin, bgr=True), cv2.COLOR_BGR2RGB)


def _frame(img: np.ndarray, size: int, preprocessing: str, margin: float, bgr: bool) -> np.ndarray:
    """Framing and resizing, in whichever channel order `img` has (`bgr` says which)."""
    if preprocessing == PREPROCESSING_WHOLE:
        return resize_square(img, size)
    if preprocessing == PREPROCESSING_CELL:
        box = cell_square(img, margin, bgr=bgr)
        if box is None:
            return resize_square(img, size)
        x0, y0, side = box
        return resize_square(np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side]), size)
    raise ValueError(f"unknown preprocessing {preprocessing!r}")


def prepare_bytes(
    data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, preprocessing: str = PREPROCESSING_ID,
    check: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """Encoded bytes -> model input (size x size x 3 uint8 RGB).

    `check` sees the decoded image (HxWx3 uint8, BGR order) before framing and may raise
    UnreadableImage: the runtime refuses images that cannot be a cell crop by their shape
    (batchwbc.engine.crop_checks); training passes none.
    """
    bgr = decode_bgr(data, max_pixels)
    if check is not None:
        check(bgr)
    return bgr_to_model_input(bgr, size, preprocessing)


def prepare_file(
    path: str | os.PathLike, size: int, max_pixels: int = DEFAULT_MAX_PIXELS, preprocessing: str = PREPROCESSING_ID,
    check: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """A crop on disk -> model input; the function both training and runtime call."""
    return prepare_bytes(read_bytes(path), size, max_pixels, preprocessing, check)
