"""HiDream-E1 on tiny weights: load time, seconds per edit with and without the refine stage, and what
one switch between the edit and refine weights costs.

    python bench/e1_switch.py
"""

from __future__ import annotations

import tempfile
import time

from PIL import Image

from worker.runners.base import EditRequest
from worker.runners.hidream_e1 import HiDreamE1Runner
from worker.runners.weights import make_tiny


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
                request = EditRequest(image=image, instruction="make it blue", width=w, height=h, steps=28,
                                      refine_strength=refine, seed=1)
                runner.edit(request)  # warm-up
                t0 = time.perf_counter()
                runner.edit(request)
                times[refine] = time.perf_counter() - t0
            cost = runner.switch_cost(repeats=5)
            print(f"{model}: canvas {w}x{h}, load {load:.2f}s, 28-step edit {times[0.0]:.2f}s (refine 0), "
                  f"{times[0.3]:.2f}s (refine 0.3), switch to refine {cost['to_refine'] * 1e3:.2f} ms, "
                  f"back {cost['to_edit'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
