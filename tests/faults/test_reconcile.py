"""Redis loses its data mid-job (FLUSHALL): `dreambatch reconcile` rebuilds the job from its durable
record in S3 and re-queues exactly the items that have no result; nothing that ended runs again."""

from __future__ import annotations

import json
import signal
import uuid

import pytest
from ledger import check_ledger
from services import TINY_GENERATE_PARAMS, cli, item_context, s3_client, service_env, wait_until

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(240)

GPU = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu", "--concurrency", "1")


def test_flushall_mid_job_then_reconcile_requeues_only_unfinished_items(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    io = start_worker("worker", "--io")
    gpu = start_worker(*GPU)
    gpu.wait_ready()
    io.wait_ready()
    manifest = tmp_path / "m.jsonl"
    ids = [f"r{n}" for n in range(6)]
    manifest.write_text(
        "".join(json.dumps({"id": i, "prompt": f"photo {i}", "seed": n}) + "\n" for n, i in enumerate(ids))
    )
    output = f"s3://{bucket}/rec"
    res = cli("submit", str(manifest), "--model", "i1-fast", "--set", "steps=12", "--output", output, "--json", env=env)
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout)["job_id"]

    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.get_job(job_id).counts["completed"] >= 2, 90, 0.05, what="two items completed")
    gpu.kill(signal.SIGKILL)  # nothing writes while Redis is wiped
    s3 = s3_client(s3_endpoint)

    def listing(prefix: str) -> dict[str, object]:
        page = s3.list_objects_v2(Bucket=bucket, Prefix=f"rec/{job_id}/{prefix}")
        return {o["Key"]: o["LastModified"] for o in page.get("Contents", [])}

    ended_before = {k.rsplit("/", 1)[1].removesuffix(".json") for k in listing("items/")}
    outputs_before = {k: v for k, v in listing("").items() if k.endswith(".png")}
    assert 2 <= len(ended_before) < 6, ended_before
    assert not listing("results.jsonl")

    redis_server.client().flushdb()
    assert store.get_job(job_id) is None

    second = start_worker(*GPU)
    second.wait_ready()
    res = cli("reconcile", job_id, "--output", output, "--json", env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["total"] == 6 and report["ended"] == len(ended_before) and report["recreated"]
    assert report["requeued"] == report["total"] - report["ended"]
    # the live state is back at once: ended items with their recorded status, the rest queued
    for item_id in ended_before:
        assert store.get_item(job_id, item_id).status == "completed"

    wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at, 120, 0.25, what="job to end after reconcile")
    job = store.get_job(job_id)
    assert job.status == "completed" and job.counts["completed"] == 6

    # items finished before the flush were not run again: same output objects, one attempt each
    outputs_after = {k: v for k, v in listing("").items() if k.endswith(".png")}
    for key, modified in outputs_before.items():
        assert outputs_after[key] == modified, key
    lines = [
        json.loads(x)
        for x in s3.get_object(Bucket=bucket, Key=f"rec/{job_id}/results.jsonl")["Body"].read().decode().splitlines()
    ]
    for line in lines:
        assert line["status"] == "completed" and line["output"]["images"], line
        if line["id"] in ended_before:
            assert line["attempts"] == 1, line

    check_ledger(s3, bucket, "rec", job_id, ids)  # every row once, in order, every output present


# --- in process: the rules, without services ---------------------------------------------------
def _recorded_job(tmp_path, statuses: dict[str, str | None], rejected: tuple[str, ...] = ()):
    """A durable record as submit + workers leave it: job.json, rows.jsonl, and items/*.json for the
    items in `statuses` whose value is a terminal status."""
    from jobs import records
    from jobs.models import ItemRecord, JobRecord
    from jobs.storage import LocalStore

    objects = LocalStore(str(tmp_path / "out"))
    at = "2024-01-01T00:00:00.000+00:00"
    ids = [*statuses, *rejected]
    job = JobRecord(
        job_id="j1", model="i1-fast", output=str(tmp_path / "out"), total=len(ids), created_at=at, updated_at=at
    )
    records.write_job_spec(objects, job)
    rows = []
    for n, item_id in enumerate(ids, 1):
        bad = item_id in rejected
        rows.append(
            {
                "id": item_id,
                "line": n,
                "params": {} if bad else {"prompt": item_id, "seed": n},
                "metadata": {},
                "error": "invalid row: prompt: field required" if bad else None,
            }
        )
        status = "failed" if bad else statuses[item_id]
        if status:
            records.write_item_result(
                objects,
                ItemRecord(
                    job_id="j1",
                    item_id=item_id,
                    line=n,
                    status=status,
                    seed=n,
                    attempts=1,
                    error=rows[-1]["error"],
                    created_at=at,
                    updated_at=at,
                ),
            )
    objects.put("j1/rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode(), "application/x-ndjson")
    return objects, job


def test_the_periodic_sweep_requeues_a_lost_jobs_items_at_the_jobs_priority(redis_server, tmp_path):
    """After Redis lost a job, the I/O worker's sweep queues its unfinished items again in its priority's list,
    as submit did: a high job's items do not go behind every normal one."""
    import redis

    from jobs import keys, records
    from jobs.services import Services
    from jobs.settings import Settings
    from jobs.store import MemoryStore
    from worker import sweeper

    objects, job = _recorded_job(tmp_path, {"a": "completed", "b": None})
    records.write_job_spec(objects, job.model_copy(update={"priority": "high"}))
    records.mark_open(objects, job)
    url = redis_server.url
    services = Services(Settings(redis_url=url, output=objects.location), store=MemoryStore())  # the job is lost
    lists, queue = redis.Redis.from_url(url), keys.gpu_queue("i1-fast")
    try:
        assert sweeper.sweep_once(services) == 1
        assert {p: lists.llen(name) for p, name in keys.priority_lists(queue).items()} == {
            "high": 1,
            "normal": 0,
            "low": 0,
        }
    finally:
        lists.flushdb()


def test_reconcile_rebuilds_counts_and_queues_only_items_without_a_result(tmp_path):
    from jobs.reconcile import reconcile
    from jobs.store import MemoryStore

    objects, _ = _recorded_job(tmp_path, {"a": "completed", "b": None, "c": "failed", "d": None}, rejected=("e",))
    store, sent, finals = MemoryStore(), [], []
    report = reconcile("j1", objects, store, sent.append, finals.append, batch=1)
    assert (report.total, report.ended, report.requeued, report.recreated) == (5, 3, 2, True)
    assert sent == [["b"], ["d"]] and finals == []
    job = store.get_job("j1")
    assert job.total == 5 and job.counts["completed"] == 1 and job.counts["failed"] == 2
    assert job.counts["queued"] == 2
    assert store.get_item("j1", "b").params == {"prompt": "b", "seed": 2}

    # run again while the store still has the job: nothing recreated, nothing double-counted
    report = reconcile("j1", objects, store, sent.append, finals.append)
    assert not report.recreated and report.requeued == 2 and sent[-1] == ["b", "d"]
    assert store.get_job("j1").counts == job.counts


def test_reconcile_finalizes_a_job_whose_items_all_ended(tmp_path):
    from jobs.reconcile import reconcile
    from jobs.store import MemoryStore

    objects, _ = _recorded_job(tmp_path, {"a": "completed", "b": "completed"})
    store, sent, finals = MemoryStore(), [], []
    report = reconcile("j1", objects, store, sent.append, finals.append)
    assert report.requeued == 0 and report.finalized and finals == ["j1"] and sent == []


def test_reconcile_in_place_applies_results_the_live_state_missed(tmp_path):
    from jobs.models import ItemRecord
    from jobs.reconcile import reconcile
    from jobs.store import MemoryStore

    objects, job = _recorded_job(tmp_path, {"a": "completed", "b": None})
    store, sent, finals = MemoryStore(), [], []
    store.create_job(job)
    at = job.created_at
    store.add_items(
        [
            ItemRecord(job_id="j1", item_id=i, line=n, status=s, created_at=at, updated_at=at)
            for n, (i, s) in enumerate([("a", "running"), ("b", "completed")], 1)
        ]
    )
    report = reconcile("j1", objects, store, sent.append, finals.append)
    assert not report.recreated and report.requeued == 0 and sent == []
    assert store.get_item("j1", "a").status == "completed"  # its result record was written, the move was not
    assert finals == ["j1"]  # that was the last item to end


def test_cancel_records_queued_items_before_they_move_so_a_rebuild_keeps_them_cancelled(redis_server, tmp_path):
    """`cancel JOB` ends its queued items the way a worker ends one (jobs.ending): at every move, worker or
    cancel, the item's record is already in items/{id}.json. So after Redis loses the job, reconcile restores
    the cancelled items as cancelled and queues none of them again."""
    from PIL import Image

    from jobs import records
    from jobs.control import cancel_job
    from jobs.models import ItemRecord, JobRecord
    from jobs.reconcile import reconcile
    from jobs.services import Services
    from jobs.settings import Settings
    from jobs.storage import LocalStore
    from jobs.store import MemoryStore
    from worker import process
    from worker.runners.base import RunOutput

    out = tmp_path / "out"
    objects, job_id, at = LocalStore(str(out)), f"j-{uuid.uuid4().hex[:8]}", "2024-01-01T00:00:00.000+00:00"

    class RecordFirst(RedisStore):
        def transition(self, item, to, *, count_attempt=False):
            if to.terminal:  # the record says so before the live state does
                recorded = objects.get(f"{job_id}/items/{item.item_id}.json")
                assert recorded and json.loads(recorded)["status"] == to, (item.item_id, to)
            return super().transition(item, to, count_attempt=count_attempt)

    class Tiny:
        model = "i1-fast"

        def generate(self, request, on_step=None):
            return RunOutput([Image.new("RGB", (16, 16))], request.seed, 0.01)

    params = TINY_GENERATE_PARAMS
    job = JobRecord(job_id=job_id, model="i1-fast", output=str(out), total=3, created_at=at, updated_at=at)
    items = [
        ItemRecord(
            job_id=job_id, item_id=i, line=n, params={**params, "prompt": i}, seed=n, created_at=at, updated_at=at
        )
        for n, i in enumerate("abc", 1)
    ]
    records.write_job_spec(objects, job)
    objects.put(
        f"{job_id}/rows.jsonl",
        "".join(
            json.dumps({"id": i.item_id, "line": i.line, "params": i.params, "metadata": {}, "error": None}) + "\n"
            for i in items
        ).encode(),
        records.JSONL,
    )
    settings = Settings(redis_url=redis_server.url)
    store = RecordFirst.from_url(redis_server.url)
    store.create_job(job)
    store.add_items(items)

    ctx = item_context(store, objects, Tiny, settings=settings)
    assert process.process_item(ctx, job_id, "a").ended == "completed"  # a worker ends a
    cancel_job(Services(settings, store=store, objects=lambda _: objects), job_id)  # b, c
    assert {i.item_id: i.status for i in store.items(job_id)} == {"a": "completed", "b": "cancelled", "c": "cancelled"}
    for item_id in "bc":
        recorded = json.loads(objects.get(f"{job_id}/items/{item_id}.json"))
        assert (recorded["status"], recorded["reason"], recorded["attempts"]) == ("cancelled", "cancelled", 0)

    rebuilt = MemoryStore()  # Redis lost the job
    report = reconcile(job_id, objects, rebuilt, lambda ids: pytest.fail(f"{ids} queued again"), lambda _: None)
    assert (report.ended, report.requeued, report.finalized) == (3, 0, True)
    assert {i.item_id: (i.status, i.reason) for i in rebuilt.items(job_id)} == {
        "a": ("completed", None),
        "b": ("cancelled", "cancelled"),
        "c": ("cancelled", "cancelled"),
    }


def test_a_completed_record_without_its_images_runs_again(tmp_path):
    """A worker writes a completed item's record and its images side by side: one that stopped between them
    leaves a record whose images are not there. Reconcile runs such an item again, whether Redis lost the job
    or still has it running; a record whose images are there (in the job's folder, or at a row's own
    output_key) stands, as does one results.jsonl lists completed."""
    from jobs import records
    from jobs.models import ItemOutput, ItemRecord, OutputImage
    from jobs.reconcile import reconcile
    from jobs.store import MemoryStore

    objects, job = _recorded_job(tmp_path, {"a": None, "b": None, "c": None})
    at = job.created_at
    keys_of = {"a": "j1/a.png", "b": "j1/b.png", "c": "mirror/c.png"}  # c: a row's own output_key
    for n, item_id in enumerate("abc", 1):
        image = OutputImage(s3_uri=objects.uri(keys_of[item_id]), width=8, height=8, content_type="image/png")
        out = ItemOutput(seed=n, images=[image])
        records.write_item_result(
            objects,
            ItemRecord(job_id="j1", item_id=item_id, line=n, status="completed", seed=n, output=out, created_at=at,
                       updated_at=at),
        )  # fmt: skip
    objects.put(keys_of["a"], b"png", "image/png")
    objects.put(keys_of["c"], b"png", "image/png")  # b's image never landed

    queued: list[str] = []
    report = reconcile("j1", objects, MemoryStore(), queued.extend, lambda _: None)  # Redis lost the job
    assert report.recreated and queued == ["b"] and report.ended == 2

    live, queued = MemoryStore(), []
    live.create_job(job)
    live.add_items(
        [ItemRecord(job_id="j1", item_id=i, line=n, status="running", created_at=at, updated_at=at)
         for n, i in enumerate("abc", 1)]
    )  # fmt: skip
    report = reconcile("j1", objects, live, queued.extend, lambda _: None)  # Redis has it, b still running
    assert not report.recreated and queued == ["b"]
    assert [live.get_item("j1", i).status for i in "abc"] == ["completed", "running", "completed"]

    # once results.jsonl lists b completed (its job ended), an image of it deleted since is not made again
    ended = [ItemRecord(job_id="j1", item_id=i, line=n, status="completed", created_at=at, updated_at=at)
             for n, i in enumerate("abc", 1)]  # fmt: skip
    records.write_results(objects, "j1", ended)
    queued = []
    report = reconcile("j1", objects, MemoryStore(), queued.extend, lambda _: None)
    assert report.recreated and queued == [] and report.ended == 3
