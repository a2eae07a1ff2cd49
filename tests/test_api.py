"""The HTTP API without workers: auth, manifest jobs (upload and JSON rows), every bad line as a 422,
idempotency, the keys CLI, and schemathesis against the OpenAPI document. Jobs created here stay
queued; they live in their own Redis database so no other test's worker picks them up."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pytest
from services import ApiServer, cli, s3_client, service_env

from jobs import export, keys
from jobs.settings import Settings

pytestmark = pytest.mark.timeout(240)
REDIS_DB = 1


@pytest.fixture(scope="module")
def api(redis_server, s3_endpoint):
    bucket = f"t-api-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    settings = Settings(
        redis_url=redis_server.database(REDIS_DB),
        output=f"s3://{bucket}/api",
        s3={"endpoint_url": s3_endpoint},
        api={"wait_timeout": 0.05},
    )
    server = ApiServer(settings)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_db(redis_server):
    import redis

    return redis.Redis.from_url(redis_server.database(REDIS_DB), decode_responses=True)


def queued_messages(redis_db, model: str = "i1-fast") -> int:
    """Task messages waiting on a model's queue, all priorities."""
    return sum(redis_db.llen(q) for q in keys.priority_lists(keys.gpu_queue(model)).values())


def client(api, *scopes: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api.key(*scopes)}"} if scopes else {}
    return httpx.Client(base_url=api.url, headers=headers, timeout=30)


BAD_CSV = (
    "id,prompt,steps,output_format,seed\n"
    "ok1,a fine prompt,4,png,1\n"
    "bad1,,4,png,1\n"
    "bad2,a prompt,many,gif,1\n"
    'ok2,"quoted, with comma",4,jpeg,-1\n'
    "bad3,a prompt,4,png,-7\n"
)


def test_manifest_upload_with_bad_lines_is_a_422_listing_every_one_and_queues_nothing(api, redis_db):
    with client(api, "jobs:write") as http:
        before = set(redis_db.keys("*"))
        res = http.post("/v1/jobs", data={"model": "i1-fast"}, files={"manifest": ("bad.csv", BAD_CSV, "text/csv")})
        assert res.status_code == 422
        error = res.json()["error"]
        assert error["errors"] == [
            "line 3: prompt: field required",
            "line 4: steps: input should be a valid integer, unable to parse string as an integer (got 'many')",
            "line 4: output_format: input should be 'jpeg', 'png' or 'webp' (got 'gif')",
            "line 6: seed: input should be greater than or equal to -1 (got '-7')",
        ]
        assert "4 problem(s); nothing was queued" in error["message"]
        assert set(redis_db.keys("*")) == before


def test_json_rows_become_a_queued_job_with_status_items_and_results(api, redis_db):
    rows = [{"id": f"r{n}", "prompt": f"a red chair, view {n}", "sku": f'=HYPERLINK("x{n}")'} for n in range(3)]
    with client(api, "jobs:write", "jobs:read") as http:
        res = http.post("/v1/jobs", json={"model": "i1-fast", "rows": rows, "defaults": {"steps": 2}})
        assert res.status_code == 201, res.text
        job = res.json()
        assert job["status"] == "queued" and job["queued"] == 3 and job["rejected"] == 0
        assert job["counts"] == {"total": 3, "queued": 3, "running": 0, "completed": 0, "failed": 0, "cancelled": 0}
        assert queued_messages(redis_db) >= 3  # the tasks are on the model's queue

        status = http.get(f"/v1/jobs/{job['id']}").json()
        assert status["id"] == job["id"] and status["rate_per_s"] == 0 and status["eta_s"] is None
        assert job["id"] in [j["id"] for j in http.get("/v1/jobs", params={"limit": 200}).json()["data"]]

        items = http.get(f"/v1/jobs/{job['id']}/items", params={"status": "queued", "limit": 2}).json()
        assert [i["id"] for i in items["data"]] == ["r0", "r1"] and items["total"] == 3 and items["next_offset"] == 2
        assert http.get(f"/v1/jobs/{job['id']}/items", params={"status": "failed"}).json()["data"] == []

        lines = http.get(f"/v1/jobs/{job['id']}/results").text.splitlines()
        assert [json.loads(x)["metadata"]["sku"] for x in lines] == [r["sku"] for r in rows]
        csv = http.get(f"/v1/jobs/{job['id']}/results", params={"format": "csv"})
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.text.splitlines()[0] == "id,line,status,error,seed,outputs,metadata,model,params"
        assert csv.text.splitlines()[1].startswith("r0,1,queued,,")

        assert http.get("/v1/jobs/nope-0").status_code == 404
        assert http.get("/v1/jobs/x/items", params={"status": "lost"}).status_code == 422


def test_json_rows_with_bad_values_list_every_row(api):
    rows = [{"prompt": "fine"}, {"prompt": "x", "steps": 0}, {"negative_prompt": "no prompt"}]
    with client(api, "jobs:write") as http:
        res = http.post("/v1/jobs", json={"model": "i1-fast", "rows": rows})
        assert res.status_code == 422
        assert res.json()["error"]["errors"] == [
            "line 2: steps: input should be greater than or equal to 1 (got 0)",
            "line 3: prompt: field required",
        ]
        unknown = http.post("/v1/jobs", json={"model": "i9", "rows": rows[:1]})
        assert unknown.status_code == 422 and "unknown model 'i9'" in unknown.json()["error"]["message"]
        assert http.post("/v1/jobs", json={"model": "i1-fast", "rows": []}).status_code == 422
        late = http.post("/v1/jobs", json={"model": "i1-fast", "rows": rows[:1], "expires_after": "soon"})
        assert late.status_code == 422 and late.json()["error"]["param"] == "expires_after"
        low = http.post(
            "/v1/jobs",
            json={"model": "i1-fast", "rows": rows[:1], "priority": "low", "max_concurrency": 2, "expires_after": "2h"},
        ).json()
        assert low["priority"] == "low" and low["max_concurrency"] == 2 and low["expires_at"] > 0
        assert (
            http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        )


def test_idempotency_key_same_body_same_job_other_body_422(api, redis_db):
    body = {"model": "i1-fast", "rows": [{"prompt": "idempotent"}]}
    key = f"k-{uuid.uuid4().hex}"
    with client(api, "jobs:write") as http:
        first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        queued = queued_messages(redis_db)
        again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
        assert first.status_code == again.status_code == 201
        assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
        assert queued_messages(redis_db) == queued  # nothing queued the second time

        other = http.post(
            "/v1/jobs", json={**body, "rows": [{"prompt": "something else"}]}, headers={"Idempotency-Key": key}
        )
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"

        # the same manifest uploaded twice (different multipart boundaries) is the same request
        upload = {"files": {"manifest": ("m.jsonl", '{"prompt": "uploaded"}\n')}, "data": {"model": "i1-fast"}}
        a = http.post("/v1/jobs", **upload, headers={"Idempotency-Key": key + "-u"})
        b = http.post("/v1/jobs", **upload, headers={"Idempotency-Key": key + "-u"})
        assert a.status_code == 201 and a.json()["id"] == b.json()["id"]

        # without a key, each POST is a new job; a failed request does not burn its key
        assert http.post("/v1/jobs", json=body).json()["id"] != http.post("/v1/jobs", json=body).json()["id"]
        bad = {"model": "i1-fast", "rows": [{"prompt": ""}]}
        assert http.post("/v1/jobs", json=bad, headers={"Idempotency-Key": key + "-b"}).status_code == 422
        assert http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key + "-b"}).status_code == 201


def test_oversized_bodies_are_refused_with_413(api):
    settings = api.app.state.services.settings.model_copy(
        update={
            "api": api.app.state.services.settings.api.model_copy(update={"max_upload_bytes": 4096, "max_json_rows": 5})
        }
    )
    small = ApiServer(settings)
    try:
        headers = {"Authorization": f"Bearer {small.key('jobs:write', 'images')}"}
        with httpx.Client(base_url=small.url, headers=headers, timeout=30) as http:
            big = "".join(json.dumps({"prompt": f"row {n}"}) + "\n" for n in range(200))  # ~5 KB: file over 4 KB
            res = http.post("/v1/jobs", data={"model": "i1-fast"}, files={"manifest": ("m.jsonl", big)})
            assert res.status_code == 413 and "4096-byte limit" in res.json()["error"]["message"]
            huge = http.post(
                "/v1/jobs", content=b"x" * (4096 + 2**20 + 1), headers={"content-type": "application/json"}
            )
            assert huge.status_code == 413  # over the whole-body limit, refused before it is read
            rows = http.post("/v1/jobs", json={"model": "i1-fast", "rows": [{"prompt": "x"}] * 6})
            assert rows.status_code == 413 and rows.json()["error"]["param"] == "rows"
            image = http.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", b"\x89PNG" * 2000)})
            assert image.status_code == 413
    finally:
        small.stop()


ROUTES = [  # (method, path, scope it needs)
    ("GET", "/v1/jobs", "jobs:read"),
    ("GET", "/v1/jobs/j1", "jobs:read"),
    ("GET", "/v1/jobs/j1/items", "jobs:read"),
    ("GET", "/v1/jobs/j1/results", "jobs:read"),
    ("GET", "/v1/jobs/j1/events", "jobs:read"),
    ("POST", "/v1/jobs", "jobs:write"),
    ("POST", "/v1/jobs/j1/cancel", "jobs:write"),
    ("POST", "/v1/jobs/j1/retry", "jobs:write"),
    ("POST", "/v1/jobs/j1/resume", "jobs:write"),
    ("POST", "/v1/images/generations", "images"),
    ("POST", "/v1/images/edits", "images"),
    ("POST", "/fal-ai/hidream-i1-fast", "images"),
    ("GET", "/fal-ai/hidream-i1-fast/requests/j1/status", "images"),
    ("GET", "/fal-ai/hidream-i1-fast/requests/j1", "images"),
    ("PUT", "/fal-ai/hidream-i1-fast/requests/j1/cancel", "images"),
    ("POST", "/run/fal-ai/hidream-i1-fast", "images"),
    ("POST", "/queue/fal-ai/hidream-i1-fast", "images"),  # the old paths still answer
    ("POST", "/apps/run", "images"),
    ("GET", "/tasks/j1", "images"),
    ("GET", "/tasks/j1/stream", "images"),
    ("POST", "/tasks/j1/cancel", "images"),
    ("POST", "/files", "images"),
    ("POST", "/api/v3/wavespeed-ai/hidream-e1-full", "images"),
    ("GET", "/api/v3/predictions/j1/result", "images"),
    ("POST", "/api/v3/media/uploads", "images"),
    ("GET", "/metrics", "metrics"),
]


def auth_failure(res: httpx.Response) -> str:
    """The error's code, read from whichever client's shape the route answers in (jobs.api.shapes)."""
    body = res.json()
    if "error" in body:  # OpenAI's (and dreambatch's)
        return body["error"]["code"]
    if "title" in body:  # inference.sh's problem+json
        assert res.headers["content-type"].startswith("application/problem+json")
        assert body["status"] == res.status_code and body["detail"]
        return body["code"]
    if "message" in body:  # WaveSpeed's: {code, message}, the HTTP status as its code
        assert body["code"] == res.status_code
        return "insufficient_scope" if "scope" in body["message"] else "invalid_api_key"
    return body["error_type"]  # fal's: {detail, error_type}


UNAUTHENTICATED = {"missing_api_key", "invalid_api_key"}


def test_auth_matrix_no_key_401_wrong_scope_403(api):
    tokens = {scope: api.key(scope) for scope in ("jobs:read", "jobs:write", "images", "metrics")}
    revoked = api.key("jobs:read", "jobs:write", "images", "metrics")
    store = api.app.state.services.store
    from jobs.api import auth

    record = store.get_api_key(auth.key_id_of(revoked))
    store.put_api_key(record.model_copy(update={"revoked_at": "2026-01-01T00:00:00+00:00"}))
    forged = revoked[:-4] + ("AAAA" if not revoked.endswith("AAAA") else "BBBB")
    with httpx.Client(base_url=api.url, timeout=30) as http:
        for method, path, scope in ROUTES:
            assert http.request(method, path).status_code == 401, (method, path)
            for bad in (revoked, forged, "dbk_000000000000_" + "x" * 43, "not-a-key"):
                res = http.request(method, path, headers={"Authorization": f"Bearer {bad}"})
                assert res.status_code == 401, (method, path, bad)
                assert auth_failure(res) in UNAUTHENTICATED, (method, path, res.text)
            for other, token in tokens.items():
                res = http.request(method, path, headers={"Authorization": f"Bearer {token}"})
                if other == scope:
                    assert res.status_code not in (401, 403), (method, path, res.text)
                else:
                    assert res.status_code == 403, (method, path, other)
                    assert auth_failure(res) == "insufficient_scope", (method, path, res.text)


def test_metrics_need_the_metrics_scope_and_count_jobs_by_status(api):
    with client(api, "jobs:write") as http:
        assert http.post("/v1/jobs", json={"model": "i1-fast", "rows": [{"prompt": "counted"}]}).status_code == 201
    with client(api, "metrics") as http:
        res = http.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    assert "dreambatch_" in res.text and 'status="queued"' in res.text


def test_keys_cli_creates_lists_and_revokes(api, redis_server, s3_endpoint, tiny_dir):
    env = service_env(redis_server.database(REDIS_DB), s3_endpoint, tiny_dir)
    res = cli("keys", "create", "--name", "ops", "--scope", "jobs:read", "--json", env=env)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert made["scopes"] == ["jobs:read"] and made["token"].startswith("dbk_")
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {made['token']}"}) as http:
        assert http.get("/v1/jobs").status_code == 200
        listed = cli("keys", "list", env=env).stdout
        assert made["key_id"] in listed and made["token"] not in listed and "active" in listed
        assert made["token"] not in str(api.app.state.services.store.r.get(f"db:apikey:{made['key_id']}"))
        assert cli("keys", "revoke", made["key_id"], env=env).returncode == 0
        assert http.get("/v1/jobs").status_code == 401
    bad = cli("keys", "create", "--name", "x", "--scope", "root", env=env)
    assert bad.returncode == 2 and "root" in bad.stderr


def test_schemathesis_finds_no_server_errors_and_no_undeclared_status_codes(api, tmp_path):
    """Every operation, fuzzed from the OpenAPI document with a key holding every scope: no 5xx (but the
    documented 504 of a request that waits for a job no worker runs here), every status code it answers is
    declared for that operation, every body matches its declared schema."""
    token = api.key("jobs:read", "jobs:write", "images", "metrics")
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {token}"}) as http:
        job = http.post("/v1/jobs", json={"model": "i1-fast", "rows": [{"prompt": "fuzzed"}]}).json()["id"]
        request = http.post("/fal-ai/hidream-i1-fast", json={"prompt": "fuzzed"}).json()["request_id"]
        task = http.post("/apps/run", json={"app": "infsh/hidream-i1-fast", "input": {"prompt": "fuzzed"}}).json()
        http.post(f"/tasks/{task['data']['id']}/cancel")  # an ended task: its stream ends at once
        prediction = http.post("/api/v3/wavespeed-ai/hidream-i1-fast", json={"prompt": "fuzzed"}).json()
        upload = http.post("/files", json={"files": [{"filename": "f.png", "content_type": "image/png"}]}).json()
        assert httpx.put(upload["data"][0]["upload_url"], content=b"\x89PNG\r\n\x1a\n").status_code == 200
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        textwrap.dedent(f"""
        [parameters]
        "path.job_id" = "{job}"
        "path.request_id" = "{request}"
        "path.task_id" = "{task["data"]["id"]}"
        "path.prediction_id" = "{prediction["data"]["id"]}"
        "path.upload_id" = "{upload["data"][0]["id"]}"
        "path.filename" = "f.png"
        "path.namespace" = "fal-ai"
        "path.name" = "hidream-i1-fast"
        "path.owner" = "wavespeed-ai"
        "path.model" = "hidream-i1-fast"

        [[operations]]
        include-path = "/v1/jobs/{{job_id}}/events"
        parameters = {{ "query.timeout" = 0.01 }}

        [[operations]]
        include-path-regex = "^/v1/images/|^/run/"
        checks.not_a_server_error.expected-statuses = ["2XX", "3XX", "4XX", "504"]
    """)
    )
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{api.url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
            "--max-examples",
            "25",
            "--phases",
            "examples,fuzzing",  # (its coverage phase trips over a hypothesis bug)
            "-H",
            f"Authorization: Bearer {token}",
            "--request-timeout",
            "10",
            "--workers",
            "2",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert "No issues found" in res.stdout or "passed" in res.stdout


def test_csv_export_quotes_cells_a_spreadsheet_would_run():
    """The CSV that `dreambatch results --format csv` and GET /v1/jobs/{id}/results?format=csv share."""
    line = {
        "id": "r1",
        "line": 1,
        "status": "failed",
        "error": "=cmd|' /C calc'!A0",
        "seed": -1,
        "metadata": {"sku": "@SUM(1)"},
        "output": {"images": [{"s3_uri": "+s3://b/k.png"}]},
    }
    ran = {**line, "error": "ok", "model": "i1-fast", "params": {"prompt": "=x", "steps": 16}}
    rows = list(csv.reader(io.StringIO("".join(export.csv_rows([line, ran])))))
    assert rows[0] == export.CSV_HEADER
    assert rows[1][:7] == ["r1", "1", "failed", "'=cmd|' /C calc'!A0", "'-1", "'+s3://b/k.png", '{"sku": "@SUM(1)"}']
    assert rows[1][7:] == ["", "{}"]  # (a line without model and params: written before they were recorded)
    assert rows[2][3] == "ok" and rows[2][7:] == ["i1-fast", '{"prompt": "=x", "steps": 16}']


def test_the_api_imports_no_torch_and_no_worker_code():
    code = (
        "import sys; from jobs.api.app import create_app; from jobs.settings import Settings; "
        "create_app(Settings(output='s3://b/p')); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'worker')))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
