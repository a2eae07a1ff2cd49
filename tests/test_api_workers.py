"""The HTTP API against real workers on tiny weights: the `openai` client's images.generate and
images.edit, a manifest job over POST /v1/jobs with server-sent progress and results, the fal-style
queue with a webhook to a loopback receiver, and cancel/retry over HTTP. One API server and one set
of workers (I/O, i1-fast, e1-1) serve the whole module, on their own Redis database."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest
from PIL import Image
from services import ROOT, ApiServer, Worker, cli, free_port, s3_client, service_env, wait_until

from jobs.api.service import sign_file
from jobs.settings import Settings

pytestmark = pytest.mark.timeout(300)
REDIS_DB = 2


@pytest.fixture(scope="module")
def stack(redis_server, s3_endpoint, tiny_dir, tmp_path_factory):
    redis_url = redis_server.database(REDIS_DB)
    bucket = f"t-apiw-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    env = service_env(redis_url, s3_endpoint, tiny_dir)
    logs = tmp_path_factory.mktemp("api-workers")
    tiny = ["--weights", "tiny", "--device", "cpu", "--concurrency", "1"]
    workers = [
        Worker(["worker", "--io"], env, logs / "io.log"),
        Worker(["worker", "--model", "i1-fast", *tiny], env, logs / "i1.log"),
        Worker(["worker", "--model", "e1-1", *tiny], env, logs / "e1.log"),
    ]
    settings = Settings(
        redis_url=redis_url,
        output=f"s3://{bucket}/api",
        s3={"endpoint_url": s3_endpoint},
        allow_private_hosts="127.0.0.1",
        api={"wait_timeout": 120},
    )
    api = ApiServer(settings)
    try:
        for w in workers:
            w.wait_ready()
        yield api
    finally:
        api.stop()
        for w in workers:
            w.kill()


@pytest.fixture(scope="module")
def token(stack) -> str:
    return stack.key("jobs:read", "jobs:write", "images")


@pytest.fixture
def http(stack, token):
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as client:
        yield client


def truncated_png() -> bytes:
    """A PNG cut off inside its pixel data: its header passes the check at submit, its decode fails on the worker."""
    data = png_bytes()
    return data[: len(data) // 2]


def png_bytes(width: int = 96, height: int = 64) -> bytes:
    image = Image.new("RGB", (width, height), "white")
    image.paste((200, 0, 0), (20, 10, 50, 40))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_openai_client_generates_and_edits_images(stack, token):
    client = openai.OpenAI(api_key=token, base_url=f"{stack.url}/v1", max_retries=0, timeout=120)

    generated = client.images.generate(
        model="hidream-i1-fast",
        prompt="a red chair on white",
        n=2,
        size="512x512",
        response_format="url",
        extra_body={"steps": 1, "seed": 7},
    )
    assert len(generated.data) == 2 and generated.created > 0
    fetched = [httpx.get(d.url) for d in generated.data]  # presigned S3 URLs: no API key needed
    assert [r.status_code for r in fetched] == [200, 200]
    images = [Image.open(io.BytesIO(r.content)) for r in fetched]
    assert all(i.format == "PNG" for i in images)
    assert fetched[0].content != fetched[1].content  # n items, seeds 7 and 8
    assert generated.data[0].revised_prompt == "a red chair on white"

    b64 = client.images.generate(
        model="hidream-i1-fast",
        prompt="a lamp",
        response_format="b64_json",
        output_format="jpeg",
        extra_body={"steps": 1},
    )
    assert len(b64.data) == 1 and b64.data[0].url is None
    assert Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json))).format == "JPEG"
    assert b64.output_format == "jpeg"

    edited = client.images.edit(
        model="hidream-e1-1",
        image=("photo.png", png_bytes(), "image/png"),
        prompt="make the square blue",
        size="96x64",
        response_format="b64_json",
        extra_body={"steps": 1, "refine_strength": 0},
    )
    out = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json)))
    assert out.size == (96, 64) and edited.size == "96x64"

    by_url = client.images.edit(
        model="hidream-e1-1",
        image=("photo.png", png_bytes(), "image/png"),
        prompt="make it green",
        extra_body={"steps": 1, "refine_strength": 0},
    )
    assert Image.open(io.BytesIO(httpx.get(by_url.data[0].url).content)).size == (96, 64)  # size 'same'

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.BadRequestError, match="does not generate"):
        client.images.generate(model="hidream-e1-1", prompt="x")
    with pytest.raises(openai.BadRequestError, match="not a PNG, JPEG or WebP"):
        client.images.edit(model="hidream-e1-1", image=("x.png", b"not an image", "image/png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="steps: input should be less than or equal to 150"):
        client.images.generate(model="hidream-i1-fast", prompt="x", extra_body={"steps": 500})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="dbk_nope", base_url=f"{stack.url}/v1", max_retries=0).images.generate(prompt="x")


def test_local_output_folder_gives_signed_links_this_server_serves(stack, redis_server, tmp_path):
    """With DREAMBATCH_OUTPUT a folder the workers share, image URLs are signed links to /v1/files."""
    settings = stack.app.state.services.settings.model_copy(update={"output": str(tmp_path / "out")})
    local = ApiServer(settings)
    try:
        token = local.key("images")
        client = openai.OpenAI(api_key=token, base_url=f"{local.url}/v1", max_retries=0, timeout=120)
        url = client.images.generate(prompt="a green cup", size="256x256", extra_body={"steps": 1}).data[0].url
        assert url.startswith(f"{local.url}/v1/files/")
        served = httpx.get(url)  # no API key: the signature is the key
        assert served.status_code == 200 and served.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(served.content)).format == "PNG"
        assert list((tmp_path / "out").glob("*/*.png"))  # the worker wrote into the shared folder
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")  # one hex digit of the signature changed
        assert httpx.get(tampered).status_code == 403
        path = url.split("?")[0].removeprefix(f"{local.url}/v1/files/")
        job_id, key = path.split("/", 1)[0], path.split("/", 1)[1]
        past = int(time.time()) - 1  # correctly signed, but expired
        signature = sign_file(local.app.state.services, job_id, key, past)
        assert (
            httpx.get(f"{local.url}/v1/files/{path}", params={"expires": past, "signature": signature}).status_code
            == 403
        )
    finally:
        local.stop()


def test_manifest_job_over_http_streams_progress_and_serves_results(http):
    manifest = "".join(
        json.dumps({"id": f"m{n}", "prompt": f"product {n}", "sku": f"=SUM({n})"}) + "\n" for n in range(3)
    )
    res = http.post(
        "/v1/jobs",
        files={"manifest": ("m.jsonl", manifest, "application/x-ndjson")},
        data={"model": "i1-fast", "set": ["steps=1", "width=256", "height=256"], "priority": "high"},
    )
    assert res.status_code == 201, res.text
    job = res.json()
    assert job["queued"] == 3 and job["priority"] == "high"

    events = []
    with http.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                last = json.loads(line.removeprefix("data: "))
    assert events[0] == "progress" and events[-1] == "end"
    assert last["status"] == "completed" and last["counts"]["completed"] == 3 and last["rate_per_s"] > 0

    lines = [json.loads(x) for x in http.get(f"/v1/jobs/{job['id']}/results").text.splitlines()]
    assert [x["id"] for x in lines] == ["m0", "m1", "m2"] and {x["status"] for x in lines} == {"completed"}
    csv = http.get(f"/v1/jobs/{job['id']}/results", params={"format": "csv"}).text.splitlines()
    assert csv[1].startswith("m0,1,completed,,") and "s3://" in csv[1]
    done = http.get(f"/v1/jobs/{job['id']}/items", params={"status": "completed"}).json()
    assert done["total"] == 3
    assert http.get(f"/v1/jobs/{job['id']}").json()["eta_s"] is None


def test_fal_queue_round_trip_with_webhook(stack, http, receiver):
    res = http.post(
        "/fal-ai/hidream-i1-fast",
        params={"fal_webhook": receiver.url},
        json={"prompt": "a blue vase", "num_inference_steps": 1, "image_size": "square", "seed": 3},
    )
    assert res.status_code == 200, res.text
    submitted = res.json()
    request_id = submitted["request_id"]
    assert submitted["status_url"] == f"{stack.url}/fal-ai/hidream-i1-fast/requests/{request_id}/status"
    early = http.get(f"/queue/fal-ai/hidream-i1-fast/requests/{request_id}/status").json()  # the old path too
    assert early["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")

    wait_until(
        lambda: http.get(submitted["status_url"]).json()["status"] == "COMPLETED",
        120,
        0.2,
        what="the fal request to complete",
    )
    result = http.get(submitted["response_url"]).json()
    assert result["seed"] == 3 and result["prompt"] == "a blue vase"
    (image,) = result["images"]
    assert image["content_type"] == "image/png" and image["width"] == image["height"]
    assert Image.open(io.BytesIO(httpx.get(image["url"]).content)).format == "PNG"

    # one webhook in fal's envelope, with the same output and a URL the receiver can fetch
    (hook,) = wait_until(lambda: receiver.delivered(), 30, what="the fal webhook")
    body = hook["json"]
    assert body["request_id"] == body["gateway_request_id"] == request_id and body["status"] == "OK"
    assert body["payload"]["seed"] == 3 and body["payload"]["prompt"] == "a blue vase"
    assert Image.open(io.BytesIO(httpx.get(body["payload"]["images"][0]["url"]).content)).format == "PNG"
    assert hook["headers"]["webhook-id"]

    cancelled = http.put(submitted["cancel_url"])
    assert cancelled.status_code == 400 and cancelled.json() == {"status": "ALREADY_COMPLETED"}
    assert http.get("/fal-ai/hidream-e1-full/requests/" + request_id).status_code == 404  # other model


def test_fal_request_that_fails_reports_error_by_status_result_and_webhook(http, receiver):
    broken = "data:image/png;base64," + base64.b64encode(truncated_png()).decode()  # fails on the worker
    submitted = http.post(
        "/fal-ai/hidream-e1-1",
        json={
            "image_url": broken,
            "edit_instruction": "make it blue",
            "num_inference_steps": 1,
            "refine_strength": 0,
            "webhookUrl": receiver.url,
        },
    ).json()
    status = wait_until(
        lambda: (s := http.get(submitted["status_url"]).json())["status"] == "COMPLETED" and s,
        120,
        0.2,
        what="the failed fal request to end",
    )
    assert "InputError" in status["error"]
    result = http.get(submitted["response_url"])
    assert result.status_code == 422 and "InputError" in result.json()["detail"][0]["msg"]
    assert result.json()["error_type"] == status["error_type"] == "input"
    (hook,) = wait_until(lambda: receiver.delivered(), 30, what="the fal webhook")
    assert hook["json"]["status"] == "ERROR" and "InputError" in hook["json"]["error"]
    assert http.post("/fal-ai/hidream-i1-fast", json={"prompt": "x", "image_size": "huge"}).status_code == 422


def test_cancel_and_retry_over_http(http):
    # a long item keeps the i1 worker busy while the cancel comes: the queued ones end cancelled at once
    rows = [{"id": "long", "prompt": "slow", "steps": 150}] + [{"id": f"q{n}", "prompt": "wait"} for n in range(3)]
    job = http.post(
        "/v1/jobs", json={"model": "i1-fast", "rows": rows, "defaults": {"steps": 1, "width": 256, "height": 256}}
    ).json()
    wait_until(
        lambda: http.get(f"/v1/jobs/{job['id']}").json()["counts"]["running"] == 1,
        60,
        0.1,
        what="the long item to start",
    )
    cancel = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    ended = wait_until(
        lambda: (s := http.get(f"/v1/jobs/{job['id']}").json())["finished_at"] and s,
        60,
        0.2,
        what="the cancelled job to end",
    )
    assert ended["status"] == "cancelled" and ended["counts"]["cancelled"] == 4
    assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"  # again: no change

    # one good edit and one whose input is not an image: only the failed one is re-queued
    bad = "data:image/png;base64," + base64.b64encode(truncated_png()).decode()
    good = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    job = http.post(
        "/v1/jobs",
        json={
            "model": "e1-1",
            "defaults": {"steps": 1, "refine_strength": 0},
            "rows": [
                {"id": "ok", "image": good, "instruction": "make it blue"},
                {"id": "broken", "image": bad, "instruction": "make it blue"},
            ],
        },
    ).json()
    first = wait_until(
        lambda: (s := http.get(f"/v1/jobs/{job['id']}").json())["finished_at"] and s,
        120,
        0.2,
        what="the edit job to end",
    )
    assert first["counts"]["completed"] == 1 and first["counts"]["failed"] == 1
    failed = http.get(f"/v1/jobs/{job['id']}/items", params={"status": "failed"}).json()["data"]
    assert [i["id"] for i in failed] == ["broken"]

    retried = http.post(f"/v1/jobs/{job['id']}/retry").json()
    assert retried["requeued"] == ["broken"] and retried["round"] == 1
    again = wait_until(
        lambda: (s := http.get(f"/v1/jobs/{job['id']}").json())["finished_at"] and s,
        120,
        0.2,
        what="the retried job to end",
    )
    assert again["counts"]["completed"] == 1 and again["counts"]["failed"] == 1
    items = {i["id"]: i for i in http.get(f"/v1/jobs/{job['id']}/items").json()["data"]}
    assert items["broken"]["attempts"] == 2 and items["ok"]["attempts"] == 1  # the good one did not run again


def _cli_env(**extra: str) -> dict[str, str]:
    """The console script's environment with no way to Redis or S3: `submit --api` needs neither."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMBATCH_", "AWS_"))}
    return {**env, "DREAMBATCH_ENV_FILE": "", "DREAMBATCH_REDIS_URL": "redis://127.0.0.1:1/0", **extra}


def test_submit_with_api_hands_the_manifest_to_the_api_and_waits_for_it(stack, token, tmp_path):
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text(
        json.dumps({"id": "a", "prompt": "a red cube", "seed": 3})
        + "\n"
        + json.dumps({"id": "b", "prompt": "a blue cone", "seed": 4})
        + "\n"
    )
    env = _cli_env(DREAMBATCH_API_URL=stack.url, DREAMBATCH_API_KEY=token)
    res = cli("submit", str(manifest), "--model", "i1-fast", "--set", "steps=2", "--wait", "--json", env=env)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert made["queued"] == 2 and made["rejected"] == 0 and made["total"] == 2
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}) as http:
        job = http.get(f"/v1/jobs/{made['job_id']}").json()
        assert job["status"] == "completed" and job["counts"]["completed"] == 2
        items = http.get(f"/v1/jobs/{made['job_id']}/items").json()["data"]
    assert sorted(i["id"] for i in items) == ["a", "b"] and all(i["params"]["steps"] == 2 for i in items)


def test_submit_with_api_says_what_is_wrong_in_one_line(stack, token, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt,seed\nr1,a cat,7\nr2,,8\nr3,a dog,minus one\n")
    env = _cli_env(DREAMBATCH_API_URL=stack.url, DREAMBATCH_API_KEY=token)
    res = cli("submit", str(bad), env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "line 3: prompt" in res.stderr and "line 4: seed" in res.stderr and "nothing was queued" in res.stderr
    assert str(bad) in res.stderr  # the file the person named, not the API's copy

    good = tmp_path / "good.csv"
    good.write_text("id,prompt\nr1,a cat\n")
    refused = cli("submit", str(good), env={**env, "DREAMBATCH_API_KEY": "dbk_nope_nope"})
    assert refused.returncode == 1 and "refused the key" in refused.stderr and "Traceback" not in refused.stderr
    both = cli("submit", str(good), "--output", "s3://elsewhere/x", env=env)
    assert both.returncode == 2 and "--output: not available with --api" in both.stderr


def test_submit_with_api_loads_nothing_it_does_not_need_and_says_when_the_api_is_away(tmp_path):
    manifest = tmp_path / "rows.csv"
    manifest.write_text("id,prompt\nr1,a cat\n")
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "worker", "submit", str(manifest), "--api", closed],
        env=_cli_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and time.monotonic() - started < 30
    said = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert said and said[-1].startswith("error: cannot reach the dreambatch API at " + closed), res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line}
    packages = {name.split(".")[0] for name in imported}
    assert "worker.cli" in imported and not packages & {"redis", "celery", "kombu", "boto3", "botocore", "torch"}
    assert not imported & {"jobs.models", "jobs.settings", "jobs.store", "jobs.services"}  # (typer brings pydantic)
