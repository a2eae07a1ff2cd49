"""The memory planner's table for docs/memory.md: model × card → plan, peak memory, seconds per image.

    python bench/memory_table.py [--mfu 0.4] [--cpu-tflops 1.0]

Everything printed is computed, nothing measured: component sizes from the published configs on the `meta`
device (worker.runners.memory.real_sizes), peaks from `peak_bytes`, and seconds per image from FLOPs
(worker.runners.fullsize.cost) at an assumed share of each card's dense bf16 rate, plus what a plan moves
over PCIe. The assumptions are the constants below and the flags.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.models import MODELS  # noqa: E402
from worker.runners import memory  # noqa: E402
from worker.runners.fullsize import LLAMA_TOKENS, build_transformer, cost  # noqa: E402


@dataclass(frozen=True)
class Card:
    name: str
    total_gib: float  # what torch.cuda.mem_get_info reports as total
    bf16_tflops: float  # dense, fp32 accumulate (what torch's bf16 matmuls use)
    pcie_gbs: float  # host → device, pinned memory, sustained


CARDS = {
    "24 GB": Card("RTX 4090", 23.6, 165.0, 20.0),  # PCIe 4.0 x16
    "48 GB": Card("L40S", 44.4, 362.0, 20.0),  # PCIe 4.0 x16
    "80 GB": Card("H100 SXM", 79.1, 989.0, 40.0),  # PCIe 5.0 x16
    "141 GB": Card("H200", 139.8, 989.0, 40.0),
}
INT8_SLOWDOWN = 1.10  # weight-only int8: each linear's weight is cast to bf16 before its matmul (torchao 0.18)
TEXT_TOKENS = LLAMA_TOKENS  # every text is padded to 128 tokens
# a row's work as the presets run it: (steps, guidance branches, width, height); E1's edit pass sees
# [target | source] (twice the width) and 3 branches; with refine_strength 0.3 the last steps run at I1's 2
WORK = {
    "i1-full": [(50, 2, 1024, 1024)],
    "i1-dev": [(28, 1, 1024, 1024)],
    "i1-fast": [(16, 1, 1024, 1024)],
    "e1-1": [(19, 3, 2048, 1024), (9, 2, 1024, 1024)],
    "e1-full": [(19, 3, 1536, 768), (9, 2, 768, 768)],
}


def seconds_per_image(
    model: str,
    plan: memory.MemoryPlan,
    card: Card,
    sizes: memory.ComponentSizes,
    transformer,
    mfu: float,
    cpu_tflops: float,
) -> float:
    """Transformer time (FLOPs at `mfu` of the card's rate; a streamed transformer's steps take at least its
    bytes over PCIe, the copy overlapping the compute), plus encoding one new text (the row's prompt; a job's
    one negative prompt comes from the prompt cache): on the CPU at `cpu_tflops`, or streamed over PCIe."""
    rate = mfu * card.bf16_tflops * 1e12 / (INT8_SLOWDOWN if "transformer" in plan.int8 else 1)
    stored = sizes.int8["transformer"] if "transformer" in plan.int8 else sizes.weights["transformer"]
    total = 0.0
    for steps, branches, width, height in WORK[model]:
        step = branches * cost(transformer, width, height).flops_per_forward / rate
        if plan.transformer == "stream":
            step = max(step, stored / (card.pcie_gbs * 1e9))
        total += steps * step
    encoders = memory.TEXT_ENCODERS
    encoder_flops = 2 * TEXT_TOKENS * sum(sizes.weights[name] // 2 for name in encoders)
    if plan.text_encoders == "cpu":
        total += encoder_flops / (cpu_tflops * 1e12)
    elif plan.text_encoders == "stream":
        moved = sum(sizes.int8[n] if n in plan.int8 else sizes.weights[n] for n in encoders)
        total += moved / (card.pcie_gbs * 1e9)
    else:
        total += encoder_flops / (mfu * card.bf16_tflops * 1e12)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mfu", type=float, default=0.4, help="share of the card's dense bf16 rate the model gets")
    ap.add_argument("--cpu-tflops", type=float, default=1.0, help="the host's bf16 rate for text-cpu encoding")
    args = ap.parse_args()
    sizes, transformer = memory.real_sizes(), build_transformer("meta")
    print(
        "component sizes (bf16, computed on meta): "
        + ", ".join(f"{name} {b / 1e9:.2f} GB" for name, b in sizes.weights.items())
    )
    print("int8: " + ", ".join(f"{name} {b / 1e9:.2f} GB" for name, b in sizes.int8.items()))
    print("activations (estimate): " + ", ".join(f"{m} {b / memory.GiB:.2f} GiB" for m, b in sizes.activations.items()))
    print()
    print("| model | card | plan | peak GiB (computed) | s/image (computed) |")
    print("|---|---|---|---|---|")
    for model in MODELS:
        for label, card in CARDS.items():
            choice = memory.choose_plan(model, int(card.total_gib * memory.GiB), sizes)
            seconds = seconds_per_image(model, choice.plan, card, sizes, transformer, args.mfu, args.cpu_tflops)
            print(
                f"| {model} | {label} ({card.name}) | `{choice.plan.name}` | {choice.peak_bytes / memory.GiB:.1f} | "
                f"{seconds:.0f} |"
            )
    print()
    print("every plan on every card (peak GiB / s per image, i1-full; * = does not fit):")
    print("| plan | " + " | ".join(CARDS) + " |")
    print("|---|" + "---|" * len(CARDS))
    for plan in memory.PLANS.values():
        cells = []
        for card in CARDS.values():
            peak = memory.peak_bytes(plan, "i1-full", sizes)
            fits = peak <= memory.USABLE * card.total_gib * memory.GiB
            seconds = seconds_per_image("i1-full", plan, card, sizes, transformer, args.mfu, args.cpu_tflops)
            cells.append(f"{peak / memory.GiB:.1f} / {seconds:.0f}{'' if fits else '*'}")
        print(f"| `{plan.name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
