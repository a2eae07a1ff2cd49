"""What operators and catalog teams see of a job: running items' denoising steps (status, status --watch, the
API's status, /items and event stream, fal's logs, inference.sh's logs), one rate/ETA rule (jobs.pace), time by
stage per item and GPU-seconds per job (status, results.jsonl, the job webhook, Prometheus), the parameters in
each results line, and the per-job webhook event filter.

Redis, S3 (moto's server), the API, webhooks and Celery workers on tiny HiDream weights are real processes, on a
Redis database of this module's own."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from services import ApiServer, Worker, cli, free_port, s3_client, service_env, wait_until

from jobs import pace
from jobs.lifecycle import ItemStatus
from jobs.models import ItemRecord, JobRecord
from jobs.settings import Settings
from jobs.store import RedisStore
from jobs.vendors import fal, inferencesh

pytestmark = pytest.mark.timeout(300)
REDIS_DB = 12
AT = "2026-12-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def stack(redis_server, s3_endpoint, tiny_dir, tmp_path_factory):
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    bucket = f"t-progress-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    env = service_env(redis_url, s3_endpoint, tiny_dir, DREAMBATCH_OUTPUT=f"s3://{bucket}/p")
    logs = tmp_path_factory.mktemp("progress")
    metrics_port = free_port()
    tiny = ["--weights", "tiny", "--device", "cpu", "--concurrency", "1"]
    workers = [
        Worker(["worker", "--io"], env, logs / "io.log"),
        Worker(["worker", "--model", "i1-fast", *tiny, "--metrics-port", str(metrics_port)], env, logs / "i1.log"),
    ]
    settings = Settings(
        redis_url=redis_url,
        output=f"s3://{bucket}/api",
        s3={"endpoint_url": s3_endpoint},
        allow_private_hosts="127.0.0.1",
    )
    api = ApiServer(settings)
    try:
        for w in workers:
            w.wait_ready()
        api.env, api.bucket, api.metrics_port, api.s3 = env, bucket, metrics_port, s3_endpoint
        api.store = RedisStore.from_url(redis_url)
        yield api
    finally:
        api.stop()
        for w in workers:
            w.kill()


@pytest.fixture
def http(stack):
    token = stack.key("jobs:read", "jobs:write", "images", "metrics")
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        yield client


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wait_job(store: RedisStore, job_id: str, timeout: float = 180) -> JobRecord:
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.1, what=f"job {job_id} to end"
    )


def results(stack, job_id: str, prefix: str = "p") -> dict[str, dict]:
    body = s3_client(stack.s3).get_object(Bucket=stack.bucket, Key=f"{prefix}/{job_id}/results.jsonl")["Body"]
    return {line["id"]: line for line in map(json.loads, body.read().decode().splitlines())}


# --- one rate/ETA rule -------------------------------------------------------------------------
def job_of(ended: int, total: int, created: str = AT, finished: str | None = None) -> JobRecord:
    return JobRecord(
        job_id="j",
        model="i1-fast",
        output="s3://b/p",
        total=total,
        counts={"completed": ended, "queued": total - ended},
        created_at=created,
        updated_at=created,
        finished_at=finished,
    )


def test_a_watch_attached_to_a_running_job_rates_only_what_ends_while_it_watches():
    now = [1000.0]
    meter = pace.Meter(lambda: now[0])
    job = job_of(1000, 2000)  # 1,000 items ended before anyone watched
    first = meter.observe(1000, 2000, job)
    assert first.rate == pytest.approx(pace.since(job).rate, rel=1e-3)  # the job's own: 1,000 since it was made
    assert first.rate < 1  # (it was made a day or more ago), not 1,000 over a moment of watching
    now[0] += 0.001
    assert meter.observe(1000, 2000, job).rate < 1  # nothing ended while watched: still not 1,000/0.001 s
    now[0] += 9.999
    seen = meter.observe(1010, 2000, job)  # 10 ended in 10 s of watching
    assert seen.rate == pytest.approx(1.0) and seen.eta_s == pytest.approx(990)
    assert seen.text() == "1.00 items/s" and seen.eta_text() == "0:16:30"


def test_a_jobs_own_rate_comes_from_its_timestamps_and_has_no_eta_once_it_ended():
    running = pace.since(job_of(30, 90), now=job_epoch(AT) + 60)
    assert running.rate == pytest.approx(0.5) and running.eta_s == pytest.approx(120)
    assert pace.Pace(0.5, 120).text() == "2.0 s/item" and pace.clock(3725) == "1:02:05"
    ended = pace.since(job_of(90, 90, finished="2026-12-01T00:03:00+00:00"))
    assert ended.rate == pytest.approx(0.5) and ended.eta_s is None
    assert pace.since(job_of(0, 5), now=job_epoch(AT) + 5) == pace.Pace(0.0, None)


def job_epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_vendor_status_shapes_carry_the_running_step():
    job = job_of(0, 1)
    job.status = "running"
    item = ItemRecord(job_id="j", item_id="0", line=1, status=ItemStatus.RUNNING, created_at=AT, updated_at=AT)
    item.timings.started_at = job_epoch(AT)
    logs = fal.queue_status(job, item, position=0, logs=True, step="3/12")["logs"]
    assert [line["message"] for line in logs][-1] == "denoising step 3/12 (25%)"
    job.webhook_format = "inferencesh"
    task = inferencesh.task(job, item, lambda image: None, progress=25.0)
    assert task["progress"] == 25.0 and task["logs"][0]["content"] == "denoising: 25% of its steps done"


# --- step progress of running items, everywhere -------------------------------------------------
def test_a_running_items_step_shows_in_status_items_events_and_watch(stack, http, tmp_path):
    rows = [{"id": "long", "prompt": "long", "steps": 150, "width": 1024, "height": 1024, "num_images": 2}]
    res = http.post("/v1/jobs", json={"model": "i1-fast", "rows": rows})
    assert res.status_code == 201, res.text
    job_id = res.json()["id"]
    try:
        wait_until(lambda: stack.store.running_steps(job_id), 120, 0.05, what="the item past its first step")

        # the CLI: status --json lists it with its step; the text says "running: long n/150"
        shown = cli("status", job_id, "--json", env=stack.env)
        assert shown.returncode == 0, shown.stderr
        running = json.loads(shown.stdout)["running"]
        assert [r["id"] for r in running] == ["long"] and running[0]["steps"] == 150 and running[0]["step"] >= 1
        text = cli("status", job_id, env=stack.env).stdout
        assert "running: long " in text and "/150" in text and "GPU-s" in text

        # the API: the status object, the item's line, and a progress event with the step
        assert http.get(f"/v1/jobs/{job_id}").json()["running"][0]["id"] == "long"
        line = http.get(f"/v1/jobs/{job_id}/items").json()["data"][0]
        assert line["status"] == "running" and line["progress"]["steps"] == 150 and line["progress"]["step"] >= 1
        with http.stream("GET", f"/v1/jobs/{job_id}/events", params={"timeout": 60}) as stream:
            steps = []
            for raw in stream.iter_lines():
                if raw.startswith("data: ") and (data := json.loads(raw.removeprefix("data: "))).get("running"):
                    steps.append(data["running"][0]["step"])
                    if len(steps) == 2:
                        break
        assert steps[1] > steps[0]  # a new event as the step moved on, counts unchanged

        # status --watch, attached to the running job, follows it to its end (the cancel below)
        watch = subprocess.Popen(
            [sys.executable, "-m", "worker", "status", job_id, "--watch"],
            env=stack.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        assert cli("cancel", job_id, env=stack.env).returncode == 0
    out, err = watch.communicate(timeout=120)
    assert watch.returncode == 0, err
    assert "1/1" in err and "failed 0" in err and "ETA" in err and ("items/s" in err or "s/item" in err), err
    assert f"{job_id}  cancelled" in out
    job = wait_job(stack.store, job_id)
    assert job.status == "cancelled" and stack.store.running_steps(job_id) == {}  # an ended item leaves the list


# --- stage timings, GPU-seconds, the parameters, the event filter -------------------------------
def test_results_carry_params_and_stage_timings_and_the_job_its_gpu_seconds(stack, http, receiver, tmp_path):
    manifest = write_rows(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "prompt": "red shoe", "negative_prompt": "blur", "seed": 7, "width": 256, "height": 256},
            {"id": "b", "prompt": "blue shoe", "steps": 2, "output_format": "jpeg"},
        ],
    )
    res = cli(
        "submit",
        str(manifest),
        "--model",
        "i1-fast",
        "--set",
        "steps=1",
        "--webhook",
        receiver.url,
        "--webhook-events",
        "start,job",
        "--json",
        env=stack.env,
    )
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout)["job_id"]
    job = wait_job(stack.store, job_id)
    assert job.status == "completed" and job.webhook_events == ["start", "job"]

    lines = results(stack, job_id)
    a, b = lines["a"], lines["b"]
    assert a["model"] == "i1-fast" and b["model"] == "i1-fast"
    assert {k: a["params"][k] for k in ("prompt", "negative_prompt", "seed", "steps", "width", "height")} == {
        "prompt": "red shoe",
        "negative_prompt": "blur",
        "seed": 7,
        "steps": 1,
        "width": 1024,  # the size HiDream rendered for 256x256 asked (~1 MP, the same aspect)…
        "height": 1024,
    }
    assert list(a["params"]["requested_size"]) == [256, 256]  # …and the size asked for
    assert b["params"]["steps"] == 2 and b["params"]["output_format"] == "jpeg"
    assert {"guidance_scale", "shift", "scheduler", "num_images"} <= set(a["params"])
    for line in (a, b):
        t = line["timings"]
        for stage in ("text_encode_s", "denoise_s", "vae_decode_s", "encode_s", "upload_s"):
            assert t[stage] is not None and t[stage] >= 0, (stage, t)
        # the model's stages are its time, split: they add up to it (to rounding)
        assert t["text_encode_s"] + t["denoise_s"] + t["vae_decode_s"] == pytest.approx(t["inference_s"], abs=2e-3)
        assert t["refine_s"] is None and t["fetch_s"] is None  # no refine, no input for a generate
    model_time = a["timings"]["inference_s"] + b["timings"]["inference_s"]
    assert job.gpu_s == pytest.approx(model_time, abs=2e-3)

    # status shows it; the webhook got job.running and job.completed (with gpu_s), and no item events
    status = json.loads(cli("status", job_id, "--json", env=stack.env).stdout)
    assert status["gpu_s"] == pytest.approx(model_time, abs=2e-3) and status["eta_s"] is None
    wait_until(lambda: len([d for d in receiver.delivered() if d["json"]["job_id"] == job_id]) >= 2, 60)
    mine = [d["json"] for d in receiver.delivered() if d["json"]["job_id"] == job_id]
    assert [m["type"] for m in mine] == ["job.running", "job.completed"]
    assert mine[1]["gpu_s"] == pytest.approx(model_time, abs=2e-3)

    # Prometheus: the worker's time by stage, the control plane's GPU-seconds per job
    scraped = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=30).text
    assert 'dreambatch_worker_stage_seconds_total{model="i1-fast",stage="denoise"}' in scraped
    control = http.get("/metrics").text
    assert f'dreambatch_job_gpu_seconds{{job_id="{job_id}",model="i1-fast"}}' in control


def test_a_job_event_filter_sends_only_the_jobs_end_and_refuses_unknown_names(stack, http, receiver, tmp_path):
    rows = [{"id": f"r{n}", "prompt": f"p {n}", "steps": 1, "width": 128, "height": 128} for n in range(2)]
    res = http.post(
        "/v1/jobs", json={"model": "i1-fast", "rows": rows, "webhook": receiver.url, "webhook_events": ["job"]}
    )
    assert res.status_code == 201, res.text
    job_id = res.json()["id"]
    assert res.json()["webhook_events"] == ["job"]
    wait_job(stack.store, job_id)
    wait_until(lambda: [d for d in receiver.delivered() if d["json"]["job_id"] == job_id], 60, what="the job event")
    assert [d["json"]["type"] for d in receiver.delivered() if d["json"]["job_id"] == job_id] == ["job.completed"]

    # "progress": a job.progress event (counts, rate, ETA) as items end, at most every PROGRESS_EVERY s
    rows3 = [{"id": f"q{n}", "prompt": f"q {n}", "steps": 1, "width": 128, "height": 128} for n in range(3)]
    res = http.post(
        "/v1/jobs",
        json={"model": "i1-fast", "rows": rows3, "webhook": receiver.url, "webhook_events": ["progress", "job"]},
    )
    assert res.status_code == 201, res.text
    job_id = res.json()["id"]
    wait_job(stack.store, job_id)
    wait_until(
        lambda: "job.completed" in [d["json"]["type"] for d in receiver.delivered() if d["json"]["job_id"] == job_id],
        60,
        what="the job's end",
    )
    sent = [d["json"] for d in receiver.delivered() if d["json"]["job_id"] == job_id]
    progress = [s for s in sent if s["type"] == "job.progress"]
    assert progress and {s["type"] for s in sent} == {"job.progress", "job.completed"}  # no item events
    assert progress[0]["counts"]["total"] == 3 and "rate_per_s" in progress[0] and "running" in progress[0]

    bad = http.post(
        "/v1/jobs", json={"model": "i1-fast", "rows": rows, "webhook": receiver.url, "webhook_events": ["output"]}
    )
    assert bad.status_code == 422 and "webhook_events" in bad.text
    form = http.post(
        "/v1/jobs",
        files={"manifest": ("m.jsonl", json.dumps(rows[0]) + "\n", "application/x-ndjson")},
        data={"model": "i1-fast", "webhook": receiver.url, "webhook_events": "item,bogus"},
    )
    assert form.status_code == 422 and "bogus" in form.json()["error"]["message"]
    manifest = write_rows(tmp_path / "m.jsonl", rows)
    cli_bad = cli("submit", str(manifest), "--webhook-events", "completed", env=stack.env)
    assert cli_bad.returncode == 2 and "--webhook-events" in cli_bad.stderr
    assert "start, progress, item, job" in cli_bad.stderr
    assert "Traceback" not in cli_bad.stderr


# --- the local run: a rich bar, and per-item lines with rate and ETA off a terminal ---------------
def test_local_run_reports_rate_eta_and_an_edits_stages(stack, tmp_path):
    from PIL import Image

    source = tmp_path / "in.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(source)
    manifest = write_rows(
        tmp_path / "e.jsonl",
        [{"id": f"e{n}", "image": str(source), "instruction": "make it blue", "steps": 4} for n in range(2)],
    )
    out = tmp_path / "out"
    res = cli(
        "run",
        str(manifest),
        "--model",
        "e1-1",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        "--out",
        str(out),
        env=stack.env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    assert "[2/2] e1: completed (" in res.stderr and "ETA 0:00:00)" in res.stderr
    assert "GPU-s of model time" in res.stdout
    results_file = next(out.rglob("results.jsonl"))
    for line in map(json.loads, results_file.read_text().splitlines()):
        t = line["timings"]
        assert line["model"] == "e1-1" and line["params"]["instruction"] == "make it blue"
        for stage in ("fetch_s", "image_encode_s", "text_encode_s", "denoise_s", "refine_s", "vae_decode_s"):
            assert t[stage] is not None and t[stage] >= 0, (stage, t)
