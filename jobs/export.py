"""A job's results as the CLI and the HTTP API hand them out: JSON lines or a spreadsheet-safe CSV.

The lines come from results.jsonl once the job has ended, from the live item records before that.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

from jobs import records
from jobs.models import JobRecord
from jobs.services import Services

CSV_HEADER = ["id", "line", "status", "error", "seed", "outputs", "metadata", "model", "params"]


def result_lines(job: JobRecord, services: Services) -> Iterator[dict[str, Any]]:
    """One result line per manifest row, in manifest order."""
    lines = records.read_results(services.objects(job.output), job.job_id) if job.finished_at else None
    if lines is not None:
        yield from lines
        return
    for item in services.store.items(job.job_id):
        yield item.result_line(job.model)


def csv_cell(value) -> str:
    """A cell a spreadsheet will not run: text starting with = + - @ (or tab/CR) gets a leading quote."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def csv_rows(lines: Iterable[dict[str, Any]]) -> Iterator[str]:
    """The CSV export, one encoded row at a time (header first); every cell goes through csv_cell."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    for line in lines:
        uris = " ".join(img.get("s3_uri") or "" for img in line["output"]["images"])
        writer.writerow(
            [
                csv_cell(v)
                for v in (
                    line["id"],
                    line["line"],
                    line["status"],
                    line["error"] or "",
                    line["seed"],
                    uris,
                    json.dumps(line["metadata"]),
                    line.get("model") or "",
                    json.dumps(line.get("params") or {}),
                )
            ]
        )
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()
    if buf.tell():
        yield buf.getvalue()


def jsonl_rows(lines: Iterable[dict[str, Any]]) -> Iterator[str]:
    for line in lines:
        yield json.dumps(line) + "\n"
