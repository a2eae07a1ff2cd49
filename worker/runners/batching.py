"""Micro-batching: the worker's item threads hand their model calls to one model thread, which denoises
requests that share a batch key (model, size, steps, guidance, scheduler) together.

The Celery threads pool runs several items at once; each reaches step 4 of `process.process_item` and
calls `runner.generate(request)`. With a `MicroBatcher` as the runner, that call queues the request and
waits. The model thread takes the oldest request, gathers the others already queued (and those arriving
until `window_s` after the oldest arrived) up to the batch limit, and runs each group of equal keys as
one `generate_batch`. A failed batch is run again one request at a time, so one bad item fails alone.
Every request's `on_step` runs after each step of its batch: one that raises (a cancelled job) takes its
request out — the batch goes on for the others and that request gets the exception — and a batch whose
requests have all stopped stops at that step.
Edits (and requests without a batch key) run alone on the same thread: the model thread is the only
one that touches the GPU, so the worker needs no other GPU lock.

Batch limit: `max_batch`, or with `max_batch=0` one from free GPU memory: the peak memory one request
added, measured on its first run, divided into 80% of what is free (at most 16; 4 on a CPU). An
out-of-memory batch halves the limit.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.runners.base import EditRequest, GenerateRequest, RunOutput

log = logging.getLogger("dreambatch.worker")

AUTO_MAX = 16  # most requests per batch when the limit comes from free memory
CPU_AUTO = 4  # the limit with max_batch=0 on a CPU (no memory reading to go by)


@dataclass
class _Call:
    request: Any
    run: Callable[[], RunOutput] | None  # set: run alone (edits, unbatchable requests)
    key: tuple | None
    on_step: Callable[[int], None] | None = None
    stopped: BaseException | None = None  # what its on_step raised: it leaves its batch with this
    arrived: float = field(default_factory=time.monotonic)
    result: Future = field(default_factory=Future)


class MicroBatcher:
    """A runner that batches `generate` calls of the runner it wraps; see the module docstring."""

    def __init__(self, runner: Any, max_batch: int, window_s: float = 0.02, device: str = "cpu"):
        self.runner = runner
        self.model = runner.model
        self.max_batch = max_batch
        self.window_s = window_s
        self.device = device
        self.batch_sizes: list[int] = []  # size of every batch run, for tests and benchmarks
        self._limit = max_batch or (CPU_AUTO if torch.device(device).type != "cuda" else 1)
        self._per_item_bytes: int | None = None
        self._queue: queue.Queue[_Call] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def source(self) -> str | None:
        return self.runner.source

    @property
    def revision(self) -> str | None:
        return self.runner.revision

    def load(self) -> object:
        return self.runner.load()

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return self.runner.canvas_size(width, height)

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput:
        key = self.runner.batch_key(request)
        alone = None if key else (lambda: self.runner.generate(request, on_step=on_step))
        return self._submit(_Call(request, alone, key, on_step))

    def edit(self, request: EditRequest, on_step: Callable[[Any], None] | None = None) -> RunOutput:
        return self._submit(_Call(request, lambda: self.runner.edit(request, on_step=on_step), None))

    def _submit(self, call: _Call) -> RunOutput:
        with self._start_lock:
            if self._thread is None:  # started in the process that runs items, on first use
                self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
                self._thread.start()
        self._queue.put(call)
        return call.result.result()

    # ---- the model thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            calls = [self._queue.get()]
            try:
                calls = self._gather(calls[0])
                for group in _groups(calls, self._limit):
                    self._run(group)
            except BaseException as exc:  # never leave an item thread waiting on a call nobody will run
                for call in calls:
                    if not call.result.done():
                        call.result.set_exception(exc)

    def _gather(self, first: _Call) -> list[_Call]:
        """`first` and what else is queued, waiting until `window_s` after `first` arrived for a full batch."""
        calls = [first]
        if first.key is None:
            return calls
        deadline = first.arrived + self.window_s
        while sum(call.key == first.key for call in calls) < self._limit:
            try:
                calls.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return calls

    def _run(self, group: list[_Call]) -> None:
        self.batch_sizes.append(len(group))
        if len(group) == 1:
            call = group[0]
            self._settle(call, call.run or (lambda: self._measured(call.request, call.on_step)))
            return
        try:
            started = time.perf_counter()
            outputs = self.runner.generate_batch([call.request for call in group], _batch_steps(group))
            log.debug("batch of %d in %.3f s", len(group), time.perf_counter() - started)
        except Exception as exc:  # run them one by one: only the bad one fails
            if all(call.stopped for call in group):  # every request was stopped: nothing to run again
                for call in group:
                    call.result.set_exception(call.stopped)
                return
            if _out_of_memory(exc):
                self._limit = max(1, len(group) // 2)
            log.warning(
                "batch of %d failed (%s: %s); running its items one by one", len(group), type(exc).__name__, exc
            )
            for call in group:
                if call.stopped:
                    call.result.set_exception(call.stopped)
                else:
                    self._settle(call, functools.partial(self.runner.generate, call.request, on_step=call.on_step))
            return
        for call, output in zip(group, outputs, strict=True):
            if call.stopped:
                call.result.set_exception(call.stopped)
            else:
                call.result.set_result(output)

    def _settle(self, call: _Call, run: Callable[[], RunOutput]) -> None:
        try:
            call.result.set_result(run())
        except BaseException as exc:  # handed to the item's own thread, which fails that item
            call.result.set_exception(exc)

    def _measured(self, request: GenerateRequest, on_step=None) -> RunOutput:
        """One request alone; on CUDA with an automatic limit, its peak memory sets the limit."""
        if self.max_batch or self._per_item_bytes is not None or torch.device(self.device).type != "cuda":
            return self.runner.generate(request, on_step=on_step)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        output = self.runner.generate(request, on_step=on_step)
        self._per_item_bytes = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        free, _ = torch.cuda.mem_get_info(self.device)
        self._limit = max(1, min(AUTO_MAX, int(0.8 * free) // self._per_item_bytes))
        log.info(
            "micro-batch limit %d (%.0f MiB per image, %.0f MiB free)",
            self._limit,
            self._per_item_bytes / 2**20,
            free / 2**20,
        )
        return output


def _batch_steps(group: list[_Call]) -> Callable[[int], None] | None:
    """One step callback for a batch: each request's own; a request whose callback raises leaves the batch
    (it gets that exception when the batch ends) and the batch stops once none is left."""
    if not any(call.on_step for call in group):
        return None

    def on_step(step: int) -> None:
        for call in group:
            if call.on_step and call.stopped is None:
                try:
                    call.on_step(step)
                except Exception as exc:  # handed to that request's own thread
                    call.stopped = exc
        stops = [call.stopped for call in group]
        if all(stops):
            raise next(stop for stop in stops if stop is not None)

    return on_step


def _groups(calls: list[_Call], limit: int) -> list[list[_Call]]:
    """Calls grouped by batch key in order of each group's first arrival, at most `limit` a group;
    keyless calls alone."""
    groups: dict[Any, list[_Call]] = {}
    for n, call in enumerate(calls):
        groups.setdefault(call.key if call.key is not None else ("alone", n), []).append(call)
    return [group[i : i + limit] for group in groups.values() for i in range(0, len(group), limit)]


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
