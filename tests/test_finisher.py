"""worker/finisher.py: an item's end runs in a spawned process with a context of its own, and a finishing
process that dies under a step is replaced while that step is done in the worker's own process. (Every GPU
worker the other tests start ends its items this way.)"""

from __future__ import annotations

import os

from jobs.settings import Settings
from jobs.store import MemoryStore
from worker.finisher import Finisher
from worker.process import Context


def where(ctx: Context, asked_from: int) -> tuple[int, str]:
    """A step: the process it ran in and the Redis its context reaches."""
    return os.getpid(), ctx.settings.redis_url


def dies_there(ctx: Context, asked_from: int) -> int:
    """A step that kills a finishing process it runs in (as an OOM kill would), and answers in the worker's."""
    if os.getpid() != asked_from:
        os._exit(1)
    return os.getpid()


def fails(ctx: Context, asked_from: int) -> None:
    raise ValueError("a step's own error")


def test_steps_run_in_a_finishing_process_and_one_that_dies_is_replaced(redis_server, monkeypatch):
    monkeypatch.setenv("DREAMBATCH_REDIS_URL", redis_server.url)  # (what the spawned process reads)
    here = Context(
        settings=Settings(redis_url="redis://unused:1/0"),
        store=MemoryStore(),
        runner=lambda: None,
        objects=lambda location: None,
        notify=lambda events: None,
        finalize=lambda job_id: None,
    )
    finisher = Finisher(1)
    try:
        finisher.warm()
        first, url = finisher.run(here, where, os.getpid())
        assert first != os.getpid() and url == redis_server.url  # its own process, its own context

        try:
            finisher.run(here, fails, os.getpid())
        except ValueError as exc:
            assert str(exc) == "a step's own error"  # raised here as it was there
        else:
            raise AssertionError("the step's error was lost")

        assert finisher.run(here, dies_there, os.getpid()) == os.getpid()  # done here when its process died
        second, _ = finisher.run(here, where, os.getpid())
        assert second not in (first, os.getpid())  # a new finishing process took over
    finally:
        finisher.close()
