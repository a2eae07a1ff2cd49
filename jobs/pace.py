"""How fast a job goes and when it will end: the one rate/ETA rule that `status`, `status --watch`, the API's
status object, its event stream and the local `run` all use.

A rate is items ended over the seconds they took to end, measured one of two ways, never mixed:

    since(job)    the job's own timestamps: items ended / (its end, or now, − its creation)
    Meter         what a watcher saw: items ended since it began watching / seconds it has watched; until one
                  ends while it watches, the job's own rate stands in (attaching to a running job must not
                  divide every item ever ended by a moment of watching)

`Pace.text()` and `clock()` are how the rate and the ETA read to people.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from jobs import lifecycle
from jobs.models import JobRecord


@dataclass(frozen=True)
class Pace:
    rate: float  # items per second (0.0 while none has ended)
    eta_s: float | None  # seconds until every item has ended at this rate; None when unknown, 0.0 when none is left

    @classmethod
    def of(cls, ended: int, seconds: float, left: int) -> Pace:
        """`ended` items in `seconds`, `left` still to end."""
        rate = ended / seconds if ended > 0 and seconds > 0 else 0.0
        if left <= 0:
            return cls(rate, 0.0)
        return cls(rate, left / rate if rate else None)

    def text(self) -> str:
        """ "2.50 items/s", or "12.3 s/item" below one a second; "-" before the first item ends."""
        if not self.rate:
            return "- items/s"
        return f"{self.rate:.2f} items/s" if self.rate >= 1 else f"{1 / self.rate:.1f} s/item"

    def eta_text(self) -> str:
        return clock(self.eta_s)

    def as_dict(self) -> dict[str, float | None]:
        return {"rate_per_s": round(self.rate, 4), "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


def clock(seconds: float | None) -> str:
    """1:02:03, or -:--:-- when unknown."""
    if seconds is None:
        return "-:--:--"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def since(job: JobRecord, now: float | None = None) -> Pace:
    """The job's rate from its own timestamps: items ended since it was created, over the time since (to its end,
    once it has ended); its ETA while it runs (None once it has ended)."""
    ended = lifecycle.ended(job.counts)
    created = _epoch(job.created_at) or 0.0
    end = _epoch(job.finished_at) or (now if now is not None else time.time())
    pace = Pace.of(ended, end - created, job.total - ended)
    return Pace(pace.rate, None) if job.finished_at else pace


class Meter:
    """A watcher's rate: items ended while it watched, over the time it watched (`observe` once per look)."""

    def __init__(self, clock_fn=time.monotonic):
        self.clock = clock_fn
        self.first: tuple[float, int] | None = None  # (when, items ended) at the first look

    def observe(self, ended: int, total: int, job: JobRecord | None = None) -> Pace:
        """This look: `ended` of `total` items have ended. `job`: its own rate until one ends while watched."""
        now = self.clock()
        if self.first is None or ended < self.first[1]:  # (a retry re-opened items: count from here)
            self.first = (now, ended)
        began, ended_then = self.first
        if ended > ended_then:
            return Pace.of(ended - ended_then, now - began, total - ended)
        if job is not None:
            return since(job)
        return Pace.of(0, now - began, total - ended)


def running(steps: dict[str, tuple[int, int]], limit: int = 50) -> list[dict[str, int | str]]:
    """Running items' denoising progress as status objects list it: [{"id", "step", "steps"}], at most `limit`."""
    return [{"id": item_id, "step": s, "steps": n} for item_id, (s, n) in sorted(steps.items())[:limit]]


def steps_text(steps: dict[str, tuple[int, int]], limit: int = 4) -> str:
    """ "a1 3/16, a2 10/16 (+2 more)": running items' steps on one line."""
    shown = ", ".join(f"{item_id} {s}/{n}" for item_id, (s, n) in sorted(steps.items())[:limit])
    more = len(steps) - limit
    return shown + (f" (+{more} more)" if more > 0 else "")
