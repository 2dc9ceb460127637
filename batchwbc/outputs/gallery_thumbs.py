"""Small JPEG thumbnails of the original crops, for the HTML gallery.

Names are derived from a hash of (patient, file), never from the file name itself, so a
hostile or non-ASCII name can neither break a URL nor escape the thumbs/ folder, and the
same cell gets the same name on every run. The original crop is read whole in Python
(`open()` works with any path, where `cv2.imread` fails on non-ASCII Windows paths) and
decoded by preprocess.decode_rgb, so the decompression-bomb guard of the run applies here too.

Cost: one decode + resize + encode per cell: 3.7 ms per 360x363 PBC crop on one thread, 2.6 ms
with two, on a loaded 2-core machine (docs/report.md), i.e. about 2-3 minutes for 50,000 cells.
OpenCV releases the GIL, so a few threads share the work without the start-up cost or the
pickling of a process pool.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Sequence

#: Longest side of a gallery thumbnail in pixels, and its JPEG quality: ~3 kB each.
EDGE = 96
QUALITY = 80
THUMBS_DIR = "thumbs"


@dataclass(frozen=True)
class ThumbJob:
    """One thumbnail to make: from the crop at `source` (or `fallback_jpeg`) into `name`."""

    name: str  # file name inside thumbs/, from thumbnail_name()
    source: Path | None  # the original crop; None when its path is unsafe or unknown
    fallback_jpeg: bytes | None = None  # e.g. the run's review thumbnail, used if the crop is unreadable


def thumbnail_name(patient: str, file: str) -> str:
    """A safe, stable file name for one cell's thumbnail: 24 hex digits of SHA-256 + .jpg."""
    key = f"{patient}\0{file}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(key).hexdigest()[:24] + ".jpg"


def crop_path(root: Path | None, rel: str) -> Path | None:
    """`root/rel` when `rel` is a plain relative path, else None (no '..', no absolute path or drive)."""
    if root is None or not rel:
        return None
    posix, windows = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        return None
    return Path(root).joinpath(*posix.parts)


def _encode(rgb, edge: int, quality: int) -> bytes:
    import cv2

    h, w = rgb.shape[:2]
    scale = edge / max(h, w)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def render(job: ThumbJob, edge: int = EDGE, quality: int = QUALITY) -> bytes | None:
    """The thumbnail's JPEG bytes, or None when neither the crop nor the fallback can be read."""
    from batchwbc.engine.preprocess import UnreadableImage, decode_rgb, read_bytes

    for data in _sources(job, read_bytes, UnreadableImage):
        try:
            return _encode(decode_rgb(data), edge, quality)
        except UnreadableImage:
            continue
        except Exception:  # noqa: BLE001 - any decoder failure only costs this cell its picture
            continue
    return None


def _sources(job: ThumbJob, read_bytes, unreadable) -> Iterable[bytes]:
    if job.source is not None:
        try:
            yield read_bytes(job.source)
        except unreadable:
            pass
    if job.fallback_jpeg:
        yield job.fallback_jpeg


def _write_one(job: ThumbJob, folder: Path) -> bool:
    jpeg = render(job)
    if jpeg is None:
        return False
    with open(folder / job.name, "wb") as fh:
        fh.write(jpeg)
    return True


def write_thumbnails(jobs: Sequence[ThumbJob], folder: Path, threads: int | None = None) -> set[str]:
    """Write every job's thumbnail into `folder`; return the names written (the rest get a placeholder).

    An interrupt (Ctrl-C, SIGTERM turned into an exception) cancels the jobs not yet started
    instead of waiting for all of them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    n = threads if threads is not None else min(4, os.cpu_count() or 1)
    if n <= 1 or len(jobs) < 2:
        return {j.name for j in jobs if _write_one(j, folder)}
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="thumbs")
    try:
        done = pool.map(lambda j: (j.name, _write_one(j, folder)), jobs)
        return {name for name, ok in done if ok}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
