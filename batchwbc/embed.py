"""Decode labelled crops with the model's own contract and return probabilities and embeddings.

`batchwbc adapt` needs, for every labelled crop, what the model sees at night: the same
decoder and framing (`pipeline.decode_one`, i.e. `preprocess.prepare_file` with the model's
preprocessing id) and the same graph. Unreadable files are returned as errors, never raised,
so one bad crop does not cost the lab its labels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

    from .model import Classifier

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    probs: "np.ndarray"  # [n_ok, K] calibrated probabilities of the model as it is
    embeddings: "np.ndarray"  # [n_ok, D]
    ok: list[int]  # indices into the input paths that were decoded
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)


def embed_files(classifier: "Classifier", paths: Sequence[str], workers: int = 0, batch_size: int = 32,
                on_progress: Callable[[int], None] | None = None) -> Embedded:
    """Decode `paths` (in worker processes when workers > 0) and run the model on them in batches."""
    import numpy as np

    from .pipeline import CHUNK_FILES, decode_chunk

    info = classifier.info
    chunks = [list(range(i, min(i + CHUNK_FILES, len(paths)))) for i in range(0, len(paths), CHUNK_FILES)]

    def decoded_chunks():
        if workers <= 0:
            for idx in chunks:
                yield idx, decode_chunk([str(paths[i]) for i in idx], info.input_size, preprocessing=info.preprocessing)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from .pipeline import _init_worker, decode_one

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as pool:
            futures = [(idx, pool.submit(decode_chunk, [str(paths[i]) for i in idx], info.input_size, decode_one,
                                         info.preprocessing)) for idx in chunks]
            for idx, fut in futures:
                yield idx, fut.result()

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
