"""Redis goes away: restarted mid-job (workers and a submit in flight ride it out), down for longer than
a submit will wait (the submission queues nothing), or wiped (the I/O worker's periodic sweep rebuilds
the job from S3 with no operator). Each scenario ends with the ledger check."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from ledger import check_ledger
from services import ROOT, RedisServer, cli, s3_client, service_env, submit_rejected_row, wait_until

from jobs import broker, keys
from jobs.models import JobSpec
from jobs.services import Services
from jobs.settings import Settings
from jobs.store import RedisStore
from jobs.submit import SubmitFailed, create_job

pytestmark = pytest.mark.timeout(300)

GPU = ("worker", "--model", "i1-fast", "--weights", "tiny", "--device", "cpu")


def manifest(path, ids):
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": f"product {i}", "seed": n}) + "\n" for n, i in enumerate(ids))
    )
    return path


def wait_end(store, job_id, timeout):
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.25, what=f"job {job_id} to end"
    )


@pytest.fixture
def own_redis(tmp_path):
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


def test_redis_restart_mid_job_workers_and_a_submit_in_flight_carry_on(
    own_redis, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    env = service_env(own_redis.url, s3_endpoint, tiny_dir)
    start_worker("worker", "--io", redis_url=own_redis.url).wait_ready()
    start_worker(*GPU, "--concurrency", "1", redis_url=own_redis.url).wait_ready()
    ids_a, ids_b = [f"a{n}" for n in range(8)], [f"b{n}" for n in range(3)]
    res = cli(
        "submit",
        str(manifest(tmp_path / "a.jsonl", ids_a)),
        "--model",
        "i1-fast",
        "--set",
        "steps=10",
        "--output",
        f"s3://{bucket}/r",
        "--json",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    job_a = json.loads(res.stdout)["job_id"]
    store = RedisStore.from_url(own_redis.url)
    wait_until(lambda: store.get_job(job_a).counts["completed"] >= 2, 90, 0.05, what="two items completed")

    own_redis.stop()  # Redis is gone…
    patient = {**env, "DREAMBATCH_REDIS_WAIT_S": "120"}  # a script's submit may wait for Redis (a person's: 3 s)
    late = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "submit",
            str(manifest(tmp_path / "b.jsonl", ids_b)),
            "--model",
            "i1-fast",
            "--set",
            "steps=2",
            "--output",
            f"s3://{bucket}/r",
            "--json",
        ],
        env=patient,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(6)
    assert late.poll() is None  # …the submit waits for it instead of failing
    own_redis.start()  # …and comes back with its data (append-only file)
    out, errors = late.communicate(timeout=120)
    assert late.returncode == 0, errors
    job_b = json.loads(out)["job_id"]

    assert wait_end(store, job_a, 180).status == "completed"
    assert wait_end(store, job_b, 120).status == "completed"
    s3 = s3_client(s3_endpoint)
    check_ledger(s3, bucket, "r", job_a, ids_a)
    check_ledger(s3, bucket, "r", job_b, ids_b)


def test_a_submit_that_outlives_its_retry_window_queues_nothing(
    own_redis, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    settings = Settings(redis_url=own_redis.url, redis_retry_s=3, celery={"publish_batch": 2})
    published: list[str] = []

    def publish(job, ids):
        if published:  # the broker dies after the first batch went out
            own_redis.stop()
        broker.publish_items(services.celery, job.model, job.job_id, ids)
        published.extend(ids)

    services = Services(settings, publish=publish)  # Redis and publishing retried for 3 s, 2 tasks a batch
    ids = [f"n{n}" for n in range(6)]
    with pytest.raises(SubmitFailed, match="nothing was queued"):
        create_job(
            JobSpec(model="i1-fast", defaults={"steps": 2}, output=f"s3://{bucket}/n"),
            manifest(tmp_path / "n.jsonl", ids),
            services,
            job_id="job-n",
        )
    assert published == ["n0", "n1"]  # a first batch did reach the queue before Redis went away

    own_redis.start()  # it comes back with those two tasks; the job never committed
    store = RedisStore.from_url(own_redis.url)
    assert store.get_job("job-n").submitting
    grace = {"DREAMBATCH_CELERY__SUBMIT_GRACE": "3"}
    start_worker("worker", "--io", redis_url=own_redis.url, **grace).wait_ready()
    start_worker(*GPU, redis_url=own_redis.url, **grace).wait_ready()
    wait_until(
        lambda: all(store.get_item("job-n", i).status == "cancelled" for i in ("n0", "n1")),
        60,
        0.25,
        what="the uncommitted job's items to be dropped",
    )
    item = store.get_item("job-n", "n0")
    assert item.attempts == 0 and "did not complete" in item.error  # it never ran
    s3 = s3_client(s3_endpoint)
    keys_left = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="n/").get("Contents", [])]
    assert not [k for k in keys_left if k.endswith(".png")]  # no output was made
    assert not [k for k in keys_left if "/_open/" in k or k.startswith("n/_open")]  # nothing to reconcile
    res = cli(
        "reconcile", "job-n", "--output", f"s3://{bucket}/n", env=service_env(own_redis.url, s3_endpoint, tiny_dir)
    )
    assert res.returncode != 0 and "no job 'job-n'" in res.stderr  # its spec is written only at commit


def test_after_a_flushall_the_io_worker_sweep_rebuilds_the_job_on_its_own(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    sweep = {"DREAMBATCH_OUTPUT": f"s3://{bucket}/sw", "DREAMBATCH_CELERY__RECONCILE_INTERVAL": "2"}
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **sweep)
    start_worker("worker", "--io", **sweep).wait_ready()
    gpu = start_worker(*GPU, "--concurrency", "1")
    gpu.wait_ready()
    ids = [f"s{n}" for n in range(6)]
    res = cli(
        "submit", str(manifest(tmp_path / "s.jsonl", ids)), "--model", "i1-fast", "--set", "steps=12", "--json", env=env
    )
    assert res.returncode == 0, res.stderr
    job_id = json.loads(res.stdout)["job_id"]
    store = RedisStore.from_url(redis_server.url)
    wait_until(lambda: store.get_job(job_id).counts["completed"] >= 2, 90, 0.05, what="two items completed")
    gpu.kill(signal.SIGKILL)
    redis_server.client().flushdb()  # the live state is gone; nobody runs `dreambatch reconcile`

    start_worker(*GPU).wait_ready()
    job = wait_end(store, job_id, 180)
    assert job.status == "completed"
    ledger = check_ledger(s3_client(s3_endpoint), bucket, "sw", job_id, ids)
    assert ledger.extra_attempts <= 1  # at most the item in flight at the kill ran twice
    open_marker = keys.S3_OPEN_JOB.format(prefix="sw/", job_id=job_id)
    wait_until(
        lambda: "Contents" not in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix=open_marker),
        10,
        what="the job's open marker to go",
    )


def test_an_io_worker_whose_consumer_dies_on_a_broker_error_restarts_itself_and_says_so(
    redis_server, s3_endpoint, tiny_dir, bucket, receiver, start_worker, tmp_path
):
    """Celery ends its consumer on an error it cannot recover from (a broker crash that broke the connection
    the wrong way) and would exit 0; the worker starts itself again in place, and jobs finalize and notify."""
    program = [sys.executable, str(ROOT / "tests" / "faults" / "broken_consumer_worker.py"), str(tmp_path / "m")]
    io = start_worker("worker", "--io", program=program)
    wait_until(lambda: "restarting it in place" in io.log.read_text(), 120, 0.2, what="the worker to say so")
    io.wait_ready()
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    job_id = submit_rejected_row(tmp_path, f"s3://{bucket}/x", receiver.url, env)  # ends at once: two events
    store = RedisStore.from_url(redis_server.url)
    wait_end(store, job_id, 120)
    wait_until(lambda: len(receiver.delivered()) == 2, 60, 0.2, what="both events delivered")
    assert io.proc.poll() is None  # the same process, still serving
    assert "Unrecoverable error" in io.log.read_text()


def test_a_worker_that_keeps_stopping_on_its_own_gives_up_with_exit_code_1(start_worker):
    """A consumer that dies within a minute of every start (a setup problem, not a passing crash) is started
    again a few times, then the worker exits 1 and says why, for its supervisor to show."""
    program = [sys.executable, str(ROOT / "tests" / "faults" / "broken_consumer_worker.py"), "always"]
    io = start_worker("worker", "--io", program=program)
    assert io.proc.wait(240) == 1, io.log.read_text()[-3000:]
    log = io.log.read_text()
    assert log.count("restarting it in place") == 5 and "stopped on its own 5 times in a row" in log, log[-3000:]
