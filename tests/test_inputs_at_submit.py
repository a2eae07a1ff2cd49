"""Edit rows' input images are checked at `validate` and `submit`, before any GPU time: local files and data URIs by
their header, `s3://` objects by a HEAD, URLs fetched through the address guard (and staged, so the worker reads
that copy). Real processes: the CLI, moto's S3 server over HTTP, redis-server, a loopback image server."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from services import cli, s3_client, service_env

from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(240)


def png(width: int = 40, height: int = 30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def huge_header_png() -> bytes:
    """A PNG whose header claims 100000×100000 pixels, with no pixel data behind it: the header alone refuses it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


class ImageServer:
    """Serves fixed bodies on 127.0.0.2 (a private address only the allow-list lets through); records each GET."""

    def __init__(self, files: dict[str, bytes]):
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.base = f"http://127.0.0.2:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def images():
    server = ImageServer({"/ok.png": png(48, 32), "/notes.png": b"not an image at all\n"})
    yield server
    server.close()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def edit_rows(folder: Path, bucket: str, images: ImageServer) -> list[dict]:
    """One good and one bad input of every kind, in this order (lines 1-10)."""
    (folder / "good.png").write_bytes(png())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8)
    (folder / "huge.png").write_bytes(huge_header_png())
    refs = [
        ("good", "good.png"),
        ("corrupt", "corrupt.png"),
        ("huge", "huge.png"),
        ("inline", "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()),
        ("tiny-uri", "data:image/png;base64,AAAA"),  # 3 bytes: no image
        ("in-s3", f"s3://{bucket}/in/ok.png"),
        ("missing-s3", f"s3://{bucket}/in/missing.png"),
        ("fetched", f"{images.base}/ok.png"),
        ("not-image", f"{images.base}/notes.png"),
        ("private", "https://127.0.0.1:9/x.png"),  # the guard refuses it before any connection
    ]
    return [{"id": i, "image": ref, "instruction": "make it blue"} for i, ref in refs]


BAD = {
    "corrupt": "line 2: image: damaged PNG",
    "huge": "line 3: image: image too large",
    "tiny-uri": "line 5: image: not a JPEG, PNG or WebP image",
    "missing-s3": "line 7: image: s3://",
    "not-image": "line 9: image: not a JPEG, PNG or WebP image",
    "private": "line 10: image: 'https://127.0.0.1:9/x.png': 127.0.0.1 resolves to 127.0.0.1",
}
REMOTE = {"missing-s3", "not-image", "private"}


@pytest.fixture
def setup(s3_endpoint, redis_server, bucket, tiny_dir, images, tmp_path):
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="in/ok.png", Body=png(20, 20))
    manifest = write_jsonl(tmp_path / "edits.jsonl", edit_rows(tmp_path, bucket, images))
    env = service_env(redis_server.url, s3_endpoint, tiny_dir, DREAMBATCH_ALLOW_PRIVATE_HOSTS="127.0.0.2")
    return manifest, env


def test_validate_names_every_bad_input_image_by_line_before_any_gpu_time(setup, images):
    manifest, env = setup
    res = cli("validate", str(manifest), "--model", "e1-1", "--json", env=env)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    report = json.loads(res.stdout)
    assert (report["rows"], report["valid"]) == (10, 4)
    assert len(report["errors"]) == len(BAD)
    for error, expected in zip(report["errors"], BAD.values(), strict=True):
        assert error.startswith(expected), (error, expected)
    assert "no such object" in report["errors"][3] and "DREAMBATCH_ALLOW_PRIVATE_HOSTS" in report["errors"][5]
    assert sorted(images.requests) == ["/notes.png", "/ok.png"]  # fetched with the caps; 127.0.0.1 never reached


def test_no_remote_checks_leaves_s3_and_urls_to_the_worker_and_says_so(setup, images):
    manifest, env = setup
    res = cli("validate", str(manifest), "--model", "e1-1", "--json", "--no-remote-checks", env=env)
    report = json.loads(res.stdout)
    assert [e.split(":")[0] for e in report["errors"]] == [BAD[i].split(":")[0] for i in BAD if i not in REMOTE]
    assert report["notes"] == [
        "5 input image(s) not checked before queueing (remote checks are off (--no-remote-checks)); "
        "the worker checks them"
    ]
    assert images.requests == []
    # the setting says the same for every submission of a deployment
    off = cli(
        "validate", str(manifest), "--model", "e1-1", "--json", env={**env, "DREAMBATCH_INPUTS__CHECK_REMOTE": "0"}
    )
    assert json.loads(off.stdout)["errors"] == report["errors"] and images.requests == []


def test_when_the_check_budget_is_spent_the_rest_is_left_to_the_worker(setup, images):
    manifest, env = setup
    res = cli(
        "validate",
        str(manifest),
        "--model",
        "e1-1",
        "--json",
        env={**env, "DREAMBATCH_INPUTS__CHECK_BUDGET_S": "0.001"},
    )
    report = json.loads(res.stdout)
    assert [e.split(":")[0] for e in report["errors"]] == [BAD[i].split(":")[0] for i in BAD if i not in REMOTE]
    assert report["notes"] == [
        "5 input image(s) not checked before queueing (the 0.001s check budget ran out); the worker checks them"
    ]
    assert images.requests == []


def test_submit_refuses_bad_images_and_skip_invalid_makes_them_failed_items(setup, images, redis_server, bucket):
    manifest, env = setup
    refused = cli("submit", str(manifest), "--model", "e1-1", "--output", f"s3://{bucket}/o", env=env)
    assert refused.returncode == 2 and "nothing was queued" in refused.stderr and "Traceback" not in refused.stderr
    assert BAD["private"] in refused.stderr
    images.requests.clear()

    res = cli(
        "submit", str(manifest), "--model", "e1-1", "--output", f"s3://{bucket}/o", "--skip-invalid", "--json", env=env
    )
    assert res.returncode == 0, res.stderr
    sub = json.loads(res.stdout)
    assert (sub["total"], sub["queued"], sub["rejected"]) == (10, 4, 6)
    store = RedisStore.from_url(redis_server.url)
    items = {i.item_id: i for i in store.items(sub["job_id"])}
    assert len(items) == 10
    for item_id, expected in BAD.items():
        assert items[item_id].status == "failed" and items[item_id].error.startswith(f"invalid row: {expected}")
    # the URL was fetched once, by the check, and staged: the worker reads that copy, not the URL again
    assert sorted(images.requests) == ["/notes.png", "/ok.png"]
    staged = items["fetched"].params["image"]
    assert staged == f"s3://{bucket}/o/{sub['job_id']}/inputs/fetched.png"
    body = s3_client(env["AWS_ENDPOINT_URL_S3"]).get_object(Bucket=bucket, Key=staged.split("/", 3)[3])["Body"]
    assert body.read() == png(48, 32)
    assert items["in-s3"].params["image"] == f"s3://{bucket}/in/ok.png"  # S3 objects are read where they are

    # with the network part off, submit queues the remote rows and says they are the worker's to check
    images.requests.clear()
    later = cli(
        "submit",
        str(manifest),
        "--model",
        "e1-1",
        "--output",
        f"s3://{bucket}/o",
        "--skip-invalid",
        "--no-remote-checks",
        env=env,
    )
    assert later.returncode == 0 and "queued 7 item(s), rejected 3" in later.stderr, later.stderr
    assert "note: 5 input image(s) not checked before queueing (remote checks are off" in later.stderr
    assert images.requests == []


def test_url_checks_run_in_parallel_within_the_bound_and_each_url_is_fetched_once():
    import time

    from jobs.inputs import ImageChecks
    from jobs.settings import Settings

    body, lock, state = png(), threading.Lock(), {"now": 0, "most": 0, "gets": 0}

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            with lock:
                state["now"] += 1
                state["gets"] += 1
                state["most"] = max(state["most"], state["now"])
            time.sleep(0.2)  # long enough for the checks to overlap if they can
            with lock:
                state["now"] -= 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.2", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        settings = Settings(allow_private_hosts="127.0.0.2", inputs={"check_workers": 3})
        urls = [f"http://127.0.0.2:{httpd.server_port}/{n}.png" for n in range(9)]
        with ImageChecks(settings) as checks:
            found = checks.check_all(urls + urls[:4])  # a URL twice in a manifest is fetched once
            assert [f.error for f in found] == [None] * 13 and all(f.copy and f.copy.is_file() for f in found)
            assert checks.check_all(urls[:2])[0] is found[0]  # the second pass of a submission: from the cache
        assert state["gets"] == 9 and 1 <= state["most"] <= 3
        assert not found[0].copy.exists()  # the copies go with the checks
    finally:
        httpd.shutdown()
        httpd.server_close()
