"""An item's end past the model — encode and upload its images, record it, move it, send its messages — in
processes beside the GPU worker's own, so that none of that Python holds the GIL the model thread needs
between its kernels (`bench/contention.py` measures what it costs a model call beside it).

The processes are spawned (never forked: CUDA does not survive a fork), import no torch, and build their own
store, object stores and Celery producer from the same settings. An item thread hands its step over and waits
for the answer, so an item's message is still acknowledged only once the item has ended. A finishing process
that dies is replaced, and the step in hand is done again in the worker's own process (every step of an
item's end is safe to do twice: deterministic keys, transitions applied once).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from worker.process import Context

log = logging.getLogger("dreambatch.worker")
T = TypeVar("T")
MOST_PROCESSES = 4  # a micro-batching worker's many item threads share at most this many (~90 MiB each)

_here: Context | None = None  # in a finishing process: its own context (set by _start)


def _start() -> None:
    global _here
    from jobs.services import get_services
    from worker.runtime import Runtime

    _here = Runtime(get_services()).context()  # (as an I/O worker's: no model, no finishing processes of its own)


def _call(step: Callable[..., T], args: tuple) -> T:
    assert _here is not None
    return step(_here, *args)


def _ready() -> bool:
    return _here is not None


class Finisher:
    """`processes` finishing processes; `run(ctx, step, *args)` is `step(context, *args)` in one of them."""

    def __init__(self, processes: int):
        self.processes = processes
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.processes, mp_context=get_context("spawn"), initializer=_start)

    def warm(self) -> None:
        """Start every process now (each imports what it needs: about a second), not on the first items."""
        for started in [self._pool.submit(_ready) for _ in range(self.processes)]:
            started.result()

    def run(self, ctx: Context, step: Callable[..., T], *args: Any) -> T:
        """`step(context, *args)` in a finishing process, with that process's own context; in this process,
        with `ctx`, when the finishing process died under it. What `step` raises is raised here."""
        pool = self._pool
        try:
            return pool.submit(_call, step, args).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    log.warning("a finishing process died; starting new ones, and ending this item here")
                    self._pool = self._new_pool()
            return step(ctx, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
