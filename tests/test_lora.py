"""Per-row LoRA adapters: a row names a diffusers-format LoRA file (local or s3://), the worker loads it with
diffusers' LoRA loading, keeps a bounded cache, batches only requests with the same adapter, and records it.

Tiny random LoRAs over the tiny pipelines (`make_tiny_lora`); images are compared pixel for pixel."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from services import cli, s3_client, service_env, wait_until

from jobs import records
from jobs.models import JobSpec
from jobs.settings import RunnerSettings, Settings
from jobs.storage import LocalStore
from worker.local import run_local
from worker.runners.base import GenerateRequest
from worker.runners.batching import MicroBatcher
from worker.runners.hidream_i1 import HiDreamI1Runner
from worker.runners.lora import LoraChoice
from worker.runners.tiny import make_tiny_lora

ROW = {"prompt": "a red mug on a table", "width": 256, "height": 256, "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {name: make_tiny_lora(folder / f"{name}.safetensors", seed=seed) for name, seed in (("a", 1), ("b", 2))}


def pixels(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_rows_match_diffusers_own_lora_loading_and_rows_without_one_match_the_base_model(
    tmp_path, tiny_dir, adapters
):
    for path in adapters.values():  # beside the manifest, where its local paths may point
        (tmp_path / path.name).write_bytes(path.read_bytes())
    rows = [
        {"id": "plain", **ROW},
        {"id": "a1", **ROW, "lora": "a.safetensors"},
        {"id": "a-half", **ROW, "lora": "a.safetensors", "lora_scale": 0.5},
        {"id": "plain-after", **ROW},
        {"id": "b1", **ROW, "lora": "b.safetensors"},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "out"
    sub = run_local(manifest, JobSpec(model="i1-fast", output=str(out)), settings=Settings(), weights="tiny")
    assert sub.job.counts.get("completed") == 5, sub.job
    job_id = sub.job.job_id
    results = {r["id"]: r for r in records.read_results(LocalStore(str(out)), job_id)}
    got = {rid: pixels(r["output"]["images"][0]["s3_uri"]) for rid, r in results.items()}
    # each distinct file is staged once, by content, and recorded with its source, digest and scale
    staged = sorted(p.name for p in (out / "_loras").iterdir())
    assert len(staged) == 2
    a = results["a-half"]["output"]["lora"]
    assert (
        a["source"] == str(tmp_path / "a.safetensors") and a["scale"] == 0.5 and f"{a['sha256']}.safetensors" in staged
    )
    assert results["plain"]["output"]["lora"] is None

    # the reference: diffusers' own pipeline-level LoRA loading, on a runner of its own
    params = {r["id"]: r["params"] for r in records.read_rows(LocalStore(str(out)), job_id)}
    reference = HiDreamI1Runner("i1-fast", "tiny")
    pipe = reference.load()

    def render(row_id: str) -> np.ndarray:
        request = GenerateRequest.of(params[row_id])
        return np.asarray(reference.generate(request).images[0].convert("RGB"), dtype=np.int16)

    base = render("plain")
    pipe.load_lora_weights(str(adapters["a"]), adapter_name="ref_a")
    pipe.set_adapters("ref_a", 1.0)
    with_a = render("a1")
    pipe.set_adapters("ref_a", 0.5)
    with_a_half = render("a-half")
    pipe.load_lora_weights(str(adapters["b"]), adapter_name="ref_b")
    pipe.set_adapters("ref_b", 1.0)
    with_b = render("b1")

    assert np.array_equal(got["plain"], base) and np.array_equal(got["plain-after"], base)
    assert np.array_equal(got["a1"], with_a)
    assert np.array_equal(got["a-half"], with_a_half)
    assert np.array_equal(got["b1"], with_b)
    assert np.abs(with_a - base).max() > 0 and np.abs(with_b - with_a).max() > 0  # the adapters do change it


def test_the_adapter_cache_is_bounded_and_a_batch_holds_one_adapter(tiny_dir, adapters):
    runner = HiDreamI1Runner("i1-fast", "tiny", options=RunnerSettings(lora_cache=1))
    a = LoraChoice(str(adapters["a"]), "lora_a")
    b = LoraChoice(str(adapters["b"]), "lora_b")

    def image(lora: LoraChoice | None, seed: int = 7) -> np.ndarray:
        request = GenerateRequest(prompt=ROW["prompt"], width=256, height=256, steps=2, seed=seed, lora=lora)
        return np.asarray(runner.generate(request).images[0], dtype=np.int16)

    first_a, first_b, again_a = image(a), image(b), image(a)
    assert runner.adapters is not None and runner.adapters.loads == 3 and runner.adapters.loaded == ["lora_a"]
    assert np.array_equal(first_a, again_a) and not np.array_equal(first_a, first_b)

    # four requests arriving together, two per adapter: two batches of two, each as it renders alone (within
    # the batched matmuls' rounding, as every micro-batch), and never with the other adapter (those differ more)
    batcher = MicroBatcher(runner, max_batch=4, window_s=0.5)
    requests = [(lora, seed) for lora in (a, b) for seed in (7, 8)]
    alone = [image(lora, seed) for lora, seed in requests]
    outputs: list = [None] * len(requests)

    def run(i: int) -> None:
        lora, seed = requests[i]
        request = GenerateRequest(prompt=ROW["prompt"], width=256, height=256, steps=2, seed=seed, lora=lora)
        outputs[i] = np.asarray(batcher.generate(request).images[0], dtype=np.int16)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(batcher.batch_sizes) == [2, 2]
    assert all(np.abs(got - want).max() <= 2 for got, want in zip(outputs, alone, strict=True))
    assert np.abs(alone[0] - alone[2]).max() > 2


def test_bad_lora_references_name_the_line_field_and_value(tmp_path, tiny_dir, adapters):
    full = tmp_path / "full.safetensors"  # a checkpoint, not a LoRA
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.proj.weight": torch.zeros(2, 2)}, str(full))
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "weights.bin").write_bytes(b"x")
    local = tmp_path / "a.safetensors"
    local.write_bytes(adapters["a"].read_bytes())
    rows = [
        {"id": "ok", **ROW, "lora": "a.safetensors"},
        {"id": "missing", **ROW, "lora": "nope.safetensors"},
        {"id": "suffix", **ROW, "lora": "weights.bin"},
        {"id": "garbage", **ROW, "lora": "garbage.safetensors"},
        {"id": "full", **ROW, "lora": "full.safetensors"},
        {"id": "url", **ROW, "lora": "https://example.com/a.safetensors"},
        {"id": "escape", **ROW, "lora": str(adapters["b"])},  # outside the manifest's folder
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    env = service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1", tiny_dir)
    done = cli("validate", str(manifest), "--model", "i1-fast", env=env)
    text = done.stdout + done.stderr
    assert done.returncode != 0 and "Traceback" not in text
    for line, why in [
        (2, "file not found"),
        (3, ".safetensors file"),
        (4, "not a safetensors file"),
        (5, "holds no LoRA tensors"),
        (6, "not a url reference"),
        (7, "escapes the manifest folder"),
    ]:
        assert f"line {line}: lora: {why}" in text or (f"line {line}: lora:" in text and why in text), (line, text)
    assert "line 1: lora" not in text

    edits = write_manifest(
        tmp_path / "e.jsonl", [{"image": str(local), "instruction": "make it blue", "lora": "a.safetensors"}]
    )
    done = cli("validate", str(edits), "--model", "e1-full", env=env)
    assert done.returncode != 0 and "line 1: lora: e1-full carries its own LoRA" in done.stdout + done.stderr


def test_an_s3_lora_and_a_local_one_run_on_a_worker_and_the_results_say_which(
    tmp_path, start_worker, redis_server, s3_endpoint, tiny_dir, adapters, bucket
):
    s3 = s3_client(s3_endpoint)
    s3.put_object(Bucket=bucket, Key="adapters/b.safetensors", Body=adapters["b"].read_bytes())
    local = tmp_path / "a.safetensors"
    local.write_bytes(adapters["a"].read_bytes())
    rows = [
        {"id": "s3-b", **ROW, "lora": f"s3://{bucket}/adapters/b.safetensors", "lora_scale": 0.8},
        {"id": "local-a", **ROW, "lora": "a.safetensors"},
        {"id": "local-a2", **ROW, "seed": 8, "lora": "a.safetensors"},
        {"id": "plain", **ROW},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    lora_dir = tmp_path / "worker-loras"
    start_worker(
        "worker",
        "--model",
        "i1-fast",
        "--weights",
        "tiny",
        "--device",
        "cpu",
        DREAMBATCH_RUNNER__LORA_DIR=str(lora_dir),
    ).wait_ready()
    start_worker("worker", "--io").wait_ready()
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    out = f"s3://{bucket}/out-{uuid.uuid4().hex[:6]}"
    done = cli("submit", str(manifest), "--model", "i1-fast", "--output", out, "--wait", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    prefix = out.split("/", 3)[3]
    listing = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    [results_key] = [k for k in listing if k.endswith("results.jsonl")]
    lines = {
        r["id"]: r for r in map(json.loads, s3.get_object(Bucket=bucket, Key=results_key)["Body"].read().splitlines())
    }
    assert {r["status"] for r in lines.values()} == {"completed"}, lines
    assert [k for k in listing if "/_loras/" in k] and len([k for k in listing if "/_loras/" in k]) == 1
    s3_b, local_a = lines["s3-b"]["output"]["lora"], lines["local-a"]["output"]["lora"]
    assert s3_b["source"] == f"s3://{bucket}/adapters/b.safetensors" and s3_b["scale"] == 0.8
    assert local_a["source"] == str(local) and local_a["sha256"] == lines["local-a2"]["output"]["lora"]["sha256"]
    assert lines["plain"]["output"]["lora"] is None
    wait_until(lambda: len(list(lora_dir.glob("*.safetensors"))) == 2, 10, what="two adapters in the worker cache")


def test_an_e1_1_edit_runs_with_a_lora_and_the_next_edit_without_one_is_the_base_models(tiny_dir, adapters):
    from worker.runners.base import EditRequest
    from worker.runners.hidream_e1 import HiDreamE1Runner

    runner = HiDreamE1Runner("e1-1", "tiny")
    source = Image.new("RGB", (256, 256), (200, 40, 40))
    width, height = runner.canvas_size(*source.size)
    canvas = source.resize((width, height))

    def edit(lora: LoraChoice | None) -> np.ndarray:
        request = EditRequest(image=canvas, instruction="make it blue", width=width, height=height, steps=2, lora=lora)
        return np.asarray(runner.edit(request).images[0], dtype=np.int16)

    base = edit(None)
    with_a = edit(LoraChoice(str(adapters["a"]), "lora_a"))
    assert np.abs(with_a - base).max() > 0 and np.array_equal(edit(None), base)

    from jobs.errors import ModelError

    with pytest.raises(ModelError, match="carries its own LoRA"):
        HiDreamE1Runner("e1-full", "tiny").use_lora(LoraChoice(str(adapters["a"]), "lora_a"), None)
