"""The review page (`dreambatch api` at /ui/) in a real headless chromium against the real API, an I/O worker and an
e1-1 worker on tiny weights: the key entered once, a job's progress moving, the before/after grid filling with
images the API serves, a failed row showing its reason, one queued item cancelled and one failed item retried from
the page; a screenshot checked. Beside it: the per-item routes over HTTP, and the static sheet's headings."""

from __future__ import annotations

import io
import json
import uuid

import httpx
import numpy as np
import pytest
from browser import CHROMIUM, Browser
from PIL import Image
from services import ApiServer, Worker, s3_client, service_env, wait_until

from jobs.models import JobRecord
from jobs.settings import Settings

pytestmark = [
    pytest.mark.timeout(400),
    pytest.mark.skipif(not __import__("os").path.exists(CHROMIUM), reason="needs chromium (apt-get install chromium)"),
]
REDIS_DB = 12  # its own: test_catalog.py keeps 11
BROKEN = b"\x89PNG\r\n\x1a\n not really a picture"


def png(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    image = Image.new("RGB", size, "white")
    image.paste(color, (16, 8, 60, 48))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class Stack:
    """The API and an I/O worker, started with the module; the e1-1 worker when a test first asks for it."""

    def __init__(self, redis_url: str, s3_endpoint: str, tiny_dir, logs):
        self.bucket = f"t-review-{uuid.uuid4().hex[:8]}"
        self.s3 = s3_client(s3_endpoint)
        self.s3.create_bucket(Bucket=self.bucket)
        self.env = service_env(redis_url, s3_endpoint, tiny_dir)
        self.logs = logs
        self.workers = [Worker(["worker", "--io"], self.env, logs / "io.log")]
        self.api = ApiServer(
            Settings(redis_url=redis_url, output=f"s3://{self.bucket}/out", s3={"endpoint_url": s3_endpoint})
        )
        self.token = self.api.key("jobs:read", "jobs:write")
        self.http = httpx.Client(base_url=self.api.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=60)
        self.e1: Worker | None = None

    def start_e1(self) -> None:
        if self.e1 is None:
            tiny = ["--weights", "tiny", "--device", "cpu", "--concurrency", "1"]
            self.e1 = Worker(["worker", "--model", "e1-1", *tiny], self.env, self.logs / "e1.log")
            self.workers.append(self.e1)
        self.e1.wait_ready(300)

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="image/png")
        return f"s3://{self.bucket}/{key}"

    def submit(self, rows: list[dict]) -> str:
        res = self.http.post(
            "/v1/jobs", json={"model": "e1-1", "rows": rows, "defaults": {"steps": 1, "refine_strength": 0}}
        )
        assert res.status_code == 201, res.text
        return res.json()["id"]

    def close(self) -> None:
        self.http.close()
        self.api.stop()
        for w in self.workers:
            w.kill()


@pytest.fixture(scope="module")
def stack(redis_server, s3_endpoint, tiny_dir, tmp_path_factory):
    s = Stack(redis_server.database(REDIS_DB), s3_endpoint, tiny_dir, tmp_path_factory.mktemp("review"))
    try:
        s.workers[0].wait_ready()
        yield s
    finally:
        s.close()


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def card(field: str, item_id: str) -> str:
    """A script reading one card of the grid."""
    return f"document.querySelector('section.card[data-id={json.dumps(item_id)}]')?.{field}"


def test_review_page_watches_a_job_fill_its_grid_and_retries_one_failed_item(stack, browser, tmp_path):
    # four edits: two good, one whose input is not a picture (it fails), one the page cancels while it waits
    rows = [
        {"id": "a", "image": stack.put("in/a.png", png((200, 0, 0))), "instruction": "blue", "sku": "SKU-A"},
        {"id": "b", "image": stack.put("in/b.png", png((0, 160, 0))), "instruction": "blue", "sku": "SKU-B"},
        {"id": "c", "image": stack.put("in/c.png", BROKEN), "instruction": "blue", "sku": "SKU-C"},
        {"id": "d", "image": stack.put("in/d.png", png((0, 0, 200))), "instruction": "blue", "source_etag": "e-9f"},
    ]
    job_id = stack.submit(rows)  # no e1-1 worker yet: every item waits, queued

    # 1. the key, entered once: kept in the tab's sessionStorage, never in the URL
    browser.open(f"{stack.api.url}/ui/")
    browser.wait("!document.getElementById('login').hidden", 30, "the key form")
    browser.js(
        f"document.getElementById('key').value = {json.dumps(stack.token)};"
        "document.querySelector('#login button').click()"
    )
    browser.wait(f"!!document.querySelector('tr[data-id={json.dumps(job_id)}]')", 30, "the job in the jobs list")
    assert browser.js("sessionStorage.getItem('dreambatch.key')") == stack.token
    assert stack.token not in browser.js("location.href")
    listed = browser.js(f"document.querySelector('tr[data-id={json.dumps(job_id)}]').innerText")
    assert "0/4 ended" in listed and "4 queued" in listed and "no live worker" in listed, listed

    # 2. the job's page: four cards, each headed by the row's own name (its sku, else its row id), no etag
    browser.js(f"document.querySelector('tr[data-id={json.dumps(job_id)}] a').click()")
    browser.wait("document.querySelectorAll('#grid section.card').length === 4", 30, "the job's grid")
    names = browser.js("[...document.querySelectorAll('#grid h2.name')].map(h => h.textContent)")
    assert names == ["SKU-A", "SKU-B", "SKU-C", "d"]
    assert "etag" not in browser.js("document.getElementById('grid').innerText").lower()

    # 3. one queued item cancelled from its card: it ends at once, the rest wait on
    browser.js(card("querySelector('button.cancel').click()", "d"))
    browser.wait(f"{card('dataset.status', 'd')} === 'cancelled'", 30, "the cancelled card")
    assert "cancelled" in browser.js(card("querySelector('.reason').textContent", "d"))
    seen = {browser.wait("document.getElementById('job-summary').textContent.match(/\\d+\\/4 ended/)?.[0]", 30, "")}
    assert seen == {"1/4 ended"}

    # 4. a worker comes: the progress moves and the grid fills
    stack.start_e1()

    def ended_all():
        seen.add(browser.js("document.getElementById('job-summary').textContent.match(/\\d+\\/4 ended/)?.[0]"))
        return "4/4 ended" in seen

    wait_until(ended_all, 180, 0.25, what="the page to show every item ended")
    assert {"1/4 ended", "4/4 ended"} <= seen
    loaded = "[...document.querySelectorAll('#grid img')].filter(i => i.complete && i.naturalWidth > 0).length"
    browser.wait(f"{loaded} === 5", 60, "the pictures")  # a, b: before and after; d: before; c's input is none
    for item_id in ("a", "b"):
        assert browser.js(card("dataset.status", item_id)) == "completed"
        srcs = browser.js(card("querySelectorAll('img').length", item_id))
        assert srcs == 2 and browser.js(card("querySelector('img.after').src.startsWith('blob:')", item_id))
    assert "s3://" not in browser.js("document.documentElement.outerHTML")

    # 5. the failed row shows its reason, the one the API gives; its retry button runs it again
    failed = stack.http.get(f"/v1/jobs/{job_id}/items", params={"status": "failed"}).json()["data"]
    assert [i["id"] for i in failed] == ["c"] and failed[0]["error"]
    assert browser.js(card("querySelector('.reason').textContent", "c")) == failed[0]["error"]
    stack.put("in/c.png", png((120, 0, 120)))  # the input fixed in place
    browser.js(card("querySelector('button.retry').click()", "c"))
    browser.wait(
        f"{card('dataset.status', 'c')} === 'completed' && {card('dataset.attempts', 'c')} === '2'",
        120,
        "the retried item to complete",
    )
    retried_output = card("querySelector('img.after')?.naturalWidth", "c")
    browser.wait(f"{retried_output} > 0", 60, "the retried item's output")
    item = {i["id"]: i for i in stack.http.get(f"/v1/jobs/{job_id}/items").json()["data"]}["c"]
    assert item["status"] == "completed" and item["attempts"] == 2
    assert stack.http.get(f"/v1/jobs/{job_id}").json()["round"] == 1

    # 6. the screenshot: pictures drawn, the grid in the DOM
    shot = Image.open(io.BytesIO(browser.screenshot()))
    shot.save(tmp_path / "review.png")  # (kept in pytest's tmp folder, to look at)
    assert shot.size == (1280, 1000) and np.asarray(shot.convert("L")).std() > 10
    dom = browser.js("document.documentElement.outerHTML")
    assert dom.count('<section class="card completed"') == 3 and dom.count('<section class="card cancelled"') == 1


def test_item_routes_cancel_retry_and_serve_images_with_the_api_key(stack):
    stack.start_e1()
    good = png((10, 90, 200))
    job_id = stack.submit([{"id": "ok", "image": stack.put("in/ok.png", good), "instruction": "red"}])
    http = stack.http
    wait_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["finished_at"], 120, 0.2, what="the job to end")
    base = f"/v1/jobs/{job_id}/items/ok"

    # images: through the API with the key, never without it
    res = http.get(f"{base}/input")
    assert res.status_code == 200 and res.headers["content-type"] == "image/png" and res.content == good
    out = http.get(f"{base}/output/0")
    assert out.status_code == 200 and Image.open(io.BytesIO(out.content)).size == (96, 64)
    assert httpx.get(f"{stack.api.url}{base}/input").status_code == 401
    missing = http.get(f"{base}/output/3")
    assert missing.status_code == 404 and "has no output 3 (it has 1)" in missing.json()["error"]["message"]

    # control: an item that ended otherwise cannot be cancelled nor retried; an unknown one is a 404
    cancel = http.post(f"{base}/cancel")
    assert cancel.status_code == 409 and "already ended completed" in cancel.json()["error"]["message"]
    retry = http.post(f"{base}/retry")
    assert retry.status_code == 409
    assert "not a failed item that ran (it is completed)" in retry.json()["error"]["message"]
    unknown = http.post(f"/v1/jobs/{job_id}/items/nope/retry")
    assert unknown.status_code == 404 and "no item 'nope'" in unknown.json()["error"]["message"]

    # a running item cancelled alone stops at its next step; the job's other item runs on and completes
    rows = [
        {"id": "long", "image": stack.put("in/long.png", good), "instruction": "red", "steps": 150},
        {"id": "next", "image": stack.put("in/next.png", good), "instruction": "red"},
    ]
    job_id = stack.submit(rows)
    wait_until(lambda: stack.api.app.state.services.store.step_of(job_id, "long"), 120, 0.1, what="a step of long")
    stop = http.post(f"/v1/jobs/{job_id}/items/long/cancel")
    assert stop.status_code == 200 and stop.json()["status"] == "running", stop.text
    ended = wait_until(
        lambda: (s := http.get(f"/v1/jobs/{job_id}").json())["finished_at"] and s, 120, 0.2, what="the job to end"
    )
    assert ended["counts"]["cancelled"] == 1 and ended["counts"]["completed"] == 1 and not ended["cancel_requested"]
    items = {i["id"]: i for i in http.get(f"/v1/jobs/{job_id}/items").json()["data"]}
    assert items["long"]["status"] == "cancelled" and items["long"]["reason"] == "cancelled"
    assert items["long"]["output"]["images"] == [] and items["next"]["status"] == "completed"


def test_one_failed_item_is_not_retried_while_its_job_is_being_cancelled(stack):
    stack.start_e1()
    http, store = stack.http, stack.api.app.state.services.store
    job_id = stack.submit(
        [
            {"id": "bad", "image": stack.put("in/bad.png", BROKEN), "instruction": "red"},
            {"id": "long", "image": stack.put("in/long2.png", png((9, 9, 9))), "instruction": "red", "steps": 150},
        ]
    )
    wait_until(lambda: store.step_of(job_id, "long"), 120, 0.1, what="bad to fail and long to run")
    assert http.post(f"/v1/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    refused = http.post(f"/v1/jobs/{job_id}/items/bad/retry")
    assert refused.status_code == 409 and "is being cancelled" in refused.json()["error"]["message"]
    ended = wait_until(lambda: (s := http.get(f"/v1/jobs/{job_id}").json())["finished_at"] and s, 120, 0.2, what="end")
    assert ended["status"] == "cancelled" and ended["counts"]["failed"] == 1
    again = http.post(f"/v1/jobs/{job_id}/items/bad/retry")  # once the job has ended, it may run again
    assert again.status_code == 200 and again.json()["status"] in ("queued", "running", "failed"), again.text
    bad = wait_until(
        lambda: (i := store.get_item(job_id, "bad")) and i.attempts == 2 and i.status == "failed" and i,
        120,
        0.2,
        what="bad's second run",
    )
    assert bad.round == 1


def test_the_page_is_served_with_a_strict_policy_and_holds_no_data(stack):
    page = httpx.get(f"{stack.api.url}/ui/")  # no key: the page is public, its data is not
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"] and 'id="login"' in page.text
    assert httpx.get(f"{stack.api.url}/ui", follow_redirects=True).url.path == "/ui/"
    script = httpx.get(f"{stack.api.url}/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript") and "sessionStorage" in script.text
    missing = httpx.get(f"{stack.api.url}/ui/secrets.env")
    assert missing.status_code == 404 and "the review page is /ui/" in missing.json()["error"]["message"]
    assert httpx.get(f"{stack.api.url}/v1/jobs").status_code == 401


def test_static_sheet_heads_each_card_with_the_rows_name_and_a_scheduled_run_with_its_schedule():
    from worker.contact_sheet import Pair, render_html, render_png

    at = "2026-11-30T02:00:00+00:00"
    job = JobRecord(job_id="J1", model="e1-1", output="s3://b/o", created_at=at, updated_at=at, schedule="nightly")
    scanned = {"sku": "SKU-1", "source_key": "in/a.jpg", "source_etag": "e1"}
    pairs = [
        Pair("k1", 2, "completed", scanned, None, None, None),
        Pair("k2", 3, "failed", {"source_key": "in/shoes/b.jpg", "source_etag": "e2"}, "InputError: no", None, None),
        Pair("7", 4, "completed", {"colour": "red"}, None, None, None),
    ]
    page = render_html(job, pairs, 1, 1)
    assert "<h1>nightly · 2026-11-30 — review (e1-1)</h1>" in page and "job J1" in page
    heads = [h.split("</h2>")[0] for h in page.split('<h2 class="name">')[1:]]
    assert heads == ["SKU-1", "in/shoes/b.jpg", "7"]
    assert "etag" not in page and "source_key: in/a.jpg" in page and "colour: red" in page
    assert "<b>k1</b>" not in page and "InputError: no" in page
    by_hand = render_html(job.model_copy(update={"schedule": None}), pairs, 1, 1)
    assert "<h1>J1 — review (e1-1)</h1>" in by_hand
    assert Image.open(io.BytesIO(render_png(pairs))).size[0] > 0
