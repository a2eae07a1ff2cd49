"""What a run found and did: the report `schedules run` prints and the run record keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.submit import now_iso

SHOWN_SKIPS = 1000  # skipped objects kept in a run record (the counts cover all of them)


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass
class RunReport:
    schedule: str
    dry_run: bool
    job_id: str | None = None
    images: int = 0
    queued: int = 0
    rejected: int = 0
    unchanged: int = 0
    in_flight: int = 0
    given_up: int = 0  # keys skipped because they failed catalog.max_failures runs in a row (in `skipped` too)
    new: list[str] = field(default_factory=list)  # keys processed (or, dry run, that would be)
    changed: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # key → why it is queued (new, changed, …)
    model_revision: str | None = None  # the weights revision the model's live workers run (None: not known)
    notes: list[str] = field(default_factory=list)  # what the operator should know about this run
    folded: list[str] = field(default_factory=list)  # earlier runs whose completed items were recorded now
    at: str = field(default_factory=now_iso)
    slot: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped[:SHOWN_SKIPS]]
        data["skipped_total"] = len(self.skipped)
        return data

    def summary(self) -> dict[str, Any]:
        """What `schedules list` shows about the last run."""
        return {
            "at": self.at,
            "slot": self.slot,
            "job_id": self.job_id,
            "images": self.images,
            "queued": self.queued,
            "unchanged": self.unchanged,
            "in_flight": self.in_flight,
            "skipped": len(self.skipped),
            "given_up": self.given_up,
        }
