"""The seeds' own SDKs, unchanged, against `dreambatch api` and tiny workers: inference.sh (`inferencesh`),
WaveSpeed (`wavespeed`), fal (`fal-client`, over TLS with a self-signed certificate) and OpenAI (`openai`).

Each SDK runs its documented example (tests/sdk_examples/) in its own process, changing only where it points and
its key; the tests check every answer has the vendor's shape and that the server did what was asked: submit,
wait or stream, result, cancel, file upload, webhook. Then: a retry storm of the OpenAI client makes one job,
retried requests attach to their first attempt's job, inference.sh's stream keeps a long wait alive, the safety
checker (a tiny random one that never flags on i1-fast, a tiny one that flags everything on e1-full, none on
e1-1) shows in every shape, and sizes come back exactly as asked.

One stack serves the module (its own Redis database): an I/O worker, i1-fast, e1-full and e1-1 workers, and the
API twice, over HTTPS (fal) and HTTP (the others). No worker serves i1-dev: requests there wait in the queue.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from PIL import Image
from services import ROOT, ApiServer, Worker, s3_client, self_signed_cert, service_env, wait_until

from jobs.models import MODELS
from jobs.settings import Settings

pytestmark = pytest.mark.timeout(420)
REDIS_DB = 3
EXAMPLES = Path(__file__).resolve().parent / "sdk_examples"
FLAGGING = "flags-everything"  # the e1-full worker's checker folder


@pytest.fixture(scope="module")
def stack(redis_server, s3_endpoint, tiny_dir, tmp_path_factory):
    from worker.safety import make_tiny_checker

    redis_url = redis_server.database(REDIS_DB)
    bucket = f"t-sdk-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    folder = tmp_path_factory.mktemp("sdks")
    flagging = make_tiny_checker(folder / FLAGGING, flags_everything=True)
    env = service_env(redis_url, s3_endpoint, tiny_dir)
    tiny = ["--weights", "tiny", "--device", "cpu", "--concurrency", "1"]
    workers = [
        Worker(["worker", "--io"], env, folder / "io.log"),
        Worker(
            ["worker", "--model", "i1-fast", *tiny], {**env, "DREAMBATCH_SAFETY__CHECKER": "tiny"}, folder / "i1.log"
        ),
        Worker(
            ["worker", "--model", "e1-full", *tiny],
            {**env, "DREAMBATCH_SAFETY__CHECKER": str(flagging)},
            folder / "e1-full.log",
        ),
        Worker(["worker", "--model", "e1-1", *tiny], env, folder / "e1-1.log"),
    ]
    settings = Settings(
        redis_url=redis_url,
        output=f"s3://{bucket}/api",
        s3={"endpoint_url": s3_endpoint},
        allow_private_hosts="127.0.0.1",
        api={"wait_timeout": 120},
    )
    cert, key = self_signed_cert(folder)
    https, http = ApiServer(settings, tls=(str(cert), str(key))), ApiServer(settings)
    try:
        for w in workers:
            w.wait_ready()
        token = http.key("images", "jobs:read", "jobs:write")
        yield SimpleNamespace(
            https=https, http=http, cert=cert, token=token, store=http.app.state.services.store, folder=folder
        )
    finally:
        https.stop()
        http.stop()
        for w in workers:
            w.kill()


def png_file(folder: Path, width: int = 96, height: int = 64) -> Path:
    image = Image.new("RGB", (width, height), "white")
    image.paste((200, 0, 0), (20, 10, 50, 40))
    path = folder / f"photo-{width}x{height}.png"
    image.save(path, "PNG")
    return path


def run_example(name: str, image: Path, **env: str) -> dict:
    """One SDK example in its own process (the vendor's environment variables set as its docs say)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMBATCH_", "FAL_", "OPENAI_"))}
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / name), str(image)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def fetch_image(url: str, **kwargs) -> Image.Image:
    res = httpx.get(url, **kwargs)
    assert res.status_code == 200, (url, res.status_code)
    return Image.open(io.BytesIO(res.content))


def item_of(stack, job_id: str):
    return next(stack.store.items(job_id))


def hooks_for(receiver, key: str, value: str) -> list[dict]:
    return [h["json"] for h in receiver.delivered() if h["json"].get(key) == value]


# --- each SDK as its documentation runs it -------------------------------------------------------------------
def test_fal_client_over_tls_runs_fals_documented_usage(stack, receiver, tmp_path):
    host = stack.https.url.removeprefix("https://")
    seen = run_example(
        "fal_example.py",
        png_file(tmp_path),
        FAL_KEY=stack.token,
        FAL_QUEUE_RUN_HOST=host,
        FAL_RUN_HOST=f"{host}/run",
        SSL_CERT_FILE=str(stack.cert),
        HOOK_URL=receiver.url,
    )

    # subscribe: fal's output schema; e1-full's checker flags everything; fal's jpeg default
    result = seen["subscribe"]["result"]
    assert set(result) == {"images", "seed", "prompt", "has_nsfw_concepts", "safety_checker", "timings"}
    (image,) = result["images"]
    assert (image["width"], image["height"], image["content_type"]) == (96, 64, "image/jpeg")
    assert result["has_nsfw_concepts"] == [True] and result["safety_checker"] == FLAGGING
    assert result["prompt"] == "Convert the image into a 3D animated style." and isinstance(result["seed"], int)
    assert fetch_image(image["url"]).format == "JPEG"
    assert seen["subscribe"]["updates"][-1].startswith("Completed:")  # with its logs
    assert any(u.startswith(("Queued", "InProgress")) for u in seen["subscribe"]["updates"])

    # fal's defaults for hidream-e1-full apply to fal's requests (the page's values), not to manifests
    request_id = seen["queued"]["request_id"]
    params = item_of(stack, request_id).params
    assert (
        params["steps"],
        params["guidance_scale"],
        params["image_guidance_scale"],
        params["negative_prompt"],
        params["output_format"],
    ) == (1, 3.5, 2.0, "low resolution, blur", "jpeg")
    assert MODELS["e1-full"].defaults["guidance_scale"] == 5.0  # HiDream's own, for everything else

    # the queued request: status with logs and metrics, sync_mode's data URI, the checker off on request
    assert seen["first_status"] in ("Queued", "InProgress", "Completed")
    if seen["first_status"] == "Queued":
        assert isinstance(seen["first_position"], int) and seen["first_position"] >= 0
    assert seen["completed"]["error"] is None and seen["completed"]["metrics"]["inference_time"] > 0
    assert [line["message"] for line in seen["completed"]["logs"]][0] == "queued"
    queued = seen["queued"]["result"]
    assert queued["images"][0]["url"].startswith("data:image/jpeg;base64,")
    assert queued["has_nsfw_concepts"] is None and queued["safety_checker"].startswith("off: disabled by the request")

    # one webhook, in fal's envelope
    (hook,) = wait_until(lambda: hooks_for(receiver, "request_id", request_id), 60, what="the fal webhook")
    assert hook["status"] == "OK" and hook["gateway_request_id"] == request_id and hook["error"] is None
    assert hook["payload"]["has_nsfw_concepts"] is None

    # cancel: the request ends COMPLETED with the error; a second cancel is fal's 400 ALREADY_COMPLETED
    assert seen["cancelled"]["status"] == "Completed" and seen["cancelled"]["error_type"] == "cancelled"
    assert "cancelled" in seen["cancelled"]["error"] and seen["cancel_again"] == 400

    # fal.run and fal.stream on the run host; fal's image sizes come back exactly
    (ran,) = seen["run"]["images"]
    assert (ran["width"], ran["height"]) == (1024, 768) and seen["run"]["seed"] == 4
    assert fetch_image(ran["url"]).size == (1024, 768)
    assert seen["run"]["has_nsfw_concepts"] == [False] and seen["run"]["safety_checker"] == "tiny"
    *states, last = seen["stream"]
    assert states and all(s["status"] in ("IN_QUEUE", "IN_PROGRESS") for s in states)
    assert (last["images"][0]["width"], last["images"][0]["height"]) == (320, 240)
    assert seen["unknown_model"]["status"] == 404 and "no model fal-ai/hidream-nope" in seen["unknown_model"]["message"]


def test_inferencesh_sdk_runs_the_seed_pages_examples(stack, receiver, tmp_path):
    seen = run_example(
        "inferencesh_example.py",
        png_file(tmp_path),
        INFERENCE_API_KEY=stack.token,
        DREAMBATCH_URL=stack.http.url,
        HOOK_URL=receiver.url,
    )

    # run and get result: the local file went through POST /files and a PUT; the output is the edit
    run = seen["run"]
    assert run["status"] == 10 and run["output"]["image"]["content_type"] == "image/png"
    assert fetch_image(run["output"]["image"]["uri"]).size == (96, 64)
    assert run["output"]["has_nsfw_concepts"] == [True] and run["output"]["safety_checker"] == FLAGGING
    params = item_of(stack, run["id"]).params
    assert (params["instruction"], params["target_description"], params["seed"]) == (
        "make the square blue",
        "a blue square",
        3,
    )
    assert "/inputs/" in params["image"]  # the uploaded file, staged next to the job

    # stream: statuses only move forward, and the last update carries the output; sizes go to multiples of 8
    statuses = [u["status"] for u in seen["stream"]]
    assert statuses == sorted(statuses) and statuses[-1] == 10 and set(statuses) <= {2, 7, 10}
    final = seen["stream"][-1]["output"]
    assert (final["image"]["width"], final["image"]["height"]) == (248, 192)
    assert fetch_image(final["image"]["uri"]).size == (248, 192)

    # wait=False: the task at once; the webhook (the seed's payload) when it ends
    assert seen["no_wait"]["status"] in (2, 7, 10) and seen["waited"]["status"] == 10
    task_id = seen["no_wait"]["id"]
    (hook,) = wait_until(lambda: hooks_for(receiver, "id", task_id), 60, what="the inference.sh webhook")
    assert set(hook) == {"id", "status", "output", "error", "session_id", "created_at", "updated_at"}
    assert hook["status"] == 10 and hook["error"] == "" and hook["output"]["image"]["uri"]

    # cancel, a failed task, an unknown app: as the SDK reports them
    assert seen["cancelled"]["status"] == 12 and seen["cancelled"]["error_kind"] == "cancelled"
    assert seen["cancelled_wait"].lower() == "task cancelled"  # (from the stream, or its GET reconciliation)
    assert "InputError" in seen["failed"]
    assert seen["unknown_app"]["status"] == 404 and "no app 'infsh/flux'" in seen["unknown_app"]["message"]


def test_inferencesh_i1_fast_takes_scheduler_type(stack):
    headers = {"Authorization": f"Bearer {stack.token}"}
    res = httpx.post(
        f"{stack.http.url}/apps/run",
        headers=headers,
        json={
            "app": "infsh/hidream-i1-fast@v2",
            "input": {"prompt": "a mill", "scheduler_type": "flow_euler", "width": 1027, "height": 61},
        },
    )
    assert res.status_code == 200, res.text
    params = item_of(stack, res.json()["data"]["id"]).params
    assert params["scheduler"] == "flow_euler" and params["requested_size"] == [1024, 64] and params["exact_size"]
    bad = httpx.post(
        f"{stack.http.url}/apps/run",
        headers=headers,
        json={"app": "infsh/hidream-i1-fast", "input": {"prompt": "x", "scheduler_type": "dpm"}},
    )
    assert bad.status_code == 422 and bad.headers["content-type"].startswith("application/problem+json")
    assert "scheduler" in bad.json()["detail"]
    httpx.post(f"{stack.http.url}/tasks/{res.json()['data']['id']}/cancel", headers=headers)


def test_wavespeed_sdk_runs_its_documented_usage(stack, receiver, tmp_path):
    seen = run_example(
        "wavespeed_example.py",
        png_file(tmp_path),
        WAVESPEED_API_KEY=stack.token,
        DREAMBATCH_URL=stack.http.url,
        HOOK_URL=receiver.url,
    )
    assert seen["upload"].startswith(f"{stack.http.url}/uploads/")
    (url,) = seen["run"]["outputs"]
    out = fetch_image(url)
    assert out.format == "JPEG" and out.size == (96, 64)  # WaveSpeed's jpeg default
    (data_uri,) = seen["sync_base64"]["outputs"]
    assert data_uri.startswith("data:image/png;base64,")

    failed = seen["failed"]
    assert failed["status"] == "failed" and failed["outputs"] is None and "InputError" in failed["error"]
    result = seen["failed_result"]
    assert result["code"] == 200 and result["message"] == "success"
    assert result["data"]["status"] == "failed" and result["data"]["outputs"] == []

    # the seed page's REST calls: HTTP 200, the envelope, exactly the documented fields (and the checker's name)
    submitted = seen["rest_submit"]
    assert submitted["status"] == 200 and submitted["body"]["code"] == 200
    data = submitted["body"]["data"]
    assert set(data) == {
        "id",
        "model",
        "outputs",
        "urls",
        "has_nsfw_contents",
        "status",
        "created_at",
        "error",
        "timings",
        "safety_checker",
    }
    assert data["model"] == "wavespeed-ai/hidream-e1-full" and data["status"] in ("created", "processing")
    assert data["outputs"] == [] and isinstance(data["timings"]["inference"], int)
    assert seen["rest_result"]["data"]["id"] == data["id"]
    assert seen["unknown"] == {"code": 404, "message": "no prediction 'nope'", "data": None}

    (hook,) = wait_until(lambda: hooks_for(receiver, "id", data["id"]), 90, what="the WaveSpeed webhook")
    assert hook["status"] == "completed" and hook["has_nsfw_contents"] == [True] and len(hook["outputs"]) == 1
    assert hook["timings"]["inference"] > 0 and hook["urls"]["get"].endswith(f"/api/v3/predictions/{data['id']}/result")


def test_openai_sdk_runs_the_lumenfall_example_and_gets_exact_sizes(stack, tmp_path):
    seen = run_example(
        "openai_example.py", png_file(tmp_path), OPENAI_API_KEY=stack.token, OPENAI_BASE_URL=f"{stack.http.url}/v1"
    )
    assert fetch_image(seen["edit"]["url"]).size == (1024, 768)  # as asked, from a 96x64 input
    assert seen["edit"]["revised_prompt"] == "Add a starry night sky to this image"
    assert seen["edit"]["extra"]["has_nsfw_concepts"] is None  # no checker on the e1-1 worker: said so
    assert seen["edit"]["extra"]["safety_checker"] == "off: no safety checker configured on this worker"
    assert seen["generate"]["size"] == [1024, 768]  # HiDream rendered 1168x880; resized to what was asked
    assert seen["generate"]["response_size"] == "1024x768"
    assert (
        seen["generate"]["extra"]["has_nsfw_concepts"] == [False]
        and seen["generate"]["extra"]["safety_checker"] == "tiny"
    )


# --- retries never make a second job -------------------------------------------------------------------------
def jobs_of(stack, model: str) -> set[str]:
    return {j for j in stack.store.job_ids(1000) if (job := stack.store.get_job(j)) and job.model == model}


def test_openai_retry_storm_on_a_slow_queue_makes_one_job(stack):
    """The SDK's defaults (2 retries) with a 3 s timeout against a queue no worker serves: every attempt is
    answered before the SDK times out, each retry attaches to the first attempt's job, and the last one raises
    with the job's id."""
    attempts = []
    client = openai.OpenAI(
        api_key=stack.token,
        base_url=f"{stack.http.url}/v1",
        timeout=3.0,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [attempts.append]}),
    )
    before = jobs_of(stack, "i1-dev")
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="hidream-i1-dev", prompt="a storm of retries", extra_body={"steps": 1})
    assert raised.value.status_code == 504 and time.monotonic() - started < 20
    assert [a.headers["x-stainless-retry-count"] for a in attempts] == ["0", "1", "2"]
    (job_id,) = jobs_of(stack, "i1-dev") - before
    assert job_id in str(raised.value)

    # a retry of a request that already ended gets its images; a new attempt 0 is a new job
    body = {"model": "hidream-i1-fast", "prompt": "attached", "size": "256x256", "steps": 1}
    headers = {"Authorization": f"Bearer {stack.token}"}
    first = httpx.post(
        f"{stack.http.url}/v1/images/generations",
        json=body,
        timeout=120,
        headers={**headers, "x-stainless-retry-count": "0"},
    )
    again = httpx.post(
        f"{stack.http.url}/v1/images/generations",
        json=body,
        timeout=120,
        headers={**headers, "x-stainless-retry-count": "1"},
    )
    other = httpx.post(
        f"{stack.http.url}/v1/images/generations",
        json=body,
        timeout=120,
        headers={**headers, "x-stainless-retry-count": "0"},
    )
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json()["id"] == first.json()["id"] != other.json()["id"]

    # an edit's retry sends the same file again (another multipart boundary): the same request, the same job
    photo = png_file(stack.folder, 48, 32).read_bytes()
    form = {"model": "hidream-e1-1", "prompt": "make it green", "steps": "1", "refine_strength": "0"}
    edits = [
        httpx.post(
            f"{stack.http.url}/v1/images/edits",
            data=form,
            files={"image": ("p.png", photo, "image/png")},
            headers={**headers, "x-stainless-retry-count": str(n)},
            timeout=120,
        )
        for n in (0, 1)
    ]
    assert [e.status_code for e in edits] == [200, 200] and edits[0].json()["id"] == edits[1].json()["id"]


def test_fal_wavespeed_and_inferencesh_resubmits_of_one_body_make_one_job(stack):
    headers = {"Authorization": f"Key {stack.token}"}
    body = {"prompt": f"the same body {uuid.uuid4().hex[:6]}"}
    url = f"{stack.http.url}/fal-ai/hidream-i1-dev"
    a, b = (httpx.post(url, json=body, headers=headers).json()["request_id"] for _ in range(2))
    c = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "one"}).json()["request_id"]
    d = httpx.post(url, json=body, headers={**headers, "Idempotency-Key": "two"}).json()["request_id"]
    assert a == b and len({a, c, d}) == 3  # distinct Idempotency-Keys: distinct requests, on purpose

    bearer = {"Authorization": f"Bearer {stack.token}"}
    ws = [
        httpx.post(f"{stack.http.url}/api/v3/dreambatch/i1-dev", json=body, headers=bearer).json()["data"]["id"]
        for _ in range(2)
    ]
    sh = [
        httpx.post(
            f"{stack.http.url}/apps/run", json={"app": "dreambatch/i1-dev", "input": body}, headers=bearer
        ).json()["data"]["id"]
        for _ in range(2)
    ]
    assert ws[0] == ws[1] and sh[0] == sh[1] and len({a, ws[0], sh[0]}) == 3
    for job_id in {a, c, d, ws[0], sh[0]}:
        httpx.post(f"{stack.http.url}/v1/jobs/{job_id}/cancel", headers=bearer)


# --- inference.sh's stream keeps a long wait alive ----------------------------------------------------------
def test_inferencesh_stream_sends_heartbeats_repeats_the_state_and_closes_after_the_end(stack, monkeypatch):
    from jobs.api import inferencesh_routes

    monkeypatch.setattr(inferencesh_routes, "HEARTBEAT_EVERY", 0.3)
    monkeypatch.setattr(inferencesh_routes, "REPEAT_EVERY", 1.0)
    headers = {"Authorization": f"Bearer {stack.token}"}
    task = httpx.post(
        f"{stack.http.url}/apps/run",
        headers=headers,
        json={"app": "infsh/hidream-i1-dev", "input": {"prompt": f"waits {uuid.uuid4().hex[:6]}"}},
    ).json()["data"]
    lines, started = [], time.monotonic()
    with httpx.stream("GET", f"{stack.http.url}/tasks/{task['id']}/stream", headers=headers, timeout=30) as res:
        assert res.headers["content-type"].startswith("application/x-ndjson")
        for line in res.iter_lines():
            lines.append(json.loads(line))
            if time.monotonic() - started > 2.5 and not any(x.get("status") == 12 for x in lines):
                httpx.post(f"{stack.http.url}/tasks/{task['id']}/cancel", headers=headers)
    states = [x for x in lines if x.get("type") != "heartbeat"]
    assert states[0]["status"] == 2 and states[-1]["status"] == 12  # the state now first, the terminal one last
    assert sum(x.get("type") == "heartbeat" for x in lines) >= 2
    assert sum(x["status"] == 2 for x in states) >= 2  # the unchanged state, sent again
    assert [x["status"] for x in states] == sorted(x["status"] for x in states)


# --- uploads, safety checker units -------------------------------------------------------------------------
def test_upload_urls_are_signed_and_map_back_to_their_objects(stack):
    headers = {"Authorization": f"Bearer {stack.token}"}
    ticket = httpx.post(
        f"{stack.http.url}/files",
        headers=headers,
        json={"files": [{"filename": "a.png", "content_type": "image/png", "size": 10}]},
    ).json()["data"][0]
    tampered = ticket["upload_url"][:-1] + ("0" if ticket["upload_url"][-1] != "0" else "1")
    assert httpx.put(tampered, content=b"x").status_code == 403
    assert httpx.get(ticket["uri"]).status_code == 404  # nothing PUT yet
    big = httpx.post(
        f"{stack.http.url}/api/v3/media/uploads", headers=headers, json={"filename": "huge.png", "size": 10**12}
    )
    assert big.status_code == 413 and big.json()["code"] == 413
    data = png_file(stack.folder, 40, 30).read_bytes()
    assert httpx.put(ticket["upload_url"], content=data, headers={"Content-Type": "image/png"}).status_code == 200
    served = httpx.get(ticket["uri"])
    assert served.content == data and served.headers["content-type"] == "image/png"


def test_safety_checker_loads_a_folder_blacks_out_on_request_and_says_when_it_did_not_run(tmp_path):
    from jobs.errors import ConfigError
    from jobs.settings import SafetySettings
    from worker import safety

    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (20, 20), "blue")]
    flagging = safety.ClipSafetyChecker(str(safety.make_tiny_checker(tmp_path / "all", flags_everything=True)))
    never = safety.Lazy(SafetySettings(checker=str(safety.make_tiny_checker(tmp_path / "none"))), "cpu")
    out, flags, name = safety.screen(lambda: flagging, {}, images, action="black")
    assert flags == [True, True] and name == "all" and all(i.getbbox() is None for i in out)  # black
    assert [i.size for i in out] == [(40, 30), (20, 20)]
    out, flags, name = safety.screen(never, {}, images)
    assert flags == [False, False] and name == "none" and out == images
    assert safety.screen(never, {"safety_check": False}, images)[1:] == (None, safety.OFF_BY_REQUEST)
    assert safety.screen(lambda: None, {}, images)[1:] == (None, safety.OFF_UNCONFIGURED)
    assert safety.load(SafetySettings(checker="off"), "cpu") is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="stable-diffusion-safety-checker"):
        safety.load(SafetySettings(checker=str(tmp_path / "empty")), "cpu")
