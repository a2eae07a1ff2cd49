"""bench/gpu.py, the one-run GPU benchmark, end to end on tiny weights on the CPU, and the real-size pipeline
it builds on a GPU, here on the meta device. Its timings are not checked (bench figures are never asserted);
that every section runs, that the budget skips what does not fit, and that dreambatch's item path renders
exactly the plain diffusers loop's images, are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from worker.runners.fullsize import build_pipeline
from worker.runners.schedulers import make_scheduler

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["peak", "build", "step", "pipeline", "batch", "e1", "fp8", "compile", "plans"]


def run_bench(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBATCH_TINY_DIR": str(tmp_path / "tiny")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_run_goes_through_every_section_and_the_item_path_renders_the_plain_loops_images(tmp_path):
    results, stdout = run_bench(tmp_path, "--tiny", "--quick", "--budget-s", "150")
    sections = results["sections"]
    assert list(sections) == SECTIONS
    not_run = {name: s for name, s in sections.items() if {"skipped", "failed"} & s.keys()}
    assert list(not_run) == ["fp8"], not_run
    assert "CPU" in sections["fp8"]["skipped"]  # says why, does not crash
    assert all("s_per_step" in v for v in sections["step"]["variants"].values()), sections["step"]
    pipeline = sections["pipeline"]
    assert pipeline["max_pixel_diff"] == 0  # same seed, same sample size: the same PNG both ways
    assert pipeline["pairs"][0]["A"]["images_per_s"] > 0 and pipeline["pairs"][0]["C"]["images_per_s"] > 0
    assert sections["e1"]["s_per_image"] > 0 and sections["batch"]["sizes"]
    assert "max pixel diff A vs C 0" in stdout


def test_sections_that_do_not_fit_the_budget_are_skipped_and_say_why(tmp_path):
    results, stdout = run_bench(tmp_path, "--tiny", "--quick", "--budget-s", "3", "--sections", "peak,build,step")
    sections = results["sections"]
    assert "matmul_tflops" in sections["peak"]
    assert "budget" in sections["build"]["skipped"]
    assert "build" in sections["step"]["skipped"] and "--sections" in sections["pipeline"]["skipped"]
    assert "build: skipped" in stdout


def test_the_real_size_pipeline_has_hidream_i1s_components_and_its_tokens_fit_every_vocabulary():
    pipe = build_pipeline(make_scheduler("flash_flow", 3.0), "meta")  # shapes only: nothing allocated
    params = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }
    assert 17.0e9 < params["transformer"] < 17.2e9
    assert 8.0e9 < params["text_encoder_4"] < 8.1e9  # Llama 3.1 8B
    assert 4.7e9 < params["text_encoder_3"] < 4.8e9  # T5-XXL's encoder
    assert 0.69e9 < params["text_encoder_2"] < 0.70e9 and 0.12e9 < params["text_encoder"] < 0.13e9  # CLIP-G, -L
    assert 0.08e9 < params["vae"] < 0.09e9 and pipe.vae_scale_factor == 8
    assert 30.7e9 < sum(params.values()) < 30.9e9
    ids = [
        pipe.tokenizer("a photo of a cat").input_ids,
        pipe.tokenizer_3("a photo of a cat").input_ids,
        pipe.tokenizer_4("a photo of a cat").input_ids,
    ]
    vocabularies = [
        pipe.text_encoder.config.vocab_size,
        pipe.text_encoder_3.config.vocab_size,
        pipe.text_encoder_4.config.vocab_size,
    ]
    assert all(max(i) < v for i, v in zip(ids, vocabularies, strict=True))
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
