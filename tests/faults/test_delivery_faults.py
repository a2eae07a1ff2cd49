"""Faults at the edges: webhook receivers that fail, redirect or time out; downloads that are too big or
never end. Real loopback servers; no traffic leaves the machine."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from services import cli, service_env, submit_rejected_row, wait_until

from jobs.errors import InputError
from jobs.netguard import Policy, fetch

pytestmark = pytest.mark.timeout(240)
LOOPBACK = Policy.from_setting("127.0.0.1")


def test_webhooks_survive_500_429_and_a_receiver_that_is_down(
    redis_server, s3_endpoint, tiny_dir, bucket, receiver, start_worker, tmp_path
):
    """500, then 429 with Retry-After, then success: each event arrives once as 2xx, with the same
    webhook-id on every attempt, and the job's outcome is unaffected."""
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    receiver.script = [500, 429, 503]
    io = start_worker("worker", "--io")
    io.wait_ready()
    job_id = submit_rejected_row(tmp_path, f"s3://{bucket}/w", receiver.url, env)  # ends at once: two events
    wait_until(lambda: len(receiver.delivered()) == 2, 60, what="both events delivered")
    time.sleep(1)
    assert [r["code"] for r in receiver.requests] == [500, 429, 503, 200, 200]
    by_id: dict[str, list[int]] = {}
    for r in receiver.requests:
        by_id.setdefault(r["headers"]["webhook-id"], []).append(r["code"])
    assert sorted(by_id) == [f"evt_{job_id}__line1_failed", f"evt_{job_id}_failed"]  # (a rejected row: _lineN)
    assert all(codes[-1] == 200 and codes.count(200) == 1 for codes in by_id.values())
    log = cli("webhooks", job_id, env=env).stdout
    assert log.count("delivered") == 2 and "HTTP 500" in log and "HTTP 429" in log
    status = json.loads(cli("status", job_id, "--json", env=env).stdout)
    assert status["status"] == "failed" and status["counts"]["failed"] == 1


def test_a_redirecting_receiver_is_not_followed(receiver):
    from worker import webhooks

    receiver.script = [307]
    attempt = webhooks.deliver(receiver.url, "evt_r", {}, secrets=[], timeout=5, policy=LOOPBACK)
    assert attempt.status_code == 307 and not attempt.delivered and not attempt.retryable
    assert len(receiver.requests) == 1


class _Server:
    """A loopback HTTP server with one handler function."""

    def __init__(self, handler):
        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                handler(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_oversized_endless_and_redirected_downloads_are_cut_off():
    def big_declared(h):
        h.send_response(200)
        h.send_header("content-length", str(10**9))
        h.end_headers()

    def endless(h):  # no length, bytes forever (until the client hangs up)
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(100_000):
                h.wfile.write(b"x" * 65536)
        except (OSError, BrokenPipeError, ConnectionResetError):
            pass

    def to_metadata(h):
        h.send_response(302)
        h.send_header("location", "http://169.254.169.254/latest/meta-data/")
        h.end_headers()

    servers = [_Server(f) for f in (big_declared, endless, to_metadata)]
    try:
        with pytest.raises(InputError, match="over the 1000000-byte limit"):
            fetch(servers[0].url, LOOPBACK, max_bytes=10**6, timeout=10)
        started = time.monotonic()
        with pytest.raises(InputError, match="more than 1000000 bytes"):
            fetch(servers[1].url, LOOPBACK, max_bytes=10**6, timeout=10)
        assert time.monotonic() - started < 10
        with pytest.raises(InputError, match="169.254.169.254"):
            fetch(servers[2].url, LOOPBACK, max_bytes=10**6, timeout=10)  # the redirect hop is checked
    finally:
        for s in servers:
            s.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://localhost/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://169.254.169.254/",
        "http://10.0.0.8/",
        "http://192.168.1.1/",
        "http://100.64.0.1/",
        "http://[fd00:ec2::254]/",
        "http://0.0.0.0/",
    ],
)
def test_private_addresses_in_every_spelling_are_refused_before_connecting(url):
    def no_dns(host, port):  # a stub resolver: 'localhost' resolves only through it, nothing leaves the box
        return {"localhost": ["127.0.0.1", "::1"]}[host]

    with pytest.raises(InputError, match="private/loopback"):
        fetch(url, Policy.from_setting("", resolver=no_dns), max_bytes=100, timeout=2, client=_ExplodingClient())


class _ExplodingClient:
    """Proves the check happens before any connection: any use of the client fails the test."""

    def stream(self, *args, **kwargs):
        raise AssertionError("a connection was attempted")

    def close(self):
        pass


def test_an_event_whose_message_was_lost_before_any_attempt_is_listed_and_redelivered(
    redis_server, s3_endpoint, tiny_dir, bucket, receiver, start_worker, tmp_path
):
    """An event noted as published whose message the broker lost (a crash between the consumer's pop and its
    unacked record) has no attempt logged: `webhooks JOB` lists it and `--redeliver` sends it."""
    from jobs import keys
    from jobs.store import RedisStore

    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    start_worker("worker", "--io").wait_ready()
    job_id = submit_rejected_row(tmp_path, f"s3://{bucket}/l", receiver.url, env)  # ends at once: two events
    wait_until(lambda: len(receiver.delivered()) == 2, 60, 0.2, what="both events delivered")
    store = RedisStore.from_url(redis_server.url)
    lost = f"evt_{job_id}_failed"  # as if the job event's message had vanished before its first attempt:
    events_key = keys.JOB_EVENTS.format(job_id=job_id)
    store.r.srem(events_key, lost)
    store.r.delete(f"{events_key}:{lost}")
    assert store.was_sent(job_id, lost) and lost not in store.events(job_id)
    listed = cli("webhooks", job_id, env=env)
    assert f"{lost}  published, no delivery attempt logged" in listed.stdout, listed.stdout + listed.stderr
    res = cli("webhooks", job_id, "--redeliver", env=env)
    assert res.returncode == 0 and "re-sending 2 event(s)" in res.stderr, res.stderr
    wait_until(
        lambda: [r["headers"]["webhook-id"] for r in receiver.delivered()].count(lost) == 2, 60, 0.2, what="it again"
    )
