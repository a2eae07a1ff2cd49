"""Receivers and image servers that answer a byte at a time are cut off at the request's total deadline, and the
one pooled client per process still connects only to the address the guard checked. Real loopback servers."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from services import cli, service_env, wait_until

from jobs import netclient
from jobs.errors import InputError, TransientError
from jobs.netguard import Policy, fetch
from jobs.store import RedisStore
from worker import webhooks

pytestmark = pytest.mark.timeout(240)
LOOPBACK = Policy.from_setting("127.0.0.1")


class RawServer:
    """A loopback TCP server: `answer(conn)` runs for each connection; counts the connections it accepted."""

    def __init__(self, answer):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.connections = 0
        self._stop = threading.Event()

        def serve():
            while not self._stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                threading.Thread(target=self._run, args=(answer, conn), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def _run(self, answer, conn):
        try:
            answer(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._stop.set()
        self.sock.close()


def trickle(conn: socket.socket) -> None:
    """Reads the request, then sends its headers one byte a second (a minute of them)."""
    conn.recv(65536)
    for byte in b"HTTP/1.1 200 OK\r\n" + b"x-pad: " + b"a" * 60 + b"\r\n\r\n":
        conn.sendall(bytes([byte]))
        time.sleep(1)


def keep_alive(conn: socket.socket) -> None:
    """Answers every request on the connection with a small 200, keeping it open."""
    buf = b""
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data
        while b"\r\n\r\n" in buf:
            head, buf = buf.split(b"\r\n\r\n", 1)
            length = next(
                (int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")), 0
            )
            while len(buf) < length:
                buf += conn.recv(65536)
            buf = buf[length:]
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")


def test_a_receiver_sending_its_headers_a_byte_a_second_is_cut_off_at_the_delivery_deadline():
    server = RawServer(trickle)
    try:
        started = time.monotonic()
        attempt = webhooks.deliver(server.url, "evt_slow", {"a": 1}, secrets=[], timeout=2, policy=LOOPBACK)
        took = time.monotonic() - started
    finally:
        server.close()
    assert not attempt.delivered and attempt.retryable  # tried again later, like any timeout
    assert "no answer within 2" in attempt.error, attempt.error
    assert took < 15, f"a 2 s deadline held the thread {took:.1f}s (the headers alone take a minute)"


def test_an_image_whose_headers_trickle_is_cut_off_at_its_download_deadline():
    server = RawServer(trickle)
    try:
        started = time.monotonic()
        with pytest.raises(TransientError, match="timed out after 2"):
            fetch(server.url, LOOPBACK, max_bytes=1000, timeout=2)
        took = time.monotonic() - started
    finally:
        server.close()
    assert took < 15, f"a 2 s download deadline held the thread {took:.1f}s"


def test_the_pooled_client_reuses_connections_and_connects_only_to_the_checked_address():
    server = RawServer(keep_alive)
    port = int(server.url.rsplit(":", 1)[1].strip("/"))
    try:
        # a name only the guard's (stub) resolver knows: the connection goes where the guard checked, not to DNS
        named = Policy.from_setting("127.0.0.1", resolver=lambda host, port: {"images.test": ["127.0.0.1"]}[host])
        for _ in range(3):
            assert fetch(f"http://images.test:{port}/a.png", named, max_bytes=100, timeout=5) == b"ok"
        assert webhooks.deliver(
            f"http://images.test:{port}/hook", "evt_1", {}, secrets=[], timeout=5, policy=named
        ).delivered
        assert server.connections == 1  # four requests, one connection: the process's client is pooled
        # the same client will not reach a host the guard did not check in this request
        with pytest.raises(httpx.ConnectError, match="not checked by the address guard"):
            netclient.shared().get(f"http://127.0.0.1:{port}/")
        # and a name resolving to a private address is refused before any connection, as before
        private = Policy.from_setting("", resolver=lambda host, port: ["127.0.0.1"])
        with pytest.raises(InputError, match="private/loopback"):
            fetch(f"http://images.test:{port}/a.png", private, max_bytes=100, timeout=5)
        assert server.connections == 1
    finally:
        server.close()


def test_a_request_on_the_pooled_client_costs_no_client_construction():
    """Prints figures: a download on the process's pooled client against one that builds its own client."""
    server = RawServer(keep_alive)
    try:
        n = 30
        t0 = time.perf_counter()
        for _ in range(n):
            fetch(server.url, LOOPBACK, max_bytes=100, timeout=5)
        pooled = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            with httpx.Client(timeout=5) as own:
                fetch(server.url, LOOPBACK, max_bytes=100, timeout=5, client=own)
        fresh = (time.perf_counter() - t0) / n
    finally:
        server.close()
    print(f"\nfetch on the pooled client: {pooled * 1000:.2f} ms; with a new httpx.Client each: {fresh * 1000:.2f} ms")
    assert server.connections <= 1 + n  # the pooled ones shared one connection; each fresh client opened its own


def _submit_rejected(env, path, rows: int, output: str, webhook: str) -> str:
    """A job of `rows` rejected rows: it ends at once, no GPU needed, with rows + 1 webhook events."""
    path.write_text('{"prompt": ""}\n' * rows)
    res = cli("submit", str(path), "--output", output, "--webhook", webhook, "--skip-invalid", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["job_id"]


def test_slow_receivers_do_not_keep_another_job_from_finalizing(
    redis_server, s3_endpoint, tiny_dir, bucket, receiver, start_worker, tmp_path
):
    """Four I/O threads, three events for a receiver that trickles its headers (each delivery may take 20 s,
    retried every 2 s: enough to hold every thread): they get one thread, that receiver's share; another job
    still finalizes within seconds (its submit included), and its events arrive while the slow ones retry."""
    cfg = {"DREAMBATCH_WEBHOOKS__TIMEOUT": "20", "DREAMBATCH_WEBHOOKS__BACKOFF_MAX": "2"}
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **cfg)
    slow = RawServer(trickle)
    try:
        start_worker("worker", "--io", "--concurrency", "4", **cfg).wait_ready()
        _submit_rejected(env, tmp_path / "a.jsonl", 2, f"s3://{bucket}/sa", slow.url)
        wait_until(lambda: slow.connections >= 1, 60, 0.1, what="a delivery to the slow receiver")
        started = time.monotonic()
        job_b = _submit_rejected(env, tmp_path / "b.jsonl", 1, f"s3://{bucket}/sb", receiver.url)
        store = RedisStore.from_url(redis_server.url)
        wait_until(lambda: store.get_job(job_b).finished_at, 60, 0.1, what="the other job to finalize")
        took = time.monotonic() - started
        print(f"\nthe other job finalized {took:.1f}s after its submit began, with slow deliveries in flight")
        assert took < 15, f"finalizing waited {took:.1f}s behind deliveries to a slow receiver"
        wait_until(lambda: len(receiver.delivered()) == 2, 60, 0.2, what="the other job's two events")
    finally:
        slow.close()
