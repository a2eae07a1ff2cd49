"""Measured peak GPU memory and seconds per image of a model under each memory plan (needs a CUDA card).

    python bench/memory_peak.py --model i1-full [--weights DIR] [--plans resident,text-cpu,int8] [--steps 50]

For each plan, in a fresh process (so one plan's allocations never count for the next): load the runner with
RUNNER__MEMORY_PLAN set to it, render one 1024² image at the preset's steps and guidance (two timed runs after a
warm-up, the prompt cache off so the text encoders run every time), and print the plan the
worker chose, `torch.cuda.max_memory_allocated` and the image's seconds. Compare with the computed peaks of
bench/memory_table.py. E1 models are not covered yet (their runner needs an input image).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def measure(model: str, weights: str | None, plan: str, steps: int | None, device: str) -> dict:
    import torch

    from jobs.models import MODELS
    from jobs.settings import RunnerSettings
    from worker.runners.base import GenerateRequest
    from worker.runners.hidream_i1 import HiDreamI1Runner

    preset = MODELS[model].defaults
    runner = HiDreamI1Runner(model, weights, device=device, options=RunnerSettings(memory_plan=plan, prompt_cache_mb=0))
    started = time.perf_counter()
    runner.load()
    loaded_s = time.perf_counter() - started
    request = GenerateRequest(
        prompt="a lighthouse at dusk, watercolor",
        negative_prompt="blurry",
        seed=1,
        steps=steps or preset["steps"],
        guidance_scale=preset["guidance_scale"],
        shift=preset["shift"],
        scheduler=preset["scheduler"],
    )
    runner.generate(request)  # warm-up
    cuda = torch.device(device).type == "cuda"  # a CPU run checks the script's path only (tiny weights)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        runner.generate(request)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return {
        "plan": plan,
        "load_s": round(loaded_s, 1),
        "s_per_image": round(min(times), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "card": torch.cuda.get_device_name() if cuda else device,
        "total_gib": round(torch.cuda.mem_get_info()[1] / 2**30, 1) if cuda else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="i1-full")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--plans", default="resident,text-cpu,text-stream,int8,stream,int8-stream")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one plan
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.weights, args.one, args.steps, args.device)))
        return
    print("| plan | peak GiB (measured) | s/image (measured) | load s |")
    print("|---|---|---|---|")
    for plan in args.plans.split(","):
        command = [sys.executable, __file__, "--model", args.model, "--one", plan, "--device", args.device]
        command += ["--weights", args.weights] if args.weights else []
        command += ["--steps", str(args.steps)] if args.steps else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"| {plan} | failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '?'} | | |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {plan} | {row['peak_gib']} | {row['s_per_image']} | {row['load_s']} |  ({row['card']}, "
            f"{row['total_gib']} GiB)"
        )


if __name__ == "__main__":
    main()
