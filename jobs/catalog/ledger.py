"""The ledger: what each source key was last edited as, runs folded in once their job ended, and the diff."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jobs import keys, records
from jobs.catalog.report import RunReport, Skipped
from jobs.errors import ErrorKind, recorded_kind
from jobs.lifecycle import ItemStatus
from jobs.storage import ObjectStore
from jobs.store import Store
from jobs.submit import now_iso

COMPACT_AFTER_DELTAS = 60  # a save that would make more delta files than this writes the whole ledger instead
COMPACT_SHARE = 0.25  # … as does one whose deltas would add up to more than this share of the whole one's bytes


@dataclass
class Ledger:
    """What each key was last edited as. Stored incrementally: `ledger.json` is a whole snapshot (as of delta
    `seq`), and each save after it writes only what changed, `ledger/{seq}.json` (the state of each key it
    touched, and the pending runs); loading reads the snapshot and applies the newer deltas in order. Once the
    deltas grow past COMPACT_AFTER_DELTAS files or COMPACT_SHARE of the snapshot's size, a save writes a new
    snapshot and deletes them. So a night that changes 1,000 keys of 1 M writes about 1,000 entries, not 1 M."""

    # source key (or manifest row id) → {fp, job_id, outputs, at, model_revision} of its last completed edit
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    # key → {fp, count, error, job_id, at}: runs in a row whose item failed (or was rejected) with fingerprint fp
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)  # job ids of runs not folded in yet
    # keys whose item failed because of its input for the first time with its fingerprint, folded in now:
    # this run reports them (a corrupt upload is reported once, not every night); not stored
    alerts: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0  # the last delta applied
    dirty: set[str] = field(default_factory=set)  # keys changed since load
    stored_pending: list[str] = field(default_factory=list)
    snapshot_bytes: int = 0
    delta_bytes: int = 0
    deltas: list[str] = field(default_factory=list)  # delta keys applied on top of the snapshot
    written: int = 0  # bytes the last save wrote

    @classmethod
    def load(cls, objects: ObjectStore, name: str) -> Ledger:
        data = objects.get(keys.S3_CATALOG_LEDGER.format(prefix="", name=name))
        raw = json.loads(data) if data else {}
        ledger = cls(entries=raw.get("entries", {}), failures=raw.get("failures", {}), pending=raw.get("pending", []))
        ledger.seq, ledger.snapshot_bytes = int(raw.get("seq", 0)), len(data or b"")
        for key in sorted(objects.keys(keys.S3_CATALOG_LEDGER_DELTAS.format(prefix="", name=name))):
            seq = _delta_seq(key)
            if seq is None or seq <= ledger.seq:
                continue  # written before the snapshot (a compaction that stopped before deleting it)
            body = objects.get(key)
            if body is None:
                continue
            delta = json.loads(body)
            for k, state in delta["keys"].items():
                _put(ledger.entries, k, state.get("entry"))
                _put(ledger.failures, k, state.get("failure"))
            ledger.pending = delta["pending"]
            ledger.seq, ledger.delta_bytes = seq, ledger.delta_bytes + len(body)
            ledger.deltas.append(key)
        ledger.stored_pending = list(ledger.pending)
        return ledger

    def save(self, objects: ObjectStore, name: str) -> None:
        """Write what changed since load: one delta file, or nothing when nothing did; a whole snapshot once the
        deltas have grown too many or too large."""
        self.written = 0
        if not self.dirty and self.pending == self.stored_pending:
            return
        delta = json.dumps(
            {
                "seq": self.seq + 1,
                "at": now_iso(),
                "pending": self.pending,
                "keys": {k: self.state(k) for k in sorted(self.dirty)},
            },
            sort_keys=True,
        ).encode()
        too_many = len(self.deltas) + 1 > COMPACT_AFTER_DELTAS
        if too_many or self.delta_bytes + len(delta) > COMPACT_SHARE * max(self.snapshot_bytes, 1 << 16):
            self.compact(objects, name)
        else:
            self.seq += 1
            key = keys.S3_CATALOG_LEDGER_DELTA.format(prefix="", name=name, seq=self.seq)
            objects.put(key, delta, records.JSON)
            self.deltas.append(key)
            self.delta_bytes += len(delta)
            self.written = len(delta)
        self.dirty.clear()
        self.stored_pending = list(self.pending)

    def state(self, key: str) -> dict[str, Any]:
        return {"entry": self.entries.get(key), "failure": self.failures.get(key)}

    def compact(self, objects: ObjectStore, name: str) -> None:
        """Write the whole ledger as the snapshot (as of the last delta), then delete the deltas it covers."""
        body = json.dumps(
            {
                "version": 2,
                "schedule": name,
                "updated_at": now_iso(),
                "seq": self.seq,
                "pending": self.pending,
                "entries": self.entries,
                "failures": self.failures,
            },
            sort_keys=True,
        ).encode()
        objects.put(keys.S3_CATALOG_LEDGER.format(prefix="", name=name), body, records.JSON)
        for key in self.deltas:
            objects.delete(key)
        self.deltas, self.delta_bytes, self.snapshot_bytes, self.written = [], 0, len(body), len(body)
        self.dirty.clear()
        self.stored_pending = list(self.pending)

    def record(self, key: str, fp: str, job_id: str, line: dict[str, Any]) -> None:
        """Fold one ended item in: a completed one is the key's edit now; one that failed because of its input
        (a rejected row, an image that does not decode) counts one more failed run in a row for that
        fingerprint. Other failures (S3 or the broker down, a model error, a lost worker) and cancelled items
        change nothing: the image is tried again next run, however often that happens."""
        if line["status"] in (ItemStatus.COMPLETED, ItemStatus.FAILED):
            self.dirty.add(key)
        if line["status"] == ItemStatus.COMPLETED:
            self.entries[key] = {
                "fp": fp,
                "job_id": job_id,
                "at": now_iso(),
                "outputs": [i["s3_uri"] for i in line["output"]["images"]],
                "model_revision": line.get("model_revision"),
            }
            self.failures.pop(key, None)
        elif line["status"] == ItemStatus.FAILED and input_failure(line):
            before = self.failures.get(key)
            count = before["count"] + 1 if before and before["fp"] == fp else 1
            if count == 1:
                self.alerts.append({"key": key, "error": str(line.get("error") or "")[:500], "job_id": job_id})
            self.failures[key] = {
                "fp": fp,
                "count": count,
                "error": str(line.get("error") or "")[:500],
                "job_id": job_id,
                "at": now_iso(),
            }

    def forget(self, key: str) -> None:
        self.entries.pop(key, None)
        self.failures.pop(key, None)
        self.dirty.add(key)

    def keys(self) -> set[str]:
        return set(self.entries) | set(self.failures)


def _put(table: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value


def _delta_seq(key: str) -> int | None:
    stem = key.rsplit("/", 1)[-1].removesuffix(".json")
    return int(stem) if stem.isdigit() else None


def input_failure(line: dict[str, Any]) -> bool:
    """Whether a failed results line failed because of its input: rejected at submit, or an input error on
    the worker (the image would not fetch, decode or fit; its URL was refused)."""
    return recorded_kind(line) == ErrorKind.INPUT


def fold(ledger: Ledger, objects: ObjectStore, store: Store, name: str) -> tuple[list[str], dict[str, str]]:
    """Fold in every pending run whose job has ended (`Ledger.record`: completed items become the keys' edits,
    failed ones count a failed run). Returns the runs folded and the items still in flight (key → fingerprint)."""
    folded, in_flight = [], {}
    for job_id in list(ledger.pending):
        data = objects.get(keys.S3_CATALOG_RUN.format(prefix="", name=name, job_id=job_id))
        run = json.loads(data) if data else {"items": {}}
        lines = records.read_results(objects, job_id)
        if lines is None:
            live = store.get_job(job_id)
            if live is not None and not live.finished_at and not live.submit_aborted:
                in_flight.update({v["key"]: v["fp"] for v in run["items"].values()})
                continue
            # its live state is gone, or its submission failed (nothing of it runs): read what ended
            lines = _item_records(objects, job_id, run["items"])
        for line in lines:
            item = run["items"].get(line["id"])
            if item:
                ledger.record(item["key"], item["fp"], job_id, line)
        ledger.pending.remove(job_id)
        folded.append(job_id)
    return folded, in_flight


def _item_records(objects: ObjectStore, job_id: str, items: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a run's items that ended, less completed ones whose images are not there (a worker
    stopped between its record and its images: not an edit, so the next run makes it)."""
    found = {item_id: record for item_id in items if (record := records.read_item_result(objects, job_id, item_id))}
    missing = records.outputs_missing(objects, objects.location, job_id, found)
    return [record for item_id, record in found.items() if item_id not in missing]


def live_revision(workers: list[dict[str, Any]], model: str) -> tuple[str | None, str | None]:
    """The weights revision the live workers of `model` run, when they all publish the same one; else None
    and a note saying why it is not known (no worker, or workers on different weights mid-upgrade)."""
    published = [w.get("model_revision") for w in workers if w.get("model") == model]
    if not published:
        return None, f"no live {model} worker: the model revision is not compared this run"
    found = sorted({str(r) for r in published if r})
    if len(found) == 1 and all(published):
        return found[0], None
    shown = ", ".join(found + (["unknown"] if not all(published) else []))
    return None, f"live {model} workers run different weights ({shown}): the model revision is not compared"


@dataclass(frozen=True)
class Diff:
    """How one run compares what it found with the ledger."""

    ledger: Ledger
    in_flight: dict[str, str]  # key → fingerprint of items of runs still going
    revision: str | None  # the live workers' weights revision (None: not compared)
    max_failures: int  # 0: never skip a key that keeps failing
    retry_failed: bool  # this run tries keys that failed max_failures runs in a row again
    schedule: str

    def verdict(self, key: str, fp: str, always: str | None = None) -> tuple[str, str | None]:
        """("unchanged" | "in_flight" | "given_up" | "new" | "changed", why) for one image or manifest row;
        `always` (why) when nothing tells whether it changed: a match in the ledger does not keep it back."""
        entry, failed = self.ledger.entries.get(key), self.ledger.failures.get(key)
        same = entry is not None and entry["fp"] == fp
        ran = entry.get("model_revision") if entry is not None and same else None
        moved = bool(self.revision and ran and ran != self.revision)  # edited with other weights than today's
        if same and not moved and always is None:
            return "unchanged", None
        if self.in_flight.get(key) == fp:  # a run still going has it (a re-run for new weights too)
            return "in_flight", None
        if entry is None:
            why = "new"
        elif moved:
            why = f"model revision changed ({ran} → {self.revision})"
        elif same:  # the same, as far as anyone can tell: `always` says why it runs anyway
            why = always or ""
        else:
            why = "changed (content, instruction or parameters)"
        if failed and failed["fp"] == fp:
            if self.max_failures and failed["count"] >= self.max_failures and not self.retry_failed:
                runs = f"{failed['count']} runs in a row" if failed["count"] != 1 else f"in job {failed['job_id']}"
                return "given_up", (
                    f"failed {runs} with this image and these parameters (last error: {failed['error']}); "
                    f"not queued again until the image or its parameters change, or a run with: "
                    f"dreambatch schedules run {self.schedule} --retry-failed"
                )
            why += f"; failed {failed['count']} run(s) in a row before, tried again"
        return ("new" if entry is None else "changed"), why

    def count(self, report: RunReport, key: str, fp: str, always: str | None = None) -> bool:
        """Count the verdict on `key` in the report; True when it is to be queued."""
        what, why = self.verdict(key, fp, always)
        if what == "unchanged":
            report.unchanged += 1
        elif what == "in_flight":
            report.in_flight += 1
        elif what == "given_up":
            report.given_up += 1
            report.skipped.append(Skipped(key, why or "", "given_up"))
        else:
            (report.changed if what == "changed" else report.new).append(key)
            report.reasons[key] = why or ""
            return True
        return False
