"""A GPU worker's model in a process of its own, so that nothing but the model holds that process's GIL.

The worker's own process runs Celery's consumer, the item threads with their Redis reads and transitions,
and the hand-over to the finishing processes (worker/finisher.py). On tiny weights that is ~14 ms of
Python an image, and every millisecond of it was one the model thread waited for the GIL between its
kernels (py-spy; docs/benchmarks.md, issue 18). Here the model lives in a spawned child (never forked:
CUDA does not survive a fork) that does nothing else: `ModelProcess` is a `Runner` whose calls go to it
over a pipe.

    worker process                                   model process
    item thread: ModelProcess.generate(request) ──▶  call thread: runner.generate(request, on_step)
                 on_step(i) ◀──────── ("step", i) ──  after each denoising step (without waiting)
                 raises ItemCancelled ─ ("stop") ──▶  the next step's on_step raises it
                 ◀───────────── ("done", RunOutput)

A step is reported without the model waiting for the answer, so the step's Redis work runs beside the
next step instead of before it; a cancel raised there stops the model at its next step boundary, and the
call raises that cancel even when the model finished first. Requests and results are pickled (messages
carry a prompt and a few images, never a model). The child loads the model before it answers, so a bad
setup fails the worker's start with the child's own error. A child that dies (the OOM killer picks the
biggest process) fails its calls with a TransientError — the item is tried again and counts an attempt,
so one that keeps killing the model ends failed — and the next call starts a new child.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import threading
import traceback
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection
from typing import Any

from jobs.errors import ConfigError, DreambatchError, ModelError, TransientError
from jobs.settings import RunnerSettings
from worker.metrics import cuda_memory
from worker.runners.base import EditRequest, GenerateRequest, RunOutput, step_index

log = logging.getLogger("dreambatch.worker")

CALLS = ("generate", "edit", "canvas_size", "cuda_memory")  # what the worker asks of its model process


class ModelProcess:
    """A Runner for `model` whose pipeline is loaded and run in a child process; see the module docstring."""

    def __init__(self, model: str, weights: str | None, device: str, options: RunnerSettings, logging_as: tuple):
        self.model = model
        self._spec = (model, weights, device, options, logging_as)
        self.source: str | None = None
        self.revision: str | None = None
        self._lock = threading.Lock()  # the child's connection and the calls on it
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self.pid: int | None = None  # the running child's
        self._calls: dict[int, tuple[Connection, queue.SimpleQueue]] = {}
        self._ids = itertools.count()

    def load(self) -> ModelProcess:
        with self._lock:
            self._connection()
        return self

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput:
        return self._call("generate", request, on_step=on_step)

    def edit(self, request: EditRequest, on_step: Callable[[Any], None] | None = None) -> RunOutput:
        return self._call("edit", request, on_step=on_step)

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return self._call("canvas_size", width, height)

    def cuda_memory(self) -> list[tuple[str, int, int]]:
        """The model process's CUDA memory (`cuda_memory`), for the worker's metrics."""
        if self._conn is None or self._lock.locked():  # (none yet, or one loading: a scrape does not wait)
            return []
        return self._call("cuda_memory")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the child reads EOF and exits
                self._conn = None

    # --- the worker's side of the pipe --------------------------------------------------------------
    def _connection(self) -> Connection:
        """The running child's end of the pipe, starting a child (and loading the model) if none runs. The
        caller holds `_lock`."""
        if self._conn is None:
            self._conn = self._start()
        return self._conn

    def _start(self) -> Connection:
        from worker.runtime import find_weights

        find_weights(*self._spec[:2], self._spec[3])  # weights that are nowhere: said before a process starts
        context = get_context("spawn")
        ours, theirs = context.Pipe()
        child = context.Process(target=_serve, args=(theirs, *self._spec), name=f"model-{self.model}", daemon=True)
        child.start()
        theirs.close()
        try:
            kind, _, value = ours.recv()
        except (EOFError, OSError):
            child.join(10)
            raise ConfigError(
                f"the model process exited (code {child.exitcode}) while loading {self.model}; see its log above"
            ) from None
        if kind != "ready":
            child.join(10)
            raise value
        self.source, self.revision, self.pid = value["source"], value["revision"], child.pid
        log.info("model %s loaded in process %d (%s)", self.model, child.pid, self.source)
        threading.Thread(target=self._read, args=(child, ours), name="model-process", daemon=True).start()
        return ours

    def _read(self, child, conn: Connection) -> None:
        """Hand each message from the child to the call it answers; when the child is gone, fail its calls."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            waiting = self._calls.get(message[1])
            if waiting is not None:
                waiting[1].put(message)
        child.join(10)
        with self._lock:  # (a call takes its connection and registers under the lock: none is missed here)
            if self._conn is conn:
                self._conn = None
            lost = [answers for on, answers in self._calls.values() if on is conn]
        if child.exitcode is not None and child.exitcode != 0:
            log.error("the model process %d exited with code %s; a new one starts on the next item", child.pid,
                      child.exitcode)  # fmt: skip
        gone = TransientError(
            f"the model process exited (code {child.exitcode}) while running this item (out of memory?); "
            "a new one loads the model for its next try"
        )
        for answers in lost:
            answers.put(("gone", None, gone))

    def _send(self, conn: Connection, message: tuple) -> None:
        with self._send_lock:
            conn.send(message)

    def _call(self, method: str, *args: Any, on_step: Callable[[Any], None] | None = None) -> Any:
        answers: queue.SimpleQueue = queue.SimpleQueue()
        call = next(self._ids)
        with self._lock:
            conn = self._connection()
            self._calls[call] = (conn, answers)
        stopped: BaseException | None = None  # what on_step raised: the call ends with it
        try:
            try:
                self._send(conn, ("call", call, method, args))
            except (OSError, ValueError):  # (closed under us: the child died between two calls)
                raise TransientError("the model process exited; a new one loads the model for the next try") from None
            while True:
                kind, _, value = answers.get()
                if kind == "step":
                    if on_step is not None and stopped is None:
                        try:
                            on_step(value)
                        except BaseException as exc:  # a cancel: the model stops at its next step
                            stopped = exc
                            self._send(conn, ("stop", call, exc))
                    continue
                if stopped is not None:
                    raise stopped
                if kind == "done":
                    return value
                raise value
        finally:
            del self._calls[call]


# --- the model process --------------------------------------------------------------------------------
def _serve(conn: Connection, model: str, weights: str | None, device: str, options: RunnerSettings, logging_as):
    """The child: load the runner, answer "ready" (or why not), then run each call on a thread of its own
    (one at a time unless the runner micro-batches), until the worker's end of the pipe closes."""
    from jobs import logs

    logs.configure(*logging_as)
    try:
        cpus = model_cpus(options.model_cpus, device)
        if cpus is not None:  # (before torch is imported: its thread pool sizes itself to what it may use)
            os.sched_setaffinity(0, cpus)
            log.info("the model process keeps to CPU %s", ",".join(map(str, sorted(cpus))))
        from worker.runtime import build_runner

        runner = build_runner(model, weights, device, options)
        runner.load()
    except BaseException as exc:
        conn.send(("failed", None, _portable(exc)))
        return
    conn.send(("ready", None, {"source": runner.source, "revision": runner.revision}))
    send_lock = threading.Lock()
    running: set[int] = set()
    stops: dict[int, BaseException] = {}

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    def run(call: int, method: str, args: tuple) -> None:
        def on_step(info: Any) -> None:
            send(("step", call, step_index(info)))
            if call in stops:
                raise stops.pop(call)

        try:
            if method == "cuda_memory":
                value = cuda_memory()
            elif method in ("generate", "edit"):
                value = getattr(runner, method)(*args, on_step=on_step)
            else:
                value = getattr(runner, method)(*args)
            send(("done", call, value))
        except BaseException as exc:
            send(("failed", call, _portable(exc)))
        finally:
            running.discard(call)
            stops.pop(call, None)

    while True:
        try:
            kind, call, *rest = conn.recv()
        except (EOFError, OSError):  # the worker closed its end, or died
            os._exit(0)
        if kind == "call" and rest[0] in CALLS:
            running.add(call)
            threading.Thread(target=run, args=(call, *rest), name=f"model-call-{call}", daemon=True).start()
        elif kind == "stop" and call in running:
            stops[call] = rest[0]


def model_cpus(setting: str, device: str) -> set[int] | None:
    """The CPUs the model process keeps to (`runner.model_cpus`); None: wherever the OS puts it.

    The other processes of a worker and the machine (Celery's consumer, the finishing processes, Redis, S3
    clients) wake many times an image. Left to the OS, they are put on the model's core as often as not and
    its call waits for them: on the 2-core bench a tiny I1 call took 276 ms against 241 ms with the model
    process on a core of its own (docs/benchmarks.md, issue 18). `auto` gives the model its own CPUs only
    when its torch threads are limited (OMP_NUM_THREADS=N, fewer than the CPUs this worker may use), N of
    them, the k-th worker's (by its device index: cuda:k) after the first k*N, so one machine's workers
    take different ones."""
    allowed = sorted(os.sched_getaffinity(0))
    if setting == "off":
        return None
    if setting != "auto":
        cpus: set[int] = set()
        for part in setting.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        if not cpus <= set(allowed):
            raise ConfigError(
                f"runner.model_cpus={setting!r}: this worker may use CPUs {_spans(allowed)} only; "
                "name some of those, or auto"
            )
        return cpus
    omp, after = os.environ.get("OMP_NUM_THREADS", ""), device.partition(":")[2]
    threads, index = (int(omp) if omp.isdigit() else 0), (int(after) if after.isdigit() else 0)
    if not 0 < threads < len(allowed):
        return None
    return {allowed[(index * threads + n) % len(allowed)] for n in range(threads)}


def _spans(cpus: list[int]) -> str:
    """0,1,2,3,8 as 0-3,8."""
    spans: list[list[int]] = []
    for cpu in cpus:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _portable(exc: BaseException) -> BaseException:
    """`exc` as it can cross the pipe: itself when it pickles (with the child's traceback as a note, for the
    worker's log), else a ModelError with its text, as the worker's own `_model_failures` boundary would have
    made of it (a ConfigError stays one)."""
    if not isinstance(exc, DreambatchError):
        exc.add_note("in the model process:\n" + "".join(traceback.format_exception(exc)).rstrip())
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        kind = ConfigError if isinstance(exc, ConfigError) else ModelError
        return kind(f"{type(exc).__name__}: {exc}")
