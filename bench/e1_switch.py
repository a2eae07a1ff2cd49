"""HiDream-E1 on tiny weights: load time, seconds per edit with and without the refine stage, what one
switch between the edit and refine steps costs, and the transformer memory each model holds (tiny, and the
real size computed on the meta device: each E1 model holds one HiDream transformer).

    python bench/e1_switch.py
"""

from __future__ import annotations

import tempfile
import time

from PIL import Image

from worker.runners.base import EditRequest
from worker.runners.fullsize import build_transformer
from worker.runners.hidream_e1 import HiDreamE1Runner
from worker.runners.memory import module_bytes
from worker.runners.tiny import make_tiny


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        for model in ("e1-1", "e1-full"):
            folder = make_tiny(model, f"{d}/{model}")
            runner = HiDreamE1Runner(model, weights=str(folder), device="cpu")
            t0 = time.perf_counter()
            runner.load()
            load = time.perf_counter() - t0
            w, h = runner.canvas_size(1200, 800)
            image = Image.new("RGB", (w, h), "white")
            times = {}
            for refine in (0.0, 0.3):
                request = EditRequest(
                    image=image, instruction="make it blue", width=w, height=h, steps=28, refine_strength=refine, seed=1
                )
                runner.edit(request)  # warm-up
                t0 = time.perf_counter()
                runner.edit(request)
                times[refine] = time.perf_counter() - t0
            cost = runner.switch_cost(repeats=5)
            pipe = runner.load()
            held = {id(m): m for m in (pipe.transformers.edit(), pipe.transformers.refine(), pipe.base.transformer)}
            print(
                f"{model}: canvas {w}x{h}, load {load:.2f}s, 28-step edit {times[0.0]:.2f}s (refine 0), "
                f"{times[0.3]:.2f}s (refine 0.3), switch to refine {cost['to_refine'] * 1e3:.2f} ms, "
                f"back {cost['to_edit'] * 1e3:.2f} ms, {len(held)} transformer(s) held, "
                f"{sum(module_bytes(m) for m in held.values()) / 2**20:.2f} MiB"
            )
    real = module_bytes(build_transformer("meta"))
    print(
        f"real size, bf16: one HiDream transformer = {real / 1e9:.1f} GB ({real / 2**30:.1f} GiB); "
        f"each E1 model holds one (E1.1 used to hold two: {2 * real / 1e9:.1f} GB)"
    )


if __name__ == "__main__":
    main()
