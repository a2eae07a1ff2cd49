"""Catalog ledger: bytes a night writes, and the time to load it, for a 1 M-image catalog.

    python bench/catalog_ledger.py --objects 1000000 --nights 90 --changed 1000

The ledger (jobs.catalog.ledger.Ledger) is saved as it is in a run: the first night writes the whole
snapshot; each night after changes `--changed` random images (a completed edit each: a new entry) and
folds one pending run, then saves, which writes a delta of what changed, or a new whole snapshot once the
deltas pass COMPACT_AFTER_DELTAS files or COMPACT_SHARE of the snapshot. The store counts every byte put;
"whole" is what rewriting ledger.json every night (the old format) writes. Entries are shaped like a run's
(64-hex fingerprint, job id, time, one output URI, a model revision); in a LocalStore on a temp folder.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--nights", type=int, default=90)
    ap.add_argument("--changed", type=int, default=1000, help="images edited again each night")
    args = ap.parse_args()
    from jobs.catalog import ledger as ledger_module
    from jobs.catalog.ledger import Ledger
    from jobs.storage import LocalStore

    class Counting(LocalStore):
        def __init__(self, location: str):
            super().__init__(location)
            self.put_bytes = 0

        def put(self, key, data, content_type, metadata=None):
            self.put_bytes += len(data)
            return super().put(key, data, content_type, metadata)

    rng = random.Random(7)

    def entry(n: int, night: int) -> dict:
        return {
            "fp": f"{rng.getrandbits(256):064x}",
            "job_id": f"j{night:04d}-{rng.getrandbits(40):010x}",
            "at": f"2026-12-{1 + night % 28:02d}T02:00:{n % 60:02d}.000000+00:00",
            "outputs": [f"s3://catalog/edited/cat{n % 37}/sub{n % 3}/{n:07d}.jpg"],
            "model_revision": "0f3c2a9e1b7d4c6a8e2f1d3b5a7c9e0f2d4b6a8c",
        }

    keys = [f"products/cat{n % 37}/sub{n % 3}/{n:07d}.jpg" for n in range(args.objects)]
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as d:
        store = Counting(d)
        ledger = Ledger(entries={k: entry(n, 0) for n, k in enumerate(keys)})
        started = time.perf_counter()
        ledger.compact(store, "nightly")  # night 1: every image new, the whole ledger written
        first_s, snapshot = time.perf_counter() - started, store.put_bytes
        per_entry = snapshot / args.objects
        nightly, save_s = [], []
        for night in range(1, args.nights + 1):
            before = store.put_bytes
            ledger.pending = [f"j{night:04d}"]  # this night's run is pending; last night's was folded in
            for n in rng.sample(range(args.objects), args.changed):
                ledger.entries[keys[n]] = entry(n, night)
                ledger.dirty.add(keys[n])
            started = time.perf_counter()
            ledger.save(store, "nightly")
            save_s.append(time.perf_counter() - started)
            nightly.append(store.put_bytes - before)
        started = time.perf_counter()
        loaded = Ledger.load(store, "nightly")
        load_s = time.perf_counter() - started
        assert loaded.entries == ledger.entries and loaded.pending == ledger.pending
    whole = snapshot  # the old format rewrote the whole ledger.json every night
    mean = sum(nightly) / len(nightly)
    deltas_only = sorted(b for b in nightly if b < snapshot / 2)
    compactions = len(nightly) - len(deltas_only)  # the nights that wrote a whole snapshot
    print(f"objects {args.objects:,}, nights {args.nights}, changed per night {args.changed:,}")
    print(f"ledger snapshot: {snapshot / 1e6:.1f} MB ({per_entry:.0f} bytes/image), written in {first_s:.2f} s")
    print(f"old format, every night: {whole / 1e6:.1f} MB written")
    print(f"delta night (median): {deltas_only[len(deltas_only) // 2] / 1e3:.1f} kB" if deltas_only else "no delta")
    print(
        f"nights that compacted: {compactions} (of {args.nights}); thresholds: "
        f"{ledger_module.COMPACT_AFTER_DELTAS} deltas or {ledger_module.COMPACT_SHARE:.0%} of the snapshot"
    )
    print(f"mean bytes written per night, compactions included: {mean / 1e6:.2f} MB ({whole / mean:.0f}x less)")
    print(f"save: median {sorted(save_s)[len(save_s) // 2] * 1e3:.0f} ms, max {max(save_s):.2f} s")
    print(f"load (snapshot + {len(loaded.deltas)} deltas): {load_s:.2f} s")


if __name__ == "__main__":
    main()
