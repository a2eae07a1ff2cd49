"""The composition root (jobs.services): a process's collaborators, built from Settings on first use, once."""

from __future__ import annotations

import ast
import json
import uuid
from pathlib import Path

from jobs import broker, keys
from jobs.models import JobRecord
from jobs.services import Services
from jobs.settings import Settings
from jobs.storage import LocalStore, S3Store
from jobs.store import MemoryStore, _retries_for

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens there: a client that connected would fail
AT = "2026-01-01T00:00:00.000+00:00"


def _retries(client) -> int:
    return client.get_retry()._retries


def test_the_root_builds_nothing_until_asked_and_then_each_collaborator_once(tmp_path):
    services = Services(Settings(redis_url=NOWHERE, redis_retry_s=7))  # connects to nothing
    assert services._clients == {} and services._celery is None and services._s3 is None

    # one Redis client for live and schedule state, riding out the configured outage
    assert services.store is services.store and services.schedule_state is services.schedule_state
    assert services.store.r is services.schedule_state.r is services.redis()
    assert _retries(services.redis()) == _retries_for(7, cap=5.0, base=0.2) > _retries(services.redis(retry_s=1))
    assert services.redis(retry_s=1) is services.redis(retry_s=1) is not services.redis()

    # one Celery app; one object store per location, every S3 location on one S3 client
    assert services.celery is services.celery and services.celery.conf.broker_url == NOWHERE
    a, b = services.objects("s3://a/x"), services.objects("s3://b/y")
    assert isinstance(a, S3Store) and a is services.objects("s3://a/x") and a.client is b.client is services.s3
    assert isinstance(services.objects(str(tmp_path)), LocalStore)
    assert services.url_secret == services.url_secret and len(services.url_secret) == 64


def test_local_mode_hands_in_its_own_store_folder_and_queues(tmp_path):
    folder, queued, events, finals = LocalStore(str(tmp_path)), [], [], []
    services = Services(
        Settings(redis_url=NOWHERE),
        store=MemoryStore(),
        objects=lambda _location: folder,
        publish=lambda job, ids: queued.append((job.job_id, job.priority, ids)),
        notify=events.extend,
        finalize=finals.append,
    )
    job = JobRecord(job_id="j", model="i1-fast", output=str(tmp_path), priority="high", created_at=AT, updated_at=AT)
    services.store.create_job(job)
    assert services.job("j").priority == "high" and services.objects("s3://anywhere/x") is folder
    services.publish(job, ["a", "b"])
    services.notify([("j", "a", "evt_j_a_completed")])
    services.finalize("j")
    assert (queued, events, finals) == ([("j", "high", ["a", "b"])], [("j", "a", "evt_j_a_completed")], ["j"])
    assert services._clients == {}  # no Redis was asked for


# the factories (and where each is allowed: the root, and the factory modules themselves)
FACTORIES = {"redis_client", "from_url", "Redis", "make_celery", "Celery", "s3_client", "open_store", "client"}
FACTORY_MODULES = {"jobs/services.py", "jobs/store.py", "jobs/storage.py", "jobs/broker.py"}


def test_only_the_composition_root_builds_clients():
    """No module of jobs/ or worker/ makes its own Redis client, Celery app, S3 client or object store: they
    receive the root's (jobs.services)."""
    offenders = []
    for path in sorted(p for folder in ("jobs", "worker") for p in (ROOT / folder).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in FACTORY_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in FACTORIES - {"client"} or (name == "client" and "boto" in ast.unparse(node.func)):
                    offenders.append(f"{rel}:{node.lineno}: {ast.unparse(node.func)}(…)")
    assert offenders == []


def _queued(client, queue: str) -> list[dict]:
    """The messages waiting in `queue` at every priority, oldest first, their ids left out."""
    found = []
    for name in keys.priority_lists(queue).values():
        for raw in reversed(client.lrange(name, 0, -1)):  # (kombu pushes on the left, takes from the right)
            message = json.loads(raw)
            for field in ("id", "root_id"):
                message["headers"].pop(field)
            for field in ("correlation_id", "delivery_tag"):
                message["properties"].pop(field)
            found.append({"list": name, **message})
    return found


def test_published_messages_are_the_ones_send_task_makes(redis_server):
    """jobs.broker.publish builds each message itself (a fan-out's speed): it must be send_task's message."""
    app = broker.make_celery(Settings(redis_url=redis_server.url))
    model = f"i1-fast-{uuid.uuid4().hex[:6]}"  # queues of this test's own
    io = f"io-{uuid.uuid4().hex[:6]}"
    client = redis_server.client()
    cases = [
        (keys.TASK_RUN_ITEM, keys.gpu_queue(model), ["job-1", "row 7"], keys.PRIORITIES["low"]),
        (keys.TASK_RUN_ITEM, keys.gpu_queue(model), ["job-1", "row 8"], keys.PRIORITIES["high"]),
        (keys.TASK_SEND_WEBHOOK, io, ["job-1", None, "job-1:completed:0"], None),
        (keys.TASK_FINALIZE_JOB, io, ["job-1"], None),
    ]
    for task, queue, args, priority in cases:
        given = {} if priority is None else {"priority": priority}
        assert broker.publish(app, task, queue, [args], **given) == 1
        app.send_task(task, args=args, queue=queue, **given)
        ours, celery = _queued(client, queue)
        assert ours == celery and ours["headers"]["task"] == task
        client.delete(*keys.priority_lists(queue).values())
