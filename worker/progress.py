"""What `dreambatch run` shows while it runs: a rich progress bar (done/total, rate, ETA, the running item and
its denoising step), each failed item's reason as it ends, and how Ctrl-C stops the run cleanly.

On a terminal the bar redraws in place; elsewhere (a log, CI) every item that ends gets one line instead.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from jobs import pace
from jobs.lifecycle import ItemStatus
from jobs.models import ItemRecord, JobRecord
from worker.local import Observer


class RunProgress(Observer):
    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}", markup=False),
            TextColumn("ETA {task.fields[eta]}", markup=False),
            TextColumn("{task.fields[now]}", markup=False),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("starting", total=None, rate="", eta="-:--:--", now="")
        self.total = self.done = 0
        self.meter = pace.Meter()  # the rate of the items this run ended (jobs.pace: the one rate/ETA rule)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def loading(self) -> None:
        _quiet_library_bars()
        self.progress.update(self.task, description="loading the model")
        if not self.live:
            self.console.print("loading the model…")

    def begin(self, job: JobRecord, pending: int) -> None:
        self.total, self.done = job.total, job.total - pending
        self.meter = pace.Meter()
        self.meter.observe(self.done, self.total)
        self.console.print(f"{job.job_id}: {pending} of {self.total} item(s) to run, into {job.output}", soft_wrap=True)
        self.progress.update(self.task, description="", total=self.total, completed=self.done)

    def started(self, item_id: str) -> None:
        self.progress.update(self.task, now=item_id)

    def step(self, item_id: str, step: int, steps: int) -> None:
        self.progress.update(self.task, now=f"{item_id}: step {step}/{steps}")

    def ended(self, item: ItemRecord) -> None:
        self.done += 1
        now = self.meter.observe(self.done, self.total)
        self.progress.update(self.task, completed=self.done, now="", rate=now.text(), eta=now.eta_text())
        if item.status != ItemStatus.COMPLETED:
            why = f": {item.error}" if item.error else (f" ({item.reason})" if item.reason else "")
            self.console.print(f"[{self.done}/{self.total}] {item.item_id}: {item.status}{why}", soft_wrap=True)
        elif not self.live:
            self.console.print(
                f"[{self.done}/{self.total}] {item.item_id}: {item.status} ({now.text()}, ETA {now.eta_text()})",
                soft_wrap=True,
            )


def _quiet_library_bars() -> None:
    """diffusers' and transformers' own loading bars would draw over this one."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:  # the runner will say which extra is missing
        return
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@contextmanager
def ctrl_c_stops(stop: threading.Event) -> Iterator[None]:
    """While inside: the first Ctrl-C sets `stop` (the run ends at the running item's next step); a second one
    interrupts at once."""

    def on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        os.write(2, b"\nstopping at the running item's next step (Ctrl-C again: at once)\n")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
