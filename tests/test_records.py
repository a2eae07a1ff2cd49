"""The durable record (jobs.records): what a job leaves in object storage, read and written by one module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from jobs import records
from jobs.models import ItemOutput, ItemRecord, JobRecord, OutputImage
from jobs.storage import LocalStore

ROOT = Path(__file__).resolve().parent.parent
AT = "2026-01-01T00:00:00.000+00:00"
RECORD_KEYS = {
    "S3_JOB_SPEC",
    "S3_JOB_ROWS",
    "S3_INPUT",
    "S3_ITEMS",
    "S3_ITEM_RESULT",
    "S3_RESULTS",
    "S3_OPEN_JOB",
    "S3_OUTBOX",
}


def test_a_jobs_record_reads_back_as_it_was_written(tmp_path):
    objects = LocalStore(str(tmp_path / "out"))
    job = JobRecord(
        job_id="j1",
        model="e1-1",
        output=objects.location,
        total=2,
        created_at=AT,
        updated_at=AT,
        priority="high",
        max_concurrency=2,
    )
    assert records.read_job(objects, "j1") is None and records.read_rows(objects, "j1") is None

    records.write_job_spec(objects, job)
    assert records.read_job(objects, "j1") == job
    rows = [
        {"id": "a", "line": 1, "params": {"prompt": "x"}, "metadata": {}, "error": None},
        {"id": "b", "line": 2, "params": {}, "metadata": {"sku": "2"}, "error": "invalid row: prompt"},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records.write_rows(objects, "j1", tmp_path / "rows.jsonl")
    assert records.read_rows(objects, "j1") == rows
    staged = records.write_input(objects, "j1", "a", ".png", b"\x89PNG", "image/png")
    assert Path(staged).read_bytes() == b"\x89PNG" and Path(staged).is_relative_to(objects.root / "j1" / "inputs")

    records.mark_open(objects, job)
    assert records.open_jobs(objects) == ["j1"]
    done = ItemRecord(
        job_id="j1",
        item_id="a",
        line=1,
        status="completed",
        seed=7,
        created_at=AT,
        updated_at=AT,
        output=ItemOutput(
            seed=7, images=[OutputImage(s3_uri="s3://b/j1/a.png", width=8, height=8, content_type="image/png")]
        ),
    )
    assert records.read_item_result(objects, "j1", "a") is None
    records.write_item_result(objects, done)
    recorded = {"job_id": "j1", **done.result_line(), **done.model_dump(mode="json", include=records.RECORD_FIELDS)}
    assert records.read_item_result(objects, "j1", "a") == recorded
    assert records.read_item_results(objects, "j1") == {"a": recorded}

    assert not records.has_results(objects, "j1") and records.read_results(objects, "j1") is None
    uri, count = records.write_results(objects, "j1", [done])
    assert count == 1 and uri.endswith(records.results_key("j1")) and records.has_results(objects, "j1")
    assert records.read_results(objects, "j1") == [done.result_line()]
    records.mark_ended(objects, "j1")
    assert records.open_jobs(objects) == []


def _modules() -> list[Path]:
    return sorted(p for folder in ("jobs", "worker") for p in (ROOT / folder).rglob("*.py"))


def test_only_jobs_records_names_the_durable_records_keys():
    """job.json, rows.jsonl, inputs/, items/, results.jsonl and the _open marker are read and written by
    jobs.records alone, with the templates of jobs.keys; no module spells a job's key itself."""
    offenders = []
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in RECORD_KEYS and rel != "jobs/records.py":
                offenders.append(f"{rel}:{node.lineno}: keys.{node.attr}")
            if isinstance(node, ast.JoinedStr) and rel != "jobs/keys.py" and len(node.values) > 1:
                first, then = node.values[0], node.values[1]
                if (
                    isinstance(first, ast.FormattedValue)
                    and "job_id" in ast.unparse(first.value)
                    and isinstance(then, ast.Constant)
                    and str(then.value).startswith("/")
                ):
                    offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_side_by_side_does_every_write_and_raises_the_first_error_once_all_have_ended():
    done: list[str] = []
    records.side_by_side(lambda: done.append("only"))  # one write: no other thread needed
    assert done == ["only"]

    def fails() -> None:
        raise OSError("S3 said no")

    try:
        records.side_by_side(lambda: done.append("a"), fails, lambda: done.append("b"))
    except OSError as exc:
        assert str(exc) == "S3 said no"
    else:
        raise AssertionError("the failed write's error was lost")
    assert sorted(done) == ["a", "b", "only"]  # the others still ran to their end
