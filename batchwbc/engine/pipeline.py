"""Decode crops in worker processes and classify them in batches, with flat memory.

Why it is built this way:

* Decoding (JPEG/TIFF + resize) is pure CPU work that the GIL would serialise, so it runs in
  a process pool; onnxruntime runs in the main process, batched, while the workers already
  decode the next files.
* Only a bounded window of tasks is ever in flight and the main process keeps one batch of
  arrays, so 50,000 crops need no more memory than 500. Per-cell results are a few small
  fields (a thumbnail only for cells that need review).
* The pool uses the "spawn" start method on every platform: it behaves as on Windows, and
  no child inherits onnxruntime's threads or locks from a fork.
* A worker that dies (a decoder crash, the OOM killer) breaks the whole pool; the files that
  were in flight are then retried one by one in a fresh single worker, so the culprit
  becomes an Errors row and the rest of the run completes. That pool is
  batchwbc.engine.worker_pool, shared with `batchwbc adapt` (embed.py).
"""
from __future__ import annotations

import logging
import os
import stat
import time
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

from batchwbc.engine.worker_pool import CRASH_REASON, PipelineError, run_isolated  # noqa: F401 - re-exported
from batchwbc.inputs.slide_folders import Crop
from batchwbc.core.records import THUMBNAIL_PX, CellResult, FileError
from batchwbc.core.thumbnail_quota import ThumbnailKeeper

if TYPE_CHECKING:  # heavy imports stay lazy so `batchwbc --help` is instant
    import numpy as np

    from batchwbc.engine.result_cache import ResultCache
    from batchwbc.engine.model import Classifier

log = logging.getLogger(__name__)

#: Measured on a 2-core PC with the bundled model (docs/performance.md): batch 4 gave end to end
#: 0.70-0.71 of the decode-only rate vs 0.68 at 16 and 0.67 at 32, and less memory (a small
#: model's activations stay in cache); with a MobileNetV3-Small stand-in 4 and 16 cost the same.
DEFAULT_BATCH_SIZE = 4
#: Files per worker task: amortises inter-process overhead while keeping crash retries cheap.
CHUNK_FILES = 8
#: Fallback review threshold when neither the user, the config nor the model sets one.
FALLBACK_REVIEW_THRESHOLD = 0.5



def default_workers() -> int:
    """All cores, as the issue asks; onnxruntime shares them (see docs/performance.md)."""
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------
# Worker side (module top level and picklable, as the spawn start method requires)
# ---------------------------------------------------------------------------------------

class Decoded(NamedTuple):
    """One file as a worker hands it back (a tuple, so it pickles and unpacks cheaply)."""

    array: "np.ndarray | None"  # the model input; None when the file could not be used
    reason: str | None  # why not, one sentence; None when decoded
    size: int  # bytes, for the result cache (0: unknown)
    mtime_ns: int




def decode_one(path: str, size: int, preprocessing: str | None = None) -> Decoded:
    """Read, decode and frame one crop as the model expects; never raises (the reason travels
    back instead)."""
    from batchwbc.engine.crop_checks import check_crop_shape
    from batchwbc.engine.preprocess import PREPROCESSING_ID, UnreadableImage, prepare_file

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Decoded(None, "file disappeared before it could be read", 0, 0)
    except OSError as exc:
        return Decoded(None, f"file could not be read ({exc.strerror or exc})", 0, 0)
    if not stat.S_ISREG(st.st_mode):
        # e.g. replaced by a FIFO after discovery: opening it would block forever
        return Decoded(None, "not a regular file", 0, 0)
    try:
        arr = prepare_file(path, size, preprocessing=preprocessing or PREPROCESSING_ID, check=check_crop_shape)
    except UnreadableImage as exc:
        return Decoded(None, str(exc), st.st_size, st.st_mtime_ns)
    except MemoryError:
        return Decoded(None, "image too large to decode in the available memory", st.st_size, st.st_mtime_ns)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one bad file, not a failed run
        return Decoded(None, f"image could not be decoded ({type(exc).__name__})", st.st_size, st.st_mtime_ns)
    return Decoded(arr, None, st.st_size, st.st_mtime_ns)


def decode_chunk(
    paths: list[str], size: int, decode: Callable[[str, int, str | None], Decoded] = decode_one, preprocessing: str | None = None
) -> list[Decoded]:
    return [decode(p, size, preprocessing) for p in paths]




# ---------------------------------------------------------------------------------------
# Main-process side
# ---------------------------------------------------------------------------------------

def make_thumbnail(rgb: "np.ndarray", edge: int = THUMBNAIL_PX) -> bytes:
    """JPEG (quality 90) of the model input, for the review sheet. JPEG rather than PNG:
    measured 0.10 vs 0.27 ms per thumbnail and 2.5 vs 11 kB, on a path that runs for every
    uncertain cell (a quarter of all cells with the v1 model)."""
    import cv2

    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if min(h, w) >= edge else cv2.INTER_LINEAR
    small = cv2.resize(rgb, (edge, edge), interpolation=interp)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:  # pragma: no cover - encoding a valid uint8 array does not fail
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def top_two(probs: "np.ndarray", classes: Sequence[str]) -> tuple[str, float, str, float]:
    """Winning class and runner-up with their probabilities (runner-up empty for 1 class)."""
    import numpy as np

    order = np.argsort(-probs, kind="stable")
    first = int(order[0])
    if len(order) > 1:
        second = int(order[1])
        return classes[first], float(probs[first]), classes[second], float(probs[second])
    return classes[first], float(probs[first]), "", 0.0


def cell_from_probs(
    crop: Crop, probs: "np.ndarray", classes: Sequence[str], review_threshold: float, thumbnail: bytes | None,
    image_reason: str = "", ood_score: float | None = None, unclassified: int = 0,
) -> CellResult:
    """`image_reason` sends the cell to review whatever its confidence (e.g. a greyscale crop). An
    unclassified crop (`unclassified` is the OOD verdict: ood.BY_EMBEDDING and/or ood.BY_COLOUR;
    True counts as BY_EMBEDDING) is labelled ood.UNCLASSIFIED, always reviewed with the verdict's
    reasons, and keeps the model's best class as its second class for the reviewer."""
    from batchwbc.engine.crop_checks import review_reasons
    from batchwbc.engine.ood import UNCLASSIFIED, reasons

    c1, p1, c2, p2 = top_two(probs, classes)
    score = None if ood_score is None else float(ood_score)
    if unclassified:
        reason = "; ".join(r for r in (*reasons(unclassified), image_reason) if r)
        return CellResult(crop.patient, crop.rel, UNCLASSIFIED, p1, c1, p1, True, thumbnail, reason, score)
    reason = review_reasons(p1, review_threshold, image_reason)
    review = bool(reason)
    return CellResult(crop.patient, crop.rel, c1, p1, c2, p2, review, thumbnail if review else None, reason, score)


@dataclass
class PipelineOutput:
    cells: list[CellResult]
    errors: list[FileError]
    decoded: int = 0  # files decoded by the workers this run
    cached: int = 0  # results taken from the cache
    pool_restarts: int = 0
    seconds: float = 0.0


class Pipeline:
    """One run over a list of crops. `done` counts finished files (classified, cached or
    failed) while it runs, so an interrupted run can say where it stopped."""

    def __init__(
        self,
        input_size: int,
        classifier: "Classifier | None" = None,
        review_threshold: float = FALLBACK_REVIEW_THRESHOLD,
        workers: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        cache: "ResultCache | None" = None,
        progress: Callable[[int], None] | None = None,
        decode: Callable[[str, int, str | None], Decoded] = decode_one,
        max_thumbnails: int | None = None,
        preprocessing: str | None = None,
    ):
        """classifier=None decodes only (the benchmark's baseline): same workers, same files.

        `decode` must be a module-level function (workers receive it by reference); tests
        swap in one that crashes to prove a dying worker does not end the run.

        `max_thumbnails` bounds memory on a night with very many review cells: only the
        thumbnails the report can embed are kept - each patient's fair share of the cap, lowest
        confidence first (batchwbc/core/thumbnail_quota.py) - whatever order cells finish in."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.input_size = int(input_size)
        self.classifier = classifier
        self.classes: tuple[str, ...] = tuple(classifier.info.classes) if classifier is not None else ()
        self._ood = getattr(classifier, "ood", None)  # the model's OOD reference, if any
        self.review_threshold = float(review_threshold)
        self.workers = default_workers() if workers is None else max(0, int(workers))
        self.batch_size = int(batch_size)
        self.cache = cache if classifier is not None else None
        self.progress = progress
        self.decode = decode
        # The model names the preprocessing it was trained with; the baseline (no model) uses the current one.
        self.preprocessing = preprocessing or (classifier.info.preprocessing if classifier is not None else None)
        self.done = 0
        self.total = 0
        self._cells: list[tuple[int, CellResult]] = []
        self.max_thumbnails = max_thumbnails
        self._thumbs: ThumbnailKeeper | None = None  # set in run(), when the patient order is known
        self._errors: list[tuple[int, FileError]] = []
        self._batch_items: list[tuple[int, Crop, int, int, str]] = []  # idx, crop, size, mtime_ns, image review reason
        self._batch: "np.ndarray | None" = None
        self._out = PipelineOutput([], [])

    # -- bookkeeping -------------------------------------------------------------------
    def _finished(self, n: int = 1) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(n)

    def _error(self, idx: int, crop: Crop, reason: str) -> None:
        self._errors.append((idx, FileError(crop.patient, crop.rel, reason)))
        self._finished()

    def _add_cell(self, idx: int, cell: CellResult) -> None:
        pos = len(self._cells)
        self._cells.append((idx, cell))
        if cell.thumbnail_jpeg is None or self._thumbs is None:
            return
        self._drop_thumbnails(self._thumbs.offer(cell.patient, cell.confidence, (idx,), pos))

    def _drop_thumbnails(self, positions: list) -> None:
        from dataclasses import replace

        for pos in positions:
            i, dropped = self._cells[pos]
            self._cells[pos] = (i, replace(dropped, thumbnail_jpeg=None))

    # -- cache -------------------------------------------------------------------------
    def _from_cache(self, idx: int, crop: Crop) -> bool:
        """Report a cached result if it reproduces a full run exactly; False -> decode it."""
        import numpy as np

        if self.cache is None:
            return False
        try:
            st = os.stat(crop.path)
        except OSError:
            return False  # the worker reports the error
        entry = self.cache.lookup(crop.path, st.st_size, st.st_mtime_ns)
        if entry is None or entry.probs.shape != (len(self.classes),) or not np.all(np.isfinite(entry.probs)):
            return False
        # The model's sha256 keys the cache and its OOD reference is inside the model file, so a
        # row has a score exactly when the model has a reference; anything else is recomputed.
        if (entry.ood_score is None) != (self._ood is None):
            return False
        cell = cell_from_probs(crop, entry.probs, self.classes, self.review_threshold, entry.thumbnail_jpeg,
                               entry.image_reason, entry.ood_score, entry.unclassified)
        if cell.review and entry.thumbnail_jpeg is None:
            return False  # needs review now (other threshold) but no thumbnail was kept: redo it
        self._add_cell(idx, cell)
        self._out.cached += 1
        self._finished()
        return True

    # -- batching ----------------------------------------------------------------------
    def _accept(self, idx: int, crop: Crop, decoded: Decoded) -> None:
        import numpy as np

        arr, reason, size, mtime_ns = decoded
        if arr is None:
            self._error(idx, crop, reason or "image could not be decoded")
            return
        self._out.decoded += 1
        if self.classifier is None:
            self._finished()
            return
        if self._batch is None:
            s = self.input_size
            self._batch = np.empty((self.batch_size, s, s, 3), dtype=np.uint8)
        from batchwbc.engine.crop_checks import GREYSCALE_REASON, is_greyscale

        self._batch[len(self._batch_items)] = arr
        self._batch_items.append((idx, crop, size, mtime_ns, GREYSCALE_REASON if is_greyscale(arr) else ""))
        if len(self._batch_items) == self.batch_size:
            self._flush()

    def _flush(self) -> None:
        import numpy as np

        items, n = self._batch_items, len(self._batch_items)
        if n == 0 or self.classifier is None or self._batch is None:
            return
        self._batch_items = []
        batch = self._batch[:n]
        try:
            if self._ood is not None:
                probs, scores, verdicts = self.classifier.predict_scored(batch)
            else:
                probs, scores, verdicts = self.classifier.predict(batch), None, None
            if probs.shape != (n, len(self.classes)):
                raise ValueError(f"model returned shape {probs.shape}")
        except Exception as exc:  # noqa: BLE001 - fail these cells, keep the run
            log.error("the model failed on a batch of %d images (%s); they are listed as errors", n, exc)
            for idx, crop, *_ in items:
                self._error(idx, crop, "the model could not classify this image")
            return
        for j, (idx, crop, size, mtime_ns, image_reason) in enumerate(items):
            p = probs[j]
            if not np.all(np.isfinite(p)):
                self._error(idx, crop, "the model returned no valid probabilities for this image")
                continue
            c1, p1, _, _ = top_two(p, self.classes)
            score = None if scores is None else float(scores[j])
            out_of_dist = 0 if verdicts is None else int(verdicts[j])  # 0, or why it is unclassified (ood.verdicts)
            thumb = make_thumbnail(batch[j]) if p1 < self.review_threshold or image_reason or out_of_dist else None
            cell = cell_from_probs(crop, p, self.classes, self.review_threshold, thumb, image_reason, score, out_of_dist)
            self._add_cell(idx, cell)
            if self.cache is not None and size:
                from batchwbc.engine.result_cache import CachedEntry

                self.cache.store(crop.path, size, mtime_ns, CachedEntry(p, thumb, image_reason, score, out_of_dist))
            self._finished()

    # -- driving -----------------------------------------------------------------------
    def _chunks(self, crops: Sequence[Crop]) -> Iterator[list[tuple[int, Crop]]]:
        """Chunks of files that need decoding; cache hits are reported on the way."""
        chunk: list[tuple[int, Crop]] = []
        for idx, crop in enumerate(crops):
            if self._from_cache(idx, crop):
                continue
            chunk.append((idx, crop))
            if len(chunk) == CHUNK_FILES:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def run(self, crops: Sequence[Crop]) -> PipelineOutput:
        t0 = time.perf_counter()
        self.total = len(crops)
        if self.max_thumbnails is not None:  # the report's patient order is the discovery order
            self._thumbs = ThumbnailKeeper(self.max_thumbnails, [crop.patient for crop in crops])
        if self.workers == 0:
            for chunk in self._chunks(crops):
                for (idx, crop) in chunk:
                    self._accept(idx, crop, self.decode(crop.path, self.input_size, self.preprocessing))
        else:
            self._run_pool(self._chunks(crops))
        self._flush()
        if self._thumbs is not None:
            self._drop_thumbnails(self._thumbs.final_drops())
        out = self._out
        out.cells = [c for _, c in sorted(self._cells, key=lambda t: t[0])]
        out.errors = [e for _, e in sorted(self._errors, key=lambda t: t[0])]
        out.seconds = time.perf_counter() - t0
        return out

    def _run_pool(self, chunks: Iterator[list[tuple[int, Crop]]]) -> None:
        """Decode in the shared crash-isolating pool (batchwbc.engine.worker_pool)."""
        def restarted(n_files: int) -> None:
            self._out.pool_restarts += 1
            log.warning("a decoding worker died; retrying the %d files in flight one by one", n_files)

        def crashed(key: tuple[int, Crop]) -> None:
            log.warning("decoding %s crashed a worker process", key[1].rel)

        task = partial(decode_chunk, size=self.input_size, decode=self.decode, preprocessing=self.preprocessing)
        keyed = ([((idx, crop), crop.path) for idx, crop in chunk] for chunk in chunks)
        with closing(run_isolated(keyed, self.workers, task, Decoded(None, CRASH_REASON, 0, 0),
                                  on_restart=restarted, on_crash=crashed)) as results:
            for (idx, crop), decoded in results:
                self._accept(idx, crop, decoded)
