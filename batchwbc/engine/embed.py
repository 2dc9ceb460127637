"""Decode labelled crops with the model's own contract and return probabilities and embeddings.

`batchwbc adapt` needs, for every labelled crop, what the model sees at night: the same
decoder and framing (`pipeline.decode_one`, i.e. `preprocess.prepare_file` with the model's
preprocessing id) and the same graph. Unreadable files are returned as errors, never raised,
so one bad crop does not cost the lab its labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.model import Classifier


@dataclass
class Embedded:
    probs: "np.ndarray"  # [n_ok, K] calibrated probabilities of the model as it is
    embeddings: "np.ndarray"  # [n_ok, D]
    ok: list[int]  # indices into the input paths that were decoded
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)


def embed_files(classifier: "Classifier", paths: Sequence[str], workers: int = 0, batch_size: int = 32,
                on_progress: Callable[[int], None] | None = None, decode: Callable | None = None) -> Embedded:
    """Decode `paths` (in worker processes when workers > 0) and run the model on them in batches.
    `decode` (module level, default pipeline.decode_one) lets tests crash a worker on purpose."""
    import numpy as np

    from batchwbc.engine.pipeline import CHUNK_FILES, decode_chunk, decode_one

    decode = decode or decode_one

    info = classifier.info
    chunks = [list(range(i, min(i + CHUNK_FILES, len(paths)))) for i in range(0, len(paths), CHUNK_FILES)]

    def decoded_chunks():
        if workers <= 0:
            for idx in chunks:
                yield idx, decode_chunk([str(paths[i]) for i in idx], info.input_size, decode, info.preprocessing)
            return
        yield from _pool_decoded(chunks, paths, info.input_size, info.preprocessing, workers, decode)

    probs, embs, ok, errors = [], [], [], []
    batch, batch_idx = [], []

    def flush() -> None:
        if batch:
            p, e = classifier.predict_with_embedding(np.stack(batch))
            probs.append(p)
            embs.append(e)
            ok.extend(batch_idx)
            batch.clear()
            batch_idx.clear()

    done = 0
    for idx, results in decoded_chunks():
        for i, (arr, reason, _size, _mtime) in zip(idx, results):
            if arr is None:
                errors.append((i, reason))
                continue
            batch.append(arr)
            batch_idx.append(i)
            if len(batch) >= batch_size:
                flush()
        done += len(idx)
        if on_progress is not None:
            on_progress(done)
    flush()
    k = len(info.classes)
    dim = embs[0].shape[1] if embs else 0
    return Embedded(
        probs=np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        embeddings=np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
        ok=ok, errors=errors,
    )


def _pool_decoded(chunks: list[list[int]], paths: Sequence[str], size: int, preprocessing: str, workers: int,
                  decode: Callable):
    """Decode chunks in spawned worker processes, a bounded window at a time, in order.

    A worker that dies (a decoder crash on a damaged file) breaks the pool: the chunk it held
    is then decoded file by file in a single-worker pool, so the culprit becomes an error, and
    the other chunks go on in a new pool, as in the nightly run (batchwbc.engine.pipeline)."""
    import multiprocessing as mp
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from batchwbc.engine.pipeline import CRASH_REASON, TASKS_PER_WORKER, _init_worker, decode_chunk

    ctx = mp.get_context("spawn")

    def new_pool(n: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker)

    def submit(pool, idx):
        return pool.submit(decode_chunk, [str(paths[i]) for i in idx], size, decode, preprocessing)

    todo = deque(chunks)
    while todo:
        with new_pool(workers) as pool:
            window: deque = deque()
            broken = False
            while todo or window:
                while todo and len(window) < workers * TASKS_PER_WORKER:
                    idx = todo.popleft()
                    window.append((idx, submit(pool, idx)))
                idx, fut = window.popleft()
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    broken = True
                    todo.extendleft(reversed([i for i, _ in window]))
                    yield from _isolated(idx, new_pool, submit, CRASH_REASON)
                    break
                yield idx, result
            if broken:
                pool.shutdown(wait=False, cancel_futures=True)


def _isolated(idx: list[int], new_pool, submit, crash_reason: str):
    """One file at a time in a single worker; a new worker only after a crash (each start costs
    seconds on a busy PC)."""
    from concurrent.futures.process import BrokenProcessPool

    rest = list(idx)
    while rest:
        with new_pool(1) as single:
            while rest:
                i = rest.pop(0)
                try:
                    yield [i], submit(single, [i]).result()
                except BrokenProcessPool:
                    yield [i], [(None, crash_reason, 0, 0)]
                    break
