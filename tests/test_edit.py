"""HiDream-E1 edit rows end to end, with real input files: CSV manifest → submit (local inputs staged to S3)
→ Celery worker on tiny E1.1 weights → S3, plus local `run` mode for seeds, dialects and data: URIs, and the
model-free pieces (input decoding, geometry, dialect mapping) at unit level."""

from __future__ import annotations

import base64
import csv
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from services import cli, s3_client, service_env, wait_until

from jobs import dialects
from jobs.errors import InputError
from jobs.manifest import RawRow, RowChecker, input_policy, validate_manifest
from jobs.models import JobSpec
from jobs.settings import Settings
from jobs.store import RedisStore
from worker import geometry, imaging
from worker.local import run_local
from worker.runners.hidream_e1 import canvas_size

pytestmark = pytest.mark.timeout(300)

TINY_E1_1_SIDE = 64  # tiny E1.1 edits within 64² px (real: 1024²)
BAR = (400, 100, 412, 700)  # a thin black vertical bar on the 1200×800 test photo


# ---- input files -----------------------------------------------------------------------------------


def bar_photo(width: int = 1200, height: int = 800) -> Image.Image:
    """White, with a thin black vertical bar off-centre (so a shift or a mirror would show)."""
    image = Image.new("RGB", (width, height), "white")
    image.paste((0, 0, 0), BAR)
    return image


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 80×40, left half red, right half blue, EXIF orientation 6 (rotate 90° clockwise to show):
    shown 40×80, red on top."""
    image = Image.new("RGB", (80, 40), (220, 0, 0))
    image.paste((0, 0, 220), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(image, exif=exif.tobytes())


def rgba_png() -> bytes:
    """Transparent 64×48 with an opaque red square in the middle."""
    image = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (16, 12, 48, 36))
    return png(image)


def gray_png() -> bytes:
    ramp = np.tile(np.linspace(0, 255, 56, dtype=np.uint8), (40, 1))
    return png(Image.fromarray(ramp, mode="L"))


def cmyk_jpeg() -> bytes:
    return jpeg(Image.new("CMYK", (72, 40), (0, 255, 255, 0)))  # process red


def rgba_webp() -> bytes:
    buf = io.BytesIO()
    image = Image.new("RGBA", (50, 30), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (10, 5, 40, 25))
    image.save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def noise_jpeg(width: int = 200, height: int = 150) -> bytes:
    rng = np.random.default_rng(0)
    return jpeg(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))


def truncated_jpeg() -> bytes:
    data = noise_jpeg()
    return data[: len(data) * 6 // 10]  # headers intact, scan data cut


def bomb_png(side: int = 3000) -> bytes:
    """A real, tiny file of `side`² pixels (a few KB): a decompression bomb for a small pixel cap."""
    return png(Image.new("L", (side, side), 0))


def huge_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width×height pixels; there is no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_csv(path: Path, header: list[str], rows: list[dict]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, header)
        writer.writeheader()
        writer.writerows(rows)
    return path


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


class ImageServer:
    """http.server on a loopback address, in a thread; records every path asked for."""

    def __init__(self, host: str, files: dict[str, bytes]):
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                body = files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "image/jpeg")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.base = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image_servers() -> Iterator[dict[str, ImageServer]]:
    """One server on 127.0.0.1 (private, not allow-listed) and one on 127.0.0.2 (allow-listed), same file."""
    files = {"/x.jpg": jpeg(bar_photo(96, 64)), "/ok.jpg": jpeg(bar_photo(96, 64))}
    servers = {"blocked": ImageServer("127.0.0.1", files), "allowed": ImageServer("127.0.0.2", files)}
    yield servers
    for server in servers.values():
        server.close()


# ---- 1 + 2. distributed: submit → worker on tiny E1.1 → S3 ------------------------------------------


def wait_job(redis_url: str, job_id: str, timeout: float = 180):
    store = RedisStore.from_url(redis_url)
    return wait_until(
        lambda: (j := store.get_job(job_id)) and j.finished_at and j, timeout, 0.25, what=f"job {job_id} to end"
    )


def test_edit_manifest_of_real_files_runs_on_a_worker_good_rows_keep_their_size_bad_rows_fail_alone(
    redis_server, s3_endpoint, tiny_dir, bucket, start_worker, image_servers, tmp_path
):
    # the worker: pixel cap 1 MP (the 1200×800 photo fits, the 3000² bomb does not), only 127.0.0.2 allowed
    gpu = start_worker(
        "worker",
        "--model",
        "e1-1",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        DREAMBATCH_INPUTS__MAX_PIXELS="1000000",
        DREAMBATCH_ALLOW_PRIVATE_HOSTS="127.0.0.2",
    )
    io_worker = start_worker("worker", "--io")

    shoot = tmp_path / "shoot"
    shoot.mkdir()
    (tmp_path / "outside.jpg").write_bytes(jpeg(bar_photo(96, 64)))  # exists, but outside the manifest folder
    files = {
        "bar.jpg": jpeg(bar_photo()),
        "rotated.jpg": exif_rotated_jpeg(),
        "alpha.png": rgba_png(),
        "gray.png": gray_png(),
        "cmyk.jpg": cmyk_jpeg(),
        "clear.webp": rgba_webp(),
        "truncated.jpg": truncated_jpeg(),
        "notes.jpg": b"this is a text file, not a photo\n",
        "bomb.png": bomb_png(),
        "huge.png": huge_header_png(),
    }
    for name, data in files.items():
        (shoot / name).write_bytes(data)
    blocked, allowed = image_servers["blocked"], image_servers["allowed"]
    rows = [  # (id, image, expected output size or None for a failure)
        ("bar", "bar.jpg", (1200, 800)),
        ("rotated", "rotated.jpg", (40, 80)),  # stored 80×40, EXIF orientation 6
        ("alpha", "alpha.png", (64, 48)),
        ("gray", "gray.png", (56, 40)),
        ("cmyk", "cmyk.jpg", (72, 40)),
        ("clear", "clear.webp", (50, 30)),
        ("truncated", "truncated.jpg", None),
        ("notes", "notes.jpg", None),
        ("bomb", "bomb.png", None),
        ("huge", "huge.png", None),
        ("escape", "../outside.jpg", None),
        ("missing", "missing.jpg", None),
        ("private", f"{blocked.base}/x.jpg", None),
        ("fetched", f"{allowed.base}/ok.jpg", (96, 64)),
    ]
    manifest = write_csv(
        shoot / "edits.csv",
        ["id", "image", "instruction", "seed", "sku"],
        [
            {"id": i, "image": ref, "instruction": "make the background light grey", "seed": 40 + n, "sku": f"SKU-{i}"}
            for n, (i, ref, _) in enumerate(rows)
        ],
    )

    env = service_env(redis_server.url, s3_endpoint, tiny_dir, DREAMBATCH_ALLOW_PRIVATE_HOSTS="127.0.0.2")
    gpu.wait_ready()
    io_worker.wait_ready()
    res = cli(
        "submit",
        str(manifest),
        "--model",
        "e1-1",
        "--set",
        "steps=2",
        "--output",
        f"s3://{bucket}/edits",
        "--skip-invalid",
        "--json",
        env=env,
    )
    assert res.returncode == 0, res.stderr
    sub = json.loads(res.stdout)
    # refused at submit (before any GPU time): not an image, a header over the pixel cap, a path escaping the
    # folder, a missing file, a private address; the truncated file and the bomb (under the submitter's default
    # pixel cap, over the worker's) fail on the worker
    assert (sub["total"], sub["queued"], sub["rejected"]) == (14, 9, 5)
    job_id = sub["job_id"]
    job = wait_job(redis_server.url, job_id)
    assert job.status == "completed"
    assert job.counts["completed"] == 7 and job.counts["failed"] == 7

    s3 = s3_client(s3_endpoint)
    body = s3.get_object(Bucket=bucket, Key=f"edits/{job_id}/results.jsonl")["Body"].read()
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert [x["id"] for x in lines] == [r[0] for r in rows]  # every row once, in manifest order
    assert [x["line"] for x in lines] == list(range(2, 2 + len(rows)))
    by_id = {x["id"]: x for x in lines}

    # good rows: completed, one PNG in S3 at exactly the input's (oriented) size; the sizes are recorded
    for item_id, _, size in rows:
        line = by_id[item_id]
        assert line["metadata"] == {"sku": f"SKU-{item_id}"}
        if size is None:
            assert line["status"] == "failed" and line["output"]["images"] == [], item_id
            continue
        assert line["status"] == "completed" and line["error"] is None, (item_id, line["error"])
        [image] = line["output"]["images"]
        assert image["s3_uri"] == f"s3://{bucket}/edits/{job_id}/{item_id}.png"
        assert (image["width"], image["height"], image["content_type"]) == (*size, "image/png")
        stored = s3.get_object(Bucket=bucket, Key=f"edits/{job_id}/{item_id}.png")
        assert stored["ContentType"] == "image/png" and stored["Metadata"]["seed"] == str(line["seed"])
        assert size_of(stored["Body"].read()) == size, item_id
        assert line["output"]["input_size"] == list(size), item_id
        assert line["output"]["processed_size"] == list(canvas_size(*size, TINY_E1_1_SIDE, fixed=False)), item_id
        width, height = line["output"]["processed_size"]
        assert width % 16 == 0 and height % 16 == 0 and width * height <= TINY_E1_1_SIDE**2

    # bad rows: each failed alone, its error naming the problem
    errors = {item_id: by_id[item_id]["error"] for item_id, _, size in rows if size is None}
    assert errors["truncated"].startswith("InputError: damaged JPEG")
    assert errors["notes"] == f"invalid row: line 9: image: not a JPEG, PNG or WebP image (got '{shoot / 'notes.jpg'}')"
    assert errors["bomb"] == "InputError: image is 3000x3000 = 9000000 pixels, over the 1000000-pixel limit"
    assert errors["huge"].startswith("invalid row: line 11: image: image too large") and "10000000000" in errors["huge"]
    assert errors["escape"] == ("invalid row: line 12: image: path escapes the manifest folder (got '../outside.jpg')")
    assert errors["missing"] == "invalid row: line 13: image: file not found (got 'missing.jpg')"
    assert errors["private"].startswith(f"invalid row: line 14: image: '{blocked.base}/x.jpg': 127.0.0.1 resolves to")
    assert "DREAMBATCH_ALLOW_PRIVATE_HOSTS" in errors["private"]
    # the guard refused before connecting; the allow-listed address was fetched once, at submit: the worker read
    # the copy submit staged
    assert blocked.requests == [] and allowed.requests == ["/ok.jpg"]

    # S3 holds the staged local inputs (valid rows only) and outputs for the completed rows only
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"edits/{job_id}/")["Contents"]}
    staged = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"edits/{job_id}/inputs/")}
    assert staged == {f"{i}{Path(ref).suffix}" for i, ref, _ in rows[:10] if i not in ("notes", "huge")} | {
        "fetched.jpg"
    }
    assert s3.get_object(Bucket=bucket, Key=f"edits/{job_id}/inputs/bar.jpg")["Body"].read() == files["bar.jpg"]
    outputs = {k.rsplit("/", 1)[1] for k in keys if k.endswith(".png") and "/inputs/" not in k}
    assert outputs == {f"{i}.png" for i, _, size in rows if size is not None}


# ---- 3. seeds and refine, local mode ------------------------------------------------------------------


def local_run(manifest: Path, model: str, out: Path, **defaults: str):
    """Local `run` mode in this process (model loads are cheap once torch is imported). Returns
    (submission, results lines by id, job folder)."""
    settings = Settings(allow_private_hosts="", input_roots="")
    spec = JobSpec(model=model, defaults={"steps": "2", **defaults}, output=str(out), skip_invalid=True)
    sub = run_local(manifest, spec, settings=settings, weights="tiny", device="cpu")
    folder = out / sub.job.job_id
    lines = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]
    return sub, {x["id"]: x for x in lines}, folder


def output_bytes(line: dict, n: int = 0) -> bytes:
    return Path(line["output"]["images"][n]["s3_uri"]).read_bytes()


@pytest.mark.parametrize("model", ["e1-1", "e1-full"])
def test_same_seed_gives_the_same_bytes_across_jobs_and_refine_changes_them(tiny_dir, tmp_path, model):
    (tmp_path / "bar.jpg").write_bytes(jpeg(bar_photo(120, 80)))
    manifest = write_csv(
        tmp_path / "seeds.csv",
        ["id", "image", "instruction", "seed", "refine_strength"],
        [
            {"id": "plain", "image": "bar.jpg", "instruction": "make it red", "seed": 11, "refine_strength": 0},
            {"id": "refined", "image": "bar.jpg", "instruction": "make it red", "seed": 11, "refine_strength": 0.3},
            {"id": "other-seed", "image": "bar.jpg", "instruction": "make it red", "seed": 12, "refine_strength": 0},
        ],
    )
    first, a, _ = local_run(manifest, model, tmp_path / "a")
    second, b, _ = local_run(manifest, model, tmp_path / "b")
    assert first.job.job_id != second.job.job_id
    assert first.job.status == second.job.status == "completed"
    for item_id in ("plain", "refined", "other-seed"):
        assert a[item_id]["status"] == "completed" and a[item_id]["output"]["images"][0]["width"] == 120
        assert output_bytes(a[item_id]) == output_bytes(b[item_id]), item_id  # same seed → same bytes
    assert output_bytes(a["plain"]) != output_bytes(a["refined"])  # refine_strength 0 vs 0.3
    assert output_bytes(a["plain"]) != output_bytes(a["other-seed"])
    assert a["plain"]["seed"] == a["refined"]["seed"] == 11


# ---- 4. the seed pages' dialects ------------------------------------------------------------------------


def rows_of(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "rows.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("model", ["e1-1", "e1-full"])
def test_each_seed_dialect_manifest_runs_unchanged(tiny_dir, tmp_path, model):
    (tmp_path / "shoe.jpg").write_bytes(jpeg(bar_photo(96, 64)))
    (tmp_path / "mug.png").write_bytes(png(bar_photo(48, 80)))

    # fal.ai
    fal = write_csv(
        tmp_path / "fal.csv",
        [
            "id",
            "image_url",
            "edit_instruction",
            "target_image_description",
            "num_inference_steps",
            "enable_safety_checker",
            "seed",
        ],
        [
            {
                "id": "fal",
                "image_url": "shoe.jpg",
                "edit_instruction": "make the shoe blue",
                "target_image_description": "a blue shoe on white",
                "num_inference_steps": 3,
                "enable_safety_checker": "true",
                "seed": 5,
            }
        ],
    )
    sub, res, folder = local_run(fal, model, tmp_path / "out-fal")
    assert sub.job.status == "completed" and res["fal"]["status"] == "completed"
    params = rows_of(folder)["fal"]["params"]
    assert (params["image"], params["instruction"], params["target_description"], params["steps"]) == (
        str(folder / "inputs" / "fal.jpg"),
        "make the shoe blue",
        "a blue shoe on white",
        3,
    )
    assert res["fal"]["metadata"] == {} and params["safety_check"] is True  # fal's name for our field
    # no checker is configured for this run: it did not run, and the result says so
    assert res["fal"]["output"]["nsfw"] is None and res["fal"]["output"]["safety"].startswith("off")
    assert (res["fal"]["output"]["images"][0]["width"], res["fal"]["output"]["images"][0]["height"]) == (96, 64)

    # WaveSpeed: base64 output in the results
    wave = write_csv(
        tmp_path / "wave.csv",
        ["id", "prompt", "image", "enable_base64_output", "seed"],
        [{"id": "ws", "prompt": "turn the mug green", "image": "mug.png", "enable_base64_output": "true", "seed": 6}],
    )
    sub, res, folder = local_run(wave, model, tmp_path / "out-wave")
    assert sub.job.status == "completed"
    assert rows_of(folder)["ws"]["params"]["instruction"] == "turn the mug green"
    [image] = res["ws"]["output"]["images"]
    assert image["b64_json"] and base64.b64decode(image["b64_json"]) == Path(image["s3_uri"]).read_bytes()
    assert size_of(base64.b64decode(image["b64_json"])) == (48, 80)

    # inference.sh: E1's own prompt format
    infsh = write_csv(
        tmp_path / "infsh.csv",
        ["id", "prompt", "image"],
        [
            {
                "id": "sh",
                "image": "shoe.jpg",
                "prompt": "Editing Instruction: add a red lace. Target Image Description: a white shoe with a red lace",
            }
        ],
    )
    sub, res, folder = local_run(infsh, model, tmp_path / "out-infsh")
    assert sub.job.status == "completed" and res["sh"]["output"]["images"][0]["b64_json"] is None
    params = rows_of(folder)["sh"]["params"]
    assert (params["instruction"], params["target_description"], params["prompt"]) == (
        "add a red lace",
        "a white shoe with a red lace",
        "",
    )

    # Lumenfall (OpenAI-style): n, response_format, output_format + output_compression, size
    lumen = write_csv(
        tmp_path / "lumen.csv",
        ["id", "prompt", "image", "n", "response_format", "output_format", "output_compression", "size"],
        [
            {
                "id": "two",
                "prompt": "make it night",
                "image": "shoe.jpg",
                "n": 2,
                "response_format": "b64_json",
                "output_format": "jpeg",
                "output_compression": 60,
            },
            {"id": "sized", "prompt": "make it night", "image": "shoe.jpg", "size": "64x64"},
        ],
    )
    sub, res, folder = local_run(lumen, model, tmp_path / "out-lumen")
    assert sub.job.status == "completed"
    assert rows_of(folder)["two"]["params"]["output_quality"] == 60
    images = res["two"]["output"]["images"]
    assert len(images) == 2
    assert [Path(i["s3_uri"]).name for i in images] == ["two_0.jpg", "two_1.jpg"]
    for image in images:
        data = base64.b64decode(image["b64_json"])
        assert data[:3] == b"\xff\xd8\xff" and image["content_type"] == "image/jpeg"  # a JPEG
        assert data == Path(image["s3_uri"]).read_bytes() and size_of(data) == (96, 64)
    assert base64.b64decode(images[0]["b64_json"]) != base64.b64decode(images[1]["b64_json"])
    [sized] = res["sized"]["output"]["images"]
    assert (sized["width"], sized["height"], sized["b64_json"]) == (64, 64, None)  # size wins; url by default


def test_dialect_names_map_to_ours_and_a_field_given_twice_is_an_error_naming_it(tmp_path):
    assert dialects.normalize(
        {
            "image_url": "a.jpg",
            "edit_instruction": "x",
            "target_image_description": "y",
            "num_inference_steps": "4",
            "sync_mode": "true",
        },
        "edit",
    ) == {"image": "a.jpg", "instruction": "x", "target_description": "y", "steps": "4", "sync_mode": "true"}
    assert dialects.normalize({"prompt": "p", "image": "a.jpg", "enable_base64_output": "TRUE"}, "edit") == {
        "image": "a.jpg",
        "instruction": "p",
        "response_format": "b64_json",
    }
    assert dialects.normalize({"prompt": "p", "image": "a", "enable_base64_output": "false"}, "edit") == {
        "image": "a",
        "instruction": "p",
    }
    assert dialects.normalize(
        {"prompt": "p", "image": "a", "n": 2, "output_compression": 70, "cfg_scale": 3}, "edit"
    ) == {"image": "a", "instruction": "p", "num_images": 2, "output_quality": 70, "guidance_scale": 3}
    e1 = dialects.normalize(
        {"prompt": "editing instruction: remove the logo. Target Image Description: a plain mug", "image": "a"}, "edit"
    )
    assert (e1["instruction"], e1["target_description"]) == ("remove the logo", "a plain mug")
    assert dialects.normalize({"prompt": "a cat"}, "generate") == {"prompt": "a cat"}  # generation keeps prompt

    with pytest.raises(dialects.DialectConflict) as exc:
        dialects.normalize({"image_url": "a.jpg", "image": "b.jpg", "instruction": "x"}, "edit")
    assert exc.value.field == "image_url" and "'image_url' and 'image'" in exc.value.message
    with pytest.raises(dialects.DialectConflict) as exc:
        dialects.normalize({"prompt": "p", "instruction": "x", "image": "a"}, "edit")
    assert exc.value.field == "prompt"

    # through the row checker and a manifest: the conflict is the row's issue, with line and field
    (tmp_path / "a.jpg").write_bytes(jpeg(bar_photo(32, 32)))
    checker = RowChecker("e1-full", inputs=input_policy(tmp_path / "m.csv"))
    bad = checker.check(RawRow(3, {"image_url": "a.jpg", "image": "a.jpg", "edit_instruction": "x"}))
    assert not bad.ok and [(i.line, i.field) for i in bad.issues] == [(3, "image_url")]
    bad = checker.check(RawRow(4, {"image": "a.jpg", "n": "2", "num_images": "3", "prompt": "x"}))
    assert [str(i) for i in bad.issues] == ["line 4: n: both 'n' and 'num_images' given; keep one (got '2')"]
    good = checker.check(RawRow(5, {"image_url": "a.jpg", "edit_instruction": "x", "num_inference_steps": "7"}))
    assert good.ok and good.params["steps"] == 7 and good.params["image"] == str(tmp_path / "a.jpg")
    assert good.params["guidance_scale"] == 5.0 and good.params["clip_cfg_norm"] is True  # e1-full's published defaults

    manifest = write_csv(
        tmp_path / "m.csv",
        ["image_url", "image", "edit_instruction"],
        [{"image_url": "a.jpg", "image": "a.jpg", "edit_instruction": "x"}],
    )
    report = validate_manifest(manifest, "e1-1")
    assert [str(i) for i in report.issues] == [
        "line 2: image_url: both 'image_url' and 'image' given; keep one (got 'a.jpg')"
    ]


# ---- 5. geometry, no model ------------------------------------------------------------------------------


def dark_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The bounding box of pixels darker than mid-grey."""
    ys, xs = np.nonzero(np.asarray(image.convert("L")) < 128)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def bar_extent(image: Image.Image) -> tuple[float, float]:
    """(width, height) of the bar from its ink: darkness summed across the bar (sub-pixel, resampling-proof)."""
    ink = 1.0 - np.asarray(image.convert("L"), dtype=float) / 255.0
    return float(ink.sum(axis=1).max()), float(ink.sum(axis=0).max())


def assert_close(actual, expected, tolerance: float) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


@pytest.mark.parametrize(
    "canvas", [canvas_size(1200, 800, 1024, fixed=False), (768, 768)], ids=["e1-1-real", "e1-full-real"]
)
def test_pad_fit_and_unfit_bring_a_thin_bar_back_in_place_and_in_proportion(canvas):
    photo = bar_photo()
    fitted, box = geometry.fit(photo, canvas, "pad")
    assert fitted.size == canvas
    # on the canvas the content keeps its proportions (3:2), centred, and so does the bar
    x0, y0, x1, y1 = box
    assert abs((x1 - x0) * 800 - (y1 - y0) * 1200) <= 1200 and (x0, y0) == (
        (canvas[0] - (x1 - x0)) // 2,
        (canvas[1] - (y1 - y0)) // 2,
    )
    width, height = bar_extent(fitted)
    assert abs(height / width - 600 / 12) < 2.5
    back = geometry.unfit(fitted, box, (1200, 800))
    assert back.size == (1200, 800)
    assert_close(dark_box(back), BAR, 2)
    assert_close(bar_extent(back), (12, 600), 1)


def test_canvas_sizes_of_the_real_models():
    assert canvas_size(1200, 800, 1024, fixed=False) == (1248, 832)  # 3:2 kept, ≤ 1024², sides ×16
    assert canvas_size(800, 1200, 1024, fixed=False) == (832, 1248)
    assert canvas_size(1024, 1024, 1024, fixed=False) == (1024, 1024)
    assert canvas_size(1200, 800, 768, fixed=True) == (768, 768)
    for w, h in [(1200, 800), (4000, 300), (300, 4000), (1000, 1001), (17, 5000)]:
        cw, ch = canvas_size(w, h, 1024, fixed=False)
        assert cw % 16 == 0 and ch % 16 == 0 and 16 <= cw and 16 <= ch and cw * ch <= 1024 * 1024, (w, h)


def test_stretch_distorts_the_bar_on_the_square_canvas_pad_does_not():
    photo = bar_photo()
    padded, pad_box = geometry.fit(photo, (768, 768), "pad")
    stretched, stretch_box = geometry.fit(photo, (768, 768), "stretch")
    assert pad_box == (0, 128, 768, 640) and stretch_box == (0, 0, 768, 768)
    # the bar is 12×600 (ratio 50): pad scales both sides by 0.64; stretch 0.64 across but 0.96 down
    pad_w, pad_h = bar_extent(padded)
    stretch_w, stretch_h = bar_extent(stretched)
    assert_close((pad_w, pad_h), (12 * 0.64, 600 * 0.64), 0.5)
    assert_close((stretch_w, stretch_h), (12 * 0.64, 600 * 0.96), 0.5)
    assert abs(pad_h / pad_w - 50) < 2.5 and abs(stretch_h / stretch_w - 75) < 4  # 1.5× taller for its width
    assert_close(dark_box(padded), (256, 192, 264, 576), 1)
    assert_close(dark_box(stretched), (256, 96, 264, 672), 1)
    # padding fills with the photo's own border (white here); stretch leaves no border at all
    assert padded.getpixel((384, 10)) == (255, 255, 255) and padded.getpixel((384, 700)) == (255, 255, 255)


def test_output_size_size_wins_same_keeps_and_ratio_with_resolution_sets_shape_and_scale():
    assert geometry.output_size((1200, 800)) == (1200, 800)
    assert geometry.output_size((1200, 800), "same") == (1200, 800)
    assert geometry.output_size((1200, 800), "512x384") == (512, 384)
    assert geometry.output_size((1200, 800), "512x384", "16:9", "4K") == (512, 384)  # size wins over both
    assert geometry.output_size((1200, 800), "same", "16:9", "1K") == (1365, 768)  # 16:9 at ~1024² px
    assert geometry.output_size((1200, 800), "same", "1:1", "0.5K") == (512, 512)
    assert geometry.output_size((1200, 800), "same", "1:1") == (980, 980)  # the input's pixel count
    assert geometry.output_size((1200, 800), "same", None, "1K") == (1254, 836)  # the input's aspect
    assert geometry.output_size((1200, 800), "same", None, "0.25") == (627, 418)  # megapixels
    for bad in [("10x10",), ("9000x100",), ("same", "200:1", "1K")]:
        with pytest.raises(ValueError, match=r"outside 16\.\.8192"):
            geometry.output_size((1200, 800), *bad)


@pytest.mark.parametrize("ratio", ["1:0", "0:1"])
def test_a_zero_aspect_ratio_is_an_invalid_row_at_submit(tmp_path, ratio):
    (tmp_path / "a.jpg").write_bytes(jpeg(bar_photo(32, 32)))
    checker = RowChecker("e1-1", inputs=input_policy(tmp_path / "m.csv"))
    row = checker.check(RawRow(2, {"image": "a.jpg", "instruction": "x", "aspect_ratio": ratio}))
    assert [i.field for i in row.issues] == ["aspect_ratio"]


def test_to_shape_pads_crops_or_stretches_to_the_target_aspect():
    photo = bar_photo()
    assert geometry.to_shape(photo, (600, 400), "pad") is photo  # same aspect: untouched
    # pad: the target's aspect at the input's pixel count, the photo scaled to fit and centred
    padded = geometry.to_shape(photo, (1365, 768), "pad")
    assert padded.size == (1306, 735)
    assert abs(padded.width * padded.height - 1200 * 800) < 1306 + 735
    width, height = bar_extent(padded)
    assert_close((width / height,), (12 / 600,), 0.002)  # the bar keeps its proportions
    cropped = geometry.to_shape(photo, (1365, 768), "crop")
    assert cropped.size == (1200, 675) and dark_box(cropped) == (400, 38, 412, 638)  # 62 rows cut top and bottom
    stretched = geometry.to_shape(photo, (1365, 768), "stretch")
    assert stretched.size == (1306, 735)
    assert_close(bar_extent(stretched), (12 * 1306 / 1200, 600 * 735 / 800), 0.5)  # distorted, as asked
    # an extreme target cannot blow up memory: the shaped image keeps the input's pixel count
    thin = geometry.to_shape(Image.new("RGB", (400, 400)), (8192, 512), "pad")
    assert thin.width * thin.height <= 400 * 400 + 2 * 8192


# ---- input decoding, no model -----------------------------------------------------------------------------


def test_decode_input_orients_flattens_and_converts_to_rgb():
    rotated = imaging.decode_input(exif_rotated_jpeg(), 10**6)
    assert rotated.size == (40, 80) and rotated.mode == "RGB"
    top, bottom = rotated.getpixel((20, 10)), rotated.getpixel((20, 70))
    assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # red (stored left) is shown on top

    alpha = imaging.decode_input(rgba_png(), 10**6)
    assert (
        alpha.mode == "RGB" and alpha.getpixel((2, 2)) == (255, 255, 255) and alpha.getpixel((32, 24)) == (255, 0, 0)
    )  # transparent → white, opaque kept

    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.paste(1, (5, 5, 15, 15))
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=0)
    flat = imaging.decode_input(buf.getvalue(), 10**6)
    assert flat.getpixel((0, 0)) == (255, 255, 255) and flat.getpixel((10, 10)) == (0, 200, 0)

    gray = imaging.decode_input(gray_png(), 10**6)
    assert gray.mode == "RGB" and gray.size == (56, 40) and gray.getpixel((55, 0)) == (255, 255, 255)
    red = imaging.decode_input(cmyk_jpeg(), 10**6)
    r, g, b = red.getpixel((36, 20))
    assert red.mode == "RGB" and r > 200 and g < 60 and b < 60

    deep = Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1)))  # 16-bit grayscale
    assert deep.mode.startswith("I")
    wide = imaging.decode_input(png(deep), 10**6)
    assert wide.mode == "RGB" and wide.getpixel((0, 0)) == (0, 0, 0) and wide.getpixel((31, 0)) == (255, 255, 255)


def test_decode_input_puts_colour_keyed_transparency_on_white_too():
    image = Image.new("RGB", (8, 8), (0, 255, 0))
    image.paste((10, 20, 30), (0, 0, 4, 8))
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=(0, 255, 0))  # green means transparent
    flat = imaging.decode_input(buf.getvalue(), 10**6)
    assert flat.getpixel((1, 1)) == (10, 20, 30) and flat.getpixel((6, 1)) == (255, 255, 255)


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (truncated_jpeg, "damaged JPEG"),
        (lambda: b"\xff\xd8 an upload cut off after its first bytes", "damaged JPEG: it begins like one"),
        (lambda: b"\x89PNG\r\n\x1a\n and then nothing", "damaged PNG"),
        (lambda: b"this is a text file, not a photo\n", "not a JPEG, PNG or WebP image"),
        (bomb_png, "image is 3000x3000 = 9000000 pixels, over the 1000000-pixel limit"),
        (huge_header_png, "image too large"),
        (gif, "not a JPEG, PNG or WebP image"),
    ],
    ids=["truncated", "damaged-jpeg", "damaged-png", "text", "bomb", "huge-header", "gif"],
)
def test_decode_input_refuses_what_it_cannot_safely_open(make, message):
    with pytest.raises(InputError, match=message):
        imaging.decode_input(make(), 1_000_000)


# ---- 6. data: URIs ----------------------------------------------------------------------------------------


def test_a_data_uri_input_is_staged_next_to_the_job_and_runs(tiny_dir, tmp_path):
    data = png(bar_photo(80, 56))
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    manifest = tmp_path / "inline.jsonl"
    manifest.write_text(
        json.dumps({"id": "inline", "image": uri, "instruction": "make it sepia", "seed": 3})
        + "\n"
        + json.dumps({"id": "gif", "image": "data:image/gif;base64,R0lGOD", "instruction": "x"})
        + "\n"
    )
    env = service_env("redis://127.0.0.1:9/0", "http://127.0.0.1:9", tiny_dir)  # local mode: neither is used
    res = cli(
        "run",
        str(manifest),
        "--model",
        "e1-1",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        "--set",
        "steps=2",
        "--out",
        str(tmp_path / "out"),
        "--skip-invalid",
        env=env,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr  # one row completed: the job completed
    [folder] = (tmp_path / "out").iterdir()
    lines = {x["id"]: x for x in map(json.loads, (folder / "results.jsonl").read_text().splitlines())}
    assert (folder / "inputs" / "inline.png").read_bytes() == data  # decoded and staged at submit
    staged = rows_of(folder)["inline"]["params"]["image"]
    assert staged == str(folder / "inputs" / "inline.png")  # the row carries the staged path, not the bytes
    [image] = lines["inline"]["output"]["images"]
    assert lines["inline"]["status"] == "completed" and (image["width"], image["height"]) == (80, 56)
    assert size_of(Path(image["s3_uri"]).read_bytes()) == (80, 56)
    assert lines["inline"]["output"]["input_size"] == [80, 56]
    assert lines["gif"]["status"] == "failed"
    assert lines["gif"]["error"] == (
        "invalid row: line 2: image: data URI must be data:image/png|jpeg|webp;base64,… "
        "(got 'data:image/gif;base64,R0lGOD')"
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("size", "10x10", "each side must be 16..8192 px"),
        ("size", "8192x16", "aspect ratio must be within 16:1"),
        ("aspect_ratio", "40:1", "aspect ratio must be within 16:1"),
    ],
)
def test_output_shapes_out_of_bounds_are_invalid_rows_at_submit(tmp_path, field, value, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "instruction": "x", field: value}) + "\n")
    report = validate_manifest(tmp_path / "m.jsonl", "e1-1")
    assert [str(i) for i in report.issues] == [f"line 1: {field}: {message} (got '{value}')"]
