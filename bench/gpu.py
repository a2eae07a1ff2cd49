"""One GPU run for every figure the H200 lease is for: the card's bf16 rate, HiDream-I1 built at real size in
GPU memory, transformer s/step and MFU per variant, the plain diffusers loop against dreambatch's item path on
the same pipeline, a micro-batch sweep, E1.1 edit + refine, fp8, compiled blocks, peak memory per memory plan.

What a GPU session runs (the device tool's `run`, with `carry: [".whl"]` and timeout_s 510; the wheels come
from `bash bench/gpu_wheels.sh`, run once here):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && python3 bench/gpu.py --json $OUT/gpu.json

Anywhere else:

    python bench/gpu.py --tiny              # every section on the CPU with tiny random weights (~1 min)
    python bench/gpu.py --tiny --quick      # fewer items and repeats (tests/test_gpu_bench.py)
    python bench/gpu.py --device meta       # real-size shapes only: the parameters of every component

Random weights, real shapes (`worker.runners.fullsize.build_pipeline`: ~31 B parameters, 57 GiB in bf16, made
on the GPU, nothing downloaded or written); the images are noise, the costs are the real ones. Sections, in
order; each prints its figures as soon as it has them, and `--json` gets them all (rewritten after each one):

  peak      the bf16 rate of a big matmul now (TFLOP/s), beside fullsize.PEAKS' rate for the card (H200: 790
            measured on this workplace's cards, 989 datasheet); MFU is given against both
  build     seconds to build, parameters and GiB per component, GPU memory held, the expert routing installed
  step      transformer s/step, TFLOP/s and MFU at I1-Fast's native input (1024², batch 1) for diffusers'
            routing (eager) and the sync-free ones (bench/model_step.py's variants), max |diff| vs diffusers
  pipeline  A = the loop a user writes (`HiDreamImagePipeline(prompt)` + PNG save, LCM noise seeded as
            dreambatch seeds it) and C = dreambatch's item path (`create_job`, then `process_item` from 3
            threads sharing one GPU lock, in-memory store, local object store), interleaved in pairs on the
            SAME pipeline object: images/s, GPU-busy share (model-call time ÷ wall), time outside the model
            per image, C/A per pair, max pixel difference A vs C (0 expected: same seeds, same sample size),
            the transformer's s/step and MFU inside each, peak GPU memory
  batch     micro-batch sweep: transformer s/step per image and MFU at batch 1, 2, 4 (dreambatch's routing)
  e1        E1.1 edit + refine on one transformer (the refine stage runs on the E1.1 transformer itself), a
            1024² canvas: s/step per stage with MFU, measured on a short run and extrapolated to the default
            28 steps (refine 0.3), and to refine 0
  fp8       torchao float8 (dynamic activations, per-row weights) on a copy of the transformer: s/step, MFU
            (against the bf16 rate), max |diff| vs bf16; skipped with the reason where it cannot run (CPU)
  compile   each block torch.compiled (full graph, sync-free routing + fold): compile seconds, s/step, MFU;
            then fp8 + compile when fp8 ran and time is left
  plans     peak GPU memory of one image under each memory plan that keeps everything on the card (resident,
            then int8: `worker.runners.memory.apply_plan`); plans with parts off the card need a process
            each: bench/memory_peak.py

`--budget-s` (default 420) bounds the run: a section whose estimate does not fit in the time left is skipped
and says so, so the script ends inside the lease. Prints figures; never asserts.
"""  # noqa: E501 (the device command above stays one line, to copy as it is)

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model_step import sync, timed, variant  # noqa: E402
from worker.runners.fullsize import (  # noqa: E402
    LATENT_FACTOR,
    build_pipeline,
    card_peak,
    cost,
    datasheet_peak,
    random_inputs,
)

MODEL = "i1-fast"  # the model the pipeline, batch and step sections run (16 steps, no CFG, flash scheduler)
C_THREADS = 3  # a GPU worker's item threads (worker.cli.default_threads): model, next input, last upload
SECTIONS = ["peak", "build", "step", "pipeline", "batch", "e1", "fp8", "compile", "plans"]
# rough seconds each section takes: (real size on an H200, tiny on a 2-core CPU); a section starts only if
# its estimate fits in the budget left, and the loops inside one stop at their section's estimate
ESTIMATES = {
    "peak": (10, 2),
    "build": (60, 5),
    "step": (30, 10),
    "pipeline": (90, 30),
    "batch": (20, 5),
    "e1": (40, 10),
    "fp8": (45, 2),
    "compile": (150, 30),
    "plans": (30, 5),
}


def log(line: str = "") -> None:
    print(line, flush=True)


class Budget:
    """Seconds since the script started, against `--budget-s`."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    results: dict[str, Any] = field(default_factory=dict)
    pipe: Any = None
    latent_side: int = 0  # the transformer's native latent side (128 real = 1024² px, 32 tiny = 64² px)
    peak: float | None = None  # TFLOP/s MFU is taken against (the table's, or --peak-tflops)
    matmul: float | None = None  # TFLOP/s a big matmul ran at in this run
    reference: torch.Tensor | None = None  # diffusers' transformer output on `inputs`, for max |diff|
    inputs: dict[str, Any] | None = None  # one denoising step's transformer inputs at the native size
    fp8: Any = None  # the float8 copy of the transformer, between the fp8 and compile sections
    section_started: float = 0.0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def estimate(self, name: str) -> float:
        return ESTIMATES[name][1 if self.args.tiny else 0]

    def section_time_left(self, name: str) -> float:
        """Seconds the running section has left of its estimate (loops inside it stop at 0)."""
        return self.estimate(name) - (time.monotonic() - self.section_started)

    def mfu(self, flops: float, seconds: float) -> dict[str, float | None]:
        """Achieved TFLOP/s and MFU against the table's rate and against this run's matmul."""
        achieved = flops / seconds / 1e12
        return {
            "tflops": achieved,
            "mfu": achieved / self.peak if self.peak else None,
            "mfu_vs_matmul": achieved / self.matmul if self.matmul else None,
        }

    def write_json(self) -> None:
        if not self.args.json:
            return
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, path)


def rate_text(rates: dict[str, float | None]) -> str:
    text = f"{rates['tflops']:.3g} TFLOP/s"
    if rates["mfu"] is not None:
        text += f", MFU {rates['mfu']:.1%}"
    if rates["mfu_vs_matmul"] is not None:
        text += f" ({rates['mfu_vs_matmul']:.1%} of this run's matmul)"
    return text


def forward_flops(transformer: Any, latent_w: int, latent_h: int, batch: int = 1) -> float:
    """FLOPs of one transformer forward on a latent_w x latent_h latent (fullsize.cost, 2 per multiply-add)."""
    return cost(transformer, latent_w * LATENT_FACTOR, latent_h * LATENT_FACTOR).flops_per_forward * batch


def as_runner_sets_it(b: Bench) -> dict[str, Any]:
    """The transformer back to what dreambatch's runner makes of it (routing, folding, compile: Settings)."""
    from worker.runners.hidream_i1 import speed_up_transformer
    from worker.runners.moe import describe

    transformer = b.pipe.transformer
    variant(transformer, "diffusers")  # no compiled blocks, no folding, diffusers' routing
    speed_up_transformer(transformer, settings().runner)
    return describe(transformer)


def settings():
    from jobs.settings import Settings

    return Settings()


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---- sections --------------------------------------------------------------------------------------------


def section_peak(b: Bench) -> dict[str, Any]:
    n, repeats = (8192, 10) if b.cuda else (1024, 3)
    dtype = torch.bfloat16 if b.cuda else torch.float32
    a = torch.randn(n, n, device=b.device, dtype=dtype)
    m = torch.randn(n, n, device=b.device, dtype=dtype)
    for _ in range(3):
        a @ m
    sync(b.device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ m
    sync(b.device)
    seconds = (time.perf_counter() - started) / repeats
    b.matmul = 2 * n**3 / seconds / 1e12
    card = torch.cuda.get_device_name(b.device) if b.cuda else platform.processor() or "cpu"
    table, datasheet = card_peak(card), datasheet_peak(card)
    b.peak = b.args.peak_tflops or table
    source = "--peak-tflops" if b.args.peak_tflops else "fullsize.PEAKS"
    log(
        f"card {card}, torch {torch.__version__}: {n}³ {str(dtype).removeprefix('torch.')} matmul at "
        f"{b.matmul:.4g} TFLOP/s now; MFU below against {b.peak or 'n/a'} TFLOP/s ({source}; datasheet "
        f"{datasheet or 'n/a'}) and against this matmul"
    )
    return {
        "card": card,
        "torch": torch.__version__,
        "matmul_n": n,
        "matmul_dtype": str(dtype),
        "matmul_tflops": b.matmul,
        "peak_tflops": b.peak,
        "peak_source": source,
        "table_tflops": table,
        "datasheet_tflops": datasheet,
    }


def section_build(b: Bench) -> dict[str, Any]:
    from jobs.models import MODELS
    from worker.runners.hidream_i1 import prepare_pipeline
    from worker.runners.moe import describe
    from worker.runners.schedulers import make_scheduler

    preset = MODELS[MODEL].defaults
    scheduler = make_scheduler(preset["scheduler"], preset["shift"])
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if b.args.tiny:
            from worker.runners.tiny import tiny_pipeline, tiny_transformer

            pipe = tiny_pipeline(scheduler, tiny_transformer)
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    component.to(b.device, *([] if b.dtype == torch.float32 else [b.dtype]))
                    component.requires_grad_(False)
        else:
            pipe = build_pipeline(scheduler, b.device, b.dtype)
    sync(b.device)
    seconds = time.perf_counter() - started
    components = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            params = sum(p.numel() for p in module.parameters())
            components[name] = {
                "class": type(module).__name__,
                "params": params,
                "gib": sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30,
            }
    total = sum(c["params"] for c in components.values())
    gib = sum(c["gib"] for c in components.values())
    weights = "tiny" if b.args.tiny else "random, real size"
    log(
        f"HiDream-I1 ({weights}, {str(b.dtype).removeprefix('torch.')}) built on {b.device} in {seconds:.1f} s: "
        f"{total / 1e9:.3f} B parameters, {gib:.2f} GiB"
    )
    for name, c in components.items():
        log(f"  {name:15} {c['class']:30} {c['params'] / 1e6:10.3f} M parameters {c['gib']:7.3f} GiB")
    out: dict[str, Any] = {"seconds": seconds, "params": total, "gib": gib, "components": components}
    if b.device.type == "meta":
        return out
    b.pipe = prepare_pipeline(pipe, settings().runner)
    b.latent_side = b.pipe.default_sample_size
    out["routing"] = describe(b.pipe.transformer)
    out["render_px"] = b.latent_side * b.pipe.vae_scale_factor
    if b.cuda:
        out["gpu_allocated_gib"] = torch.cuda.memory_allocated(b.device) / 2**30
        log(
            f"  GPU memory allocated: {out['gpu_allocated_gib']:.1f} GiB; routing as the runner sets it: "
            f"{out['routing']}"
        )
    return out


def section_step(b: Bench) -> dict[str, Any]:
    transformer, side = b.pipe.transformer, b.latent_side
    generator = torch.Generator(b.device).manual_seed(0)
    b.inputs = random_inputs(transformer, 1, side * LATENT_FACTOR, side * LATENT_FACTOR, b.device, b.dtype, generator)
    flops = forward_flops(transformer, side, side)
    steps = _steps()
    log(
        f"{MODEL} at {side * b.pipe.vae_scale_factor}² ({(side // 2) ** 2} image tokens), batch 1: "
        f"{flops / 1e12:.3g} TFLOP per step"
    )
    out = {"flops_per_step": flops, "variants": {}}
    first = b.args.variants.split(",")[0]
    for name in b.args.variants.split(","):
        try:
            seconds, result = timed(variant(transformer, name), b.inputs, b.device, b.args.repeats)
        except Exception as exc:  # a routing the device or dtype cannot run
            log(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            out["variants"][name] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        if b.reference is None:
            b.reference = result
        diff = (result.float() - b.reference.float()).abs().max().item()
        rates = b.mfu(flops, seconds)
        out["variants"][name] = {"s_per_step": seconds, "s_per_image": seconds * steps, "max_abs_diff": diff, **rates}
        log(
            f"  {name}: {seconds:.4f} s/step, {seconds * steps:.2f} s/image ({steps} steps), {rate_text(rates)}, "
            f"max |diff| vs {first} {diff:.3g}"
        )
    as_runner_sets_it(b)
    return out


def _steps() -> int:
    from jobs.models import MODELS

    return MODELS[MODEL].defaults["steps"]


class TransformerClock:
    """Time spent in the transformer's forwards, from hooks (CUDA events on a GPU: no syncs added)."""

    def __init__(self, transformer: Any, device: torch.device):
        self.device = device
        self.spans: list[tuple[Any, Any]] = []
        self._open: dict[int, Any] = {}
        self._handles = [
            transformer.register_forward_pre_hook(self._start),
            transformer.register_forward_hook(self._stop),
        ]

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, module: Any, args: Any) -> None:
        self._open[threading.get_ident()] = self._now()

    def _stop(self, module: Any, args: Any, output: Any) -> None:
        self.spans.append((self._open.pop(threading.get_ident()), self._now()))

    def take(self) -> tuple[int, float]:
        """(forwards, seconds) since the last take."""
        spans, self.spans = self.spans, []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return len(spans), sum(start.elapsed_time(end) for start, end in spans) / 1000
        return len(spans), sum(end - start for start, end in spans)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _rows(pair: int, n: int) -> list[dict[str, Any]]:
    from worker.runners.tiny import _CORPUS

    return [{"prompt": f"{_CORPUS[i % 4]}, take {pair}.{i}", "seed": 1000 * pair + i} for i in range(n)]


def run_plain(b: Bench, scheduler: Any, rows: list[dict], folder: Path, steps: int) -> dict[str, Any]:
    """A: the loop a user writes around diffusers' pipeline, PNGs to a folder. The flash (LCM) scheduler
    re-noises from the generator it is handed (dreambatch's SeededFlowMatchLCMScheduler), as a user must for
    the same seed to give the same image."""
    folder.mkdir(parents=True, exist_ok=True)
    model_s, images = [], {}
    started = time.perf_counter()
    for row in rows:
        t0 = time.perf_counter()
        generator = torch.Generator(b.device).manual_seed(row["seed"])
        scheduler.generator = generator
        b.pipe.scheduler = scheduler
        image = b.pipe(prompt=row["prompt"], num_inference_steps=steps, guidance_scale=0.0, generator=generator).images[
            0
        ]
        model_s.append(time.perf_counter() - t0)
        images[row["seed"]] = folder / f"{row['seed']}.png"
        image.save(images[row["seed"]])
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "images_per_s": len(rows) / wall,
        "model_share": sum(model_s) / wall,
        "outside_model_s": (wall - sum(model_s)) / len(rows),
        "images": images,
    }  # (each image's own, too)


def run_dreambatch(b: Bench, runner: Any, rows: list[dict], folder: Path, steps: int) -> dict[str, Any]:
    """C: dreambatch's item path, as a GPU worker runs it: the job made by `create_job`, each item through
    `process_item` from C_THREADS threads that share one GPU lock; in-memory store, local object store."""
    from jobs.models import JobSpec
    from jobs.services import Services
    from jobs.storage import LocalStore
    from jobs.store import MemoryStore
    from jobs.submit import create_job
    from worker import process

    config = settings()
    store, objects = MemoryStore(), LocalStore(str(folder))
    ctx = process.Context(
        settings=config,
        store=store,
        runner=lambda: runner,
        objects=lambda _location: objects,
        notify=lambda job_id, item_id, event_id: None,
        finalize=lambda job_id: None,
        gpu_lock=threading.Lock(),
        revision=lambda: runner.revision,
    )
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**row, "steps": steps}) + "\n" for row in rows))
    queued: list[str] = []
    services = Services(
        config,
        store=store,
        objects=lambda _location: objects,
        publish=lambda _job, ids: queued.extend(ids),
        notify=lambda _events: None,
        finalize=lambda _job_id: None,
    )
    t0 = time.perf_counter()
    job = create_job(JobSpec(model=MODEL, output=objects.location), manifest, services).job
    submit_s = time.perf_counter() - t0
    started = time.perf_counter()
    with ThreadPoolExecutor(C_THREADS) as pool:
        outcomes = list(pool.map(lambda item_id: process.process_item(ctx, job.job_id, item_id), queued))
    wall = time.perf_counter() - started
    process.finalize_job(ctx, job.job_id)  # results.jsonl: the I/O worker's part, not timed
    items = list(store.items(job.job_id))
    done = [item for item in items if item.status == "completed"]
    if len(done) != len(rows):
        errors = sorted({f"{item.status}: {item.error}" for item in items if item.status != "completed"})
        raise RuntimeError(f"{len(done)} of {len(rows)} items completed ({[o.status for o in outcomes]}): {errors}")
    model_s = sum(item.timings.inference_s for item in done)
    outside = [item.timings.total_s - item.timings.inference_s - item.timings.model_wait_s for item in done]
    return {
        "wall_s": wall,
        "images_per_s": len(rows) / wall,
        "model_share": model_s / wall,
        "outside_model_s": (wall - model_s) / len(rows),
        "item_outside_model_s": statistics.mean(outside),
        "submit_s": submit_s,
        "images": {item.seed: Path(item.output.images[0].s3_uri) for item in done},
    }


def max_pixel_diff(a: dict[int, Path], c: dict[int, Path]) -> int:
    import numpy as np
    from PIL import Image

    return max(
        int(
            np.abs(
                np.asarray(Image.open(a[seed]), dtype=np.int16) - np.asarray(Image.open(c[seed]), dtype=np.int16)
            ).max()
        )
        for seed in a
    )


def section_pipeline(b: Bench) -> dict[str, Any]:
    from worker.runners.hidream_i1 import HiDreamI1Runner
    from worker.runners.schedulers import SeededFlowMatchLCMScheduler

    routing = as_runner_sets_it(b)
    steps = _steps()
    scheduler = SeededFlowMatchLCMScheduler.from_config(b.pipe.scheduler.config)  # A's, made before C runs
    runner = HiDreamI1Runner(MODEL, weights=None, device=str(b.device), dtype=None, options=settings().runner)
    runner.use_pipeline(b.pipe, "random:real-size" if not b.args.tiny else "random:tiny")
    side = b.latent_side
    flops = forward_flops(b.pipe.transformer, side, side)
    clock = TransformerClock(b.pipe.transformer, b.device)
    pairs, in_model = [], {"A": [0, 0.0], "C": [0, 0.0]}
    log(
        f"{MODEL}, {steps} steps at {side * b.pipe.vae_scale_factor}², {b.args.items} images per run, "
        f"C with {C_THREADS} threads; routing {routing['modes']}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # warm-up: one image each way (kernel selection, allocator, the routing check), not counted
        run_plain(b, scheduler, _rows(99, 1), root / "warm-a", steps)
        run_dreambatch(b, runner, _rows(99, 1), root / "warm-c", steps)
        clock.take()
        reset_peak_memory(b.device)
        for pair in range(b.args.pairs):
            started = time.monotonic()
            rows = _rows(pair, b.args.items)
            runs = {}
            for path in ("A", "C") if pair % 2 == 0 else ("C", "A"):  # alternate who goes first
                if path == "A":
                    runs["A"] = run_plain(b, scheduler, rows, root / f"a{pair}", steps)
                else:
                    runs["C"] = run_dreambatch(b, runner, rows, root / f"c{pair}", steps)
                forwards, seconds = clock.take()
                in_model[path][0] += forwards
                in_model[path][1] += seconds
                runs[path]["transformer_share"] = seconds / runs[path]["wall_s"]
            a, c = runs["A"], runs["C"]
            diff = max_pixel_diff(a.pop("images"), c.pop("images"))
            ratio = c["images_per_s"] / a["images_per_s"]
            pairs.append({"A": a, "C": c, "c_over_a": ratio, "max_pixel_diff": diff})
            log(f"  pair {pair + 1}: C/A {ratio:.3f}, max pixel diff A vs C {diff}")
            for path, run in (("A", a), ("C", c)):
                own = (
                    (
                        f", each item's own work outside the model call {run['item_outside_model_s'] * 1000:.1f} ms, "
                        f"submit {run['submit_s'] * 1000:.0f} ms"
                    )
                    if path == "C"
                    else ""
                )
                log(
                    f"    {path}: {run['images_per_s']:.4g} images/s; busy: model call {run['model_share']:.1%} of the "
                    f"wall, transformer {run['transformer_share']:.1%}; outside the model "
                    f"{run['outside_model_s'] * 1000:.1f} ms/image of the wall{own}"
                )
            if b.section_time_left("pipeline") < 1.5 * (time.monotonic() - started):
                break
    clock.close()
    out: dict[str, Any] = {
        "steps": steps,
        "items_per_run": b.args.items,
        "threads": C_THREADS,
        "routing": routing,
        "pairs": pairs,
        "c_over_a_median": statistics.median(p["c_over_a"] for p in pairs),
        "a_images_per_s_median": statistics.median(p["A"]["images_per_s"] for p in pairs),
        "c_images_per_s_median": statistics.median(p["C"]["images_per_s"] for p in pairs),
        "max_pixel_diff": max(p["max_pixel_diff"] for p in pairs),
        "peak_gpu_gib": peak_memory_gib(b.device),
    }
    for path, (forwards, seconds) in in_model.items():
        if forwards:
            per_step = seconds / forwards
            out[f"transformer_{path}"] = {"s_per_step": per_step, **b.mfu(flops, per_step)}
            log(f"  transformer inside {path}: {per_step:.4f} s/step, {rate_text(b.mfu(flops, per_step))}")
    summary = (
        f"  C/A median {out['c_over_a_median']:.3f} over {len(pairs)} pairs; max pixel diff {out['max_pixel_diff']}"
    )
    if out["peak_gpu_gib"] is not None:
        summary += f"; peak GPU memory {out['peak_gpu_gib']:.1f} GiB"
    log(summary)
    return out


def section_batch(b: Bench) -> dict[str, Any]:
    transformer, side, steps = b.pipe.transformer, b.latent_side, _steps()
    routing = as_runner_sets_it(b)
    out: dict[str, Any] = {"routing": routing, "sizes": {}}
    for batch in (int(n) for n in b.args.batch_sweep.split(",")):
        inputs = random_inputs(transformer, batch, side * LATENT_FACTOR, side * LATENT_FACTOR, b.device, b.dtype)
        started = time.monotonic()
        try:
            seconds, _ = timed(transformer, inputs, b.device, b.args.repeats)
        except torch.cuda.OutOfMemoryError:
            log(f"  micro-batch {batch}: out of memory")
            out["sizes"][batch] = {"failed": "out of memory"}
            break
        rates = b.mfu(forward_flops(transformer, side, side, batch), seconds)
        out["sizes"][batch] = {
            "s_per_step": seconds,
            "s_per_step_per_image": seconds / batch,
            "s_per_image": seconds * steps / batch,
            **rates,
        }
        log(
            f"  micro-batch {batch}: {seconds / batch:.4f} s/step per image, {seconds * steps / batch:.2f} s/image, "
            f"{rate_text(rates)}"
        )
        if b.section_time_left("batch") < 2.5 * (time.monotonic() - started):
            break
    return out


def section_e1(b: Bench) -> dict[str, Any]:
    from PIL import Image

    from jobs.models import MODELS
    from worker.runners.hidream_e1 import REFERENCE_SIDE, AdapterSwitch, HiDreamE1Pipeline, StepInfo
    from worker.runners.schedulers import make_scheduler

    routing = as_runner_sets_it(b)
    pipe, transformer = b.pipe, b.pipe.transformer
    spec = MODELS["e1-1"]
    defaults = spec.defaults
    side = spec.base_size * b.latent_side * pipe.vae_scale_factor // REFERENCE_SIDE  # the canvas, in pixels
    latent = side // pipe.vae_scale_factor
    tokens = (latent // transformer.config.patch_size) ** 2
    saved = transformer.max_seq, pipe.scheduler
    transformer.max_seq = 2 * tokens  # the edit pass sees [target | source]
    pipe.scheduler = make_scheduler("flow_unipc", 3.0)  # I1-Full's, which the E1 folders' components bring
    e1 = HiDreamE1Pipeline(pipe, AdapterSwitch(transformer), token_budget=tokens)
    image = Image.effect_noise((side, side), 64).convert("RGB")
    times: list[tuple[str, float]] = []

    def on_step(info: StepInfo) -> None:
        sync(b.device)
        times.append((info.stage, time.perf_counter()))

    def edit(steps: int, hook: Callable | None = None) -> float:
        generator = torch.Generator(b.device).manual_seed(0)
        started = time.perf_counter()
        e1(
            image,
            "make the sky a deep blue",
            negative_prompt=defaults["negative_prompt"],
            refine_prompt="a landscape under a deep blue sky",
            steps=steps,
            guidance_scale=defaults["guidance_scale"],
            image_guidance_scale=defaults["image_guidance_scale"],
            clip_cfg_norm=True,
            refine_strength=0.5,
            generator=generator,
            on_step=hook,
        )
        return time.perf_counter() - started

    try:
        edit(2)  # warm-up at these shapes
        steps = b.args.e1_steps
        started = time.perf_counter()
        total = edit(steps, on_step)
        marks = [started, *(t for _, t in times)]
        # a step's time: from the previous step's hook to its own (the first also encodes: left out)
        spans = {"edit": [], "refine": []}
        for i, (stage, t) in enumerate(times[1:], start=1):
            if stage == times[i - 1][0]:  # the first refine step also switches stage: left out
                spans[stage].append(t - marks[i])
    finally:
        transformer.max_seq, pipe.scheduler = saved
    edit_s, refine_s = statistics.median(spans["edit"]), statistics.median(spans["refine"])
    ran = {stage: sum(1 for s, _ in times if s == stage) for stage in ("edit", "refine")}
    full_steps, strength = defaults["steps"], defaults["refine_strength"]
    edit_n = int(full_steps * (1 - strength))
    refine_n = full_steps - edit_n
    per_image = total + (edit_n - ran["edit"]) * edit_s + (refine_n - ran["refine"]) * refine_s
    no_refine = total + (full_steps - ran["edit"]) * edit_s - ran["refine"] * refine_s
    edit_rates = b.mfu(forward_flops(transformer, 2 * latent, latent, 3), edit_s)
    refine_rates = b.mfu(forward_flops(transformer, latent, latent, 2), refine_s)
    log(
        f"E1.1 at a {side}² canvas ({tokens} target tokens, edit pass {2 * tokens} x 3 branches, refine x 2), "
        f"one transformer; routing {routing['modes']}"
    )
    log(f"  measured: {steps} steps (refine 0.5: {ran['edit']} edit + {ran['refine']} refine) in {total:.2f} s")
    log(f"  edit step {edit_s:.4f} s, {rate_text(edit_rates)}; refine step {refine_s:.4f} s, {rate_text(refine_rates)}")
    log(
        f"  ≈ {per_image:.2f} s/image at {full_steps} steps, refine {strength} ({edit_n} edit + {refine_n} refine); "
        f"≈ {no_refine:.2f} s/image with refine 0"
    )
    return {
        "canvas_px": side,
        "target_tokens": tokens,
        "measured_steps": steps,
        "measured_s": total,
        "edit_steps_run": ran["edit"],
        "refine_steps_run": ran["refine"],
        "edit_s_per_step": edit_s,
        "edit": edit_rates,
        "refine_s_per_step": refine_s,
        "refine": refine_rates,
        "s_per_image": per_image,
        "s_per_image_no_refine": no_refine,
        "steps": full_steps,
        "refine_strength": strength,
    }


def section_fp8(b: Bench) -> dict[str, Any] | str:
    if not b.cuda:
        return "fp8 needs a CUDA GPU of compute capability 8.9 or more (torch._scaled_mm); this run is on the CPU"
    if torch.cuda.get_device_capability(b.device) < (8, 9):
        return f"fp8 needs compute capability 8.9 or more; this card has {torch.cuda.get_device_capability(b.device)}"
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except Exception as exc:  # not installed, or built for another torch
        return f"torchao float8 not importable: {type(exc).__name__}: {exc}"
    from worker.runners.moe import moe_layers

    transformer, side = b.pipe.transformer, b.latent_side
    variant(transformer, "diffusers")  # the copy routes through its (quantized) expert Linears
    for layer in moe_layers(transformer):
        layer.__dict__.pop("_stacked", None)  # the grouped routing's stacks are not copied (made again below)
    started = time.perf_counter()
    fp8 = copy.deepcopy(transformer)
    quantize_(fp8, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    sync(b.device)
    quantize_s = time.perf_counter() - started
    as_runner_sets_it(b)
    seconds, result = timed(fp8, b.inputs, b.device, b.args.repeats)
    flops = forward_flops(transformer, side, side)
    rates = b.mfu(flops, seconds)
    diff = (result.float() - b.reference.float()).abs().max().item()
    scale = b.reference.float().abs().max().item()
    b.fp8 = fp8
    log(
        f"  torchao {torchao.__version__} float8 (dynamic activations, per-row weights), diffusers' routing: "
        f"quantized in {quantize_s:.1f} s; {seconds:.4f} s/step, {seconds * _steps():.2f} s/image, "
        f"{rate_text(rates)} (of the bf16 rate); max |diff| vs bf16 {diff:.3g} (outputs reach {scale:.3g})"
    )
    return {
        "torchao": torchao.__version__,
        "config": "Float8DynamicActivationFloat8WeightConfig(PerRow)",
        "routing": "diffusers",
        "quantize_s": quantize_s,
        "s_per_step": seconds,
        "max_abs_diff": diff,
        "output_max_abs": scale,
        **rates,
    }


def section_compile(b: Bench) -> dict[str, Any]:
    transformer, side = b.pipe.transformer, b.latent_side
    backend = b.args.compile_backend or ("inductor" if b.cuda else "aot_eager")
    name = ("grouped" if b.cuda else "dense") + "+fold+compile"  # grouped_mm traces in bf16 only
    flops = forward_flops(transformer, side, side)
    out: dict[str, Any] = {"backend": backend, "variants": {}}
    runs = [(name, lambda: variant(transformer, name, backend))]
    if b.fp8 is not None:
        runs.append(("fp8+compile", lambda: _compiled(b.fp8, backend)))
    for label, make in runs:
        if out["variants"] and b.section_time_left("compile") < 60:
            log(f"  {label}: skipped ({b.section_time_left('compile'):.0f} s left of this section's estimate)")
            out["variants"][label] = {"skipped": "no time left in this section"}
            continue
        started = time.perf_counter()
        try:
            seconds, result = timed(make(), b.inputs, b.device, b.args.repeats)
        except Exception as exc:
            log(f"  {label}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            out["variants"][label] = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        first_s = time.perf_counter() - started - seconds * b.args.repeats
        diff = (result.float() - b.reference.float()).abs().max().item()
        rates = b.mfu(flops, seconds)
        out["variants"][label] = {
            "s_per_step": seconds,
            "s_per_image": seconds * _steps(),
            "compile_s": first_s,
            "max_abs_diff": diff,
            **rates,
        }
        log(
            f"  {label} ({backend}): first call (compile) {first_s:.1f} s; {seconds:.4f} s/step, "
            f"{seconds * _steps():.2f} s/image, {rate_text(rates)}, max |diff| vs diffusers {diff:.3g}"
        )
    b.fp8 = None
    if b.cuda:
        torch.cuda.empty_cache()
    as_runner_sets_it(b)
    return out


def _compiled(transformer: Any, backend: str) -> Any:
    """Each block compiled; not full graph: diffusers' routing (what the fp8 copy runs) syncs per MoE layer."""
    for block in (*transformer.double_stream_blocks, *transformer.single_stream_blocks):
        block.compile(backend=backend)
    return transformer


def section_plans(b: Bench) -> dict[str, Any]:
    """Peak GPU memory of one image under the plans that keep every component on the card (resident, int8),
    applied in turn to the one built pipeline; int8 is irreversible, so it goes last. Plans that leave parts in
    CPU memory or stream them each need a process of their own: bench/memory_peak.py measures those."""
    from worker.runners import memory

    names = b.args.plans.split(",") if b.args.plans else ["resident", "int8"]
    out: dict[str, Any] = {"plans": {}}
    scheduler = type(b.pipe.scheduler).from_config(b.pipe.scheduler.config)
    for name in sorted(names, key=lambda n: bool(memory.PLANS[n].int8)):
        plan = memory.PLANS[name]
        if plan.transformer != "device" or plan.text_encoders != "device":
            log(f"  plan {name}: skipped here (parts off the card; bench/memory_peak.py runs it in its own process)")
            out["plans"][name] = {"skipped": "parts off the card: bench/memory_peak.py"}
            continue
        started = time.perf_counter()
        memory.apply_plan(b.pipe, plan, str(b.device))
        reset_peak_memory(b.device)
        with tempfile.TemporaryDirectory() as tmp:
            run_plain(b, scheduler, _rows(50, 1), Path(tmp), 2)
        peak = peak_memory_gib(b.device)
        out["plans"][name] = {"peak_gpu_gib": peak, "seconds": time.perf_counter() - started}
        log(
            f"  plan {name}: peak GPU memory {'n/a on the CPU' if peak is None else f'{peak:.1f} GiB'} "
            f"(one 2-step image, {out['plans'][name]['seconds']:.1f} s with applying the plan)"
        )
    return out


RUN = {
    "peak": section_peak,
    "build": section_build,
    "step": section_step,
    "pipeline": section_pipeline,
    "batch": section_batch,
    "e1": section_e1,
    "fp8": section_fp8,
    "compile": section_compile,
    "plans": section_plans,
}
NEEDS = {
    "step": "build",
    "pipeline": "build",
    "batch": "build",
    "e1": "build",
    "fp8": "step",
    "compile": "step",
    "plans": "build",
}  # a section runs only once this one has


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random weights on the CPU (--device cpu)")
    ap.add_argument("--quick", action="store_true", help="fewer images, pairs and repeats (tests)")
    ap.add_argument("--device", default=None, help="cuda (default when there is one), cpu, or meta (shapes only)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip sections that would end past this")
    ap.add_argument("--json", default=None, help="write every figure here too (rewritten after each section)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the bf16 rate MFU is taken against; default: fullsize.PEAKS by card (H200: 790)",
    )
    ap.add_argument("--sections", default=",".join(SECTIONS), help="the sections to run, in their order")
    ap.add_argument("--variants", default="diffusers,grouped,grouped+fold", help="step section's variants")
    ap.add_argument("--repeats", type=int, default=None, help="timed forwards per variant (default 5; quick 2)")
    ap.add_argument("--items", type=int, default=None, help="images per A or C run (default 4; tiny 3; quick 2)")
    ap.add_argument("--pairs", type=int, default=None, help="A/C pairs (default 3; quick 1)")
    ap.add_argument("--batch-sweep", default=None, help="micro-batch sizes (default 1,2,4; quick 1,2)")
    ap.add_argument("--e1-steps", type=int, default=None, help="steps of the timed E1.1 run (default 6; quick 4)")
    ap.add_argument("--compile-backend", default=None, help="default: inductor on a GPU, aot_eager on the CPU")
    ap.add_argument("--plans", default=None, help="memory plan names (comma-separated) for apply_plan")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # one intra-op thread: on a shared CPU the main and item threads then compare
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.items = args.items or (2 if args.quick else 3 if args.tiny else 4)
    args.pairs = args.pairs or (1 if args.quick else 3)
    args.batch_sweep = args.batch_sweep or ("1,2" if args.quick else "1,2,4")
    args.e1_steps = args.e1_steps or (4 if args.quick else 6)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    b = Bench(args, device, dtype, Budget(args.budget_s))
    wanted = args.sections.split(",")
    b.results = {
        "argv": sys.argv[1:] if argv is None else argv,
        "started": datetime.now(UTC).isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
        "device": str(device),
        "weights": "tiny" if args.tiny else "random, real size",
        "budget_s": args.budget_s,
        "sections": {},
    }
    log(
        f"bench/gpu.py on {device} ({b.results['weights']}), budget {args.budget_s:.0f} s, "
        f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    for name in SECTIONS:
        results = b.results["sections"]
        reason = None
        if name not in wanted:
            reason = "not asked for (--sections)"
        elif device.type == "meta" and name != "build":
            reason = "meta device: shapes only"
        elif name in NEEDS and not {"skipped", "failed"}.isdisjoint(results.get(NEEDS[name], {"skipped": 1})):
            reason = f"needs the {NEEDS[name]} section, which did not run"
        elif b.budget.left() < b.estimate(name):
            reason = f"{b.budget.left():.0f} s of the budget left; it takes about {b.estimate(name)} s"
        log(f"\n== {name}" + (f": skipped ({reason})" if reason else ""))
        if reason:
            results[name] = {"skipped": reason}
            continue
        b.section_started = time.monotonic()
        try:
            found = RUN[name](b)
        except Exception as exc:  # one section's failure must not cost the others their figures
            import traceback

            traceback.print_exc(limit=-6)
            found = {"failed": f"{type(exc).__name__}: {exc}"[:1000]}
            log(f"  failed: {found['failed']}")
            if b.cuda:
                torch.cuda.empty_cache()  # an out-of-memory section leaves the next ones room
        if isinstance(found, str):  # a reason it cannot run here
            log(f"  skipped: {found}")
            found = {"skipped": found}
        found["section_s"] = round(time.monotonic() - b.section_started, 2)
        results[name] = found
        b.results["elapsed_s"] = round(b.budget.elapsed(), 2)
        b.write_json()
    b.results["load_at_end"] = os.getloadavg()
    b.results["elapsed_s"] = round(b.budget.elapsed(), 2)
    b.write_json()
    ran = [n for n, r in b.results["sections"].items() if "skipped" not in r and "failed" not in r]
    log(f"\ndone in {b.budget.elapsed():.1f} s; ran {', '.join(ran) or 'nothing'}; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
