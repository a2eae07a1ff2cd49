"""The whole path, with real parts: CLI submit → Redis → Celery worker processes on tiny HiDream-I1
weights → S3 (moto server over HTTP) → webhooks to a loopback receiver."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from services import cli, s3_client, service_env, wait_until

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(420)

FORMATS = ["png", "jpeg", "webp"]


def write_manifest(path: Path, rows: int, **extra) -> Path:
    with path.open("w") as fh:
        for n in range(rows):
            row = {
                "id": f"p{n:02d}",
                "prompt": f"product photo number {n}",
                "sku": f"SKU-{n:03d}",
                "output_format": FORMATS[n % 3],
                "seed": 100 + n,
                **extra,
            }
            if n % 4 == 1:
                row["num_images"] = 2
            if n % 4 == 2:
                row.update(width=1344, height=768, negative_prompt="blurry")
            if n % 4 == 3:
                row.update(steps=3, seed=-1, output_quality=70)
            fh.write(json.dumps(row) + "\n")
    return path


def wait_job(redis_url: str, job_id: str, timeout: float = 300):
    store = RedisStore.from_url(redis_url)
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.25, what=f"job {job_id} to end"
    )


@pytest.fixture
def env(redis_server, s3_endpoint, tiny_dir):
    return service_env(redis_server.url, s3_endpoint, tiny_dir)


def submit(manifest: Path, env, *args: str) -> dict:
    res = cli("submit", str(manifest), "--model", "i1-fast", "--set", "steps=2", "--json", *args, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_twelve_row_manifest_lands_in_s3_with_results_and_webhooks(
    env, bucket, receiver, start_worker, s3_endpoint, redis_server, tmp_path
):
    io = start_worker("worker", "--io")
    gpu = start_worker("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")
    gpu.wait_ready()
    io.wait_ready()
    manifest = write_manifest(tmp_path / "m.jsonl", 12)

    sub = submit(manifest, env, "--output", f"s3://{bucket}/runs", "--webhook", receiver.url)
    assert sub["queued"] == 12 and sub["total"] == 12
    job = wait_job(redis_server.url, sub["job_id"])
    assert job.status == "completed"

    status = json.loads(cli("status", sub["job_id"], "--json", env=env).stdout)
    assert status["status"] == "completed"
    assert status["counts"] == {"total": 12, "queued": 0, "running": 0, "completed": 12, "failed": 0, "cancelled": 0}

    # every output is in S3 with its content type and seed metadata
    s3 = s3_client(s3_endpoint)
    body = s3.get_object(Bucket=bucket, Key=f"runs/{sub['job_id']}/results.jsonl")["Body"].read()
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert [x["id"] for x in lines] == [f"p{n:02d}" for n in range(12)]
    assert [x["line"] for x in lines] == list(range(1, 13))
    for n, line in enumerate(lines):
        assert line["status"] == "completed" and line["error"] is None
        assert line["metadata"] == {"sku": f"SKU-{n:03d}"}
        images = line["output"]["images"]
        assert len(images) == (2 if n % 4 == 1 else 1)
        if n % 4 != 3:
            assert line["seed"] == 100 + n
        else:
            assert isinstance(line["seed"], int) and line["seed"] >= 0  # -1 → a recorded random seed
        for k, image in enumerate(images):
            ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[FORMATS[n % 3]]
            suffix = f"_{k}" if len(images) > 1 else ""
            key = f"runs/{sub['job_id']}/p{n:02d}{suffix}.{ext}"
            assert image["s3_uri"] == f"s3://{bucket}/{key}"
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ContentType"] == f"image/{FORMATS[n % 3]}" == image["content_type"]
            assert head["Metadata"]["seed"] == str(line["seed"])
            assert image["width"] > 0 and image["height"] > 0
    wide = lines[2]["output"]["images"][0]
    assert wide["width"] > wide["height"]  # the 1344x768 row keeps its aspect ratio

    # durable per-item records and the job spec sit next to the outputs
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"runs/{sub['job_id']}/items/")["Contents"]}
    assert len(keys) == 12
    spec = json.loads(s3.get_object(Bucket=bucket, Key=f"runs/{sub['job_id']}/job.json")["Body"].read())
    assert spec["status"] == "completed" and spec["total"] == 12

    # one webhook per terminal state: 12 items + the job, each with a distinct stable id
    wait_until(lambda: len(receiver.delivered()) >= 13, 30, what="13 webhooks")
    time.sleep(1)
    hooks = receiver.delivered()
    assert len(hooks) == 13
    assert len({h["headers"]["webhook-id"] for h in hooks}) == 13
    item_hooks = [h["json"] for h in hooks if h["json"]["type"].startswith("item.")]
    assert sorted(h["id"] for h in item_hooks) == [f"p{n:02d}" for n in range(12)]
    sample = next(h for h in item_hooks if h["id"] == "p01")
    assert sample["status"] == "completed" and sample["job_id"] == sub["job_id"]
    assert sample["metadata"] == {"sku": "SKU-001"} and sample["seed"] == 101
    assert {"url", "width", "height", "content_type"} <= set(sample["output"]["images"][0])
    job_hook = next(h["json"] for h in hooks if h["json"]["type"].startswith("job."))
    assert job_hook["status"] == "completed" and job_hook["counts"]["completed"] == 12

    # `results` prints the same lines
    printed = cli("results", sub["job_id"], env=env).stdout.splitlines()
    assert [json.loads(x)["id"] for x in printed] == [x["id"] for x in lines]


def test_invalid_manifest_queues_nothing_and_reports_every_bad_line(env, bucket, redis_server, tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text(
        "id,prompt,steps,output_format,seed\n"
        "ok1,a fine prompt,4,png,1\n"
        "bad1,,4,png,1\n"
        "bad2,a prompt,many,gif,1\n"
        'ok2,"quoted, with comma",4,jpeg,-1\n'
        "bad3,a prompt,4,png,-7\n"
    )
    res = cli("validate", str(manifest), "--model", "i1-fast", env=env)
    assert res.returncode == 2
    assert "line 3: prompt: field required" in res.stderr
    assert "line 4: steps: input should be a valid integer" in res.stderr and "(got 'many')" in res.stderr
    assert "line 4: output_format: input should be 'jpeg', 'png' or 'webp' (got 'gif')" in res.stderr
    assert "line 6: seed: input should be greater than or equal to -1 (got '-7')" in res.stderr

    before = set(redis_server.client().keys("*"))
    res = cli("submit", str(manifest), "--model", "i1-fast", "--output", f"s3://{bucket}/x", env=env)
    assert res.returncode == 2
    assert "line 3: prompt" in res.stderr and "nothing was queued" in res.stderr
    assert set(redis_server.client().keys("*")) == before
    assert redis_server.client().llen("gpu.i1-fast") == 0


def test_skip_invalid_records_bad_rows_as_failed_items(env, bucket, redis_server, start_worker, tmp_path, s3_endpoint):
    io = start_worker("worker", "--io")
    io.wait_ready()
    manifest = tmp_path / "all-bad.jsonl"
    manifest.write_text('{"prompt": ""}\nnot json\n{"prompt": "x", "steps": 0}\n')
    sub = submit(manifest, env, "--output", f"s3://{bucket}/o", "--skip-invalid")
    assert sub["queued"] == 0 and sub["rejected"] == 3
    job = wait_job(redis_server.url, sub["job_id"], 60)
    assert job.status == "failed"  # every item failed
    body = s3_client(s3_endpoint).get_object(Bucket=bucket, Key=f"o/{sub['job_id']}/results.jsonl")["Body"]
    lines = [json.loads(x) for x in body.read().decode().splitlines()]
    assert [(x["line"], x["status"]) for x in lines] == [(1, "failed"), (2, "failed"), (3, "failed")]
    assert "prompt" in lines[0]["error"] and "invalid JSON" in lines[1]["error"] and "steps" in lines[2]["error"]


def test_local_run_writes_the_same_result_files(env, bucket, redis_server, start_worker, tmp_path, s3_endpoint):
    manifest = write_manifest(tmp_path / "same.jsonl", 4, steps=2)
    local = cli(
        "run",
        str(manifest),
        "--model",
        "i1-fast",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        env=env,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    results = next((tmp_path / "out").glob("*/results.jsonl"))
    local_lines = [json.loads(x) for x in results.read_text().splitlines()]

    io = start_worker("worker", "--io")
    gpu = start_worker("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")
    gpu.wait_ready()
    io.wait_ready()
    sub = submit(manifest, env, "--output", f"s3://{bucket}/same")
    wait_job(redis_server.url, sub["job_id"])
    s3 = s3_client(s3_endpoint)
    remote_lines = [
        json.loads(x)
        for x in s3.get_object(Bucket=bucket, Key=f"same/{sub['job_id']}/results.jsonl")["Body"]
        .read()
        .decode()
        .splitlines()
    ]

    def shape(line):
        imgs = [(i["width"], i["height"], i["content_type"]) for i in line["output"]["images"]]
        seed = line["seed"] if line["id"] != "p03" else None  # p03 asks for a random seed
        return line["id"], line["line"], line["status"], seed, line["metadata"], imgs, sorted(line)

    assert [shape(x) for x in local_lines] == [shape(x) for x in remote_lines]
    # each item's timings place its model call inside its attempt (what bench/speed.py measures duty cycles by)
    for t in (x["timings"] for x in local_lines + remote_lines):
        assert (
            t["started_at"] - 0.001
            <= t["model_started_at"]
            <= t["model_started_at"] + t["inference_s"]
            <= t["started_at"] + t["total_s"] + 0.01
        )  # (started_at is rounded to the millisecond)
        # (each of the three is rounded to 0.1 ms on its own, so their sum may pass the total by that much)
        assert t["model_wait_s"] >= 0 and t["total_s"] >= t["inference_s"] + t["upload_s"] - 0.0002
    # both ran the same tiny weights, and both results say which (the catalog compares it)
    revisions = {x["model_revision"] for x in local_lines + remote_lines}
    assert len(revisions) == 1 and revisions.pop().startswith("sha256:")
    # same weights, same seed → the same pixels, locally and on the worker
    local_png = Path(local_lines[0]["output"]["images"][0]["s3_uri"]).read_bytes()
    remote_png = s3.get_object(Bucket=bucket, Key=f"same/{sub['job_id']}/p00.png")["Body"].read()
    assert local_png == remote_png
