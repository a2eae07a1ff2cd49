"""Real services on loopback, for the tests and the benchmarks: redis-server, an S3 endpoint
(moto's server mode), a webhook receiver, and dreambatch worker processes on tiny random weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` for the block, then back to what they were."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- Redis --------------------------------------------------------------------------------------
DATABASES = 10_000  # one per test (from 100 up) and a few fixed ones for module-wide stacks


class RedisServer:
    def __init__(self, workdir: Path, persistent: bool = False):
        """`persistent`: an append-only file in `workdir`, so a restart keeps the data (as in docker-compose)."""
        self.port = free_port()
        self.base_url = f"redis://127.0.0.1:{self.port}"
        self.db = 0  # the database `url` names: conftest gives every test its own
        self.workdir = workdir
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.db}"

    def database(self, n: int) -> str:
        """The URL of database `n` (a module's shared stack keeps a fixed one of its own, below 100)."""
        return f"{self.base_url}/{n}"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.persistent else "no",
                "--appendfsync",
                "always",
                "--databases",
                str(DATABASES),
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _ping(client), 10, what="redis-server")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)


def _ping(client) -> bool:
    try:
        return client.ping()
    except Exception:
        return False


# --- S3 -----------------------------------------------------------------------------------------
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3():
    """moto's S3 in server mode on a free loopback port: a real HTTP endpoint. Returns (server, url)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def start_s3_process() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (benchmarks: it then competes with nothing in this one), on a free
    loopback port, once it answers. Returns (process, url); terminate the process when done."""
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return True
        except OSError as exc:  # an HTTP error status is an answer too
            return getattr(exc, "code", None) is not None

    wait_until(up, 30, what="moto server")
    return proc, endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


class S3Proxy:
    """A loopback HTTP proxy in front of an S3 endpoint. `intercept(method, path)` runs before each request
    is forwarded: it may sleep (a slow network), or return (status, body) to answer in the endpoint's place."""

    def __init__(self, upstream: str, intercept):
        import http.client
        from urllib.parse import urlsplit

        target = urlsplit(upstream)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                answer = intercept(self.command, self.path)
                if answer is not None:
                    status, data = answer
                    self.send_response(status)
                    self.send_header("content-type", "application/xml")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["host"] = target.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a killed worker's connection resets: expected
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- Webhook receiver ---------------------------------------------------------------------------
class Receiver:
    """A real HTTP server on loopback that records every POST. `script` lists status codes to answer
    with, in order, before falling back to 200."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    code = receiver.script.pop(0) if receiver.script else 200
                    receiver.requests.append(
                        {
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "json": json.loads(body or b"null"),
                            "code": code,
                        }
                    )
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def delivered(self) -> list[dict]:
        with self._lock:
            return [r for r in self.requests if 200 <= r["code"] < 300]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# --- tiny weights and worker processes ----------------------------------------------------------
def service_env(redis_url: str, s3: str, tiny: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DREAMBATCH_")}
    env.update(S3_ENV)
    env.update(
        {
            "DREAMBATCH_REDIS_URL": redis_url,
            "AWS_ENDPOINT_URL_S3": s3,
            "DREAMBATCH_TINY_DIR": str(tiny),
            "DREAMBATCH_CELERY__VISIBILITY_TIMEOUT": "20",
            "DREAMBATCH_CELERY__TASK_TIME_LIMIT": "15",
            "DREAMBATCH_CELERY__RESTORE_INTERVAL": "1",
            "DREAMBATCH_WEBHOOKS__BACKOFF_BASE": "0.2",
            "DREAMBATCH_WEBHOOKS__BACKOFF_MAX": "1",
            "HF_HUB_OFFLINE": "1",
            "DREAMBATCH_ALLOW_PRIVATE_HOSTS": "127.0.0.1",  # the loopback webhook receiver
            "PYTHONUNBUFFERED": "1",
            "DREAMBATCH_ENV_FILE": "",  # a developer's .env (docker compose's) never leaks into a test
        }
    )
    env.update(extra)
    return env


class Worker:
    def __init__(self, args: list[str], env: dict[str, str], log: Path, program: list[str] | None = None):
        """`program` replaces `python -m worker` (a test wrapper script that sabotages the worker)."""
        self.args, self.log = args, log
        self._fh = log.open("w")
        if program:
            env = {**env, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [*(program or [sys.executable, "-m", "worker"]), *args],
            env=env,
            cwd=ROOT,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 120) -> Worker:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            return " ready." in self.log.read_text()

        wait_until(ready, timeout, 0.2, what=f"worker ready ({self.log})")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        self._fh.close()


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def submit_rejected_row(tmp_path: Path, output: str, webhook: str, env: dict[str, str]) -> str:
    """Submit a job of one rejected row with a webhook: it ends at once with two events (the row's and the job's),
    no GPU needed. Returns its id."""
    manifest = tmp_path / "rejected.jsonl"
    manifest.write_text('{"prompt": ""}\n')
    res = cli("submit", str(manifest), "--output", output, "--webhook", webhook, "--skip-invalid", "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["job_id"]


# The params of a tiny generation row, as a manifest row normalizes them (tests that build items by hand).
TINY_GENERATE_PARAMS = {
    "negative_prompt": "",
    "width": 16,
    "height": 16,
    "seed": 1,
    "steps": 1,
    "guidance_scale": 0.0,
    "shift": 3.0,
    "scheduler": "flash_flow",
    "num_images": 1,
    "output_format": "png",
    "output_quality": 90,
}


def item_context(store, objects, runner=None, *, settings=None, notify=None, finalize=None):
    """A worker's Context for calling worker.process directly: `objects` for every output location, events
    and finalize messages dropped unless `notify` / `finalize` take them."""
    from jobs.settings import Settings
    from worker import process

    return process.Context(
        settings=settings or Settings(),
        store=store,
        runner=runner,
        objects=lambda _location: objects,
        notify=notify or (lambda *events: None),
        finalize=finalize or (lambda _job_id: None),
    )


def fake_hub_snapshot(cache: Path, repo: str, source: Path, *skip: str) -> Path:
    """Lay `source` out as huggingface_hub caches a downloaded repo."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot, ignore=shutil.ignore_patterns(*skip))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    return snapshot


def load_offline(runner_class, models, folders: dict) -> dict:
    """Runners for `models`, each loaded once from its tiny folder with the hub switched off."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        loaded = {model: runner_class(model, weights=str(folders[model])) for model in models}
        for runner in loaded.values():
            runner.load()
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = before
    return loaded


# --- the HTTP API -------------------------------------------------------------------------------
class ApiServer:
    """`dreambatch api` (uvicorn) in a thread of this process, on a free loopback port; over HTTPS when given
    `tls=(certfile, keyfile)`."""

    def __init__(self, settings, tls: tuple[str, str] | None = None):
        import uvicorn

        from jobs.api.app import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",  # the listener that wakes synchronous waits (jobs.api.app)
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 15, 0.05, what="the API server")

    def key(self, *scopes: str, name: str = "test", **options) -> str:
        """A fresh API key with these scopes (minted and kept as `dreambatch keys create` does); `options`:
        tenant, prefix, rate."""
        from jobs.api import auth, keyring
        from jobs.submit import now_iso

        new = auth.mint(name, list(scopes), now_iso(), **options)
        keyring.save(self.app.state.services, new.record)
        return new.token

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def self_signed_cert(folder: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `host` (and localhost) and its key, as PEM files: (cert, key). The
    certificate is its own CA, so a client trusts it with SSL_CERT_FILE / REQUESTS_CA_BUNDLE pointed at it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dreambatch test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
