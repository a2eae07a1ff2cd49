"""dreambatch against what a user would write instead, side by side on the same model, Redis, S3 and rows:

    A  a plain diffusers loop: render (an edit: get the input from S3 with boto3, edit it), encode the PNG,
       put it to S3 (boto3), one row after another
    B  a minimal Celery app: one task per row, the model loaded once, render (or get + edit), encode, put,
       webhook (bench/minimal_celery.py, thread pool of 3 as dreambatch's default item threads)
    C  dreambatch: `dreambatch submit` (its own start-up counted) → a GPU worker and an I/O worker → outputs,
       results.jsonl and webhooks; with `--submit api`, `dreambatch submit --api` hands the manifest to a
       `dreambatch api` process the bench starts, which makes the job (the command's start-up still counted)

    python bench/compare.py                       # i1-fast, loopback S3 and +60 ms per S3 request
    python bench/compare.py --items 16 --rounds 5 --delay-ms 0,60
    python bench/compare.py --model e1-1          # edits: E1.1 on small inputs in S3
    python bench/compare.py --submit api          # C submits through the API

Every run of every round uses fresh rows (prompt, seed; an edit: input, instruction, seed); A, B and C run
them in turn, the order rotating each round. Edit rows name one of a few input images the bench puts to
s3://compare/inputs/ once, at the tiny E1.1's canvas size (64 x 64), so fitting them is the identity.
All S3 requests go through a loopback proxy that holds each one `--delay-ms` (a remote S3's round trip). A run
is timed from its first row sent (C: the submit command's start) to its last output stored (A), its last
webhook received (B), or its last item webhook and the job's webhook received (C). Figures are medians of the
per-round ratios; the outputs of A, B and C are compared byte for byte. Prints a markdown table for
docs/benchmarks.md; never asserts. Starts its own redis-server, moto S3 server (its own process), webhook
receiver and worker processes; A runs in a process of its own as well.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from services import (  # noqa: E402
    S3_ENV,
    Receiver,
    RedisServer,
    S3Proxy,
    Worker,
    free_port,
    s3_client,
    service_env,
    start_s3_process,
    wait_until,
)

from jobs.errors import InputError  # noqa: E402
from jobs.manifest import parse_sets  # noqa: E402
from jobs.models import MODELS  # noqa: E402

BUCKET = "compare"
SYSTEMS = ("A", "B", "C")
INPUTS = 3  # edit input images, used in turn by the rows
INPUT_SIDE = 64  # px: the tiny E1.1's canvas for a square input (its pixel budget, 64²)


class Proxy:
    """The request-delaying S3 proxy, counting the requests it forwards."""

    def __init__(self, upstream: str):
        self.delay = 0.0
        self.requests = 0
        self._lock = threading.Lock()
        self.proxy = S3Proxy(upstream, self._intercept)
        self.url = self.proxy.url

    def _intercept(self, method: str, path: str) -> None:
        with self._lock:
            self.requests += 1
        if self.delay:
            time.sleep(self.delay)

    def close(self) -> None:
        self.proxy.close()


def setting_env(settings: list[str]) -> dict[str, str]:
    """`--setting NAME=VALUE` options as the environment variables dreambatch reads (DREAMBATCH_NAME)."""
    return {f"DREAMBATCH_{name.upper()}": value for name, value in parse_sets(settings, "--setting").items()}


def rows_for(model: str, round_no: int, n: int) -> list[dict]:
    if MODELS[model].kind == "edit":
        return [
            {
                "id": f"r{i}",
                "image": f"s3://{BUCKET}/inputs/{i % INPUTS}.png",
                "instruction": f"make the background light grey, take {round_no}.{i}",
                "seed": 1000 * round_no + i,
            }
            for i in range(n)
        ]
    return [
        {"id": f"r{i}", "prompt": f"a product photo, take {round_no}.{i}", "seed": 1000 * round_no + i}
        for i in range(n)
    ]


def input_png(n: int) -> bytes:
    """Edit input `n`: a colour gradient with a dark square whose place depends on `n`, INPUT_SIDE square."""
    from PIL import Image

    side = INPUT_SIDE
    image = Image.new("RGB", (side, side))
    image.putdata([(4 * x, 4 * y, 255 - 4 * x) for y in range(side) for x in range(side)])
    corner = side // 8 * (1 + n % 4)
    image.paste((20, 20, 20), (corner, corner // 2, corner + side // 4, corner // 2 + side // 4))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# --- A: the plain loop, in a process of its own (`compare.py plain`) ---------------------------------
def plain_main(model: str) -> None:
    """Load the model once, then for each request line on stdin ({rows, prefix}) run the loop and answer
    {wall_s} on stdout."""
    import boto3

    from bench.minimal_celery import PlainEditModel, PlainModel, get_input

    editing = MODELS[model].kind == "edit"
    plain, s3 = (PlainEditModel(model) if editing else PlainModel(model)), boto3.client("s3")
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        ask = json.loads(line)
        started, model_s = time.perf_counter(), 0.0
        for row in ask["rows"]:
            source = get_input(s3, row["image"]) if editing else b""
            t0 = time.perf_counter()
            if isinstance(plain, PlainEditModel):
                data = plain.edit(source, row["instruction"], row["seed"])  # (decode, fit, edit, unfit)
            else:
                data = plain.render(row["prompt"], row["seed"])
            model_s += time.perf_counter() - t0  # (the model call and the PNG encode)
            s3.put_object(Bucket=BUCKET, Key=f"{ask['prefix']}{row['id']}.png", Body=data, ContentType="image/png")
        wall = time.perf_counter() - started
        print(json.dumps({"wall_s": wall, "model_s": model_s / len(ask["rows"])}), flush=True)


class PlainLoop:
    def __init__(self, model: str, env: dict, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "plain", "--model", model],
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self._answer()

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the plain loop exited; see {self.log.name}")
        return json.loads(line)

    def run(self, rows: list[dict], prefix: str) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"rows": rows, "prefix": prefix}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        self.model_s = answer["model_s"]
        return answer["wall_s"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.log.close()


# --- B: the minimal Celery app ---------------------------------------------------------------------
class MinimalCelery:
    def __init__(self, model: str, env: dict, tmp: Path, threads: int):
        self.worker = Worker(
            [
                "-A",
                "bench.minimal_celery",
                "worker",
                "-P",
                "threads",
                "-c",
                str(threads),
                "-l",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            {**env, "MINIMAL_MODEL": model},
            tmp / "minimal.log",
            program=[sys.executable, "-m", "celery"],
        )
        self.worker.wait_ready()
        from bench.minimal_celery import app

        app.conf.broker_url = env["DREAMBATCH_REDIS_URL"]  # this process's producer: the bench's Redis
        self.app = app

    def run(self, rows: list[dict], prefix: str, receiver: Receiver, webhook: str) -> float:
        started = time.perf_counter()
        with self.app.producer_or_acquire() as producer:
            for row in rows:
                out = [BUCKET, f"{prefix}{row['id']}.png", webhook]
                if "image" in row:
                    task, args = "minimal.edit", [row["image"], row["instruction"], row["seed"], *out]
                else:
                    task, args = "minimal.render", [row["prompt"], row["seed"], *out]
                self.app.send_task(task, args=args, producer=producer)
        wait_until(lambda: len(events(receiver, prefix)) >= len(rows), 900, 0.005, what="minimal celery run")
        return time.perf_counter() - started

    def close(self) -> None:
        self.worker.kill()


def events(receiver: Receiver, run: str) -> set[str]:
    """The distinct events of one run the receiver got (a redelivered webhook counts once): B's by output
    key under the run's prefix, C's by item (and the job's own) of the run's job."""
    seen = set()
    for request in receiver.delivered():
        body = request["json"] or {}
        if body.get("key", "").startswith(run) or body.get("job_id") == run:
            seen.add(body.get("key") or body.get("type", "").split(".")[0] + ":" + str(body.get("id")))
    return seen


# --- C: dreambatch ---------------------------------------------------------------------------------
class Dreambatch:
    def __init__(self, model: str, env: dict, tmp: Path, submit: str = "cli"):
        """`submit`: "cli", the submit command builds the job itself (Redis, S3, Celery from this machine); "api",
        it hands the manifest to a `dreambatch api` process (`submit --api`), which builds it."""
        self.env, self.tmp, self.model = env, tmp, model
        self.io = Worker(["worker", "--io"], env, tmp / "io.log")
        self.gpu = Worker(["worker", "--model", model, "--weights", "tiny", "--device", "cpu"], env, tmp / "gpu.log")
        self.api = None
        if submit == "api":
            api_env = {**env, "DREAMBATCH_OUTPUT": f"s3://{BUCKET}/api"}
            made = subprocess.run(
                [sys.executable, "-m", "worker", "keys", "create", "--tenant", "bench", "--scope", "jobs:write",
                 "--scope", "jobs:read", "--json"],
                env=api_env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
            )  # fmt: skip
            port = free_port()
            self.api = Worker(["api", "--port", str(port)], api_env, tmp / "api.log")
            self.url, self.key = f"http://127.0.0.1:{port}", json.loads(made.stdout)["token"]
            wait_until(lambda: _answers(self.url), 120, 0.1, what="the API")
        self.gpu.wait_ready()
        self.io.wait_ready()

    def run(self, rows: list[dict], prefix: str, receiver: Receiver, webhook: str) -> tuple[float, str]:
        """One run; returns its wall time and the S3 prefix its outputs went to."""
        manifest = self.tmp / "c.jsonl"
        manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
        where = ["--output", f"s3://{BUCKET}/{prefix.rstrip('/')}"]
        if self.api is not None:
            where = ["--api", self.url, "--api-key", self.key]
        started, started_at = time.perf_counter(), time.time()
        res = subprocess.run(
            [sys.executable, "-m", "worker", "submit", str(manifest), "--model", self.model, *where,
             "--webhook", webhook, "--json"],
            env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if res.returncode:
            raise RuntimeError(f"dreambatch submit failed: {res.stderr[-2000:]}")
        submitted_at = time.time()
        job_id = json.loads(res.stdout)["job_id"]
        wait_until(lambda: len(events(receiver, job_id)) >= len(rows) + 1, 900, 0.005, what="dreambatch run")
        self.last = {"started_at": started_at, "submitted_at": submitted_at, "ended_at": time.time()}
        return time.perf_counter() - started, f"{'api/' if self.api is not None else prefix}{job_id}/"

    def phases(self, s3, prefix: str) -> dict[str, float]:
        """Where the last run's time went, from its items' timings: the submit command, submit → the first
        model call, the model's busy share between first and last call, and the last call's end → the end."""
        key = f"{prefix}results.jsonl"
        wait_until(lambda: etags(s3, prefix) and _exists(s3, key), 60, 0.05, what=key)
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
        timings = [json.loads(line)["timings"] for line in body.splitlines() if line]
        calls = sorted((t["model_started_at"], t["model_started_at"] + t["inference_s"]) for t in timings)
        return {
            "submit_s": self.last["submitted_at"] - self.last["started_at"],
            "to_first_model_s": calls[0][0] - self.last["submitted_at"],
            "model_busy": sum(b - a for a, b in calls) / (calls[-1][1] - calls[0][0]),
            "after_last_model_s": self.last["ended_at"] - calls[-1][1],
            "model_call_s": statistics.mean(t["inference_s"] for t in timings),
        }

    def close(self) -> None:
        self.gpu.kill()
        self.io.kill()
        if self.api is not None:
            self.api.kill()


def _answers(url: str) -> bool:
    """Whether the API at `url` answers (any HTTP status: it is up)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/v1/jobs", timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _exists(s3, key: str) -> bool:
    return bool(s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("KeyCount"))


def etags(s3, prefix: str) -> dict[str, str]:
    """file name → ETag (moto: the bytes' MD5) of every PNG under `prefix`."""
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".png"):
                found[obj["Key"].rsplit("/", 1)[-1]] = obj["ETag"]
    return found


def run_setting(args, systems: dict, proxy: Proxy, redis_client, s3, receiver: Receiver, delay_ms: float) -> dict:
    """`args.rounds` interleaved rounds (plus one warm-up) at one delay; per-round walls and request counts."""
    proxy.delay = delay_ms / 1000
    walls: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    s3_requests: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    redis_commands: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    identical = True
    phases: list[dict] = []
    for round_no in range(args.rounds + 1):  # round 0 warms every process up; not counted
        tag = f"{int(delay_ms)}ms-{round_no}"
        rows = rows_for(args.model, round_no + 100 * int(delay_ms), args.items)
        order = SYSTEMS[round_no % 3 :] + SYSTEMS[: round_no % 3]
        made = {}
        for name in order:
            prefix = f"{name.lower()}/{tag}/"
            with receiver._lock:
                receiver.requests.clear()
            requests0 = proxy.requests
            commands0 = redis_client.info("stats")["total_commands_processed"]
            if name == "A":
                wall = systems["A"].run(rows, prefix)
            elif name == "B":
                wall = systems["B"].run(rows, prefix, receiver, args.webhook)
            else:
                wall, prefix = systems["C"].run(rows, prefix, receiver, args.webhook)
                if round_no:
                    phases.append(systems["C"].phases(s3, prefix))
            if round_no:
                walls[name].append(wall)
                s3_requests[name].append((proxy.requests - requests0) / len(rows))
                commands = redis_client.info("stats")["total_commands_processed"] - commands0
                redis_commands[name].append(commands / len(rows))
            made[name] = etags(s3, prefix)
        if round_no:
            phases[-1]["a_model_call_s"] = systems["A"].model_s  # (this round's A)
        same = len(made["A"]) == args.items and made["A"] == made["B"] == made["C"]
        identical = identical and same
        if round_no:
            print(
                f"  {args.model} +{delay_ms:.0f} ms, round {round_no}: "
                + ", ".join(f"{n} {args.items / walls[n][-1]:.2f} img/s" for n in SYSTEMS)
                + f"; bytes {'identical' if same else 'DIFFER'}; load {os.getloadavg()[0]:.1f}; C: "
                + phase_text(phases[-1]),
                flush=True,
            )
    return {"walls": walls, "s3": s3_requests, "redis": redis_commands, "identical": identical, "phases": phases}


def phase_text(p: dict) -> str:
    first = p["to_first_model_s"]  # (negative: the workers began before the submit command had exited)
    to_first = (
        f"then {first:.2f} s to the first model call"
        if first >= 0
        else f"the first model call {-first:.2f} s before its end"
    )
    return (
        f"submit command {p['submit_s']:.2f} s, {to_first}, "
        f"model busy {p['model_busy']:.0%} from first call to last, {p['after_last_model_s']:.2f} s after it; "
        f"one model call {p['model_call_s'] * 1000:.0f} ms (A's call + PNG encode: {p['a_model_call_s'] * 1000:.0f} ms)"
    )


def summarize(model: str, delay_ms: float, run: dict, items: int) -> dict:
    walls = run["walls"]
    per_round = list(zip(walls["A"], walls["B"], walls["C"], strict=True))
    kind = " edits" if MODELS[model].kind == "edit" else ""
    return {
        "label": f"{model}{kind}, {'loopback S3' if not delay_ms else f'+{delay_ms:.0f} ms per S3 request'}",
        "rate": {n: items / statistics.median(walls[n]) for n in SYSTEMS},
        "c_over_a": statistics.median(a / c for a, _, c in per_round),
        "c_over_b": statistics.median(b / c for _, b, c in per_round),
        "s3": {n: statistics.median(run["s3"][n]) for n in SYSTEMS},
        "redis": {n: statistics.median(run["redis"][n]) for n in SYSTEMS},
        "identical": run["identical"],
        "phases": {k: statistics.median(p[k] for p in run["phases"]) for k in run["phases"][0]},
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model, I/O per S3 request | A plain loop img/s | B minimal Celery img/s | C dreambatch img/s "
        "| **C ÷ A** | **C ÷ B** | S3 requests per image A / B / C | Redis commands per image B / C "
        "| bytes A = B = C |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['rate']['A']:.2f} | {r['rate']['B']:.2f} | {r['rate']['C']:.2f} "
            f"| **{r['c_over_a']:.2f}×** | **{r['c_over_b']:.2f}×** "
            f"| {r['s3']['A']:.2f} / {r['s3']['B']:.2f} / {r['s3']['C']:.2f} "
            f"| {r['redis']['B']:.0f} / {r['redis']['C']:.0f} | {'yes' if r['identical'] else '**no**'} |"
        )
    lines.append("")
    for r in rows:
        lines.append(f"- C, {r['label']} (medians): {phase_text(r['phases'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        default="i1-fast",
        choices=[name for name, spec in MODELS.items() if spec.kind == "generate"] + ["e1-1"],
        help="a generation model, or e1-1 for edits of the bench's inputs in S3 (tiny weights)",
    )
    ap.add_argument("--items", type=int, default=12, help="rows per run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting (after one warm-up)")
    ap.add_argument(
        "--delay-ms", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 60.0], help="per S3 request"
    )
    ap.add_argument(
        "--submit",
        choices=["cli", "api"],
        default="cli",
        help="C's submit: the command builds the job itself (cli), or hands it to a `dreambatch api` process "
        "the bench starts (api: `submit --api`)",
    )
    ap.add_argument("--threads", type=int, default=3, help="B's thread pool (dreambatch's default item threads)")
    ap.add_argument(
        "--model-threads",
        type=int,
        default=1,
        help="torch intra-op threads of A, B and C alike (OMP_NUM_THREADS): 1 leaves the other core to the "
        "Python around the model, as a GPU leaves the host's cores (2 spinning OpenMP threads on a shared "
        "2-core machine slow every model call several times over)",
    )
    ap.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a dreambatch setting for C's processes, as its environment variable without DREAMBATCH_ (e.g. "
        "RUNNER__MODEL_CPUS=off); C runs on the defaults otherwise",
    )
    args = ap.parse_args()
    try:
        c_env = setting_env(args.setting)
    except InputError as exc:
        ap.error(str(exc))
    started_load = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {started_load[0]:.1f} / {started_load[1]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "redis").mkdir()
        redis_server = RedisServer(tmp / "redis")
        redis_server.start()
        s3_server, endpoint = start_s3_process()
        proxy = Proxy(endpoint)
        receiver = Receiver()
        args.webhook = receiver.url
        os.environ.update(S3_ENV)
        direct = s3_client(endpoint)
        direct.create_bucket(Bucket=BUCKET)
        for n in range(INPUTS if MODELS[args.model].kind == "edit" else 0):
            direct.put_object(Bucket=BUCKET, Key=f"inputs/{n}.png", Body=input_png(n), ContentType="image/png")
        tiny = Path(os.environ.get("DREAMBATCH_TINY_DIR") or tmp / "tiny")
        env = service_env(redis_server.url, proxy.url, tiny, OMP_NUM_THREADS=str(args.model_threads))
        for name in [k for k in env if k.startswith(("DREAMBATCH_CELERY__", "DREAMBATCH_WEBHOOKS__"))]:
            del env[name]  # (the tests' short timeouts): dreambatch runs on its default settings
        env.update(c_env)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        systems: dict = {}
        results = []
        try:
            systems["C"] = Dreambatch(args.model, env, tmp, args.submit)  # (first: it builds the tiny weights)
            systems["A"] = PlainLoop(args.model, env, tmp / "plain.log")
            systems["B"] = MinimalCelery(args.model, env, tmp, args.threads)
            for delay_ms in args.delay_ms:
                run = run_setting(args, systems, proxy, redis_server.client(), direct, receiver, delay_ms)
                results.append(summarize(args.model, delay_ms, run, args.items))
        finally:
            for system in systems.values():
                system.close()
            receiver.close()
            proxy.close()
            s3_server.kill()
            redis_server.stop()
    ended_load = os.getloadavg()
    print()
    delays = ",".join(f"{d:g}" for d in args.delay_ms)
    settings = "".join(f" --setting {setting}" for setting in args.setting)
    print(
        f"`python bench/compare.py --model {args.model} --items {args.items} --rounds {args.rounds} "
        f"--submit {args.submit} "
        f"--delay-ms {delays} --model-threads {args.model_threads}{settings}`: medians of {args.rounds} interleaved "
        f"rounds; load average {started_load[0]:.1f} at start, {ended_load[0]:.1f} at end ({os.cpu_count()} CPUs)"
    )
    print()
    print(table(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "plain":
        plain = argparse.ArgumentParser()
        plain.add_argument("plain")
        plain.add_argument("--model", default="i1-fast")
        plain_main(plain.parse_args().model)
    else:
        main()
