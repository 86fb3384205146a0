"""Worker processes for build-shards: `prepare_batch` over a stream of items, results in input order.

An *ordered* map is what keeps the shards independent of --workers (shards.py, "Determinism"). Workers
ignore Ctrl-C (the main process handles it), die with the main process even when it is SIGKILLed, and
apply the main process's decompression-bomb limit.
"""
from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator

from dallecli.console import UserError
from dallecli.data.sources import Item, Prepared, PrepareConfig, prepare_batch


def _init_worker(max_pixels: int | None) -> None:
    from PIL import Image

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the main process's to handle
    die_with_parent()
    warnings.simplefilter("ignore")                  # Pillow's notes on odd files must not garble the bar
    Image.MAX_IMAGE_PIXELS = max_pixels


def die_with_parent() -> None:
    """A worker must not outlive a main process killed with SIGKILL: ask Linux to send it SIGKILL when
    its parent dies (prctl PR_SET_PDEATHSIG), and elsewhere poll for a new parent."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # 1 = PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _batched(items: Iterable[Item], n: int) -> Iterator[list[Item]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


@contextlib.contextmanager
def worker_pool(workers: int, config: PrepareConfig) -> Iterator[ProcessPoolExecutor | None]:
    """Worker processes for prepare_batch, or None for one worker (everything then runs in this process).
    Started with fork where there is one (no re-import of __main__), before the progress bar's thread."""
    if workers <= 1:
        yield None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(config.image.max_pixels,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepared_in_order(items: Iterable[Item], config: PrepareConfig, pool: ProcessPoolExecutor | None,
                      batch: int = 8, in_flight: int = 6) -> Iterator[Prepared]:
    """prepare_batch over `items` on `pool` (None: in this process), results in input order, at most
    `in_flight` batches submitted at a time (the listing may be a stream of images held in memory)."""
    batches = _batched(items, batch)
    if pool is None:
        for b in batches:
            yield from prepare_batch(b, config)
        return
    pending: deque = deque()

    def result() -> list[Prepared]:
        future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            raise UserError("a worker process died while decoding images (out of memory, or a crash in an "
                            "image library); rerun the same command to resume, with fewer --workers") from None

    for b in batches:
        pending.append(pool.submit(prepare_batch, b, config))
        if len(pending) >= in_flight:
            yield from result()
    while pending:
        yield from result()
