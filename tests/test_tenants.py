"""Tenants, and keys that outlive Redis: a job belongs to the tenant of the key that made it, another tenant's key
gets 404 on every route that names it (the native routes and each vendor's, through the vendors' SDKs where the
SDK tests use them), lists show a tenant only its own jobs, an `admin` key and the CLI see every job; a key's prefix
puts its jobs under it and its rate limit answers 429 with Retry-After; keys and idempotency records are kept next
to the outputs, so after FLUSHALL the same key still works and the same Idempotency-Key is the same job.

No workers: jobs stay queued. The module has its own redis-server, so FLUSHALL touches no other test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from types import SimpleNamespace

import httpx
import pytest
from services import ROOT, ApiServer, RedisServer, cli, s3_client, self_signed_cert, service_env

from jobs import keys, records
from jobs.api import auth
from jobs.reconcile import reconcile
from jobs.settings import Settings

pytestmark = pytest.mark.timeout(240)
ALL = ("jobs:read", "jobs:write", "images")


@pytest.fixture(scope="module")
def stack(s3_endpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenants")
    redis = RedisServer(folder)
    redis.start()
    bucket = f"t-ten-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    output = f"s3://{bucket}/api"
    settings = Settings(
        redis_url=redis.url, output=output, s3={"endpoint_url": s3_endpoint}, api={"wait_timeout": 0.05}
    )
    cert, key = self_signed_cert(folder)
    api, https = ApiServer(settings), ApiServer(settings, tls=(str(cert), str(key)))
    try:
        yield SimpleNamespace(
            api=api,
            https=https,
            cert=cert,
            redis=redis,
            bucket=bucket,
            svc=api.app.state.services,
            env=service_env(redis.url, s3_endpoint, folder, DREAMBATCH_OUTPUT=output),
            a=api.key(*ALL, tenant="acme"),
            b=api.key(*ALL, tenant="bolt"),
            admin=api.key("admin", name="ops"),
        )
    finally:
        https.stop()
        api.stop()
        redis.stop()


def http(stack, token: str) -> httpx.Client:
    return httpx.Client(base_url=stack.api.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


# --- what a tenant makes: one of each kind, each by its own protocol ----------------------------------
def make_job(c: httpx.Client) -> str:
    res = c.post("/v1/jobs", json={"model": "i1-fast", "rows": [{"prompt": f"a job {uuid.uuid4().hex}"}]})
    assert res.status_code == 201, res.text
    return res.json()["id"]


def make_fal(c: httpx.Client) -> str:
    res = c.post("/fal-ai/hidream-i1-fast", json={"prompt": f"a fal request {uuid.uuid4().hex}"})
    assert res.status_code == 200, res.text
    return res.json()["request_id"]


def make_task(c: httpx.Client) -> str:
    body = {"app": "infsh/hidream-i1-fast", "input": {"prompt": f"a task {uuid.uuid4().hex}"}}
    res = c.post("/apps/run", json=body)
    assert res.status_code == 200, res.text
    return res.json()["data"]["id"]


def make_prediction(c: httpx.Client) -> str:
    res = c.post("/api/v3/wavespeed-ai/hidream-i1-fast", json={"prompt": f"a prediction {uuid.uuid4().hex}"})
    assert res.status_code == 200, res.text
    return res.json()["data"]["id"]


def make_openai(c: httpx.Client) -> str:
    """An OpenAI images request: no worker runs it, so it answers 504 naming its job."""
    res = c.post("/v1/images/generations", json={"prompt": f"an image {uuid.uuid4().hex}"})
    assert res.status_code == 504, res.text
    return res.json()["error"]["message"].split()[1]


MAKERS = {"job": make_job, "fal": make_fal, "task": make_task, "prediction": make_prediction, "openai": make_openai}
FAL = "/fal-ai/hidream-i1-fast/requests/{id}"
ROUTES = [  # (what it names, method, path): every route that names a job, item, request, task or prediction
    ("job", "GET", "/v1/jobs/{id}"),
    ("job", "GET", "/v1/jobs/{id}/items"),
    ("job", "GET", "/v1/jobs/{id}/results"),
    ("job", "GET", "/v1/jobs/{id}/events?timeout=0.01"),
    ("job", "POST", "/v1/jobs/{id}/cancel"),
    ("job", "POST", "/v1/jobs/{id}/retry"),
    ("job", "POST", "/v1/jobs/{id}/resume"),
    ("job", "POST", "/v1/jobs/{id}/items/1/cancel"),  # one item of it (the review page's buttons)
    ("job", "POST", "/v1/jobs/{id}/items/1/retry"),
    ("fal", "GET", FAL + "/status"),
    ("fal", "GET", FAL),
    ("fal", "PUT", FAL + "/cancel"),
    ("fal", "GET", "/queue" + FAL + "/status"),  # fal's old queue paths
    ("fal", "PUT", "/queue" + FAL + "/cancel"),
    ("fal", "GET", "/v1/jobs/{id}"),  # a vendor request is a job like any other
    ("task", "GET", "/tasks/{id}"),
    ("task", "GET", "/tasks/{id}/stream"),
    ("task", "POST", "/tasks/{id}/cancel"),
    ("prediction", "GET", "/api/v3/predictions/{id}/result"),
    ("openai", "GET", "/v1/jobs/{id}"),
    ("openai", "GET", "/v1/jobs/{id}/items"),
    ("openai", "POST", "/v1/jobs/{id}/cancel"),
]


@pytest.mark.parametrize(("kind", "method", "path"), ROUTES, ids=[f"{m} {p}" for _, m, p in ROUTES])
def test_another_tenants_key_gets_404_the_owner_and_an_admin_do_not(stack, kind, method, path):
    with http(stack, stack.a) as a, http(stack, stack.b) as b, http(stack, stack.admin) as admin:
        made = MAKERS[kind](a)
        url = path.format(id=made)
        res = b.request(method, url)
        assert res.status_code == 404, (method, url, res.status_code, res.text)
        assert stack.svc.store.get_job(made).cancel_requested is False  # the other tenant's cancel did nothing
        for owner in (a, admin):
            with owner.stream(method, url) as res:  # (a stream of a queued task goes on: its status is enough)
                assert res.status_code != 404 and res.status_code < 500, (method, url, res.read())
        assert b.get(f"/v1/jobs/{made}").status_code == 404  # (and still none of its business)


def test_another_tenants_key_cannot_read_an_items_images(stack):
    """The image routes answer the owner "no output yet" (a 404 about the item) and the other tenant "no job"."""
    with http(stack, stack.a) as a, http(stack, stack.b) as b:
        made = make_job(a)
        for path in (f"/v1/jobs/{made}/items/1/input", f"/v1/jobs/{made}/items/1/output/0"):
            theirs, mine = b.get(path), a.get(path)
            assert theirs.status_code == 404 and "no job" in theirs.text, theirs.text
            assert mine.status_code == 404 and "item 1" in mine.text and "no job" not in mine.text, mine.text


def test_a_tenant_lists_only_its_own_jobs_an_admin_lists_every_one(stack):
    with http(stack, stack.a) as a, http(stack, stack.b) as b, http(stack, stack.admin) as admin:
        mine, theirs = make_job(a), make_job(b)
        listed = {
            name: {j["id"] for j in c.get("/v1/jobs", params={"limit": 200}).json()["data"]}
            for name, c in (("a", a), ("b", b), ("admin", admin))
        }
    assert mine in listed["a"] and theirs not in listed["a"]
    assert theirs in listed["b"] and mine not in listed["b"]
    assert {mine, theirs} <= listed["admin"]
    tenants = {stack.svc.store.get_job(i).tenant for i in listed["a"]}
    assert tenants == {"acme"}


def test_a_listing_finds_a_tenants_jobs_behind_many_of_anothers(stack):
    with http(stack, stack.a) as a, http(stack, stack.b) as b:
        older = make_job(a)
        newer = [make_job(b) for _ in range(6)]
        listed = [j["id"] for j in a.get("/v1/jobs", params={"limit": 1}).json()["data"]]
    assert listed and listed[0] not in newer
    assert older in [j["id"] for j in http(stack, stack.a).get("/v1/jobs", params={"limit": 200}).json()["data"]]


def test_the_vendor_sdks_of_another_tenant_see_no_such_request(stack):
    """inference.sh's and WaveSpeed's SDKs in this process, fal-client in its own (it reads its host at import)."""
    import wavespeed  # type: ignore[import-untyped]
    from inferencesh import inference  # type: ignore[import-untyped]

    with http(stack, stack.a) as a:
        task, prediction, request = make_task(a), make_prediction(a), make_fal(a)
    other = inference(api_key=stack.b, base_url=stack.api.url)
    with pytest.raises(Exception, match="404|no task"):
        other.get_task(task)
    with pytest.raises(Exception, match="404|no task"):
        other.cancel(task)
    assert inference(api_key=stack.a, base_url=stack.api.url).get_task(task).data["id"] == task
    with pytest.raises(Exception, match="404|no prediction"):
        wavespeed.Client(api_key=stack.b, base_url=stack.api.url, max_retries=0).get_result(prediction)
    code = (
        "import json, sys, fal_client\n"
        "out = {}\n"
        "for name, call in (('status', lambda: fal_client.status('fal-ai/hidream-i1-fast', sys.argv[1])),\n"
        "                   ('result', lambda: fal_client.result('fal-ai/hidream-i1-fast', sys.argv[1])),\n"
        "                   ('cancel', lambda: fal_client.cancel('fal-ai/hidream-i1-fast', sys.argv[1]))):\n"
        "    try:\n"
        "        out[name] = ['ok', str(call())]\n"
        "    except Exception as exc:\n"
        "        out[name] = [type(exc).__name__, str(getattr(getattr(exc, 'response', None), 'status_code', exc))]\n"
        "print(json.dumps(out))\n"
    )
    host = stack.https.url.removeprefix("https://")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DREAMBATCH_", "FAL_", "OPENAI_"))}
    env = {**clean, "FAL_KEY": stack.b, "FAL_QUEUE_RUN_HOST": host, "SSL_CERT_FILE": str(stack.cert)}
    res = subprocess.run(
        [sys.executable, "-c", code, request], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert {name: outcome[1] for name, outcome in seen.items()} == {"status": "404", "result": "404", "cancel": "404"}
    assert stack.svc.store.get_job(request).cancel_requested is False


def test_a_keys_prefix_puts_its_jobs_under_it(stack):
    token = stack.api.key(*ALL, tenant="carrot", prefix="carrot/out")
    with http(stack, token) as c:
        job_id = make_job(c)
        request = make_fal(c)
    for made in (job_id, request):
        job = stack.svc.store.get_job(made)
        assert job.output == f"s3://{stack.bucket}/api/carrot/out" and job.tenant == "carrot"
        spec = s3_client(stack.svc.settings.s3.endpoint_url).get_object(
            Bucket=stack.bucket, Key=f"api/carrot/out/{made}/job.json"
        )
        assert json.loads(spec["Body"].read())["tenant"] == "carrot"


def test_periodic_reconcile_finds_a_prefixed_tenants_jobs_after_a_redis_loss(stack):
    from worker.sweeper import sweep_once

    token = stack.api.key(*ALL, tenant="date", prefix="date")
    with http(stack, token) as c:
        job_id = make_job(c)
        stack.redis.client().flushall()
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404  # Redis lost it (the key it read back)
        assert sweep_once(stack.svc) >= 1  # the sweep looks under every key's prefix too
        job = c.get(f"/v1/jobs/{job_id}")
        assert job.status_code == 200 and job.json()["status"] == "queued"
    assert stack.svc.store.get_job(job_id).tenant == "date"


def test_rate_limit_answers_429_with_retry_after_in_every_clients_shape(stack):
    token = stack.api.key(*ALL, tenant="dash", rate=3)
    with http(stack, token) as c, http(stack, stack.a) as unlimited:
        answers = [c.get("/v1/jobs") for _ in range(8)]  # at most one minute boundary falls in between
        limited = [r for r in answers if r.status_code == 429]
        assert limited and all(r.status_code == 200 for r in answers[: answers.index(limited[0])])
        assert answers.index(limited[0]) <= 6
        error = limited[0].json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "3 requests a minute" in error["message"]
        assert 1 <= int(limited[0].headers["Retry-After"]) <= 60
        fal = c.get("/fal-ai/hidream-i1-fast/requests/nope/status")
        if fal.status_code == 429:  # (unless the minute just turned)
            assert fal.json()["error_type"] == "rate_limit_exceeded" and int(fal.headers["Retry-After"]) >= 1
        assert unlimited.get("/v1/jobs").status_code == 200  # another key's limit is its own


def test_the_cli_sees_every_tenants_jobs_and_its_own_belong_to_no_tenant(stack, tmp_path):
    with http(stack, stack.a) as a:
        job_id = make_job(a)
    res = cli("status", job_id, "--json", env=stack.env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["job_id"] == job_id

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "an operator\'s job"}\n')
    res = cli("submit", str(manifest), "--model", "i1-fast", "--json", env=stack.env)
    assert res.returncode == 0, res.stderr
    operators = json.loads(res.stdout)["job_id"]
    assert stack.svc.store.get_job(operators).tenant is None
    with http(stack, stack.a) as a, http(stack, stack.admin) as admin:
        assert a.get(f"/v1/jobs/{operators}").status_code == 404
        assert operators not in [j["id"] for j in a.get("/v1/jobs", params={"limit": 200}).json()["data"]]
        assert admin.get(f"/v1/jobs/{operators}").status_code == 200


def test_keys_cli_makes_tenant_keys_with_prefix_and_rate_and_says_what_is_wrong(stack):
    res = cli(
        "keys",
        "create",
        "--tenant",
        "elm",
        "--scope",
        "jobs:read",
        "--prefix",
        "elm/",
        "--rate",
        "50",
        "--json",
        env=stack.env,
    )
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert (made["tenant"], made["prefix"], made["rate"], made["scopes"]) == ("elm", "elm", 50, ["jobs:read"])
    durable = records.read_api_key(stack.svc.objects(stack.svc.settings.output), made["key_id"])
    assert durable is not None and durable.tenant == "elm" and made["token"] not in durable.model_dump_json()
    listed = cli("keys", "list", env=stack.env).stdout
    assert made["key_id"] in listed and "tenant elm" in listed and "50/min" in listed
    bad = cli("keys", "create", "--tenant", "f", "--scope", "jobs:read", "--prefix", "../up", env=stack.env)
    assert bad.returncode == 2 and "--prefix" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    for options, field in (({"tenant": "a b"}, "--tenant"), ({"rate": 0}, "--rate"), ({"prefix": "a//b"}, "--prefix")):
        with pytest.raises(ValueError, match=field):
            auth.mint("f", ["jobs:read"], "2026-01-01T00:00:00+00:00", **options)


def test_after_flushall_keys_and_idempotency_records_still_hold(stack):
    made = json.loads(
        cli(
            "keys",
            "create",
            "--tenant",
            "fig",
            "--scope",
            "jobs:read",
            "--scope",
            "jobs:write",
            "--json",
            env=stack.env,
        ).stdout
    )
    revoked = json.loads(
        cli("keys", "create", "--tenant", "fig", "--scope", "jobs:read", "--json", env=stack.env).stdout
    )
    assert cli("keys", "revoke", revoked["key_id"], env=stack.env).returncode == 0
    body = {"model": "i1-fast", "rows": [{"prompt": "kept across a Redis loss"}]}
    idem = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    with http(stack, made["token"]) as c:
        first = c.post("/v1/jobs", json=body, headers=idem)
        assert first.status_code == 201, first.text
        job_id = first.json()["id"]

        stack.redis.client().flushall()
        assert stack.redis.client().get(keys.API_KEY.format(key_id=made["key_id"])) is None

        assert c.get("/v1/jobs").status_code == 200  # the key, read back from its record (and cached again)
        assert stack.redis.client().get(keys.API_KEY.format(key_id=made["key_id"])) is not None
        with http(stack, revoked["token"]) as gone:
            assert gone.get("/v1/jobs").status_code == 401  # a revoked key stays revoked
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404  # Redis lost the job itself: reconcile brings it

        svc = stack.svc
        reconcile(job_id, svc.objects(svc.settings.output), svc.store, lambda ids: None, lambda _: None)
        again = c.post("/v1/jobs", json=body, headers=idem)
        assert again.status_code == 201 and again.json()["id"] == job_id
        assert again.headers["Idempotent-Replayed"] == "true"
        other = c.post("/v1/jobs", json={**body, "rows": [{"prompt": "another"}]}, headers=idem)
        assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
        assert c.get(f"/v1/jobs/{job_id}").json()["id"] == job_id  # still this tenant's, after the rebuild
        with http(stack, stack.b) as b:
            assert b.get(f"/v1/jobs/{job_id}").status_code == 404
