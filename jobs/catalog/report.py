"""What a run found and did: the report `schedules run` prints and the run record keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.submit import now_iso

SHOWN_SKIPS = 1000  # skipped objects kept in a run record (the counts cover all of them)


SHOWN_DELETED = 1000  # deleted images named in a run record (the count covers all of them)
SHOWN_IN_JOB = 50  # deleted images, alerts and problem objects named in a job's `catalog` block (its webhook)
PROBLEMS = ("empty", "unsupported", "given_up")  # kinds of skipped object a person should look at (the sheet)


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str
    kind: str = "other"  # empty, unsupported (an image format not read), not_image, folder, too_large, given_up
    #                      (its image failed for its content and has not changed since), other


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
    # images the ledger held that the source no longer has (or source.exclude now leaves out):
    # {key, why, outputs, action (kept, deleted, moved, would …), moved_to}
    deleted: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)  # source.exclude pattern → objects it left out
    alerts: list[dict[str, Any]] = field(default_factory=list)  # {key, error, job_id}: failed for the first time

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped"] = [asdict(s) for s in self.skipped[:SHOWN_SKIPS]]
        data["skipped_total"] = len(self.skipped)
        data["deleted"] = self.deleted[:SHOWN_DELETED]
        data["deleted_total"] = len(self.deleted)
        return data

    def problems(self) -> list[Skipped]:
        """The skipped objects a person should look at: empty, in a format not read, failed for its content."""
        return [s for s in self.skipped if s.kind in PROBLEMS]

    def for_job(self, sheet: str | None) -> dict[str, Any]:
        """What the run's job carries (`JobRecord.catalog`: its job webhook and its sheet show it)."""
        problems = self.problems()
        return {
            "schedule": self.schedule,
            "slot": self.slot,
            "sheet": sheet,
            "deleted": self.deleted[:SHOWN_IN_JOB],
            "deleted_total": len(self.deleted),
            "alerts": self.alerts[:SHOWN_IN_JOB],
            "problems": [asdict(s) for s in problems[:SHOWN_IN_JOB]],
            "problems_total": len(problems),
            "excluded": sum(self.excluded.values()),
        }

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
            "deleted": len(self.deleted),
            "deleted_keys": [d["key"] for d in self.deleted[:SHOWN_IN_JOB]],
            "deleted_action": self.deleted[0]["action"] if self.deleted else None,
            "excluded": sum(self.excluded.values()),
            "alerts": [a["key"] for a in self.alerts[:SHOWN_IN_JOB]],
            "problems": len(self.problems()),
        }
