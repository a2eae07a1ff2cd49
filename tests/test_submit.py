"""One way to make a job: `create_job(spec, manifest, services)`, whoever submits (CLI, API, schedule, local)."""

from __future__ import annotations

import json
import time

import pytest

from jobs import records
from jobs.errors import ConfigError, InputError
from jobs.manifest import RowChecker
from jobs.models import JobSpec
from jobs.services import Services
from jobs.settings import CelerySettings, Settings
from jobs.storage import LocalStore
from jobs.store import MemoryStore
from jobs.submit import create_job


def _services(tmp_path, **settings):
    folder, sent = LocalStore(str(tmp_path / "out")), {"published": [], "events": [], "finals": []}
    services = Services(
        Settings(redis_url="redis://127.0.0.1:1/0", allow_private_hosts="127.0.0.1", **settings),
        store=MemoryStore(),
        objects=lambda _location: folder,
        publish=lambda job, ids: sent["published"].append((job.job_id, job.priority, ids)),
        notify=sent["events"].extend,
        finalize=sent["finals"].append,
    )
    return services, folder, sent


def _manifest(tmp_path, *rows):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_job_spec_makes_a_job_with_every_option_it_names(tmp_path):
    services, folder, sent = _services(tmp_path)
    spec = JobSpec(
        model="i1-fast",
        defaults={"steps": 2},
        output=folder.location,
        webhook="http://127.0.0.1:9/h",
        priority="high",
        max_concurrency=3,
        expires_after=3600,
        review_sheet=True,
        skip_invalid=True,
    )
    before = time.time()
    sub = create_job(spec, _manifest(tmp_path, {"id": "a", "prompt": "x"}, {"id": "b", "prompt": ""}), services)

    job = services.job(sub.job.job_id)
    assert (job.model, job.defaults, job.output, job.webhook, job.priority, job.max_concurrency, job.review_sheet) == (
        "i1-fast",
        {"steps": 2},
        folder.location,
        "http://127.0.0.1:9/h",
        "high",
        3,
        True,
    )
    assert before + 3600 <= job.expires_at <= time.time() + 3600
    assert records.read_job(folder, job.job_id).priority == "high"  # the durable record says so too
    # the valid row queued at the job's priority; the rejected one reported once, by its webhook event
    assert (sub.queued, sub.rejected, sub.job_done) == (1, 1, False)
    assert sent["published"] == [(job.job_id, "high", ["a"])]
    assert sent["events"] == [(job.job_id, "b", f"evt_{job.job_id}_b_failed")] and sent["finals"] == []


def test_a_job_whose_every_row_is_rejected_is_finalized_at_once(tmp_path):
    services, folder, sent = _services(tmp_path)
    sub = create_job(
        JobSpec(model="i1-fast", output=folder.location, skip_invalid=True),
        _manifest(tmp_path, {"id": "a", "prompt": ""}),
        services,
    )
    assert sub.job_done and sent["finals"] == [sub.job.job_id] and sent["published"] == []
    assert sent["events"] == []  # no webhook: nothing to report to


def test_the_spec_is_checked_before_anything_is_made(tmp_path):
    services, folder, sent = _services(tmp_path)
    manifest = _manifest(tmp_path, {"prompt": "x"})
    with pytest.raises(InputError, match="model: unknown model 'i9'"):
        create_job(JobSpec(model="i9", output=folder.location), manifest, services)
    with pytest.raises(InputError, match="webhook|private|10.0.0.1"):  # an address the network policy refuses
        create_job(JobSpec(model="i1-fast", output=folder.location, webhook="http://10.0.0.1/h"), manifest, services)
    with pytest.raises(ConfigError, match="DREAMBATCH_OUTPUT"):
        create_job(JobSpec(model="i1-fast"), manifest, services)
    assert not (tmp_path / "out").exists() and sent == {"published": [], "events": [], "finals": []}
    default = create_job(JobSpec(model="i1-fast"), manifest, _services(tmp_path, output=folder.location)[0])
    assert default.job.output == folder.location  # no output in the spec: DREAMBATCH_OUTPUT


def test_each_row_is_checked_once_and_each_batch_is_stored_before_its_tasks_are_published(tmp_path, monkeypatch):
    checked: list[int] = []
    check = RowChecker.check
    monkeypatch.setattr(RowChecker, "check", lambda self, raw: checked.append(raw.line) or check(self, raw))
    store, folder, published = MemoryStore(), LocalStore(str(tmp_path / "out")), []

    def publish(job, ids):
        assert all(store.get_item(job.job_id, i) for i in ids)  # stored first
        published.append(ids)

    services = Services(
        Settings(redis_url="redis://127.0.0.1:1/0", celery=CelerySettings(publish_batch=3)),
        store=store,
        objects=lambda _location: folder,
        publish=publish,
    )
    rows = [{"id": f"r{n}", "prompt": "x" if n != 4 else ""} for n in range(7)]
    spec = JobSpec(model="i1-fast", output=folder.location, skip_invalid=True)
    sub = create_job(spec, _manifest(tmp_path, *rows), services)

    assert checked == [1, 2, 3, 4, 5, 6, 7]  # step 1 checked each row; the fan-out read back what it kept
    assert published == [["r0", "r1", "r2"], ["r3", "r5"], ["r6"]]  # batches of 3 rows; r4 was rejected
    assert (sub.queued, sub.rejected) == (6, 1)
    assert [i.item_id for i in store.items(sub.job.job_id)] == [f"r{n}" for n in range(7)]
    assert store.get_item(sub.job.job_id, "r4").status == "failed"
