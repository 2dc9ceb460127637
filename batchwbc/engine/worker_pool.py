"""The one crash-isolating worker pool: decode files in spawned processes, survive a decoder crash.

Every command that decodes crops in worker processes (run and evaluate through the pipeline,
adapt through embed) goes through `run_isolated`, so they share one executor and one watchdog:

* workers are spawned (not forked: onnxruntime and OpenCV threads do not survive a fork) and
  ignore SIGINT, so Ctrl-C reaches only the main process, which stops them;
* every worker watches the pid of the process that started it (batchwbc.ops.parent_watch), so
  a run killed with kill -9 does not leave its workers running;
* a worker that dies (a decoder crash on a damaged file) breaks the pool: the files in flight
  are then decoded one at a time in a single worker, so the crash is pinned on its file, and
  the rest goes on in a new pool.
"""
from __future__ import annotations

import os
from collections import deque
from contextlib import closing
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

#: Tasks in flight per worker: enough to keep every worker busy while the main process runs
#: the model, small enough to bound memory.
TASKS_PER_WORKER = 3

CRASH_REASON = "decoding this file crashed the worker process; the file is probably damaged"

K = TypeVar("K")
R = TypeVar("R")


class PipelineError(Exception):
    """The run cannot go on (e.g. worker processes cannot start); str is one sentence."""


# -- worker side (module top level and picklable, as the spawn start method requires) -------

def _init_worker(parent_pid: int | None = None) -> None:
    """Ctrl-C goes to the whole process group; only the main process should react to it.
    A worker ends when the process that started it dies, even by kill -9 (batchwbc.ops.parent_watch).
    One OpenCV thread per worker: the pool already uses every core."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        from batchwbc.ops.parent_watch import watch_parent

        watch_parent(parent_pid)
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001 - a missing cv2 shows up as per-file errors instead
        pass


def ping() -> bool:
    """Proves a fresh worker can start (spawn re-imports the program; that can fail)."""
    return True


# -- main-process side ----------------------------------------------------------------------

def new_pool(workers: int):
    """A spawn pool whose workers ignore Ctrl-C and end with this process, however it ends."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(),))


def stop_pool(pool) -> None:
    """Stop at once, also on Ctrl-C/SIGTERM: cancel queued work and end the workers rather
    than waiting for them (a worker may be stuck on a hung network share)."""
    pool.shutdown(wait=False, cancel_futures=True)
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)


def checked_single_pool():
    """A one-worker pool that has proved it can run a task; otherwise a crash would be
    blamed on innocent files one after another."""
    from concurrent.futures.process import BrokenProcessPool

    pool = new_pool(1)
    try:
        pool.submit(ping).result()
    except BrokenProcessPool:
        stop_pool(pool)
        raise PipelineError(
            "the image-decoding worker processes could not start; try --workers 0 to decode in the main process."
        ) from None
    return pool


def run_isolated(chunks: Iterable[Sequence[tuple[K, str]]], workers: int, task: Callable[[list[str]], list[R]],
                 crashed: R, on_restart: Callable[[int], None] | None = None,
                 on_crash: Callable[[K], None] | None = None) -> Iterator[tuple[K, R]]:
    """Run `task` (picklable, paths -> one result per path) on chunks of (key, path) in `workers`
    processes, a bounded window at a time, and yield (key, result) in chunk order.

    `chunks` is pulled lazily (the pipeline reports cache hits while chunks are made). When a
    worker dies, `on_restart(files in flight)` is called, the chunks in flight are run one file
    at a time in a single checked worker, and a file whose task crashes it yields `crashed`
    (after `on_crash(key)`). Use it as `with closing(run_isolated(...)) as results:` so that an
    interrupt in the caller stops the workers at once."""
    from concurrent.futures.process import BrokenProcessPool

    source = iter(chunks)
    window = workers * TASKS_PER_WORKER
    pending: deque = deque()
    pool = new_pool(workers)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < window:
                chunk = next(source, None)
                if chunk is None:
                    exhausted = True
                    break
                pending.append((pool.submit(task, [path for _, path in chunk]), chunk))
            if not pending:
                break
            fut, chunk = pending.popleft()
            try:
                results = fut.result()
            except BrokenProcessPool:
                suspects = [chunk] + [c for _, c in pending]
                pending.clear()
                stop_pool(pool)
                if on_restart is not None:
                    on_restart(sum(len(c) for c in suspects))
                with closing(_one_by_one([item for c in suspects for item in c], task, crashed, on_crash)) as single:
                    yield from single
                pool = new_pool(workers)
                continue
            yield from zip((key for key, _ in chunk), results)
        pool.shutdown(wait=True)  # all work is done: let the workers exit cleanly
    finally:
        stop_pool(pool)


def _one_by_one(items: list[tuple[K, str]], task: Callable[[list[str]], list[R]], crashed: R,
                on_crash: Callable[[K], None] | None) -> Iterator[tuple[K, R]]:
    """Suspects one at a time in a single worker, so a crash names its file; a new worker only
    after a crash (each start costs seconds on a busy PC)."""
    from concurrent.futures.process import BrokenProcessPool

    pool = checked_single_pool()
    try:
        for key, path in items:
            try:
                result = pool.submit(task, [path]).result()[0]
            except BrokenProcessPool:
                stop_pool(pool)
                if on_crash is not None:
                    on_crash(key)
                yield key, crashed
                pool = checked_single_pool()
                continue
            yield key, result
    finally:
        stop_pool(pool)
