"""Decode labelled crops with the model's own contract and return probabilities and embeddings.

`batchwbc adapt` needs, for every labelled crop, what the model sees at night: the same
decoder and framing (`pipeline.decode_one`, i.e. `preprocess.prepare_file` with the model's
preprocessing id) and the same graph. Unreadable files are returned as errors, never raised,
so one bad crop does not cost the lab its labels.

Each crop's stain-colour statistic (batchwbc.engine.stain_colour) is taken from the very batch
the model runs on: the runtime's colour check reads the same model input, so adapt can widen
the colour envelope for exactly what a run will measure, without decoding anything twice.
"""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

if TYPE_CHECKING:
    import numpy as np

    from batchwbc.engine.model import Classifier


@dataclass
class Embedded:
    probs: "np.ndarray"  # [n_ok, K] calibrated probabilities of the model as it is
    embeddings: "np.ndarray"  # [n_ok, D]
    ok: list[int]  # indices into the input paths that were decoded
    errors: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)
    colour: "np.ndarray | None" = None  # [n_ok, 2] stain_colour.colour_statistics of the same model inputs


def embed_files(classifier: "Classifier", paths: Sequence[str], workers: int = 0, batch_size: int = 32,
                on_progress: Callable[[int], None] | None = None, decode: Callable | None = None) -> Embedded:
    """Decode `paths` (in worker processes when workers > 0) and run the model on them in batches.
    `decode` (module level, default pipeline.decode_one) lets tests crash a worker on purpose."""
    import numpy as np

    from batchwbc.engine.pipeline import CHUNK_FILES, Decoded, decode_chunk, decode_one
    from batchwbc.engine.stain_colour import colour_statistics
    from batchwbc.engine.worker_pool import CRASH_REASON, run_isolated

    decode = decode or decode_one

    info = classifier.info
    chunks = [[(i, str(paths[i])) for i in range(start, min(start + CHUNK_FILES, len(paths)))]
              for start in range(0, len(paths), CHUNK_FILES)]
    task = partial(decode_chunk, size=info.input_size, decode=decode, preprocessing=info.preprocessing)

    def decoded_files() -> Iterator[tuple[int, Decoded]]:
        if workers <= 0:
            for chunk in chunks:
                yield from zip((i for i, _ in chunk), task([path for _, path in chunk]))
            return
        # The same pool, watchdog and crash isolation as a nightly run (batchwbc.engine.worker_pool).
        with closing(run_isolated(chunks, workers, task, Decoded(None, CRASH_REASON, 0, 0))) as results:
            yield from results

    probs, embs, colours, ok, errors = [], [], [], [], []
    batch, batch_idx = [], []

    def flush() -> None:
        if batch:
            stacked = np.stack(batch)
            p, e = classifier.predict_with_embedding(stacked)
            probs.append(p)
            embs.append(e)
            colours.append(colour_statistics(stacked))
            ok.extend(batch_idx)
            batch.clear()
            batch_idx.clear()

    done = 0
    with closing(decoded_files()) as files:  # an interrupt here stops the workers at once
        for i, (arr, reason, _size, _mtime_ns) in files:
            if arr is None:
                errors.append((i, reason))
            else:
                batch.append(arr)
                batch_idx.append(i)
                if len(batch) >= batch_size:
                    flush()
            done += 1
            if on_progress is not None and (done % CHUNK_FILES == 0 or done == len(paths)):
                on_progress(done)
    flush()
    k = len(info.classes)
    dim = embs[0].shape[1] if embs else 0
    return Embedded(
        probs=np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
        embeddings=np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
        ok=ok, errors=errors, colour=np.concatenate(colours) if colours else np.zeros((0, 2)),
    )
