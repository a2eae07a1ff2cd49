"""The live store's transitions on a real redis-server, and webhook delivery to a real receiver."""

from __future__ import annotations

import base64
import os

import pytest
from PIL import Image
from services import TINY_GENERATE_PARAMS, item_context
from standardwebhooks.webhooks import Webhook

from jobs.lifecycle import ItemStatus, JobStatus
from jobs.models import ItemRecord, JobRecord
from jobs.netguard import Policy
from jobs.store import MemoryStore, RedisStore
from worker import webhooks

LOOPBACK = Policy.from_setting("127.0.0.1")


def _job(job_id: str, total: int) -> JobRecord:
    return JobRecord(
        job_id=job_id,
        model="i1-fast",
        output="s3://b/p",
        total=total,
        created_at="2026-11-22T00:00:00+00:00",
        updated_at="2026-11-22T00:00:00+00:00",
    )


def _item(job_id: str, item_id: str, line: int) -> ItemRecord:
    return ItemRecord(
        job_id=job_id,
        item_id=item_id,
        line=line,
        params={"prompt": "x"},
        created_at="2026-11-22T00:00:00+00:00",
        updated_at="2026-11-22T00:00:00+00:00",
    )


@pytest.fixture(params=["redis", "memory"])
def store(request):
    if request.param == "memory":
        return MemoryStore()
    server = request.getfixturevalue("redis_server")
    return RedisStore.from_url(server.url)


def test_transitions_count_and_only_the_last_item_sees_the_job_done(store):
    job_id = f"j-{os.urandom(4).hex()}"
    store.create_job(_job(job_id, 2))
    a, b = _item(job_id, "a", 1), _item(job_id, "b", 2)
    store.add_items([a, b])

    first = store.transition(a, ItemStatus.RUNNING, count_attempt=True)
    assert first.applied and first.attempts == 1 and not first.job_done
    again = store.transition(a, ItemStatus.RUNNING, count_attempt=True)  # a redelivery
    assert again.applied and again.attempts == 2
    assert store.transition(a, ItemStatus.COMPLETED).job_done is False
    assert store.transition(a, ItemStatus.FAILED).applied is False  # terminal stays terminal
    store.transition(b, ItemStatus.RUNNING, count_attempt=True)
    assert store.transition(b, ItemStatus.FAILED).job_done is True

    job = store.get_job(job_id)
    assert job.counts == {"queued": 0, "running": 0, "completed": 1, "failed": 1, "cancelled": 0}
    assert job.status == "running"
    assert store.finish_job(job_id, JobStatus.COMPLETED, "s3://b/p/r", "t") is True
    assert store.finish_job(job_id, JobStatus.FAILED, None, "t") is False  # exactly once
    assert store.get_job(job_id).status == "completed"
    assert [i.item_id for i in store.items(job_id)] == ["a", "b"]
    assert store.get_item(job_id, "a").attempts == 2


def test_signed_webhook_verifies_with_the_standardwebhooks_package(receiver):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    attempt = webhooks.deliver(
        receiver.url, "evt_1", {"id": "x", "status": "completed"}, secrets=[secret], timeout=5, policy=LOOPBACK
    )
    assert attempt.delivered and attempt.status_code == 200
    req = receiver.requests[0]
    assert Webhook(secret).verify(req["body"], req["headers"]) == {"id": "x", "status": "completed"}
    assert req["headers"]["webhook-id"] == "evt_1"


def test_during_a_key_rotation_each_event_verifies_with_the_old_and_the_new_secret(receiver):
    from jobs.settings import Settings

    old, new = ("whsec_" + base64.b64encode(os.urandom(24)).decode() for _ in range(2))
    settings = Settings(webhook_secret=f"{new} {old}")
    attempt = webhooks.deliver(
        receiver.url, "evt_rot", {"id": "r"}, secrets=settings.signing_secrets(), timeout=5, policy=LOOPBACK
    )
    assert attempt.delivered
    req = receiver.requests[0]
    assert len(req["headers"]["webhook-signature"].split(" ")) == 2
    for secret in (old, new):  # receivers on either key accept it, checked by an independent verifier
        assert Webhook(secret).verify(req["body"], req["headers"]) == {"id": "r"}
    stranger = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(stranger).verify(req["body"], req["headers"])


def test_webhook_retries_are_bounded_by_a_time_window_not_a_count():
    from jobs.settings import WebhookSettings

    cfg = WebhookSettings(retry_window=86400, backoff_base=5, backoff_max=3600)
    first = 1_000_000.0
    waits, t, n = [], first, 1
    while (wait := webhooks.next_retry(n, first, cfg, None, now=t)) is not None:
        waits.append(wait)
        t += max(wait, 1.0)
        n += 1
    assert t >= first + 86400 and t - first < 86400 + 3600  # retried for about a day, then stopped
    assert max(waits) <= 3600
    assert webhooks.next_retry(3, first, cfg, None, now=first + 86400) is None
    # Retry-After is honoured but never pushes the next attempt past the window
    assert webhooks.next_retry(1, first, cfg, 7200.0, now=first) == 3600
    assert webhooks.next_retry(1, first, cfg, 60.0, now=first + 86400 - 10) == 10
    assert webhooks.next_retry(4, first, WebhookSettings(max_attempts=4), None, now=first) is None


def test_webhook_waits_must_stay_below_the_visibility_timeout():
    from jobs.settings import Settings

    with pytest.raises(ValueError, match="visibility_timeout"):
        Settings(webhooks={"backoff_max": 5000}, celery={"visibility_timeout": 4000, "task_time_limit": 100})


def test_failed_delivery_is_reported_retryable_with_retry_after(receiver):
    receiver.script = [503]
    attempt = webhooks.deliver(receiver.url, "evt_2", {}, secrets=[], timeout=5, policy=LOOPBACK)
    assert not attempt.delivered and attempt.retryable and attempt.error == "HTTP 503"
    gone = webhooks.Attempt(0, 410, 0.1, "HTTP 410")
    assert not gone.retryable
    assert webhooks.backoff(3, 1.0, 60.0, retry_after=30.0) >= 30.0
    assert 0 <= webhooks.backoff(10, 1.0, 5.0) <= 5.0
    refused = webhooks.deliver("http://127.0.0.1:9/none", "evt_3", {}, secrets=[], timeout=2, policy=LOOPBACK)
    assert refused.status_code is None and refused.retryable and "ConnectError" in refused.error


def test_webhook_to_a_private_address_is_refused_before_any_connection(receiver):
    for url in (
        receiver.url,
        receiver.url.replace("127.0.0.1", "localhost"),
        receiver.url.replace("127.0.0.1", "2130706433"),
    ):
        attempt = webhooks.deliver(url, "evt_4", {}, secrets=[], timeout=2, policy=Policy.from_setting(""))
        assert not attempt.delivered and not attempt.retryable and attempt.error.startswith("blocked:")
    assert receiver.requests == []  # nothing reached the receiver
    # a public-looking name that a (stub) resolver maps to a metadata address is refused too
    stub = Policy.from_setting("", resolver=lambda host, port: ["169.254.169.254"])
    attempt = webhooks.deliver("http://hooks.example.com/x", "evt_5", {}, secrets=[], timeout=2, policy=stub)
    assert attempt.refused and "169.254.169.254" in attempt.error


def test_410_disables_the_endpoint_for_the_job(receiver):
    from jobs.settings import Settings
    from worker import process

    store = MemoryStore()
    job = _job("j-gone", 1).model_copy(update={"webhook": receiver.url})
    store.create_job(job)
    store.add_items([_item("j-gone", "a", 1)])
    ctx = process.Context(
        settings=Settings(allow_private_hosts="127.0.0.1"),
        store=store,
        runner=None,
        objects=None,
        notify=None,
        finalize=None,
    )
    receiver.script = [410]
    first = process.webhook_attempt(ctx, "j-gone", "a", "evt_a")
    assert first.status_code == 410 and not first.retryable
    assert store.get_job("j-gone").webhook_disabled
    assert process.webhook_attempt(ctx, "j-gone", None, "evt_job") is None  # nothing more is sent
    assert len(receiver.requests) == 1
    assert [a["status_code"] for a in store.events("j-gone")["evt_a"]] == [410]


def test_an_item_that_keeps_losing_its_worker_ends_failed_at_the_attempt_cap(tmp_path):
    """Each redelivery of an item whose worker died counts an attempt; past the cap it fails instead of
    running again, and the job still ends."""
    from jobs.settings import Settings
    from jobs.storage import LocalStore
    from worker import process

    store, objects, finals = MemoryStore(), LocalStore(str(tmp_path)), []
    store.create_job(_job("j-poison", 1).model_copy(update={"output": str(tmp_path)}))
    item = _item("j-poison", "a", 1)
    store.add_items([item])
    settings = Settings()
    for _ in range(settings.celery.max_attempts):  # three starts that never finished (worker SIGKILLed)
        assert store.transition(item, ItemStatus.RUNNING, count_attempt=True).applied

    def runner():
        raise AssertionError("a poison item must not reach the model again")

    ctx = item_context(store, objects, runner, settings=settings, finalize=finals.append)
    outcome = process.process_item(ctx, "j-poison", "a")
    assert outcome.ended == "failed"
    ended = store.get_item("j-poison", "a")
    assert ended.status == "failed" and "gave up after 3 attempts" in ended.error and ended.error_kind == "lost"
    assert finals == ["j-poison"]
    assert (tmp_path / "j-poison" / "items" / "a.json").is_file()


def test_a_request_the_runner_refuses_fails_its_item_as_a_model_error_and_the_worker_goes_on(tmp_path):
    """Whatever a runner raises that is not one of ours (a ValueError for a request it refuses) fails that item
    with error_kind "model"; the next item runs."""
    from jobs.storage import LocalStore
    from worker import process
    from worker.runners.base import RunOutput

    class Refusing:
        model = "i1-fast"

        def generate(self, request, on_step=None):
            if request.prompt == "refused":
                raise ValueError("requests denoised together must share one batch key")
            return RunOutput([Image.new("RGB", (16, 16))], request.seed, 0.01)

    params = TINY_GENERATE_PARAMS
    store, objects = MemoryStore(), LocalStore(str(tmp_path))
    store.create_job(_job("j-model", 2).model_copy(update={"output": str(tmp_path)}))
    store.add_items(
        [
            _item("j-model", i, n).model_copy(update={"params": {**params, "prompt": i}})
            for n, i in enumerate(("refused", "fine"), 1)
        ]
    )
    ctx = item_context(store, objects, Refusing)
    assert process.process_item(ctx, "j-model", "refused").ended == "failed"
    assert process.process_item(ctx, "j-model", "fine").ended == "completed"
    refused = store.get_item("j-model", "refused")
    assert refused.error == "ModelError: ValueError: requests denoised together must share one batch key"
    assert refused.error_kind == "model"


def test_an_end_that_loses_to_another_leaves_the_winners_record(store, tmp_path):
    """A cancel that read an item as queued, ending it after a worker completed it (or a stale duplicate
    attempt failing after the first one completed): its record is written before its move is refused, and
    the winner's is put back, so a Redis loss rebuilds the item as it ended."""
    from jobs import records
    from jobs.ending import end_item
    from jobs.errors import ErrorKind, Failure
    from jobs.storage import LocalStore

    objects = LocalStore(str(tmp_path))
    job_id = f"j-{os.urandom(4).hex()}"
    job = _job(job_id, 1).model_copy(update={"output": str(tmp_path)})
    store.create_job(job)
    item = _item(job_id, "a", 1)
    store.add_items([item])
    stale = item.model_copy(deep=True)  # as the cancel and the duplicate read it
    store.transition(item, ItemStatus.RUNNING, count_attempt=True)
    ends = {"publish": lambda events: None, "finalize": lambda _: None}
    assert end_item(store, objects, job, item, ItemStatus.COMPLETED, **ends)
    assert not end_item(store, objects, job, stale, ItemStatus.CANCELLED, reason="cancelled", **ends)
    assert records.read_item_result(objects, job_id, "a")["status"] == "completed"
    lost = Failure(ErrorKind.LOST, "timed out")
    assert not end_item(store, objects, job, stale.model_copy(deep=True), ItemStatus.FAILED, failure=lost, **ends)
    record = records.read_item_result(objects, job_id, "a")
    assert record["status"] == "completed" and record["error"] is None


def test_a_failure_after_a_completed_items_images_are_stored_is_not_recorded_as_its_failure(tmp_path):
    """The broker is away when a completed item's finalize goes out: its record stays completed (not rewritten
    as failed with the broker's error), and its message comes back, which finds it ended and sends the
    finalize then."""
    import json

    from jobs.storage import LocalStore
    from worker import process
    from worker.runners.base import RunOutput

    class Tiny:
        model = "i1-fast"

        def generate(self, request, on_step=None):
            return RunOutput([Image.new("RGB", (16, 16))], request.seed, 0.01)

    store, objects = MemoryStore(), LocalStore(str(tmp_path))
    store.create_job(_job("j-after", 1).model_copy(update={"output": str(tmp_path)}))
    store.add_items([_item("j-after", "a", 1).model_copy(update={"params": {**TINY_GENERATE_PARAMS, "prompt": "x"}})])
    finals, broker_up = [], False

    def finalize(job_id):
        if not broker_up:
            raise ConnectionError("broker unreachable")
        finals.append(job_id)

    ctx = item_context(store, objects, Tiny, finalize=finalize)
    first = process.process_item(ctx, "j-after", "a")
    assert first.ended is None and first.retry_in and "broker unreachable" in first.note
    record = json.loads((tmp_path / "j-after" / "items" / "a.json").read_text())
    assert record["status"] == "completed" and record["error"] is None, record
    assert (tmp_path / "j-after" / "a.png").exists() and store.get_item("j-after", "a").status == "completed"
    broker_up = True
    assert process.process_item(ctx, "j-after", "a").ended is None and finals == ["j-after"]  # the message again
    assert json.loads((tmp_path / "j-after" / "items" / "a.json").read_text())["status"] == "completed"


def test_a_redelivered_item_that_ended_sends_its_lost_webhook_once_and_finalizes_the_job(store, tmp_path):
    """A worker killed between an item's last transition and the messages after it: the redelivered task
    does not run the item again, but sends the event that was never published (same id), once, and
    finalizes a job whose items have all ended. An item that ended moments ago is left to the process that
    ended it for a grace period (no racing it into a duplicate)."""
    from jobs.models import item_event_id, job_event_id
    from jobs.storage import LocalStore
    from jobs.submit import now_iso
    from worker import process

    job_id = f"j-{os.urandom(4).hex()}"
    store.create_job(_job(job_id, 3).model_copy(update={"output": str(tmp_path), "webhook": "https://x.test/h"}))
    a, b, c = _item(job_id, "a", 1), _item(job_id, "b", 2), _item(job_id, "c", 3)
    store.add_items([a, b, c])
    notified, finals = [], []

    def runner():
        raise AssertionError("an item that ended must not reach the model again")

    ctx = item_context(store, LocalStore(str(tmp_path)), runner, notify=notified.extend, finalize=finals.append)
    c.updated_at = now_iso()  # c ended just now
    for item in (a, b, c):  # all ended; the worker died before publishing a's and c's events and finalizing
        store.transition(item, ItemStatus.RUNNING, count_attempt=True)
        store.transition(item, ItemStatus.COMPLETED)
    store.mark_sent(job_id, item_event_id(job_id, "b", "completed"))  # b's event did go out

    young = process.process_item(ctx, job_id, "c")
    assert young.ended is None and 0 < young.retry_in <= process.SEND_GRACE + 0.1 and notified == []
    assert process.process_item(ctx, job_id, "a").ended is None
    assert notified == [(job_id, "a", item_event_id(job_id, "a", "completed"))] and finals == [job_id]
    assert process.process_item(ctx, job_id, "a").ended is None  # a second redelivery: nothing new
    assert process.process_item(ctx, job_id, "b").ended is None
    assert len(notified) == 1 and finals == [job_id]  # one finalize nudge, not one per redelivery

    # a finalize of a job that ended just now leaves its event to the finalizer that ended it, for a while
    young = f"j-{os.urandom(4).hex()}"
    store.create_job(_job(young, 0).model_copy(update={"output": str(tmp_path), "webhook": "https://x.test/h"}))
    store.finish_job(young, JobStatus.COMPLETED, None, now_iso())
    with pytest.raises(process.SendLater):
        process.finalize_job(ctx, young)

    # the finalizer died after marking the job terminal and before its event: a redelivered finalize sends it
    store.finish_job(job_id, JobStatus.COMPLETED, None, "2026-11-22T00:01:00+00:00")
    assert process.finalize_job(ctx, job_id) is None
    assert process.finalize_job(ctx, job_id) is None
    assert notified[1:] == [(job_id, None, job_event_id(job_id, "completed"))]


def test_a_job_redis_calls_ended_has_its_durable_end_and_a_losing_finalizer_leaves_the_winners_record(store, tmp_path):
    """The finalizer writes results.jsonl, the final job.json and the outbox marker side by side before Redis
    marks the job ended: whoever sees it ended (the API's waiters, a webhook receiver) finds them there. Its
    _open marker goes only after that (so a Redis loss always finds the job by one or the other). A second
    finalizer that loses the race leaves job.json as the winner ended it."""
    from jobs import records
    from jobs.models import job_event_id
    from jobs.storage import LocalStore
    from worker import process

    objects = LocalStore(str(tmp_path))
    job_id = f"j-{os.urandom(4).hex()}"
    job = _job(job_id, 2).model_copy(update={"output": str(tmp_path), "webhook": "https://x.test/h"})
    store.create_job(job)
    records.open_job(objects, job)
    items = [_item(job_id, "a", 1), _item(job_id, "b", 2)]
    store.add_items(items)
    for item in items:
        store.transition(item, ItemStatus.RUNNING, count_attempt=True)
        store.transition(item, ItemStatus.COMPLETED)
    seen_at_the_end = []
    real_finish = store.finish_job

    def finish_job(job_id, status, results_uri, at, round_=None):
        written = records.read_job(objects, job_id)
        seen_at_the_end.append(
            (records.read_results(objects, job_id), written.status, written.finished_at, records.open_jobs(objects))
        )
        return real_finish(job_id, status, results_uri, at, round_)

    store.finish_job = finish_job
    notified = []
    ctx = item_context(store, objects, lambda: None, notify=notified.extend)
    assert process.finalize_job(ctx, job_id) == "completed"
    results, status, finished_at, still_open = seen_at_the_end[0]
    assert [line["id"] for line in results] == ["a", "b"] and status == JobStatus.COMPLETED and finished_at
    assert still_open == [job_id] and records.open_jobs(objects) == []
    ended = store.get_job(job_id)
    assert ended.finished_at == finished_at and ended.results_uri == objects.uri(records.results_key(job_id))
    assert records.read_job(objects, job_id).results_uri == ended.results_uri
    assert notified == [(job_id, None, job_event_id(job_id, "completed"))]

    # a finalizer that read the job before the other ended it, and loses the race to mark it ended
    other = f"j-{os.urandom(4).hex()}"
    store.create_job(job.model_copy(update={"job_id": other, "total": 0}))

    def loses(job_id, status, results_uri, at, round_=None):
        real_finish(job_id, status, results_uri, "2026-11-22T00:05:00+00:00")  # the winner, a moment before
        return real_finish(job_id, status, results_uri, at, round_)

    store.finish_job = loses
    assert process.finalize_job(ctx, other) is None
    assert records.read_job(objects, other).finished_at == "2026-11-22T00:05:00+00:00"
    assert len(notified) == 1  # the winner sends the job's event
