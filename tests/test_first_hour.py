"""The first hour, as a newcomer lives it: every `dreambatch` command in README.md and docs/*.md, read from the
docs themselves and run as a real process under the faults a new setup has — Redis down, S3 misconfigured (no
bucket, no endpoint, no credentials), bad weights, a misspelled manifest, Ctrl-C in the middle of a run, no
worker — answers within LIMIT seconds with one `error:` line that gives the cause and the fix, and never a
traceback. Long-running processes (worker, api, beat) say in their log what they cannot reach, and keep running.

`run` and `models make-tiny` do their work without any service, so Redis and S3 being down is nothing to them
(except `run --out s3://…`); their faults are bad weights, a misspelled manifest and Ctrl-C, each tested below.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from services import ROOT, free_port, s3_client, wait_until

from worker.cli import NEEDS_REDIS

pytestmark = pytest.mark.timeout(300)

LIMIT = 10.0  # s: every command answers within this
JOB = "20260101-000000-0badc0de"  # a job nobody has
LONG_RUNNING = {"worker", "api", "beat"}
# complete commands the docs give in running text rather than in a code block
PROSE = [
    "dreambatch worker --io",
    "dreambatch worker --model i1-fast --device cuda:0",
    "dreambatch models make-tiny i1-fast|e1-1|e1-full DIR",
]


# --- the commands, as the docs give them -------------------------------------------------------------------
@dataclass(frozen=True)
class DocCommand:
    where: str
    text: str  # as written, after `dreambatch`
    env: tuple[tuple[str, str], ...] = ()  # VAR=value written before it


def doc_commands() -> list[DocCommand]:
    found: dict[str, DocCommand] = {}
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", doc.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                for segment in re.sub(r"\s+#.*$", "", line).split("&&"):
                    m = re.match(r"^\s*((?:[A-Z_]+=\S+\s+)*)dreambatch\s+(.+?)\s*$", segment)
                    if m:
                        env = tuple(tuple(a.split("=", 1)) for a in m.group(1).split())
                        found.setdefault(m.group(2), DocCommand(doc.name, m.group(2), env))
    text = "".join(doc.read_text() for doc in docs)
    for command in PROSE:
        assert command in text, f"{command!r} is no longer in the docs"
        found.setdefault(command.removeprefix("dreambatch "), DocCommand("prose", command.removeprefix("dreambatch ")))
    return list(found.values())


@dataclass
class Places:
    """What the placeholders in the docs stand for, in this test."""

    tmp: Path
    i1: Path  # a generation manifest
    e1: Path  # an edit manifest (its image beside it)
    bucket: str = "dreambatch"

    def args(self, command: DocCommand) -> list[str]:
        text = re.sub(r"\s*\[[^\]]*\]", "", command.text)  # [--optional bits]
        words = [w for w in shlex.split(text) if w not in ("...", "…")]
        edit = any(w.startswith("e1-") for w in words)
        out = []
        for n, word in enumerate(words):
            before = words[n - 1] if n else ""
            if word == "JOB":
                word = JOB
            elif word == "N":
                word = "4"
            elif word == "DIR":
                word = str(self.tmp / "tiny-build")
            elif word in ("out/", "review/"):
                word = str(self.tmp / word)
            elif word == "s3://…":
                word = f"s3://{self.bucket}/outputs"
            elif "|" in word and not word.startswith(("http", "s3://")):
                word = word.split("|")[0]  # high|normal|low
            elif word == "M" or (word.endswith((".csv", ".jsonl")) and not (ROOT / word).is_file()):
                word = str(self.e1 if edit else self.i1)
            elif before in ("--port", "--metrics-port"):
                word = str(free_port())
            elif word.startswith("s3://dreambatch/"):
                word = word.replace("s3://dreambatch/", f"s3://{self.bucket}/")
            out.append(word)
        assert not [w for w in out if re.fullmatch(r"[A-Z_]{1,8}", w)], f"a placeholder left in {out}"
        return out


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> Places:
    tmp = tmp_path_factory.mktemp("newcomer")
    (tmp / "home").mkdir()
    i1 = tmp / "nightly.csv"
    i1.write_text((ROOT / "manifests" / "examples" / "products.csv").read_text())
    Image.new("RGB", (48, 32), "white").save(tmp / "shoe.png")
    e1 = tmp / "shoes.csv"
    e1.write_text("id,image,sku,category\nshoe,shoe.png,S-1,shoes\n")
    return Places(tmp, i1, e1)


def closed_port() -> int:
    return free_port()  # nothing listens there


def newcomer_env(places: Places, tiny_dir: Path, **extra: str) -> dict[str, str]:
    """A fresh shell: no dreambatch, AWS or hub variables of the test's, an empty home (no ~/.aws, an empty hub
    cache), the project on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DREAMBATCH_", "AWS_", "HF_")) and k not in ("XDG_CACHE_HOME", "PYTHONPATH")
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "HOME": str(places.tmp / "home"),
            "DREAMBATCH_ENV_FILE": "",
            "DREAMBATCH_TINY_DIR": str(tiny_dir),
            "PYTHONUNBUFFERED": "1",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
        }
    )
    env.update(extra)
    return env


# --- running them -----------------------------------------------------------------------------------------
@dataclass
class Answer:
    args: list[str]
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]

    def __str__(self) -> str:
        return f"dreambatch {shlex.join(self.args)} → rc {self.rc} in {self.seconds:.1f}s\n{self.text[-2500:]}"


def answer(args: list[str], env: dict[str, str], cwd: Path = ROOT, program: list[str] | None = None) -> Answer:
    start = time.monotonic()
    done = subprocess.run(
        [*(program or [sys.executable, "-m", "worker"]), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=LIMIT + 50,
    )
    return Answer(args, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def answers(runs: list[tuple[list[str], dict[str, str]]], at_once: int = 6) -> list[Answer]:
    """Each run's answer, `at_once` processes at a time (most of a failing command's time is waiting)."""
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(lambda run: answer(*run), runs))


def shape(args: list[str]) -> tuple:
    """Commands of one shape take one code path: the command, its subcommand, the options it gives."""
    sub = (
        args[1] if len(args) > 1 and not args[1].startswith("-") and args[0] in ("keys", "schedules", "models") else ""
    )
    return args[0], sub, tuple(sorted(a for a in args if a.startswith("--")))


def one_of_each_shape(runs: list) -> list:
    seen: dict[tuple, object] = {}
    for run in runs:
        seen.setdefault(shape(run[0] if isinstance(run, tuple) else run), run)
    return list(seen.values())


def check_answer(a: Answer, cause: str, fix: str | None = None) -> None:
    """Within LIMIT, no traceback, a non-zero exit, exactly one `error:` line matching `cause`; `fix` is found in
    what it printed (on that line, or the lines that list the ways to fix it)."""
    assert a.seconds < LIMIT, f"too slow: {a}"
    assert "Traceback" not in a.text, str(a)
    assert a.rc != 0, str(a)
    assert len(a.errors) == 1, f"expected one error line: {a}"
    assert re.search(cause, a.errors[0]), f"cause /{cause}/ not in: {a}"
    if fix:
        assert re.search(fix, a.err), f"fix /{fix}/ not in: {a}"


class Process:
    """A long-running command, its output collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=env,
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()
        self.started = time.monotonic()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, within: float = LIMIT) -> float:
        """Seconds until a line matching `pattern` came; fails if it did not within `within`."""
        wait_until(
            lambda: re.search(pattern, self.text) or self.proc.poll() is not None,
            within,
            0.1,
            what=f"/{pattern}/ from dreambatch {shlex.join(self.args)}",
        )
        assert re.search(pattern, self.text), f"exited {self.proc.returncode} without /{pattern}/:\n{self.text}"
        return time.monotonic() - self.started

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait(10)
        self.reader.join(10)
        return rc


def head(args: list[str]) -> str:
    return args[0]


# --- the faults ---------------------------------------------------------------------------------------------
def test_the_docs_give_the_commands_this_checks():
    commands = {c.text.split()[0] for c in doc_commands()}
    assert {
        "run",
        "validate",
        "submit",
        "status",
        "results",
        "webhooks",
        "reconcile",
        "cancel",
        "retry",
        "resume",
        "top",
        "worker",
        "keys",
        "api",
        "schedules",
        "beat",
        "sheet",
        "presets",
        "models",
    } <= commands


def test_with_redis_down_every_command_says_so_in_one_line_or_does_not_need_it(places, tiny_dir, s3_endpoint):
    port = closed_port()
    env = newcomer_env(
        places,
        tiny_dir,
        DREAMBATCH_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    runs = []
    for command in doc_commands():
        args = places.args(command)
        if head(args) in LONG_RUNNING or head(args) in ("run", "models"):
            continue  # below, and in the tests of their own faults
        runs.append((args, {**env, **dict(command.env)}))
    runs = one_of_each_shape(runs)
    assert len(runs) >= 15
    for a in answers(runs):
        if head(a.args) in NEEDS_REDIS:
            check_answer(a, rf"cannot reach Redis at redis://127\.0\.0\.1:{port}/0", r"DREAMBATCH_REDIS_URL")
        else:  # validate, presets, sheet: they do not need Redis; whatever they say, they say it plainly
            assert a.seconds < LIMIT and "Traceback" not in a.text, str(a)
            assert a.rc == 0 or len(a.errors) == 1, str(a)


@pytest.mark.parametrize("args", [["worker", "--io"], ["beat"]], ids=["worker-io", "beat"])
def test_with_redis_down_a_long_running_process_says_so_and_keeps_running(places, tiny_dir, args):
    port = closed_port()
    proc = Process(args, newcomer_env(places, tiny_dir, DREAMBATCH_REDIS_URL=f"redis://127.0.0.1:{port}/0"))
    try:
        proc.wait_for(rf"cannot reach Redis at redis://127\.0\.0\.1:{port}/0 .*keeps trying")
        time.sleep(1)
        assert proc.proc.poll() is None, proc.text  # it rides the outage out
    finally:
        proc.stop()
    assert "Traceback" not in proc.text, proc.text


def test_with_redis_down_or_s3_misconfigured_the_api_runs_and_healthz_tells_the_truth(
    places, tiny_dir, s3_endpoint, redis_server
):
    [command] = [c for c in doc_commands() if c.text.startswith("api ") and c.env]  # README's, with its output
    args = places.args(command)
    for option in ("--ssl-certfile", "--ssl-keyfile"):  # the README's HTTPS example: plain HTTP here
        if option in args:
            del args[args.index(option) : args.index(option) + 2]
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    redis_down = f"redis://127.0.0.1:{closed_port()}/0"
    s3 = {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    env = newcomer_env(places, tiny_dir, DREAMBATCH_REDIS_URL=redis_down, **dict(command.env), **s3)
    proc = Process(args, {**env, "DREAMBATCH_REDIS_RETRY_S": "1"})  # a request gives up on Redis after 1 s
    try:
        proc.wait_for(r"cannot reach Redis at .*The API keeps trying")
        # a long-running process: its start-up (imports, a loaded CI box) is not a command's answer time
        wait_until(lambda: "Uvicorn running" in proc.text, 60, what="the API to listen")
        start = time.monotonic()
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=LIMIT)
        assert time.monotonic() - start < LIMIT
        assert health.status_code == 503
        body = health.json()
        assert not body["ok"] and not body["redis"]["ok"] and "DREAMBATCH_REDIS_URL" in body["redis"]["error"]
        assert not body["s3"]["ok"] and "does not exist" in body["s3"]["error"]  # nobody made the bucket
        # a route that needs Redis (checking the key) answers 503 saying why, in the client's own error shape
        listed = httpx.get(
            f"http://127.0.0.1:{port}/v1/jobs",
            headers={"Authorization": f"Bearer dbk_{'0' * 12}_{'a' * 43}"},
            timeout=60,
        )
        assert listed.status_code == 503, listed.text
        assert "Redis" in listed.text and "DREAMBATCH_REDIS_URL" in listed.text
    finally:
        proc.stop()
    assert "Traceback" not in proc.text, proc.text


def s3_commands(places: Places) -> list[list[str]]:
    """The docs' commands that write to or read from an S3 location (the output, a schedule's bucket)."""
    picked = []
    for command in doc_commands():
        args = places.args(command)
        if (
            head(args) == "submit"
            or (args[:2] == ["schedules", "run"])
            or any(a.startswith("s3://") for a in args)
            and head(args) not in LONG_RUNNING | {"run"}
        ):
            picked.append(args)
    return one_of_each_shape(picked)


@pytest.mark.parametrize("fault", ["no bucket", "no endpoint", "no credentials"])
def test_with_s3_misconfigured_every_command_that_uses_it_says_what_to_fix(
    fault, places, tiny_dir, s3_endpoint, redis_server
):
    s3 = {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    if fault == "no endpoint":
        s3["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{closed_port()}"
    if fault == "no credentials":
        del s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]
    env = newcomer_env(
        places,
        tiny_dir,
        DREAMBATCH_REDIS_URL=redis_server.url,
        DREAMBATCH_OUTPUT="s3://dreambatch/outputs",
        **s3,
    )
    runs = s3_commands(places)
    assert len(runs) >= 5
    if fault != "no bucket":
        runs = [r for r in runs if head(r) == "submit"][:2] + [r for r in runs if head(r) != "submit"][:2]
    cause = {
        "no bucket": r"bucket '(dreambatch|catalog)' does not exist",
        "no endpoint": r"cannot reach S3",
        "no credentials": r"no credentials",
    }[fault]
    fix = {
        "no bucket": r"create the bucket",
        "no endpoint": r"AWS_ENDPOINT_URL_S3",
        "no credentials": r"AWS_ACCESS_KEY_ID",
    }[fault]
    for a in answers([(args, env) for args in runs]):
        check_answer(a, cause, fix)


def test_run_writes_to_s3_when_out_is_s3_and_refuses_a_bucket_that_is_not_there(places, tiny_dir, s3_endpoint, bucket):
    manifest = places.tmp / "one.jsonl"
    manifest.write_text(json.dumps({"id": "one", "prompt": "a mug", "seed": 1, "steps": 2}) + "\n")
    env = newcomer_env(
        places,
        tiny_dir,
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    missing = answer(["run", str(manifest), "--weights", "tiny", "--out", "s3://no-such-bucket/x"], env)
    check_answer(missing, r"bucket 'no-such-bucket' does not exist", r"create the bucket")
    assert "loading the model" not in missing.err  # refused before the model loads
    done = answer(["run", str(manifest), "--weights", "tiny", "--device", "cpu", "--out", f"s3://{bucket}/local"], env)
    assert done.rc == 0, str(done)
    [results] = re.findall(r"^results: (\S+)$", done.out, re.M)
    assert results.startswith(f"s3://{bucket}/local/") and results.endswith("/results.jsonl")
    assert not (ROOT / "s3:").exists()  # not a local folder named after the URL
    listed = {o["Key"] for o in s3_client(s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="local/")["Contents"]}
    assert any(k.endswith("/one.png") for k in listed) and any(k.endswith("/results.jsonl") for k in listed)


def test_bad_weights_or_a_missing_device_stop_run_and_worker_at_once(places, tiny_dir):
    env = newcomer_env(places, tiny_dir)
    [readme_run] = [
        places.args(c)
        for c in doc_commands()
        if c.text.startswith("run manifests/examples/quickstart") and "--resume" not in c.text
    ]
    nowhere = str(places.tmp / "no-such-weights")
    bad = [a if a != "tiny" else nowhere for a in readme_run]
    runs = [(bad, env), (["worker", "--model", "i1-fast", "--device", "cpu"], env)]  # the hub cache is empty
    import torch

    if not torch.cuda.is_available():
        runs += [
            ([*readme_run, "--device", "cuda:0"], env),
            (["worker", "--model", "i1-fast", "--device", "cuda:0"], env),
        ]
    results = [answer(*run) for run in runs]  # one at a time: each imports torch and diffusers (seconds of CPU)
    check_answer(results[0], rf"no weights {re.escape(nowhere)} for model 'i1-fast'", r"--weights tiny")
    check_answer(results[1], r"no weights HiDream-ai/HiDream-I1-Fast", r"hf download HiDream-ai/HiDream-I1-Fast")
    for a in results[2:]:
        check_answer(a, r"--device cuda:0: .*CUDA", r"use --device cpu")
    assert not (places.tmp / "out").exists() or not list((places.tmp / "out").glob("*/items/*.json"))


def test_a_misspelled_manifest_is_refused_by_validate_submit_and_run_alike(
    places, tiny_dir, s3_endpoint, redis_server, bucket
):
    manifest = places.tmp / "products[v2].csv"  # square brackets in its name are printed as they are
    manifest.write_text("id,prompt,stpes,output_fromat,sku\nshoe,a red shoe,4,png,S-1\n")
    empty = places.tmp / "empty.csv"
    empty.write_text("")
    env = newcomer_env(
        places,
        tiny_dir,
        DREAMBATCH_REDIS_URL=redis_server.url,
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    out = ["--output", f"s3://{bucket}/typo"]
    runs = [
        (["validate", str(manifest), "--model", "i1-fast"], env),
        (["submit", str(manifest), "--model", "i1-fast", *out], env),
        (["run", str(manifest), "--weights", "tiny", "--out", str(places.tmp / "typo")], env),
        (["validate", str(places.e1), "--model", "i1-fast"], env),
        (["validate", str(empty)], env),
        (["submit", str(empty), *out], env),
    ]
    validate, submit, run, e1_as_i1, validate_empty, submit_empty = answers(runs)
    for a in (validate, submit, run):
        assert a.rc == 2 and a.seconds < LIMIT and "Traceback" not in a.text, str(a)
        assert "stpes: not a field; did you mean 'steps'?" in a.err, str(a)
        assert "output_fromat: not a field; did you mean 'output_format'?" in a.err, str(a)
    assert "products[v2].csv" in submit.errors[0] and "nothing was queued" in submit.errors[0]
    assert "products[v2].csv" in run.errors[0] and "loading the model" not in run.err  # refused before the model
    assert "use an edit model (--model e1-1 or e1-full)" in e1_as_i1.err
    for a in (validate_empty, submit_empty):  # they agree
        assert a.rc == 2 and "the manifest has no rows" in a.err, str(a)
    assert not list((places.tmp / "typo").glob("*/job.json"))


def test_ctrl_c_mid_run_keeps_what_ended_marks_the_job_and_resume_runs_the_rest(places, tiny_dir):
    manifest = places.tmp / "six.jsonl"
    manifest.write_text(
        "".join(json.dumps({"id": f"p{n}", "prompt": f"thing {n}", "seed": n, "steps": 24}) + "\n" for n in range(4))
    )
    out = places.tmp / "ctrl-c"
    env = newcomer_env(places, tiny_dir)
    proc = Process(["run", str(manifest), "--weights", "tiny", "--device", "cpu", "--out", str(out)], env)
    try:
        proc.wait_for(r"\[1/4\] p0: completed", within=180)
        proc.proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        rc = proc.proc.wait(LIMIT + 20)
        assert time.monotonic() - stopped < LIMIT, proc.text
    finally:
        proc.stop()
    proc.reader.join(10)
    assert rc == 130 and "Traceback" not in proc.text, proc.text
    [folder] = [p for p in out.iterdir() if p.name != "_open"]
    lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    ended = [x["id"] for x in lines]
    assert ended[:1] == ["p0"] and len(ended) < 4 and {x["status"] for x in lines} == {"completed"}
    assert json.loads((folder / "job.json").read_text())["interrupted_at"]
    assert (out / "_open" / folder.name).exists()  # unfinished: what --resume looks for
    [again] = [line.split(": ", 1)[1] for line in proc.text.splitlines() if line.startswith("to run the rest: ")]
    assert "--resume" in again

    rest = answer(shlex.split(again)[1:], env)  # as printed, `dreambatch …`
    assert rest.rc == 0, str(rest)
    lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"p{n}" for n in range(4)]
    assert {x["status"] for x in lines} == {"completed"}
    assert not json.loads((folder / "job.json").read_text())["interrupted_at"]
    assert not (out / "_open" / folder.name).exists()
    assert oct((folder / "p0.png").stat().st_mode & 0o777) != oct(0o600)  # the umask's, not mkstemp's 0600


def test_a_job_nobody_serves_is_named_at_submit_in_status_and_top(
    places, tiny_dir, s3_endpoint, redis_server, bucket, receiver
):
    [readme] = [places.args(c) for c in doc_commands() if c.text.startswith("submit manifests/examples/products")]
    args = [
        receiver.url if a.startswith("https://example.com") else a.replace("s3://dreambatch/", f"s3://{bucket}/")
        for a in readme
    ]
    assert "--wait" in args
    env = newcomer_env(
        places,
        tiny_dir,
        DREAMBATCH_REDIS_URL=redis_server.url,
        AWS_ENDPOINT_URL_S3=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        DREAMBATCH_ALLOW_PRIVATE_HOSTS="127.0.0.1",
    )
    proc = Process(args, env)
    try:
        waited = proc.wait_for(r"warning: no live worker serves gpu\.i1-fast or io .*dreambatch worker --model i1-fast")
        assert waited < LIMIT
        proc.proc.send_signal(signal.SIGINT)
        rc = proc.proc.wait(LIMIT)
    finally:
        proc.stop()
    assert rc == 130 and "stopped watching" in proc.text and "Traceback" not in proc.text, proc.text
    assert proc.text.count("no live worker serves") == 1, proc.text  # (said by the submit, not again by its watch)
    [job_id] = re.findall(r"^\d{8}-\d{6}-[0-9a-f]{8}$", proc.text, re.M)
    status, top = answers([(["status", job_id], env), (["top", "--once"], env)])
    for a in (status, top):
        assert a.rc == 0 and a.seconds < LIMIT and "no live worker serves gpu.i1-fast" in a.text, str(a)


def test_the_cli_reads_dot_env_from_the_current_folder_and_the_environment_wins(places, tiny_dir):
    folder = places.tmp / "compose-checkout"
    folder.mkdir()
    in_file, in_env = closed_port(), closed_port()
    (folder / ".env").write_text(f"DREAMBATCH_REDIS_URL=redis://127.0.0.1:{in_file}/0\n")
    env = newcomer_env(places, tiny_dir)
    del env["DREAMBATCH_ENV_FILE"]
    from_file, from_env = (
        answer(["status", JOB], env, cwd=folder),
        answer(["status", JOB], {**env, "DREAMBATCH_REDIS_URL": f"redis://127.0.0.1:{in_env}/0"}, cwd=folder),
    )
    check_answer(from_file, rf"cannot reach Redis at redis://127\.0\.0\.1:{in_file}/0")
    check_answer(from_env, rf"cannot reach Redis at redis://127\.0\.0\.1:{in_env}/0")


def test_models_download_without_the_hub_says_so_at_once(places, tiny_dir):
    downloads = [places.args(c) for c in doc_commands() if c.text.startswith("models download")]
    assert downloads
    env = newcomer_env(places, tiny_dir, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    results = answers([(args, env) for args in downloads] + [(downloads[0], offline)])
    for a in results[:-1]:
        check_answer(a, r"cannot reach the Hugging Face hub at http://127\.0\.0\.1", r"copy its cache|mount it")
    check_answer(results[-1], r"HF_HUB_OFFLINE is set", r"HF_HUB_OFFLINE=0")


def test_a_base_install_without_torch_names_the_extra_to_install(places, tiny_dir, tmp_path):
    blocker = tmp_path / "no_torch.py"  # as if `pip install dreambatch` without [worker]
    blocker.write_text(
        "import sys\nfor m in ('torch', 'diffusers', 'transformers'):\n    sys.modules[m] = None\n"
        "sys.argv = ['dreambatch', *sys.argv[1:]]\nfrom worker.cli import main\nmain()\n"
    )
    [readme_run] = [
        places.args(c)
        for c in doc_commands()
        if c.text.startswith("run manifests/examples/quickstart") and "--resume" not in c.text
    ]
    a = answer(readme_run, newcomer_env(places, tiny_dir), program=[sys.executable, str(blocker)])
    check_answer(a, r"needs the worker extra \(torch is not installed\)", r"pip install 'dreambatch\[worker\]'")


def test_a_submission_that_failed_reads_cancelled_not_queued(redis_server, tmp_path):
    from jobs.errors import TransientError
    from jobs.metrics import overview
    from jobs.models import JobSpec
    from jobs.services import Services
    from jobs.settings import Settings
    from jobs.storage import LocalStore
    from jobs.store import RedisStore
    from jobs.submit import SubmitFailed, create_job

    class S3Down(LocalStore):
        def put_file(self, key, path, content_type):
            raise TransientError("S3 s3://b/x: connection reset")

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n')
    store = RedisStore.from_url(redis_server.url, 1)
    folder = S3Down(str(tmp_path))
    services = Services(Settings(), store=store, objects=lambda _loc: folder, publish=lambda job, ids: None)
    with pytest.raises(SubmitFailed, match="nothing was queued"):
        create_job(JobSpec(model="i1-fast", output=str(tmp_path)), manifest, services, job_id="phantom")
    assert store.get_job("phantom").status == "cancelled"
    assert [j for j in overview(store).jobs if j["job_id"] == "phantom"][0]["submit_aborted"]
