"""Fixtures: real services on loopback (see services.py), started per session or per test."""

from __future__ import annotations

import itertools
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import S3_ENV, Receiver, RedisServer, Worker, s3_client, service_env, start_s3

os.environ["DREAMBATCH_ENV_FILE"] = ""  # get_settings() in this process never reads a developer's .env


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


_databases = itertools.count(100)


@pytest.fixture(autouse=True)
def _own_redis_database(request) -> None:
    """Every test that uses the session's Redis gets a database of its own (queues included: kombu keeps a
    database's lists and broadcast channels apart), so leftovers of an earlier test never reach it."""
    if "redis_server" in request.fixturenames:
        request.getfixturevalue("redis_server").db = next(_databases)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    server, endpoint = start_s3()
    yield endpoint
    server.stop()


@pytest.fixture
def bucket(s3_endpoint) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Tiny random-weight pipelines, built once per session and shared by every worker process."""
    path = tmp_path_factory.mktemp("tiny")
    os.environ["DREAMBATCH_TINY_DIR"] = str(path)
    return path


LOGGED = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (\w+ dreambatch|ERROR|CRITICAL)")  # a worker log's own records


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on its test (`item.failed_call`), for fixtures that say more when it failed."""
    report = yield
    if report.when == "call":
        item.failed_call = report.failed
    return report


@pytest.fixture
def start_worker(redis_server, s3_endpoint, tiny_dir, tmp_path, request) -> Iterator:
    """Start worker processes (each logging to tmp_path/worker-N.log), all killed at the end; a test that
    failed prints what dreambatch logged in each, as CI keeps nothing else of a run."""
    workers: list[Worker] = []

    def start(*args: str, program: list[str] | None = None, redis_url: str | None = None, **env: str) -> Worker:
        w = Worker(
            list(args),
            service_env(redis_url or redis_server.url, s3_endpoint, tiny_dir, **env),
            tmp_path / f"worker-{len(workers)}.log",
            program,
        )
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.kill(signal.SIGKILL)
    if getattr(request.node, "failed_call", False):
        for w in workers:
            ours = [line for line in w.log.read_text(errors="replace").splitlines() if LOGGED.match(line)]
            print(f"--- {w.log.name}: dreambatch {' '.join(w.args)} (its last {min(len(ours), 80)} log lines)")
            print("\n".join(ours[-80:]))
