"""A GPU worker's model in a process of its own (worker/modelproc.py): the same bytes as the runner in this
process, its steps reported, a cancel from a step honoured, a child that dies replaced, a bad setup reported
with the child's own error, and the CPUs it keeps to."""

from __future__ import annotations

import os
import signal

import pytest

from jobs.errors import ConfigError, ItemCancelled, ModelError, TransientError
from jobs.models import MODELS
from jobs.settings import RunnerSettings
from worker.modelproc import ModelProcess, model_cpus
from worker.runners.base import GenerateRequest
from worker.runtime import build_runner


def request(n: int, **given) -> GenerateRequest:
    return GenerateRequest.of({**MODELS["i1-fast"].defaults, "prompt": f"a red fox, number {n}", **given}, seed=n)


@pytest.fixture(scope="module")
def apart(tiny_dir):
    runner = ModelProcess("i1-fast", "tiny", "cpu", RunnerSettings(), ("WARNING", "text")).load()
    yield runner
    runner.close()


def test_the_model_process_makes_the_bytes_this_process_makes(apart):
    here = build_runner("i1-fast", "tiny", "cpu", RunnerSettings())
    here.load()
    assert (apart.source, apart.revision) == (here.source, here.revision)
    steps: list[int] = []
    there = apart.generate(request(1), on_step=steps.append)
    mine = here.generate(request(1))
    assert [image.tobytes() for image in there.images] == [image.tobytes() for image in mine.images]
    assert there.seed == mine.seed and there.inference_s > 0 and set(there.stages) == set(mine.stages)
    assert steps == list(range(MODELS["i1-fast"].defaults["steps"]))
    with pytest.raises(ModelError, match="it has no edit canvas"):  # the child's own error, as this process's
        apart.canvas_size(100, 60)
    assert apart.cuda_memory() == []  # (no CUDA here: nothing to report)


def test_a_cancel_raised_at_a_step_ends_the_call_with_it(apart):
    cancel = ItemCancelled("job j was cancelled; stopped after step 2/16")
    seen: list[int] = []

    def on_step(step: int) -> None:
        seen.append(step)
        if step == 1:
            raise cancel

    with pytest.raises(ItemCancelled) as raised:
        apart.generate(request(2), on_step=on_step)
    assert raised.value is cancel and seen == [0, 1]  # (the steps after it are not handed to on_step)
    assert apart.generate(request(3)).images  # the process goes on with the next call


def test_a_model_process_that_dies_fails_its_call_and_the_next_call_starts_another(apart):
    first = apart.pid

    def kill(step: int) -> None:
        if step == 0:
            os.kill(first, signal.SIGKILL)

    with pytest.raises(TransientError, match=r"model process exited \(code -9\)"):
        apart.generate(request(4), on_step=kill)
    assert apart.generate(request(5)).images and apart.pid not in (None, first)


def test_a_bad_setup_fails_the_load_with_the_childs_error(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        ModelProcess("i1-fast", str(tmp_path / "nowhere"), "cpu", RunnerSettings(), ("WARNING", "text")).load()
    bad = RunnerSettings(model_cpus="4096")
    with pytest.raises(ConfigError, match="runner.model_cpus='4096': this worker may use CPUs"):
        ModelProcess("i1-fast", "tiny", "cpu", bad, ("WARNING", "text")).load()


def test_the_cpus_the_model_process_keeps_to(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert model_cpus("auto", "cuda:0") is None  # torch uses every CPU: nothing to keep to
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert model_cpus("auto", "cuda:0") is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert model_cpus("auto", "cpu") == {0} and model_cpus("auto", "cuda:2") == {2}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert model_cpus("auto", "cuda:1") == {2, 3} and model_cpus("auto", "cuda:3") == {2, 3}
    assert model_cpus("off", "cpu") is None and model_cpus("1-2,0", "cpu") == {0, 1, 2}
    with pytest.raises(ConfigError, match=r"may use CPUs 0-3 only"):
        model_cpus("2-5", "cpu")
    with pytest.raises(ValueError, match="model_cpus"):
        RunnerSettings(model_cpus="half")
