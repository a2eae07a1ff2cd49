"""What weight quantization costs in image quality and saves in memory, on the parity cases' tiny weights.

    python bench/memory_quality.py [--parity ../shared/parity] [--cases i1full-square,...] [--variants ...]

Each case runs once per variant through dreambatch's own runners on the CPU, in fp32 (as the parity cases were
made) and in bf16 (what a GPU runs), plain and with the transformer's blocks and Llama quantized. Every run
is compared with the plain fp32 run, and a bf16 run also with the plain bf16 one, as PSNR (dB, over all pixels
of the case's images) with the largest pixel difference. Quantizations:

- `int8`: memory plan `int8` — torchao int8 weight-only on the transformer's blocks and Llama, the text
  encoders streamed (on a CPU that moves nothing): exactly what a 24 GB card runs.
- `fp8`: torchao float8 (e4m3) weight-only on the same linears, for comparison (no plan uses it).
- `nf4`: bitsandbytes NF4 on the same linears, for comparison; skipped unless bitsandbytes is importable.

The plain fp32 run is also compared with the case's expected PNGs (a row notes a difference). The weights are
tiny and random, so these figures say how each method rounds weights of that spread, not how a trained 17 B
model's outliers fare; real-weight figures need a GPU run. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.settings import RunnerSettings  # noqa: E402
from worker.runners import memory  # noqa: E402
from worker.runners.base import EditRequest, GenerateRequest  # noqa: E402

QUANTIZED = ("transformer", "text_encoder_4")  # what each quantized variant changes: the int8 plan's components
VARIANTS = ("fp32", "int8", "fp8", "nf4", "bf16", "bf16-int8", "bf16-fp8", "bf16-nf4")
RUNNABLE = ("i1-full", "i1-dev", "i1-fast", "e1-1", "e1-full")
# (until E1.1 runs on one transformer, its edit steps would stay unquantized and the figures would flatter it)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parity", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "parity"))
    ap.add_argument("--cases", default="", help="comma-separated case ids (default: every runnable case)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    parity = Path(args.parity)
    cases = [c for c in json.loads((parity / "cases.json").read_text())["cases"] if c["model"] in RUNNABLE]
    if args.cases:
        cases = [c for c in cases if c["id"] in args.cases.split(",")]
    variants = [v for v in args.variants.split(",") if not v.endswith("nf4") or _has_bitsandbytes()]
    print(
        f"torch {torch.__version__}, torchao {_version('torchao')}, bitsandbytes {_version('bitsandbytes')}; "
        f"{len(cases)} cases, variants {', '.join(variants)}"
    )
    print(
        "| case | variant | PSNR vs fp32 (dB) | max diff vs fp32 | PSNR vs bf16 (dB) | max diff vs bf16 | "
        "transformer + Llama bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        references: dict[str, np.ndarray] = {}
        for variant in sorted(variants, key=lambda v: (v not in ("fp32", "bf16"), v != "fp32")):
            images, stored = run_case(parity, case, variant)
            if variant == "fp32":
                expected = np.concatenate([pixels(Image.open(parity / p)) for p in case["expected"]["images"]])
                off = np.abs(images - expected).max()
                if off > 1:  # a difference of method, not of memory plan: the quantized runs still compare
                    print(f"| {case['id']} | (fp32 differs from its parity PNGs by up to {off:.0f}) | | | | | |")
            if variant in ("fp32", "bf16"):
                references[variant] = images
            row = [f"{psnr(images, references['fp32']):.1f}", f"{np.abs(images - references['fp32']).max():.0f}"]
            if variant.startswith("bf16") and variant != "bf16" and "bf16" in references:
                row += [f"{psnr(images, references['bf16']):.1f}", f"{np.abs(images - references['bf16']).max():.0f}"]
            else:
                row += ["–", "–"]
            print(f"| {case['id']} | {variant} | {' | '.join(row)} | {stored:,} |", flush=True)


def run_case(parity: Path, case: dict, variant: str) -> tuple[np.ndarray, int]:
    """The case's images under `variant` (stacked), and the bytes of the transformer and Llama as run."""
    dtype, _, quantized = (
        variant.rpartition("-")
        if "-" in variant
        else ("bf16", "", "")
        if variant == "bf16"
        else ("fp32", "", "" if variant == "fp32" else variant)
    )
    plan = "int8" if quantized == "int8" else "resident"
    runner = make_runner(case["model"], str(parity / case["weights"]), plan, dtype)
    pipe = runner.load()
    base = pipe.base if hasattr(pipe, "base") else pipe
    if quantized in ("fp8", "nf4"):
        for name in QUANTIZED:
            (float8 if quantized == "fp8" else nf4)(name, getattr(base, name))
    stored = sum(memory.module_bytes(getattr(base, name)) for name in QUANTIZED)
    params = case["params"]
    if case["model"].startswith("e1"):
        image = Image.open(parity / case["input"]).convert("RGB")
        out = runner.edit(EditRequest(image=image, width=case["canvas"][0], height=case["canvas"][1], **params))
    else:
        out = runner.generate(GenerateRequest(**params))
    return np.concatenate([pixels(im) for im in out.images]), stored


def make_runner(model: str, weights: str, plan: str, dtype: str | None):
    options = RunnerSettings(memory_plan=plan)
    if model.startswith("e1"):
        from worker.runners.hidream_e1 import HiDreamE1Runner

        return HiDreamE1Runner(model, weights, dtype=dtype, options=options)
    from worker.runners.hidream_i1 import HiDreamI1Runner

    return HiDreamI1Runner(model, weights, dtype=dtype, options=options)


def float8(component: str, module: torch.nn.Module) -> None:
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    targets = {id(linear) for _, linear in memory.int8_targets(component, module)}
    quantize_(module, Float8WeightOnlyConfig(), filter_fn=lambda m, _: id(m) in targets)


def nf4(component: str, module: torch.nn.Module) -> None:
    """bitsandbytes NF4 (block 64, compute in the weights' dtype) in place of the same linears."""
    import bitsandbytes as bnb

    for name, linear in memory.int8_targets(component, module):
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, quant_type="nf4"
        )._quantize("cpu")
        if linear.bias is not None:
            quantized.bias = linear.bias
        module.set_submodule(name, quantized)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    main()
