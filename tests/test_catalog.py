"""Scheduled catalog runs end to end: a held-out catalog in S3 (moto server: nested prefixes, mixed formats,
non-image objects) is fired by `dreambatch beat`, scanned by an io worker and edited on a worker running tiny
E1.1 weights; a second run does nothing, a changed image or template re-runs exactly what changed; the
review contact sheet renders every pair in headless chromium; two beats fire a missed slot once."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from PIL import Image
from services import cli, item_context, s3_client, service_env, wait_until

from jobs import keys
from jobs.catalog.ledger import Ledger, fold, input_failure
from jobs.catalog.plan import item_id_for
from jobs.catalog.run import run_schedule
from jobs.catalog.schedules import load_schedules
from jobs.errors import ConfigError, InputError
from jobs.manifest import RawRow, RowChecker
from jobs.models import JobRecord
from jobs.presets import apply_preset, load_presets
from jobs.services import Services
from jobs.settings import CatalogSettings, S3Settings, Settings
from jobs.storage import LocalStore
from jobs.store import MemoryStore, RedisStore, ScheduleState
from jobs.templates import KeyTemplate, render

pytestmark = pytest.mark.timeout(240)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def photo(seed: int, fmt: str, size=(48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


# the held-out catalog: 4 images (nested, mixed formats) and 5 objects that are not images
IMAGES = {
    "products/shoes/101.jpg": ("jpg", "image/jpeg"),
    "products/shoes/102.png": ("png", "image/png"),
    "products/bags/leather/201.webp": ("webp", "image/webp"),
    "products/bags/202.JPG": ("jpg", "image/jpeg"),
}
OTHERS = {
    "products/README.txt": (b"catalog notes\n", "text/plain", "not an image (.txt file)"),
    "products/shoes/101.json": (b'{"sku": 101}', "application/json", "not an image (.json file)"),
    "products/shoes/": (b"", "application/x-directory", "folder marker"),
    "products/bags/scan.gif": (b"GIF89a....", "image/gif", "unsupported image format .gif"),
    "products/hats/blob": (b"\x00\x01binary", "application/octet-stream", "not an image (no extension"),
}


def schedule_file(path: Path, name: str, bucket: str, instruction: str | None = None) -> Path:
    text = f"""
[schedules.{name}]
cron = "0 2 * * *"
timezone = "Europe/Berlin"
model = "e1-1"
preset = "white-studio"
params = {{ steps = 1, seed = 3 }}
output = "s3://{bucket}/edited"
keep_format = true
{f'instruction = "{instruction}"' if instruction else ""}
[schedules.{name}.source]
prefix = "s3://{bucket}/products/"
path = "products/{{category*}}/{{sku}}.jpg"
"""
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def e1_workers(redis_server, s3_endpoint, tiny_dir, tmp_path_factory):
    """A GPU worker on tiny E1.1 weights and an I/O worker, on their own Redis database, shared by the tests
    that need items to run (each uses its own bucket and schedule name)."""
    from services import Worker

    redis_url = redis_server.database(11)
    logs = tmp_path_factory.mktemp("e1-workers")
    env = service_env(redis_url, s3_endpoint, tiny_dir)
    workers = [
        Worker(["worker", "--model", "e1-1", "--weights", "tiny", "--device", "cpu"], env, logs / "gpu.log"),
        Worker(["worker", "--io"], env, logs / "io.log"),
    ]
    try:
        for w in workers:
            w.wait_ready()
        yield redis_url
    finally:
        for w in workers:
            w.kill(signal.SIGKILL)


class Nightly:
    """Runs of one schedule in this process, against the shared workers, as beat would fire them."""

    def __init__(
        self, redis_url: str, s3_endpoint: str, schedules: Path, name: str, allow_private_hosts: str = "", **catalog
    ):
        self.settings = Settings(
            redis_url=redis_url,
            s3=S3Settings(endpoint_url=s3_endpoint),
            catalog=CatalogSettings(schedules_file=str(schedules), **catalog),
            allow_private_hosts=allow_private_hosts,
        )
        self.services, self.name = Services(self.settings), name
        self.env = service_env(
            redis_url,
            s3_endpoint,
            Path("."),
            DREAMBATCH_CATALOG__SCHEDULES_FILE=str(schedules),
            **{f"DREAMBATCH_CATALOG__{k.upper()}": str(v) for k, v in catalog.items()},
        )

    def run(self, wait: bool = True, **kwargs):
        report = run_schedule(load_schedules(self.settings)[self.name], self.services, **kwargs)
        if wait and report.job_id:
            wait_job(self.settings.redis_url, report.job_id)
        return report


def run_cli(*args: str, env: dict) -> dict:
    res = cli(*args, "--json", env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def stored_ledger(s3_endpoint: str, bucket: str, name: str) -> Ledger:
    """The schedule's ledger as a run reads it (its snapshot and the deltas after it)."""
    return Ledger.load(
        Services(Settings(s3=S3Settings(endpoint_url=s3_endpoint))).objects(f"s3://{bucket}/edited"), name
    )


def wait_job(redis_url: str, job_id: str):
    store = RedisStore.from_url(redis_url)
    return wait_until(lambda: (j := store.get_job(job_id)) and j.finished_at and j, 120, 0.2, what=f"job {job_id}")


def results(s3, bucket: str, job_id: str) -> list[dict]:
    body = s3.get_object(Bucket=bucket, Key=f"edited/{job_id}/results.jsonl")["Body"].read()
    return [json.loads(x) for x in body.decode().splitlines()]


def test_scheduled_scan_edits_every_image_once_then_only_what_changed_and_the_sheet_shows_every_pair(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    s3 = s3_client(s3_endpoint)
    for n, (key, (fmt, ctype)) in enumerate(IMAGES.items()):
        s3.put_object(Bucket=bucket, Key=key, Body=photo(n, fmt), ContentType=ctype)
    for key, (body, ctype, _) in OTHERS.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ctype)
    name = f"nightly-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, bucket)
    redis_url = redis_server.url
    extra = {
        "DREAMBATCH_REDIS_URL": redis_url,
        "DREAMBATCH_CATALOG__SCHEDULES_FILE": str(schedules),
        "DREAMBATCH_CATALOG__BEAT_INTERVAL": "0.3",
    }
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **extra)

    # beat was down at 02:00 for three nights: when it comes back it fires once, an io worker scans
    state = ScheduleState.from_url(redis_url)
    state.set_last_fired(name, (datetime.now(UTC) - timedelta(days=3, hours=1)).isoformat())
    gpu = start_worker("worker", "--model", "e1-1", "--weights", "tiny", "--device", "cpu", **extra)
    io_worker = start_worker("worker", "--io", **extra)
    beat = start_worker("beat", **extra)
    for process in (gpu, io_worker, beat):
        process.wait_ready()
    last = wait_until(lambda: state.last_run(name), 60, 0.2, what="the scheduled run")
    assert last["slot"] is not None and last["queued"] == 4 and last["skipped"] == len(OTHERS)
    job_id = last["job_id"]
    job = wait_job(redis_url, job_id)
    assert (job.status, job.counts["completed"]) == ("completed", 4)

    # every image edited once; outputs mirror the keys with the original name and format
    lines = results(s3, bucket, job_id)
    assert sorted(x["metadata"]["source_key"] for x in lines) == sorted(IMAGES)
    for line in lines:
        source = line["metadata"]["source_key"]
        rel = source.removeprefix("products/")
        [image] = line["output"]["images"]
        assert image["s3_uri"] == f"s3://{bucket}/edited/{rel}"
        stored = s3.get_object(Bucket=bucket, Key=f"edited/{rel}")
        assert stored["ContentType"] == IMAGES[source][1]
        assert Image.open(io.BytesIO(stored["Body"].read())).size == (48, 40)
        assert line["metadata"]["sku"] == Path(rel).stem and line["metadata"]["category"] == str(Path(rel).parent)
    run = json.loads(s3.get_object(Bucket=bucket, Key=f"edited/_catalog/{name}/runs/{job_id}.json")["Body"].read())
    reasons = {s["key"]: s["reason"] for s in run["skipped"]}
    assert set(reasons) == set(OTHERS)
    for key, (_, _, reason) in OTHERS.items():
        assert reasons[key].startswith(reason), (key, reasons[key])

    # the review contact sheet, written by the io worker when the job ended: opened from S3 as it was written,
    # every pair renders in a real browser, with its id, sku and a link to its output
    def sheet_written():
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"edited/{job_id}/sheet")
        return {o["Key"] for o in listed.get("Contents", [])} == {
            f"edited/{job_id}/sheet.html",
            f"edited/{job_id}/sheet.png",
        }

    wait_until(sheet_written, 30, 0.2, what="the job's review sheet")
    written = s3.get_object(Bucket=bucket, Key=f"edited/{job_id}/sheet.html")
    assert written["ContentType"].startswith("text/html")
    page = tmp_path / "written" / "sheet.html"
    page.parent.mkdir()
    page.write_bytes(written["Body"].read())
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert 'data-images="8"' in dom and 'data-loaded="8"' in dom  # 4 befores + 4 afters, all decoded
    assert f"<h1>{name} · " in dom  # the header names the schedule and the run's date
    for line in lines:
        card = re.search(rf'<section class="card completed" data-id="{re.escape(line["id"])}">(.*?)</section>', dom)
        assert card, line["id"]
        pair = card.group(1)
        assert pair.count('<img class="before"') == 1 and pair.count('<img class="after"') == 1, line["id"]
        assert f'<h2 class="name">{line["metadata"]["sku"]}</h2>' in pair and "etag" not in pair  # its own name
        assert f'href="{line["output"]["images"][0]["s3_uri"]}"' in pair
    # made again on demand into a folder, it is the same page
    res = cli("sheet", job_id, "--to", str(tmp_path / "sheet"), env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "sheet" / "sheet.html").read_bytes() == page.read_bytes()
    shot = tmp_path / "sheet.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1000,800",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=60,
    )
    assert np.asarray(Image.open(shot).convert("L")).std() > 10  # the page drew pictures, not a blank
    grid = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"edited/{job_id}/sheet.png")["Body"].read()))
    assert grid.size == (4 * (2 * 192 + 12) + 8, 1 * (192 + 34 + 8) + 8)  # one row of four pairs

    # the same night again: nothing new, so no job and no GPU work (runs in this process from here on)
    settings = Settings(
        redis_url=redis_url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(schedules)),
    )
    services = Services(settings)

    def run_now(**kwargs):
        return run_schedule(load_schedules(settings)[name], services, **kwargs)

    again = run_now()
    assert (again.job_id, again.queued, again.unchanged, again.folded) == (None, 0, 4, [job_id])
    ledger = stored_ledger(s3_endpoint, bucket, name)
    assert sorted(ledger.entries) == sorted(IMAGES) and ledger.pending == []

    # one photo re-shot: the dry run (CLI) names it alone, the run edits it alone
    s3.put_object(Bucket=bucket, Key="products/shoes/102.png", Body=photo(99, "png"), ContentType="image/png")
    dry = run_cli("schedules", "run", name, "--dry-run", env=env)
    assert (dry["new"], dry["changed"], dry["unchanged"], dry["job_id"]) == ([], ["products/shoes/102.png"], 3, None)
    one = run_now()
    assert one.queued == 1 and one.changed == ["products/shoes/102.png"]
    assert wait_job(redis_url, one.job_id).counts["completed"] == 1
    assert [x["metadata"]["source_key"] for x in results(s3, bucket, one.job_id)] == ["products/shoes/102.png"]

    # a new instruction template: every image it applies to runs again, then nothing
    schedule_file(schedules, name, bucket, instruction="Put the {category} product {sku} on pure white")
    changed = run_now()
    assert changed.queued == 4 and sorted(changed.changed) == sorted(IMAGES)
    assert wait_job(redis_url, changed.job_id).counts["completed"] == 4
    assert run_now().queued == 0

    listed = {s["name"]: s for s in run_cli("schedules", "list", env=env)}
    assert listed[name]["last_run"]["unchanged"] == 4 and listed[name]["last_run"]["job_id"] is None
    # the next 02:00 in Berlin, with the offset Berlin has that night (+01:00 in winter, +02:00 in summer;
    # on the night the clocks go forward 02:00 does not exist and the slot is the instant they jump to)
    berlin, now = ZoneInfo("Europe/Berlin"), datetime.now(UTC)
    today = now.astimezone(berlin).date()
    nights = [datetime.combine(today + timedelta(days=n), datetime.min.time().replace(hour=2), berlin) for n in (0, 1)]
    expected = next(t.astimezone(UTC) for t in nights if t.astimezone(UTC) > now)
    assert datetime.fromisoformat(listed[name]["next_fire"]) == expected
    assert listed[name]["next_fire_local"] == expected.astimezone(berlin).isoformat()


def test_two_beats_started_together_fire_a_missed_slot_once_and_a_standby_takes_over(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    name = f"twobeats-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, bucket)
    redis_url = redis_server.url
    extra = {
        "DREAMBATCH_REDIS_URL": redis_url,
        "DREAMBATCH_CATALOG__SCHEDULES_FILE": str(schedules),
        "DREAMBATCH_CATALOG__BEAT_INTERVAL": "0.2",
        "DREAMBATCH_CATALOG__BEAT_LOCK_TTL": "1.5",
    }
    state = ScheduleState.from_url(redis_url)
    state.set_last_fired(name, (datetime.now(UTC) - timedelta(days=2, hours=1)).isoformat())
    beats = [start_worker("beat", **extra), start_worker("beat", **extra)]  # no io worker: messages stay queued

    def fired() -> list[list]:
        """The run_schedule messages waiting in the io queue (Celery protocol 2 bodies: [args, kwargs, embed])."""
        messages = [json.loads(m) for m in state.r.lrange(keys.IO_QUEUE, 0, -1)]
        return [
            json.loads(base64.b64decode(m["body"]) if m["properties"].get("body_encoding") == "base64" else m["body"])
            for m in messages
            if m["headers"]["task"] == keys.TASK_RUN_SCHEDULE
        ]

    wait_until(fired, 30, 0.1, what="beat to fire")
    wait_until(lambda: all("ready." in b.log.read_text() for b in beats), 10, what="both beats up")
    wait_until(lambda: sum("standby" in b.log.read_text() for b in beats) == 1, 10, what="one standby")
    [holder] = [b for b in beats if "holding the beat lock" in b.log.read_text()]
    [standby] = [b for b in beats if b is not holder]
    slot = state.last_fired(name)
    assert [args[:2] for args, _, _ in fired()] == [[name, slot]]
    assert datetime.now(UTC) - datetime.fromisoformat(slot) < timedelta(days=1)  # the latest slot, not the first

    holder.kill(signal.SIGKILL)  # the lock is not released: the standby takes over once it expires
    wait_until(lambda: "holding the beat lock" in standby.log.read_text(), 15, 0.1, what="the standby to take over")
    assert len(fired()) == 1  # and does not fire the slot again


# ---- the pieces, without services ---------------------------------------------------------------------


def test_only_completed_items_of_an_ended_run_are_recorded_and_a_run_in_flight_is_not_queued_again(tmp_path):
    objects, store = LocalStore(str(tmp_path)), MemoryStore()
    run = {"items": {"a-1": {"key": "p/a.jpg", "fp": "fa"}, "b-2": {"key": "p/b.jpg", "fp": "fb"}}}
    objects.put(keys.S3_CATALOG_RUN.format(prefix="", name="n", job_id="J1"), json.dumps(run).encode(), "x")
    ledger = Ledger(pending=["J1"])
    store.create_job(
        JobRecord(
            job_id="J1",
            model="e1-1",
            output=str(tmp_path),
            created_at="2026-01-01T00:00:00+00:00",
            updated_at="2026-01-01T00:00:00+00:00",
            total=2,
        )
    )
    assert fold(ledger, objects, store, "n") == ([], {"p/a.jpg": "fa", "p/b.jpg": "fb"})  # still running
    lines = [
        {"id": "a-1", "status": "completed", "output": {"images": [{"s3_uri": "s3://x/a.jpg"}]}},
        {"id": "b-2", "status": "failed", "output": {"images": []}},
    ]
    objects.put("J1/results.jsonl", "\n".join(json.dumps(x) for x in lines).encode(), "x")
    assert fold(ledger, objects, store, "n") == (["J1"], {})
    assert set(ledger.entries) == {"p/a.jpg"} and ledger.entries["p/a.jpg"]["fp"] == "fa" and ledger.pending == []


def test_a_run_whose_live_state_is_gone_records_only_the_completions_whose_images_are_there(tmp_path):
    """No results.jsonl and no live job (Redis lost it): the run is read from its items' records, and a
    completed record whose image never landed (its worker stopped between the two) is not an edit."""
    objects, store = LocalStore(str(tmp_path)), MemoryStore()
    run = {"items": {"a-1": {"key": "p/a.jpg", "fp": "fa"}, "b-2": {"key": "p/b.jpg", "fp": "fb"}}}
    objects.put(keys.S3_CATALOG_RUN.format(prefix="", name="n", job_id="J2"), json.dumps(run).encode(), "x")
    for item_id in run["items"]:
        image = {"s3_uri": objects.uri(f"J2/{item_id}.png")}
        record = {"job_id": "J2", "id": item_id, "status": "completed", "output": {"images": [image]}}
        objects.put(f"J2/items/{item_id}.json", json.dumps(record).encode(), "x")
    objects.put("J2/a-1.png", b"png", "image/png")  # b-2's image is not there
    ledger = Ledger(pending=["J2"])
    assert fold(ledger, objects, store, "n") == (["J2"], {})
    assert set(ledger.entries) == {"p/a.jpg"}


def test_rejected_and_failed_items_count_failed_runs_per_fingerprint_and_an_aborted_submission_is_not_in_flight(
    tmp_path,
):
    objects, store = LocalStore(str(tmp_path)), MemoryStore()
    at = "2026-01-01T00:00:00+00:00"
    ledger = Ledger()

    def ended_run(job_id: str, lines: list[tuple[str, str, str]], aborted: bool = False) -> None:
        """A run of items (item id, fingerprint, status), written as the run record and its results."""
        run = {"items": {i: {"key": f"p/{i}.jpg", "fp": fp} for i, fp, _ in lines}}
        objects.put(keys.S3_CATALOG_RUN.format(prefix="", name="n", job_id=job_id), json.dumps(run).encode(), "x")
        store.create_job(
            JobRecord(
                job_id=job_id,
                model="e1-1",
                output=str(tmp_path),
                created_at=at,
                updated_at=at,
                total=len(lines),
                submitting=aborted,
            )
        )
        ledger.pending.append(job_id)
        if aborted:  # its submission failed: no results will ever come, and nothing of it runs
            store.abort_submission(job_id)
            return
        results = [
            {
                "id": i,
                "status": st,
                "error": "invalid row: line 2: steps: should be >= 1" if st == "failed" else None,
                "output": {"images": [{"s3_uri": f"s3://x/{i}"}] if st == "completed" else []},
            }
            for i, _, st in lines
        ]
        objects.put(f"{job_id}/results.jsonl", "\n".join(json.dumps(x) for x in results).encode(), "x")

    ended_run("J0", [("a", "fa", "queued")], aborted=True)
    assert fold(ledger, objects, store, "n") == (["J0"], {}) and ledger.failures == {}  # not in flight forever
    ended_run("J1", [("a", "fa", "failed"), ("b", "fb", "cancelled"), ("c", "fc", "completed")])
    ended_run("J2", [("a", "fa", "failed")])
    fold(ledger, objects, store, "n")
    assert {k: (v["fp"], v["count"]) for k, v in ledger.failures.items()} == {"p/a.jpg": ("fa", 2)}  # b: cancelled
    assert ledger.failures["p/a.jpg"]["error"].startswith("invalid row: line 2: steps")  # a rejected row counts
    ended_run("J3", [("a", "fa2", "failed")])  # the image changed: a new count
    fold(ledger, objects, store, "n")
    assert ledger.failures["p/a.jpg"]["count"] == 1 and set(ledger.entries) == {"p/c.jpg"}

    # failures that are not the input's never count: an outage or a model error must not give up on images
    for error in (
        "TransientError: S3 PUT: SlowDown (after 3 attempts)",
        "ModelError: CUDA out of memory",
        "gave up after 3 attempts that did not finish (worker lost or timed out)",
    ):
        assert not input_failure({"status": "failed", "attempts": 3, "error": error})
    assert input_failure({"status": "failed", "attempts": 1, "error": "InputError: not a JPEG, PNG or WebP"})
    assert input_failure({"status": "failed", "attempts": 0, "error": "line 2: steps: should be >= 1"})


def test_an_image_url_the_address_guard_refuses_is_an_input_failure_to_every_reader(tmp_path):
    """A row whose image URL points at a private address fails with BlockedAddress, an InputError: its record,
    results line and webhook carry error_kind "input", so the catalog's failure cap counts it (it is not retried
    every night forever) and the OpenAI routes answer 400, not 500."""
    from types import SimpleNamespace

    from jobs import records
    from jobs.api.openai_routes import images_response
    from jobs.api.service import ApiError
    from jobs.models import ItemRecord
    from worker import process, webhooks

    objects, store, at, url = (
        LocalStore(str(tmp_path)),
        MemoryStore(),
        "2026-01-01T00:00:00+00:00",
        "http://127.0.0.1:9/a.jpg",
    )
    store.create_job(
        JobRecord(
            job_id="J",
            model="e1-1",
            output=str(tmp_path),
            total=1,
            created_at=at,
            updated_at=at,
            webhook="https://hooks.example/j",
        )
    )
    store.add_items(
        [
            ItemRecord(
                job_id="J",
                item_id="a",
                line=1,
                seed=1,
                created_at=at,
                updated_at=at,
                params={"image": url, "instruction": "make it blue", "steps": 1},
            )
        ]
    )

    def no_model():
        raise AssertionError("a refused input never reaches the model")

    ctx = item_context(store, objects, no_model, settings=Settings(allow_private_hosts=""))
    assert process.process_item(ctx, "J", "a").ended == "failed"
    process.finalize_job(ctx, "J")

    item = store.get_item("J", "a")
    assert item.error.startswith(f"BlockedAddress: {url!r}") and item.error_kind == "input"
    assert json.loads(objects.get("J/items/a.json"))["error_kind"] == "input"
    [line] = records.read_results(objects, "J")
    assert line["error_kind"] == "input" and input_failure(line)
    assert webhooks.item_payload(store.get_job("J"), item)["error_kind"] == "input"
    ledger = Ledger()
    ledger.record("p/a.jpg", "fa", "J", line)
    assert ledger.failures["p/a.jpg"]["count"] == 1
    with pytest.raises(ApiError) as refused:
        images_response(SimpleNamespace(store=store), store.get_job("J"), "http://api.test/", "url")
    assert refused.value.status == 400 and refused.value.type == "invalid_request_error"

    # readers go by the kind, not the message; a line written before kinds were stored is read from its message
    assert not input_failure({"status": "failed", "attempts": 1, "error": "InputError: x", "error_kind": "model"})
    assert input_failure({"status": "failed", "attempts": 1, "error": f"BlockedAddress: {url!r}: 127.0.0.1 …"})


def test_the_diff_keeps_in_flight_items_back_even_for_new_weights_and_gives_up_on_keys_that_keep_failing():
    from jobs.catalog.ledger import Diff

    ledger = Ledger(
        entries={"k": {"fp": "f", "model_revision": "A"}},
        failures={"bad": {"fp": "g", "count": 3, "error": "InputError: not an image"}},
    )

    def verdict(key, fp, revision="A", in_flight=None, always=None, retry_failed=False):
        return Diff(ledger, in_flight or {}, revision, 3, retry_failed, "n").verdict(key, fp, always)

    assert verdict("k", "f") == ("unchanged", None)
    assert verdict("k", "f", revision=None) == ("unchanged", None)  # live revision not known: not compared
    assert verdict("k", "f", revision="B") == ("changed", "model revision changed (A → B)")
    assert verdict("k", "f", revision="B", in_flight={"k": "f"}) == ("in_flight", None)  # re-run still going
    assert verdict("k", "f", always="no ETag") == ("changed", "no ETag")
    assert verdict("k", "f2") == ("changed", "changed (content, instruction or parameters)")
    assert verdict("bad", "g")[0] == "given_up" and "InputError: not an image" in verdict("bad", "g")[1]
    assert verdict("bad", "g", retry_failed=True) == ("new", "new; failed 3 run(s) in a row before, tried again")
    assert verdict("bad", "g2") == ("new", "new")  # a changed image starts again


def test_every_preset_is_valid_e1_job_defaults_and_set_fills_its_placeholders():
    presets = load_presets()
    assert {"white-studio", "flat-cutout", "seasonal"} <= set(presets)
    for name in presets:
        for model in ("e1-1", "e1-full"):
            defaults = apply_preset(name, {"steps": "2"})
            assert RowChecker(model, defaults).check_defaults() == [], (name, model)
            assert "{" not in defaults["instruction"]
    seasonal = apply_preset("seasonal", {"theme": "summer beach", "guidance_scale": "3"})
    assert "summer beach" in seasonal["instruction"] and seasonal["guidance_scale"] == "3"
    with pytest.raises(InputError, match="unknown preset 'nope'; choose one of"):
        apply_preset("nope", {})


def test_key_templates_and_text_templates_name_what_is_wrong(tmp_path):
    nested = KeyTemplate("products/{category*}/{sku}.jpg", "t")
    assert nested.match("products/bags/leather/201.WEBP") == {"category": "bags/leather", "sku": "201"}
    assert KeyTemplate("products/{category}/{sku}.jpg", "t").match("products/bags/leather/201.jpg") is None
    assert render("{{literal}} {sku}", {"sku": "7"}, "w") == "{literal} 7"
    with pytest.raises(InputError, match=r"unknown placeholder \{skuu\}"):
        render("{skuu}", {"sku": "7"}, "w")
    with pytest.raises(InputError, match="bad placeholder"):
        render("{sku.__class__.__mro__[1]}", {"sku": "7"}, "w")
    assert item_id_for("shoes/1 2.jpg") != item_id_for("shoes/1_2.jpg")
    bad = tmp_path / "s.toml"
    bad.write_text(
        '[schedules.x]\ncron = "61 * * * *"\noutput = "s3://b/o"\npreset = "white-studio"\n'
        '[schedules.x.source]\nprefix = "s3://b/p/"\n'
    )
    with pytest.raises(ConfigError, match=r"schedules\.x: cron: not a cron expression: '61 \* \* \* \*'"):
        load_schedules(Settings(), bad)


def test_validate_with_a_preset_fills_the_instruction_and_compose_runs_beat(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from worker.cli import build_app

    app = build_app()
    photo_path = tmp_path / "shoe.jpg"
    photo_path.write_bytes(photo(1, "jpg"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,sku\nshoe.jpg,SKU-1\n")
    runner = CliRunner()
    bare = runner.invoke(app, ["validate", str(manifest), "--model", "e1-1"])
    assert bare.exit_code == 2 and "an edit row needs an instruction" in bare.output
    preset = runner.invoke(
        app,
        [
            "validate",
            str(manifest),
            "--model",
            "e1-1",
            "--preset",
            "seasonal",
            "--set",
            "theme=autumn leaves",
            "--json",
        ],
    )
    assert preset.exit_code == 0, preset.output
    assert json.loads(preset.stdout)["valid"] == 1
    unknown = runner.invoke(app, ["validate", str(manifest), "--model", "e1-1", "--preset", "studio"])
    assert unknown.exit_code == 2 and "unknown preset 'studio'" in unknown.output

    compose = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
    assert compose["services"]["beat"]["command"] == ["dreambatch", "beat"]
    assert "./ops:/app/ops:ro" in compose["services"]["worker-io"]["volumes"]
    assert runner.invoke(app, ["beat", "--help"]).exit_code == 0


def test_a_manifest_source_queues_every_row_with_the_schedules_preset_and_a_dry_run_queues_nothing(
    redis_server, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="in/a.jpg", Body=photo(1, "jpg"), ContentType="image/jpeg")
    manifest = "image,sku\n" + f"s3://{bucket}/in/a.jpg,A\n" + f"s3://{bucket}/in/a.jpg,B\n"
    s3.put_object(Bucket=bucket, Key="manifests/tonight.csv", Body=manifest.encode())
    name = f"m-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "schedules.toml"
    path.write_text(
        f'[schedules.{name}]\nmodel = "e1-1"\npreset = "seasonal"\noutput = "s3://{bucket}/out"\n'
        f'[schedules.{name}.source]\nmanifest = "s3://{bucket}/manifests/tonight.csv"\n'
    )
    settings = Settings(
        redis_url=redis_server.url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(path)),
    )
    published: list[tuple[str, str, list[str]]] = []
    services = Services(settings, publish=lambda job, ids: published.append((job.model, job.job_id, ids)))
    schedule = load_schedules(settings)[name]

    dry = run_schedule(schedule, services, dry_run=True, sets={"theme": "autumn"})
    assert (dry.images, dry.new, dry.job_id, published) == (2, ["2", "3"], None, [])
    report = run_schedule(schedule, services, sets={"theme": "autumn"})
    assert published == [("e1-1", report.job_id, ["2", "3"])]  # ids = line numbers
    job = RedisStore.from_url(settings.redis_url).get_job(report.job_id)
    assert "autumn" in job.defaults["instruction"] and job.review_sheet
    assert ScheduleState.from_url(settings.redis_url).last_run(name)["job_id"] == report.job_id


def test_a_schedules_priority_concurrency_cap_and_expiry_reach_its_jobs(redis_server, s3_endpoint, bucket, tmp_path):
    """A schedule says how urgent its runs are, how many of their items may run at once and how long they may
    wait; each run's job carries all three, as `dreambatch submit --priority/--max-concurrency/--expires-after`."""
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="in/a.jpg", Body=photo(1, "jpg"), ContentType="image/jpeg")
    manifest = tmp_path / "tonight.csv"
    manifest.write_text(f"image,sku\ns3://{bucket}/in/a.jpg,A\n")
    name, path = f"opts-{uuid.uuid4().hex[:6]}", tmp_path / "schedules.toml"

    def write(priority: str = '"high"', cap: str = "2", expires: str = '"2h"') -> None:
        path.write_text(
            f'[schedules.{name}]\nmodel = "e1-1"\npreset = "seasonal"\noutput = "s3://{bucket}/out"\n'
            f"priority = {priority}\nmax_concurrency = {cap}\nexpires_after = {expires}\n"
            f'[schedules.{name}.source]\nmanifest = "{manifest}"\n'
        )

    write()
    settings = Settings(
        redis_url=redis_server.url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(path)),
    )
    published: list[tuple[str, list[str]]] = []
    services = Services(settings, publish=lambda job, ids: published.append((job.priority, ids)))

    before = time.time()
    report = run_schedule(load_schedules(settings)[name], services, sets={"theme": "autumn"})
    job = RedisStore.from_url(settings.redis_url).get_job(report.job_id)
    assert (job.priority, job.max_concurrency) == ("high", 2)
    assert before + 7200 <= job.expires_at <= time.time() + 7200
    assert published == [("high", ["2"])]  # its items wait in the high-priority list

    for bad, why in [
        ({"priority": '"urgent"'}, "priority"),
        ({"cap": "0"}, "max_concurrency"),
        ({"expires": '"soon"'}, "expires_after: expected a duration"),
    ]:
        write(**bad)
        with pytest.raises(ConfigError, match=f"schedules.{name}: {why}"):
            load_schedules(settings)


def test_a_large_job_gets_sheet_pages_and_a_failed_row_shows_its_error(tmp_path):
    from worker.contact_sheet import make_sheet

    objects = LocalStore(str(tmp_path))
    at = "2026-01-01T00:00:00+00:00"
    job = JobRecord(job_id="J", model="e1-1", output=objects.location, created_at=at, updated_at=at, total=3)
    objects.put("J/job.json", job.model_dump_json().encode(), "application/json")
    rows, lines = [], []
    for n, status in enumerate(["completed", "failed", "completed"]):
        before = objects.put(f"J/inputs/r{n}.png", photo(n, "png"), "image/png")
        after = objects.put(f"J/r{n}.png", photo(10 + n, "png"), "image/png") if status == "completed" else None
        rows.append({"id": f"r{n}", "line": n + 2, "params": {"image": before}, "metadata": {}})
        lines.append(
            {
                "id": f"r{n}",
                "line": n + 2,
                "status": status,
                "metadata": {"sku": f"<b>{n}</b>"},
                "error": None if after else "InputError: not a JPEG, PNG or WebP image",
                "seed": 1,
                "output": {"images": [{"s3_uri": after, "url": None}] if after else []},
            }
        )
    objects.put("J/rows.jsonl", "\n".join(json.dumps(r) for r in rows).encode(), "x")
    objects.put("J/results.jsonl", "\n".join(json.dumps(x) for x in lines).encode(), "x")

    pages = make_sheet("J", objects, Settings(), lambda _loc: objects, page_size=2)
    assert [(Path(p.html_uri).name, Path(p.png_uri).name, p.pairs) for p in pages] == [
        ("sheet.html", "sheet.png", 2),
        ("sheet-2.html", "sheet-2.png", 1),
    ]
    first = Path(pages[0].html_uri).read_text()
    assert first.count('class="before"') == 2 and first.count('class="after"') == 1
    assert "InputError: not a JPEG, PNG or WebP image" in first and "no output" in first
    assert '<h2 class="name">&lt;b&gt;0&lt;/b&gt;</h2>' in first and "<b>0</b>" not in first  # the sku, escaped
    assert f'href="{Path(lines[0]["output"]["images"][0]["s3_uri"]).as_uri()}"' in first


def scan_once(tmp_path, s3_endpoint: str, bucket: str, name: str, fields: str) -> tuple[list, list, object]:
    """The candidates, skipped objects and plan of one scan of s3://bucket/p/ by a schedule with these TOML
    fields."""
    from jobs.catalog.plan import make_plan
    from jobs.catalog.scan import candidates
    from jobs.storage import S3Store

    path = tmp_path / "s.toml"
    path.write_text(f'[schedules.{name}]\n{fields}[schedules.{name}.source]\nprefix = "s3://{bucket}/p/"\n')
    settings = Settings(s3=S3Settings(endpoint_url=s3_endpoint))
    schedule = load_schedules(settings, path)[name]
    skipped: list = []
    store, plan = S3Store(f"s3://{bucket}/p/", s3_client(s3_endpoint)), make_plan(schedule, {}, settings)
    return list(candidates(schedule, plan, store, settings, skipped)), skipped, plan


def test_instruction_templates_read_object_metadata_and_an_object_without_it_is_skipped_with_the_reason(
    s3_endpoint, bucket, tmp_path
):

    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="p/red.jpg", Body=photo(1, "jpg"), Metadata={"Color": "red"})
    s3.put_object(Bucket=bucket, Key="p/plain.jpg", Body=photo(2, "jpg"))
    found, skipped, _ = scan_once(
        tmp_path,
        s3_endpoint,
        bucket,
        "m",
        f'model = "e1-1"\ninstruction = "Make the '
        f'{{meta.color}} shoe {{stem}} pop"\noutput = "s3://{bucket}/out"\nlayout = "job"\n',
    )
    assert [(c.key, c.row["instruction"], "output_key" in c.row) for c in found] == [
        ("p/red.jpg", "Make the red shoe red pop", False)
    ]
    assert [(s.key, s.reason) for s in skipped] == [
        ("p/plain.jpg", "no object metadata x-amz-meta-color (the instruction uses {meta.color})")
    ]


def test_a_yaml_schedules_file_loads_as_the_same_schedules_and_a_broken_one_names_its_line(tmp_path):
    toml_file = schedule_file(tmp_path / "schedules.toml", "nightly", "b")
    yaml_file = tmp_path / "schedules.yaml"
    yaml_file.write_text("""
schedules:
  nightly:
    cron: "0 2 * * *"
    timezone: Europe/Berlin
    model: e1-1
    preset: white-studio
    params: {steps: 1, seed: 3}
    output: s3://b/edited
    keep_format: true
    source:
      prefix: s3://b/products/
      path: "products/{category*}/{sku}.jpg"
""")
    from_toml, from_yaml = load_schedules(Settings(), toml_file), load_schedules(Settings(), yaml_file)
    assert from_yaml["nightly"].model_dump() == from_toml["nightly"].model_dump()
    assert from_yaml["nightly"].next_fire(datetime.now(UTC)) is not None
    broken = tmp_path / "broken.yml"
    broken.write_text("schedules:\n  x:\n\tcron: '0 2 * * *'\n")  # a tab where YAML wants spaces
    with pytest.raises(ConfigError, match=r"schedules file .*broken\.yml: line 3, column 1: found character '\\t'"):
        load_schedules(Settings(), broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        "schedules:\n  x:\n    output: s3://b/o\n    preset: white-studio\n    revision: 2025-07-01\n"
        "    source: {prefix: 's3://b/p/'}\n"
    )
    with pytest.raises(ConfigError, match=r"wrong\.yaml: schedules\.x: revision: Input should be a valid string"):
        load_schedules(Settings(), wrong)


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("s3://b/products/", "s3://b/products/edited"),
        ("s3://b/products", "s3://b/products/"),
        ("s3://b/", "s3://b/edited"),
        ("s3://b", "s3://b/"),
    ],
)
def test_a_schedule_whose_output_is_inside_its_source_prefix_is_refused_naming_both(tmp_path, source, output):
    path = tmp_path / "s.toml"
    path.write_text(
        f'[schedules.loop]\npreset = "white-studio"\noutput = "{output}"\n'
        f'[schedules.loop.source]\nprefix = "{source}"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_schedules(Settings(), path)
    assert f"schedules.loop: output: {output.rstrip('/')} is inside source.prefix {source}:" in str(caught.value)


@pytest.mark.parametrize(
    "output", ["s3://b/products-edited", "s3://b/edited/products", "s3://other/products/edited", "s3://b"]
)
def test_an_output_beside_the_source_prefix_is_accepted(tmp_path, output):
    path = tmp_path / "s.toml"
    path.write_text(
        f'[schedules.ok]\npreset = "white-studio"\noutput = "{output}"\n'
        f'[schedules.ok.source]\nprefix = "s3://b/products/"\n'
    )
    assert load_schedules(Settings(), path)["ok"].output == output


def test_keep_format_gives_an_extensionless_image_the_extension_of_its_format_so_its_row_is_valid(
    s3_endpoint, bucket, tmp_path
):

    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="p/hats/cap", Body=photo(1, "png"), ContentType="image/png")
    s3.put_object(Bucket=bucket, Key="p/hats/beanie", Body=photo(2, "jpg"), ContentType="image/jpeg; charset=x")
    s3.put_object(Bucket=bucket, Key="p/hats/visor.WEBP", Body=photo(3, "webp"), ContentType="image/webp")
    found, skipped, plan = scan_once(
        tmp_path,
        s3_endpoint,
        bucket,
        "k",
        f'preset = "white-studio"\noutput = "s3://{bucket}/out"\nkeep_format = true\n',
    )
    assert skipped == []
    assert {c.key: (c.row["output_key"], c.row["output_format"]) for c in found} == {
        "p/hats/beanie": ("hats/beanie.jpg", "jpeg"),
        "p/hats/cap": ("hats/cap.png", "png"),
        "p/hats/visor.WEBP": ("hats/visor.WEBP", "webp"),
    }
    checker = RowChecker("e1-1", plan.defaults)
    for c in found:  # what submit will check: each output key's extension matches its format
        checked = checker.check(RawRow(1, c.row))
        assert checked.ok, checked.issues


# ---- retries and the run lock -------------------------------------------------------------------------


def test_a_fired_run_that_finds_the_schedule_running_retries_and_runs_once_the_lock_is_free(
    redis_server, s3_endpoint, bucket, start_worker, tmp_path
):
    from jobs import broker

    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="products/shoes/1.jpg", Body=photo(1, "jpg"), ContentType="image/jpeg")
    name = f"retry-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, bucket)
    redis_url = redis_server.url
    extra = {
        "DREAMBATCH_REDIS_URL": redis_url,
        "DREAMBATCH_CATALOG__SCHEDULES_FILE": str(schedules),
        "DREAMBATCH_CATALOG__RUN_RETRY_BASE": "0.4",
        "DREAMBATCH_CATALOG__RUN_RETRY_MAX": "0.8",
    }
    io_worker = start_worker("worker", "--io", **extra).wait_ready()
    settings = Settings(
        redis_url=redis_url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(schedules)),
    )
    state = ScheduleState.from_url(redis_url)
    lock = keys.SCHEDULE_RUNNING.format(name=name)
    assert state.hold_lock(lock, "another-run", 30)  # a run of this schedule is going on elsewhere

    slot = load_schedules(settings)[name].latest_slot(datetime.now(UTC)).isoformat()
    broker.make_celery(settings).send_task(keys.TASK_RUN_SCHEDULE, args=[name, slot], queue=keys.IO_QUEUE)
    failed = wait_until(
        lambda: (last := state.last_run(name)) and last.get("attempt", 0) >= 2 and last,
        30,
        0.1,
        what="two attempts that found the schedule running",
    )
    assert "another run is in progress" in failed["error"] and failed["retry_in"] == 0.8
    assert "attempt 1 failed: schedule " in io_worker.log.read_text() and "retrying in" in io_worker.log.read_text()
    assert state.r.get(lock) == "another-run"  # the waiting run never took it

    state.release_lock(lock, "another-run")
    done = wait_until(
        lambda: (last := state.last_run(name)) and "error" not in last and last,
        30,
        0.1,
        what="the run after the lock was freed",
    )
    assert (done["slot"], done["queued"]) == (slot, 1) and done["job_id"]
    assert state.r.get(lock) is None  # released at the end
    res = cli("schedules", "list", env=service_env(redis_url, s3_endpoint, tmp_path, **extra))
    assert f"job {done['job_id']}" in res.stdout, res.stdout + res.stderr


def test_a_crashed_runs_lock_expires_within_its_ttl_while_a_live_run_keeps_renewing_it(
    redis_server, s3_endpoint, bucket, tmp_path
):
    import sys
    import time

    from jobs.catalog.lock import RunInProgress

    name = f"lock-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, bucket)
    redis_url = redis_server.url
    settings = Settings(
        redis_url=redis_url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(schedules), run_lock_ttl=1.5),
    )
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom jobs.catalog.lock import RunLock\n"
            "from jobs.store import ScheduleState\n"
            f"with RunLock(ScheduleState.from_url({redis_url!r}), {name!r}, 'holder', 1.5):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        state, lock = ScheduleState.from_url(redis_url), keys.SCHEDULE_RUNNING.format(name=name)
        schedule = load_schedules(settings)[name]
        time.sleep(3.5)  # over twice its TTL: the live holder's thread renewed it
        assert state.r.get(lock) == "holder"
        with pytest.raises(RunInProgress, match=f"schedule {name}: another run is in progress"):
            run_schedule(schedule, Services(settings))
        holder.kill()  # crashed: the lock is not released, and nobody renews it
        holder.wait(10)
        assert 0 < state.r.pttl(lock) <= 1500  # at most one TTL left: it runs out, nobody renews it
        wait_until(lambda: state.r.get(lock) is None, 5, 0.05, what="the crashed holder's lock to expire")
        assert run_schedule(schedule, Services(settings)).images == 0
    finally:
        holder.kill()
        holder.wait(10)


def test_retries_back_off_stop_before_the_next_slot_and_an_unreachable_s3_is_retried(
    redis_server, s3_endpoint, tmp_path
):
    from services import free_port

    from jobs.catalog.run import retry_delay, run_fired

    name = f"s3down-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, "b")
    settings = Settings(
        redis_url=redis_server.url,
        s3=S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout=0.5),
        catalog=CatalogSettings(schedules_file=str(schedules), run_retry_base=30, run_retry_max=600, run_retries=5),
    )
    schedule = load_schedules(settings)[name]  # 02:00 Berlin daily
    slot = datetime(2026, 1, 10, 1, 0, tzinfo=UTC)  # 02:00 Berlin; the next slot is 24 h later
    just_after = slot + timedelta(minutes=1)
    assert [retry_delay(schedule, slot.isoformat(), n, settings, just_after) for n in range(1, 8)] == [
        30,
        60,
        120,
        240,
        480,
        None,
        None,
    ]  # doubling, capped by run_retries
    late = slot + timedelta(hours=23, minutes=58)  # 2 minutes before the next slot
    assert [retry_delay(schedule, slot.isoformat(), n, settings, late) for n in (1, 2, 3)] == [30, 60, None]
    assert retry_delay(schedule, slot.isoformat(), 1, settings, late + timedelta(seconds=100)) is None
    assert retry_delay(None, None, 5, settings) == 480  # a schedule that did not load: the count bounds it

    assert retry_delay(schedule, slot.isoformat(), 1, settings) is None  # a slot from long ago: its time is over

    # S3 unreachable (nothing listens on that port): a transient failure, retried; the last run says why
    by_hand = tmp_path / "by-hand.toml"
    by_hand.write_text(schedules.read_text().replace('cron = "0 2 * * *"\n', ""))
    settings.catalog.schedules_file = str(by_hand)
    services = Services(settings)
    fired = run_fired(name, services, slot=just_after.isoformat(), attempt=2)
    assert fired.retry_in == 60
    assert "Unreachable: cannot reach S3 for s3://b/edited (Could not connect" in fired.summary["error"]
    assert ScheduleState.from_url(settings.redis_url).last_run(name)["error"] == fired.summary["error"]
    settings.catalog.schedules_file = str(tmp_path / "missing.toml")
    assert run_fired(name, services, slot=just_after.isoformat()).retry_in is None  # a config error: not retried


# ---- the model revision -------------------------------------------------------------------------------


def new_weights(tiny: Path, to: Path) -> Path:
    """A copy of a tiny E1 folder with other weights: the last value of its edit transformer nudged."""
    shutil.copytree(tiny, to)
    weights = sorted((to / "transformer").glob("diffusion_pytorch_model*.safetensors"))[-1]  # its last shard
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the lowest bit of the last tensor's last value: a loadable, different model
    weights.write_bytes(bytes(data))
    return to


def test_the_weights_revision_is_the_hub_commit_or_a_digest_of_configs_and_weight_edges(
    tiny_dir, tmp_path, monkeypatch
):
    from services import fake_hub_snapshot

    from worker.runners.revision import weights_revision
    from worker.runners.tiny import ensure_tiny

    tiny = ensure_tiny("e1-1")
    local = weights_revision("e1-1", str(tiny))
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", local) and weights_revision("e1-1", "tiny") == local
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy, copy_function=shutil.copy)  # new paths, new mtimes, same bytes
    (copy / "README.md").write_text("notes\n")  # not a config or weight file
    assert weights_revision("e1-1", str(copy)) == local
    config = copy / "refine" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("{", '{"note": 1, ', 1))
    changed_config = weights_revision("e1-1", str(copy))
    other = new_weights(tiny, tmp_path / "other")
    assert len({local, changed_config, weights_revision("e1-1", str(other))}) == 3

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_snapshot(tmp_path / "hub", "HiDream-ai/HiDream-E1-1", tiny)
    assert (
        weights_revision("e1-1", None)
        == weights_revision("e1-1", "HiDream-ai/HiDream-E1-1")
        == "HiDream-ai/HiDream-E1-1@" + "0" * 40
    )


def test_new_weights_on_the_workers_re_run_every_image_once_then_nothing(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, tmp_path
):
    from worker.runners.revision import weights_revision
    from worker.runners.tiny import ensure_tiny

    s3 = s3_client(s3_endpoint)
    sources = {"products/shoes/1.jpg": photo(1, "jpg"), "products/bags/2.png": photo(2, "png")}
    for key, body in sources.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    name = f"rev-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "schedules.toml", name, bucket)
    redis_url = redis_server.url
    extra = {
        "DREAMBATCH_REDIS_URL": redis_url,
        "DREAMBATCH_CATALOG__SCHEDULES_FILE": str(schedules),
        "DREAMBATCH_CELERY__HEARTBEAT": "0.3",
    }
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, **extra)
    tiny = ensure_tiny("e1-1")
    before, after = weights_revision("e1-1", "tiny"), weights_revision("e1-1", str(new_weights(tiny, tmp_path / "w2")))
    assert before != after
    gpu = start_worker("worker", "--model", "e1-1", "--weights", "tiny", "--device", "cpu", **extra)
    start_worker("worker", "--io", **extra).wait_ready()
    gpu.wait_ready()
    settings = Settings(
        redis_url=redis_url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(schedules)),
    )
    services, store = Services(settings), RedisStore.from_url(redis_url)

    def run_now(**kwargs):
        return run_schedule(load_schedules(settings)[name], services, **kwargs)

    def live_revisions() -> list:
        return sorted(w.get("model_revision") for w in store.workers() if w["model"] == "e1-1")

    # the workers publish their weights' revision; every item records the revision it ran with
    assert wait_until(lambda: live_revisions() == [before], 10, 0.1, what="the heartbeat's revision")
    first = run_now()
    assert first.queued == 2 and first.model_revision == before
    wait_job(redis_url, first.job_id)
    for line in results(s3, bucket, first.job_id):
        assert line["model_revision"] == before
        record = s3.get_object(Bucket=bucket, Key=f"edited/{first.job_id}/items/{line['id']}.json")["Body"].read()
        assert json.loads(record)["model_revision"] == before
    again = run_now()
    assert (again.queued, again.unchanged) == (0, 2)
    ledger = stored_ledger(s3_endpoint, bucket, name)
    assert {e["model_revision"] for e in ledger.entries.values()} == {before}

    # the workers move to new weights: every image is changed once ("model revision changed"), then nothing
    gpu.kill()
    gpu = start_worker("worker", "--model", "e1-1", "--weights", str(tmp_path / "w2"), "--device", "cpu", **extra)
    gpu.wait_ready()
    assert wait_until(lambda: live_revisions() == [after], 10, 0.1, what="only the new weights' heartbeat")
    dry = run_cli("schedules", "run", name, "--dry-run", env=env)
    assert sorted(dry["changed"]) == sorted(sources) and dry["model_revision"] == after
    assert set(dry["reasons"].values()) == {f"model revision changed ({before} → {after})"}
    rerun = run_now()
    assert rerun.queued == 2 and sorted(rerun.changed) == sorted(sources)
    wait_job(redis_url, rerun.job_id)
    assert {line["model_revision"] for line in results(s3, bucket, rerun.job_id)} == {after}
    assert (run_now().queued, run_now().unchanged) == (0, 2)

    # the schedule's own `revision` label still counts: changing it re-runs everything (seen in a dry run)
    schedules.write_text(schedules.read_text().replace("keep_format = true", 'keep_format = true\nrevision = "v2"'))
    relabelled = run_now(dry_run=True)
    assert sorted(relabelled.changed) == sorted(sources)
    assert set(relabelled.reasons.values()) == {"changed (content, instruction or parameters)"}
    # with no live worker for the model, the revision is not compared, and the report says so
    gpu.kill()
    wait_until(lambda: live_revisions() == [], 10, 0.1, what="the heartbeat to expire")
    schedules.write_text(schedules.read_text().replace('revision = "v2"\n', ""))
    idle = run_now(dry_run=True)
    assert (idle.unchanged, idle.model_revision) == (2, None)
    assert idle.notes == ["no live e1-1 worker: the model revision is not compared this run"]


# ---- images that keep failing ---------------------------------------------------------------------------


def test_a_corrupt_upload_fails_once_is_reported_once_then_skipped_until_retried_or_re_uploaded(
    e1_workers, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="products/shoes/1.jpg", Body=photo(1, "jpg"), ContentType="image/jpeg")
    bad = "products/shoes/broken.jpg"
    s3.put_object(Bucket=bucket, Key=bad, Body=b"\xff\xd8 not really a JPEG", ContentType="image/jpeg")
    name = f"poison-{uuid.uuid4().hex[:6]}"
    nightly = Nightly(e1_workers, s3_endpoint, schedule_file(tmp_path / "s.toml", name, bucket), name)

    def status_of(job_id: str) -> dict:
        return {x["metadata"]["source_key"]: x["status"] for x in results(s3, bucket, job_id)}

    first = nightly.run()  # night 1: both run; the broken one fails, and says it is a damaged JPEG
    assert status_of(first.job_id) == {"products/shoes/1.jpg": "completed", bad: "failed"}
    [failed] = [x for x in results(s3, bucket, first.job_id) if x["status"] == "failed"]
    assert failed["error"].startswith("InputError: damaged JPEG"), failed["error"]
    second = nightly.run()  # night 2: reported once (alerts), not queued again: the same bytes fail the same way
    assert (second.job_id, second.queued, second.given_up, second.unchanged) == (None, 0, 1, 1)
    assert [a["key"] for a in second.alerts] == [bad] and "damaged JPEG" in second.alerts[0]["error"]
    [skip] = [s for s in second.skipped if s.key == bad]
    assert skip.reason.startswith(f"failed in job {first.job_id} with this image and these parameters (last error: ")
    assert skip.reason.endswith(f"or a run with: dreambatch schedules run {name} --retry-failed")
    third = nightly.run()  # night 3: still skipped, and not reported again
    assert (third.queued, third.given_up, third.alerts) == (0, 1, [])
    ledger = stored_ledger(s3_endpoint, bucket, name)
    assert ledger.failures[bad]["count"] == 1 and bad not in ledger.entries

    # --retry-failed queues it once more (it fails again: still skipped by a plain run afterwards)
    forced = run_cli("schedules", "run", name, "--retry-failed", env=nightly.env)
    assert (forced["queued"], forced["new"]) == (1, [bad])
    assert status_of(wait_job(e1_workers, forced["job_id"]).job_id) == {bad: "failed"}
    assert nightly.run().given_up == 1

    # the image is fixed (re-uploaded): a new fingerprint, processed, and the failures are forgotten
    s3.put_object(Bucket=bucket, Key=bad, Body=photo(7, "jpg"), ContentType="image/jpeg")
    fixed = nightly.run()
    assert (fixed.queued, fixed.reasons[bad]) == (1, "new") and status_of(fixed.job_id) == {bad: "completed"}
    after = nightly.run()
    assert (after.queued, after.unchanged, after.given_up) == (0, 2, 0)
    ledger = stored_ledger(s3_endpoint, bucket, name)
    assert ledger.failures == {} and bad in ledger.entries


# ---- incremental manifest sources -------------------------------------------------------------------------


def manifest_schedule(path: Path, name: str, bucket: str, manifest: str) -> Path:
    path.write_text(
        f'[schedules.{name}]\nmodel = "e1-1"\npreset = "white-studio"\nparams = {{ steps = 1 }}\n'
        f'output = "s3://{bucket}/out"\n[schedules.{name}.source]\nmanifest = "{manifest}"\n'
    )
    return path


def out_results(s3, bucket: str, job_id: str) -> dict[str, tuple[int, str]]:
    body = s3.get_object(Bucket=bucket, Key=f"out/{job_id}/results.jsonl")["Body"].read()
    return {x["id"]: (x["line"], x["status"]) for x in map(json.loads, body.decode().splitlines())}


def test_a_local_manifest_runs_incrementally_and_a_changed_row_or_image_re_runs_alone(
    e1_workers, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photo(1, "jpg"))
    (folder / "b.png").write_bytes(photo(2, "png"))
    s3.put_object(Bucket=bucket, Key="in/c.jpg", Body=photo(3, "jpg"))
    manifest = folder / "tonight.csv"
    rows = [
        "id,image,seed,sku",
        "a,a.jpg,1,A",
        "b,b.png,1,B",
        f"c,s3://{bucket}/in/c.jpg,1,C",
        ",a.jpg,2,D",
        "a,b.png,9,Z",
    ]  # the last row repeats an id: one ledger key, one row
    manifest.write_text("\n".join(rows) + "\n")
    name = f"local-{uuid.uuid4().hex[:6]}"
    nightly = Nightly(
        e1_workers, s3_endpoint, manifest_schedule(tmp_path / "s.toml", name, bucket, str(manifest)), name
    )

    first = nightly.run()
    assert (first.images, first.queued, sorted(first.new)) == (4, 4, ["5", "a", "b", "c"])
    assert [(x.key, x.reason) for x in first.skipped] == [
        ("line 6", "line 6: id: duplicate id; ids must be unique in a manifest (got 'a')")
    ]
    assert out_results(s3, bucket, first.job_id) == {
        "a": (2, "completed"),
        "b": (3, "completed"),
        "c": (4, "completed"),
        "5": (5, "completed"),
    }
    again = nightly.run()  # nothing changed: no job
    assert (again.job_id, again.queued, again.unchanged, again.folded) == (None, 0, 4, [first.job_id])

    (folder / "b.png").write_bytes(photo(20, "png"))  # a referenced local image replaced
    rows[1] = "a,a.jpg,7,A"  # one row changed (its seed)
    manifest.write_text("\n".join(rows) + "\n")
    dry = run_cli("schedules", "run", name, "--dry-run", env=nightly.env)
    assert (sorted(dry["changed"]), dry["new"], dry["unchanged"]) == (["a", "b"], [], 2)
    changed = nightly.run()
    assert out_results(s3, bucket, changed.job_id) == {"a": (2, "completed"), "b": (3, "completed")}
    s3.put_object(Bucket=bucket, Key="in/c.jpg", Body=photo(30, "jpg"))  # the S3 image of row c replaced
    only_c = nightly.run()
    assert (only_c.changed, only_c.unchanged) == (["c"], 3)
    assert out_results(s3, bucket, only_c.job_id) == {"c": (4, "completed")}
    assert nightly.run().queued == 0


def test_an_s3_manifest_runs_incrementally_and_url_images_use_their_etag_or_run_every_time(
    e1_workers, s3_endpoint, bucket, tmp_path
):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    served = {"/tagged.jpg": (photo(4, "jpg"), {"ETag": '"v1"'}), "/plain.jpg": (photo(5, "jpg"), {})}

    class Images(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802
            body, headers = served[self.path]
            self.send_response(200)
            for k, v in {"Content-Type": "image/jpeg", "Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            return body

        def do_GET(self):  # noqa: N802
            self.wfile.write(self.do_HEAD())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        s3 = s3_client(s3_endpoint)
        s3.put_object(Bucket=bucket, Key="in/x.jpg", Body=photo(1, "jpg"))
        lines = [
            {"id": "x", "image": f"s3://{bucket}/in/x.jpg", "seed": 1},
            {"id": "tagged", "image": f"{url}/tagged.jpg", "seed": 1},
            {"id": "plain", "image": f"{url}/plain.jpg", "seed": 1},
        ]

        def upload(rows):
            s3.put_object(Bucket=bucket, Key="manifests/m.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows))

        upload(lines)
        name = f"s3m-{uuid.uuid4().hex[:6]}"
        schedules = manifest_schedule(tmp_path / "s.toml", name, bucket, f"s3://{bucket}/manifests/m.jsonl")
        nightly = Nightly(e1_workers, s3_endpoint, schedules, name, allow_private_hosts="127.0.0.1")  # loopback

        first = nightly.run()
        assert out_results(s3, bucket, first.job_id) == {
            "x": (1, "completed"),
            "tagged": (2, "completed"),
            "plain": (3, "completed"),
        }
        second = nightly.run()  # the server gives no ETag or Last-Modified for plain.jpg: it runs every time
        plain = f"{url}/plain.jpg gives no ETag or Last-Modified: it runs every time"
        assert (second.changed, second.unchanged, second.reasons) == (["plain"], 2, {"plain": plain})
        assert second.notes == [f"row plain: {plain}"]
        served["/tagged.jpg"] = (photo(40, "jpg"), {"ETag": '"v2"'})  # a new image behind the same URL
        lines[0]["seed"] = 2  # and one row of the manifest changed
        upload(lines)
        third = nightly.run()
        assert sorted(third.changed) == ["plain", "tagged", "x"] and third.unchanged == 0
        fourth = nightly.run()
        assert (fourth.changed, fourth.unchanged) == (["plain"], 2)
    finally:
        server.shutdown()
        server.server_close()


# ---- layout, presets and templates ------------------------------------------------------------------------


def test_the_mirror_layout_without_keep_format_writes_png_keys_and_skips_a_second_source_of_one_key(
    e1_workers, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    for key, fmt in {
        "products/shoes/123.jpg": "jpg",
        "products/shoes/123.png": "png",
        "products/bags/7.webp": "webp",
    }.items():
        s3.put_object(Bucket=bucket, Key=key, Body=photo(len(key), fmt), ContentType=f"image/{fmt}")
    name = f"mirror-{uuid.uuid4().hex[:6]}"
    schedules = schedule_file(tmp_path / "s.toml", name, bucket)
    schedules.write_text(schedules.read_text().replace("keep_format = true\n", ""))  # the default: PNG outputs
    report = Nightly(e1_workers, s3_endpoint, schedules, name).run()
    assert sorted(report.new) == ["products/bags/7.webp", "products/shoes/123.jpg"]
    assert [(s.key, s.reason) for s in report.skipped] == [
        (
            "products/shoes/123.png",
            "its output shoes/123.png is also products/shoes/123.jpg's (set keep_format = true to keep both)",
        )
    ]
    lines = {x["metadata"]["source_key"]: x for x in results(s3, bucket, report.job_id)}
    assert {k: [i["s3_uri"] for i in x["output"]["images"]] for k, x in lines.items()} == {
        "products/shoes/123.jpg": [f"s3://{bucket}/edited/shoes/123.png"],
        "products/bags/7.webp": [f"s3://{bucket}/edited/bags/7.png"],
    }
    for key in ("edited/shoes/123.png", "edited/bags/7.png"):
        stored = s3.get_object(Bucket=bucket, Key=key)
        assert stored["ContentType"] == "image/png"
        assert Image.open(io.BytesIO(stored["Body"].read())).format == "PNG"


def test_a_change_that_renders_differently_for_some_images_re_runs_exactly_those(
    e1_workers, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    shades = {"a": ("red", "red"), "b": ("blue", "blue"), "c": ("blue", "navy")}  # {meta.color}, {meta.shade}
    for n, (stem, (color, shade)) in enumerate(shades.items()):
        s3.put_object(
            Bucket=bucket,
            Key=f"p/{stem}.jpg",
            Body=photo(n, "jpg"),
            ContentType="image/jpeg",
            Metadata={"color": color, "shade": shade},
        )
    name = f"subset-{uuid.uuid4().hex[:6]}"
    schedules = tmp_path / "s.toml"

    def instruction(text: str) -> None:
        schedules.write_text(
            f'[schedules.{name}]\ninstruction = "{text}"\nparams = {{ steps = 1 }}\n'
            f'output = "s3://{bucket}/out"\n[schedules.{name}.source]\nprefix = "s3://{bucket}/p/"\n'
        )

    instruction("Make the {meta.color} shoe {stem} pop on white")
    nightly = Nightly(e1_workers, s3_endpoint, schedules, name)
    assert nightly.run().queued == 3
    # a template change: only c renders differently ({meta.shade} is its {meta.color} for a and b)
    instruction("Make the {meta.shade} shoe {stem} pop on white")
    shade = nightly.run()
    assert (shade.changed, shade.unchanged) == (["p/c.jpg"], 2)
    # one object's metadata changed (same bytes, so the same ETag): only that image
    s3.copy_object(
        Bucket=bucket,
        Key="p/a.jpg",
        CopySource={"Bucket": bucket, "Key": "p/a.jpg"},
        Metadata={"color": "red", "shade": "crimson"},
        MetadataDirective="REPLACE",
        ContentType="image/jpeg",
    )
    meta = nightly.run()
    assert (meta.changed, meta.unchanged) == (["p/a.jpg"], 2)
    [line] = [
        json.loads(x)
        for x in s3.get_object(Bucket=bucket, Key=f"out/{meta.job_id}/rows.jsonl")["Body"].read().decode().splitlines()
    ]
    assert line["params"]["instruction"] == "Make the crimson shoe a pop on white"
    assert nightly.run().queued == 0  # and after that, nothing


def test_a_presets_file_from_the_environment_replaces_a_builtin_preset_and_adds_its_own(tmp_path, monkeypatch):
    mine = tmp_path / "my-presets.toml"
    mine.write_text(
        '[white-studio]\ndescription = "Our white"\ninstruction = "Put it on our house white"\n'
        "[white-studio.params]\nsteps = 12\n\n"
        '[marble]\ndescription = "A {stone} slab"\ninstruction = "Place the product on a {stone} slab"\n'
        '[marble.vars]\nstone = "white marble"\n'
    )
    env = {
        **service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1", tmp_path),
        "DREAMBATCH_CATALOG__PRESETS_FILE": str(mine),
    }
    listed = json.loads(cli("presets", "--json", env=env).stdout)
    assert listed["white-studio"]["instruction"] == "Put it on our house white"
    assert listed["white-studio"]["source"] == str(mine)
    assert listed["marble"]["vars"] == {"stone": "white marble"} and "flat-cutout" in listed  # ours stay too

    monkeypatch.setenv("DREAMBATCH_CATALOG__PRESETS_FILE", str(mine))
    settings = Settings()  # read from the environment, as every command does
    assert apply_preset("white-studio", {}, settings) == {"steps": 12, "instruction": "Put it on our house white"}
    assert apply_preset("marble", {"stone": "slate"}, settings)["instruction"] == "Place the product on a slate slab"
    photo_path = tmp_path / "shoe.jpg"
    photo_path.write_bytes(photo(1, "jpg"))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image\nshoe.jpg\n")
    checked = cli("validate", str(manifest), "--model", "e1-1", "--preset", "marble", "--json", env=env)
    assert checked.returncode == 0 and json.loads(checked.stdout)["valid"] == 1, checked.stderr


# ---- catalog hygiene: deleted products, excluded folders, corrupt and empty uploads -----------------------


def hygiene_schedule(path: Path, name: str, bucket: str, webhook: str) -> Path:
    path.write_text(
        f"""
[schedules.{name}]
model = "e1-1"
preset = "white-studio"
params = {{ steps = 1, seed = 3 }}
output = "s3://{bucket}/edited"
keep_format = true
webhook = "{webhook}"
on_deleted = "move"
move_deleted_to = "s3://{bucket}/attic"
[schedules.{name}.source]
prefix = "s3://{bucket}/products/"
exclude = ["_thumbs/", "*.tmp"]
"""
    )
    return path


def test_three_nights_report_a_deleted_product_move_its_outputs_skip_thumbs_and_alert_a_corrupt_upload_once(
    e1_workers, s3_endpoint, bucket, tmp_path, receiver
):
    s3 = s3_client(s3_endpoint)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    products = {
        "products/shoes/101.jpg": photo(1, "jpg"),
        "products/shoes/102.png": photo(2, "png"),
        "products/bags/201.webp": photo(3, "webp"),
    }
    for key, body in products.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    for key in ("products/shoes/_thumbs/101.jpg", "products/bags/_thumbs/201.jpg", "products/upload.tmp"):
        s3.put_object(Bucket=bucket, Key=key, Body=photo(9, "jpg"))
    bad, empty, gif = "products/shoes/broken.jpg", "products/hats/301.jpg", "products/bags/scan.gif"
    s3.put_object(Bucket=bucket, Key=bad, Body=b"\xff\xd8 not really a JPEG")
    s3.put_object(Bucket=bucket, Key=empty, Body=b"")
    s3.put_object(Bucket=bucket, Key=gif, Body=b"GIF89a....")
    name = f"hygiene-{uuid.uuid4().hex[:6]}"
    schedules = hygiene_schedule(tmp_path / "s.toml", name, bucket, receiver.url)
    nightly = Nightly(e1_workers, s3_endpoint, schedules, name, allow_private_hosts="127.0.0.1")

    def job_event(job_id: str) -> dict:
        def sent():
            return next(
                (
                    r["json"]
                    for r in receiver.delivered()
                    if r["json"].get("type", "").startswith("job.") and r["json"]["job_id"] == job_id
                ),
                None,
            )

        return wait_until(sent, 60, 0.2, what=f"job {job_id}'s webhook")

    def run_record(job_id: str) -> dict:
        return json.loads(s3.get_object(Bucket=bucket, Key=f"edited/_catalog/{name}/runs/{job_id}.json")["Body"].read())

    # night 1: three products and the corrupt upload run; thumbnails and the .tmp are left out, counted;
    # the empty object and the GIF are reported in the run record, the webhook and the sheet
    first = nightly.run()
    assert first.queued == 4 and first.excluded == {"_thumbs/": 2, "*.tmp": 1}
    assert not any("_thumbs" in s.key or s.key.endswith(".tmp") for s in first.skipped)
    kinds = {s.key: s.kind for s in first.skipped}
    assert (kinds[empty], kinds[gif]) == ("empty", "unsupported")
    record = run_record(first.job_id)
    assert {p["key"]: p["reason"] for p in record["problems"]} == {
        empty: "empty object (0 bytes)",
        gif: "unsupported image format .gif (JPEG, PNG and WebP are read)",
    }
    event = job_event(first.job_id)
    assert event["counts"]["failed"] == 1 and event["catalog"]["schedule"] == name
    assert {p["key"] for p in event["catalog"]["problems"]} == {empty, gif}
    assert (
        event["catalog"]["deleted"] == []
        and event["catalog"]["sheet"] == f"s3://{bucket}/edited/{first.job_id}/sheet.html"
    )
    with urllib.request.urlopen(event["catalog"]["sheet_url"], timeout=30) as resp:  # the sheet, from the link
        sheet = resp.read().decode()
    assert (
        f'<li data-key="{empty}"><b>{empty}</b>: empty object (0 bytes)</li>' in sheet and f'data-key="{gif}"' in sheet
    )
    [failed] = [x for x in results(s3, bucket, first.job_id) if x["status"] == "failed"]
    assert failed["error"].startswith("InputError: damaged JPEG"), failed["error"]
    # every edited object names the upload it was made from: its key, ETag and version
    for key in products:
        source = s3.head_object(Bucket=bucket, Key=key)
        edited = s3.head_object(Bucket=bucket, Key=f"edited/{key.removeprefix('products/')}")["Metadata"]
        assert edited["source-key"] == key and edited["source-etag"] == source["ETag"].strip('"')
        assert edited["source-version"] == source["VersionId"]

    # night 2: a product was deleted and one re-shot: the deletion is in the run record, the job webhook and
    # `schedules list`, its output moved to the attic; the corrupt upload is reported (once) and not re-run
    s3.delete_object(Bucket=bucket, Key="products/bags/201.webp")
    s3.put_object(Bucket=bucket, Key="products/shoes/102.png", Body=photo(22, "png"))
    dry = run_cli("schedules", "run", name, "--dry-run", env=nightly.env)  # says what it would do, does nothing
    assert [(d["key"], d["action"]) for d in dry["deleted"]] == [("products/bags/201.webp", "would be moved")]
    assert s3.head_object(Bucket=bucket, Key="edited/bags/201.webp")["ContentType"] == "image/webp"
    second = nightly.run()
    assert (second.queued, second.changed, second.given_up) == (1, ["products/shoes/102.png"], 1)
    assert [a["key"] for a in second.alerts] == [bad]
    [gone] = second.deleted
    assert (gone["key"], gone["why"], gone["action"]) == ("products/bags/201.webp", "deleted from the source", "moved")
    assert gone["outputs"] == [f"s3://{bucket}/edited/bags/201.webp"]
    assert gone["moved_to"] == [f"s3://{bucket}/attic/bags/201.webp"]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="edited/bags/").get("Contents", [])
    assert listed == []
    moved = s3.head_object(Bucket=bucket, Key="attic/bags/201.webp")
    assert moved["ContentType"] == "image/webp" and moved["Metadata"]["source-key"] == "products/bags/201.webp"
    record = run_record(second.job_id)
    assert [d["key"] for d in record["deleted"]] == ["products/bags/201.webp"]
    assert [a["key"] for a in record["alerts"]] == [bad]
    event = job_event(second.job_id)
    assert [d["key"] for d in event["catalog"]["deleted"]] == ["products/bags/201.webp"]
    assert [a["key"] for a in event["catalog"]["alerts"]] == [bad] and event["catalog"]["schedule"] == name
    [row] = [s for s in run_cli("schedules", "list", env=nightly.env) if s["name"] == name]
    assert row["last_run"]["deleted_keys"] == ["products/bags/201.webp"] and row["last_run"]["alerts"] == [bad]
    text = cli("schedules", "list", env=nightly.env)
    assert "1 deleted from the source (outputs moved: products/bags/201.webp)" in text.stdout, text.stdout
    assert f"1 failed for the first time ({bad})" in text.stdout

    # night 3: nothing changed: no job, nothing deleted, the corrupt upload skipped without a second alert
    third = nightly.run()
    assert (third.job_id, third.queued, third.deleted, third.alerts, third.given_up) == (None, 0, [], [], 1)
    assert third.excluded == {"_thumbs/": 2, "*.tmp": 1} and third.unchanged == 2
    [row] = [s for s in run_cli("schedules", "list", env=nightly.env) if s["name"] == name]
    assert (row["last_run"]["deleted"], row["last_run"]["alerts"]) == (0, [])
    alerted = [r for r in receiver.delivered() if r["json"].get("catalog", {}).get("alerts")]
    assert len(alerted) == 1  # one job webhook across three nights said the upload is corrupt
    ledger = stored_ledger(s3_endpoint, bucket, name)
    assert sorted(ledger.entries) == ["products/shoes/101.jpg", "products/shoes/102.png"]


@pytest.mark.parametrize(
    ("rel", "pattern"),
    [
        ("shoes/_thumbs/101.jpg", "_thumbs/"),
        ("_thumbs/101.jpg", "_thumbs/"),
        ("bags/old/2019/7.jpg", "bags/old/"),
        ("upload.tmp", "*.tmp"),
        ("shoes/upload.tmp", "*.tmp"),
        ("shoes/draft-101.jpg", "**/draft-*"),
        ("shoes/101.jpg", None),
        ("shoes/_thumbs.jpg", None),  # a file named like the folder is not in it
        ("old/bags/7.jpg", None),  # bags/old/ is that folder below the prefix, not any folder named old
    ],
)
def test_source_excludes_match_folders_at_any_depth_a_folder_path_and_globs(rel, pattern):
    from jobs.catalog.scan import excluded_by

    assert excluded_by(rel, ["_thumbs/", "bags/old/", "*.tmp", "**/draft-*"]) == pattern


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ('on_deleted = "move"', "on_deleted = 'move' needs move_deleted_to = 's3://bucket/prefix'"),
        ('move_deleted_to = "s3://b/attic"', "move_deleted_to is set but on_deleted is 'keep'"),
        ('on_deleted = "move"\nmove_deleted_to = "s3://b/products/attic"', "is inside source.prefix"),
        ('on_deleted = "wipe"', "on_deleted: Input should be 'keep', 'delete' or 'move'"),
    ],
)
def test_a_schedule_whose_deleted_outputs_have_nowhere_to_go_is_refused_naming_the_field(tmp_path, fields, message):
    path = tmp_path / "s.toml"
    path.write_text(
        f'[schedules.x]\npreset = "white-studio"\noutput = "s3://b/edited"\n{fields}\n'
        '[schedules.x.source]\nprefix = "s3://b/products/"\n'
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_schedules(Settings(), path)


def test_an_exclude_that_leaves_out_everything_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        '[schedules.x]\npreset = "white-studio"\noutput = "s3://b/edited"\n'
        '[schedules.x.source]\nprefix = "s3://b/products/"\nexclude = ["_thumbs/", "**"]\n'
    )
    with pytest.raises(
        ConfigError, match=re.escape("schedules.x: source.exclude: entry 2, '**': would leave out every object")
    ):
        load_schedules(Settings(), path)


def test_the_ledger_saves_only_what_changed_and_compacts_into_a_snapshot_that_loads_the_same(tmp_path, monkeypatch):
    from jobs.catalog import ledger as ledger_module

    objects = LocalStore(str(tmp_path))

    def completed(job_id: str, n: int) -> dict:
        return {"status": "completed", "output": {"images": [{"s3_uri": f"s3://b/edited/{n}.jpg"}]}}

    ledger = Ledger.load(objects, "n")
    for n in range(200):
        ledger.record(f"k{n}", f"fp{n}", "J1", completed("J1", n))
    ledger.save(objects, "n")  # the first save: larger than a quarter of no snapshot: a snapshot
    snapshot = (tmp_path / "_catalog/n/ledger.json").stat().st_size
    assert ledger.written == snapshot and not (tmp_path / "_catalog/n/ledger").exists()

    again = Ledger.load(objects, "n")  # nothing changed: nothing written
    again.save(objects, "n")
    assert again.written == 0
    again.record("k7", "fp7b", "J2", completed("J2", 7))
    again.forget("k9")
    again.pending = ["J3"]
    again.save(objects, "n")  # two keys and the pending list: one small delta, the snapshot untouched
    [delta] = sorted((tmp_path / "_catalog/n/ledger").iterdir())
    assert delta.name == "0000000001.json" and again.written == delta.stat().st_size < snapshot / 20
    assert (tmp_path / "_catalog/n/ledger.json").stat().st_size == snapshot
    loaded = Ledger.load(objects, "n")
    assert loaded.entries == again.entries and loaded.pending == ["J3"] and "k9" not in loaded.entries
    assert loaded.entries["k7"]["fp"] == "fp7b" and loaded.seq == 1

    monkeypatch.setattr(ledger_module, "COMPACT_AFTER_DELTAS", 2)
    for n in (2, 3):  # the third delta would pass the limit: the save writes a snapshot and deletes the deltas
        loaded.record(f"k{n}", f"fp{n}-{n}", f"J{n}", completed(f"J{n}", n))
        loaded.save(objects, "n")
    assert list((tmp_path / "_catalog/n").glob("ledger/*")) == []
    compacted = Ledger.load(objects, "n")
    assert compacted.entries == loaded.entries and compacted.seq == 2 and compacted.deltas == []
    assert json.loads((tmp_path / "_catalog/n/ledger.json").read_bytes())["seq"] == 2


def test_a_source_emptied_at_once_holds_back_deleting_outputs_until_a_run_confirms_it(
    redis_server, s3_endpoint, bucket, tmp_path
):
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="products/README.txt", Body=b"notes")  # every product image is gone
    name = f"emptied-{uuid.uuid4().hex[:6]}"
    path = tmp_path / "s.toml"
    path.write_text(
        f'[schedules.{name}]\npreset = "white-studio"\noutput = "s3://{bucket}/edited"\non_deleted = "delete"\n'
        f'[schedules.{name}.source]\nprefix = "s3://{bucket}/products/"\n'
    )
    settings = Settings(
        redis_url=redis_server.url,
        s3=S3Settings(endpoint_url=s3_endpoint),
        catalog=CatalogSettings(schedules_file=str(path)),
    )
    services = Services(settings)
    output = services.objects(f"s3://{bucket}/edited")
    ledger = Ledger()
    for n in range(12):  # twelve images edited by an earlier run
        s3.put_object(Bucket=bucket, Key=f"edited/shoes/{n}.png", Body=photo(n, "png"))
        line = {"status": "completed", "output": {"images": [{"s3_uri": f"s3://{bucket}/edited/shoes/{n}.png"}]}}
        ledger.record(f"products/shoes/{n}.png", f"fp{n}", "J0", line)
    ledger.save(output, name)
    schedule = load_schedules(settings)[name]

    held = run_schedule(schedule, services)
    assert len(held.deleted) == 12 and {d["action"] for d in held.deleted} == {"held back"}
    assert any("--confirm-deleted" in note and "12 of 12 edited images" in note for note in held.notes)
    assert len(s3.list_objects_v2(Bucket=bucket, Prefix="edited/shoes/")["Contents"]) == 12
    assert len(Ledger.load(output, name).entries) == 12  # still held: reported again next run
    assert len(run_schedule(schedule, services).deleted) == 12

    confirmed = run_schedule(schedule, services, confirm_deleted=True)
    assert {d["action"] for d in confirmed.deleted} == {"deleted"}
    assert s3.list_objects_v2(Bucket=bucket, Prefix="edited/shoes/").get("Contents", []) == []
    assert Ledger.load(output, name).entries == {} and run_schedule(schedule, services).deleted == []
