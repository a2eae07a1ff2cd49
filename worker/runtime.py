"""Per-process resources of a worker: its services (jobs.services: settings, store, object stores, the
Celery app), the loaded model, its execution leases and metrics.

Built once per process, on first use, in the process that runs tasks (never at import time and
never before a fork: CUDA does not survive one). Workers run Celery's threads pool (worker.cli), so
that process is the worker itself and its item threads share one runtime.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from jobs.errors import ConfigError
from jobs.models import MODELS
from jobs.services import Services
from jobs.settings import RunnerSettings
from jobs.storage import ObjectStore
from jobs.store import Store
from worker import safety
from worker.finisher import Finisher
from worker.leases import Leases
from worker.metrics import WorkerMetrics
from worker.modelproc import ModelProcess
from worker.process import Context
from worker.runners.base import Runner
from worker.webhooks import DeliverySlots


def build_runner(model: str, weights: str | None, device: str, options: RunnerSettings | None = None) -> Runner:
    """The real runner for a model, by its kind in `MODELS` (HiDream-I1 generates, HiDream-E1 edits); an I1
    runner is wrapped in a `MicroBatcher` when `options.batch_max` is not 1."""
    options = options or RunnerSettings()
    kind = MODELS[model].kind if model in MODELS else None
    find_weights(model, weights, options)
    if kind == "generate":
        from worker.runners.hidream_i1 import HiDreamI1Runner

        runner = HiDreamI1Runner(model, weights=weights, device=device, options=options)
        if batches(model, options):
            from worker.runners.batching import MicroBatcher

            return MicroBatcher(runner, options.batch_max, options.batch_window_ms / 1000, device)
        return runner
    if kind == "edit":
        from worker.runners.hidream_e1 import HiDreamE1Runner

        return HiDreamE1Runner(model, weights=weights, device=device, options=options)
    raise ConfigError(f"no runner for model {model!r}; expected one of {', '.join(MODELS)}")


def check_device(device: str) -> str:
    """`device` as given (or, empty, this machine's default: cuda:0 when there is a GPU, else cpu), checked
    against what this machine has: a device it lacks is a ConfigError saying what it has, before a model loads."""
    import torch

    if not device:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        wanted = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {device!r}: {exc}; use cpu, cuda:0, cuda:1, …") from None
    if wanted.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"--device {device}: {why} on this machine; use --device cpu (or a machine with a GPU)")
        count = torch.cuda.device_count()
        if wanted.index is not None and wanted.index >= count:
            raise ConfigError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0…cuda:{count - 1}")
    elif wanted.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    elif wanted.type != "cpu":
        raise ConfigError(f"--device {device}: dreambatch runs on cpu, cuda:N or mps")
    return device


def find_weights(model: str, weights: str | None, options: RunnerSettings) -> None:
    """Look for a model's weights before its pipeline code is imported (seconds of torch and diffusers): weights
    that are nowhere raise WeightsNotFound, saying where they were looked for, that much sooner. The runner looks
    again as it loads (a few file lookups)."""
    if weights == "tiny" or model not in MODELS:
        return  # tiny weights are built on demand; an unknown model is build_runner's to refuse
    if MODELS[model].kind == "generate":
        from worker.runners.weights import resolve_weights

        resolve_weights(model, weights, options)
    else:
        from worker.runners.weights_e1 import resolve_edit_weights

        resolve_edit_weights(model, weights, options)


def batches(model: str | None, options: RunnerSettings) -> bool:
    """Whether a worker for `model` micro-batches (I1 only: E1 edits run one at a time)."""
    return bool(model in MODELS and MODELS[model].kind == "generate" and options.batch_max != 1)


class Runtime:
    def __init__(
        self,
        services: Services,
        *,
        model: str | None = None,
        weights: str | None = None,
        device: str = "cpu",
        runner_factory: Callable[[], Runner] | None = None,
        model_process: tuple | None = None,
    ):
        """`model_process`: run the model in a process of its own (worker.modelproc), whose logging is
        `jobs.logs.configure(*model_process)`; a GPU worker does. None: in this process (local mode, tests)."""
        self.services = services
        self.settings = settings = services.settings
        self.model = model
        self.safety = safety.Lazy(settings.safety, device)  # loaded on the first item it checks
        self._runner: Runner | None = None
        if runner_factory is not None:
            self._runner_factory = runner_factory
        elif model_process is not None:
            self._runner_factory = lambda: ModelProcess(self._model_name(), weights, device, settings.runner,
                                                        model_process)  # fmt: skip
        else:
            self._runner_factory = lambda: build_runner(self._model_name(), weights, device, settings.runner)
        # a micro-batching runner has its own model thread, the only one touching the GPU: no lock around calls
        self._model_lock = (
            contextlib.nullcontext() if runner_factory is None and batches(model, settings.runner) else None
        )
        self._lock = threading.Lock()
        self.gpu_lock = threading.Lock()
        self._leases: Leases | None = None
        self.metrics = WorkerMetrics()
        self.active: set[tuple[str, str]] = set()  # (job_id, item_id) running in this process, for heartbeats
        self.ended = 0  # items this process ran to an end
        self.name = ""  # the worker's name in its heartbeats (worker.cli sets it; worker.recovery reads it)
        # webhook deliveries at once; an I/O worker keeps threads beyond them for finalizing jobs (worker.cli)
        self.deliveries = DeliverySlots(1_000_000, 1_000_000)
        self.finisher: Finisher | None = None  # a GPU worker's finishing processes (worker.cli starts them)

    @property
    def leases(self) -> Leases:
        store = self.store
        with self._lock:
            if self._leases is None:
                self._leases = Leases(store, self.settings.celery.lease_ttl)
            return self._leases

    @property
    def store(self) -> Store:
        return self.services.store

    def runner(self) -> Runner:
        with self._lock:
            if self._runner is None:
                if self.model is None:
                    raise RuntimeError("this worker has no model (an --io worker never runs items)")
                runner = self._runner_factory()
                runner.load()
                self._runner = runner
                if isinstance(runner, ModelProcess):  # the model's CUDA memory is its process's
                    self.metrics.gpu_memory.read = runner.cuda_memory
            return self._runner

    def _model_name(self) -> str:
        if self.model is None:
            raise ConfigError("an I/O worker runs no model (start a GPU worker with --model)")
        return self.model

    @property
    def model_revision(self) -> str | None:
        """The revision of the weights this worker loaded (read as it loaded them); None for an I/O worker or
        before the model is loaded."""
        with self._lock:
            return self._runner.revision if self._runner is not None else None

    def objects(self, location: str) -> ObjectStore:
        return self.services.objects(location)

    def context(self) -> Context:
        return Context(
            settings=self.settings,
            store=self.store,
            runner=self.runner,
            objects=self.services.objects,
            notify=self.services.notify,
            finalize=self.services.finalize,
            gpu_lock=self._model_lock or self.gpu_lock,
            leases=self.leases,
            metrics=self.metrics,
            revision=lambda: self.model_revision,
            safety=self.safety,
            finisher=self.finisher,
        )
