"""Seconds per denoising step and per image, achieved TFLOP/s and MFU of the HiDream transformer.

    python bench/model_step.py --weights random-full-size              # a GPU: real-size, random weights
    python bench/model_step.py --weights random-full-size --device meta  # anywhere: parameters and FLOPs only
    python bench/model_step.py --weights tiny --device cpu              # the same code path on the tiny model

Builds HiDream-I1's transformer (one architecture for I1-Full/Dev/Fast and E1) directly on the device, then
times transformer forwards at each model's native input: I1 at 1024² (4,096 image tokens; batch 2 with CFG
for Full, 1 for Dev/Fast), E1.1's edit pass on [target | source] of a 1024² canvas (8,192 tokens, 3 guidance
branches), E1-Full's on a 768² canvas (4,608 tokens, 3 branches). Each variant — diffusers' routing, the
sync-free routings, padding folded, torch.compile — is timed on the same inputs and its output compared
with diffusers' (max abs difference). s/image = steps × s/step (the transformer only: no text encoding,
no VAE). FLOPs: `fullsize.cost`, 2 per multiply-add (≈78 TFLOP per 1024² forward).

Prints figures; never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.runners.fullsize import build_transformer, card_peak, cost, random_inputs  # noqa: E402
from worker.runners.moe import install_moe_dispatch  # noqa: E402
from worker.runners.padding import install_fold_padding, remove_fold_padding  # noqa: E402

# model → (canvas width, height in pixels, width multiplier of the transformer input, batch, steps)
NATIVE = {
    "i1-full": (1024, 1024, 1, 2, 50),
    "i1-dev": (1024, 1024, 1, 1, 28),
    "i1-fast": (1024, 1024, 1, 1, 16),
    "e1-1": (1024, 1024, 2, 3, 28),
    "e1-full": (768, 768, 2, 3, 28),
    "i1-fast-4:3": (1024, 768, 1, 1, 16),  # non-square: diffusers pads 3,072 tokens to 4,096
}
VARIANTS = ["diffusers", "dense", "grouped", "grouped+fold", "grouped+fold+compile"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, inputs: dict, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = model(**inputs)[0]  # warm-up (and compile)
        sync(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            out = model(**inputs)[0]
            sync(device)
            times.append(time.perf_counter() - started)
    return statistics.median(times), out


def variant(model, name: str, backend: str = "inductor"):
    """`model` switched, in place, to what a variant names: routing (diffusers = its own), +fold (padding
    folded), +compile (each block compiled by `backend`, full graph). In place, not a copy: a real-size copy
    would need a second 34 GB."""
    parts = name.split("+")
    blocks = [*model.double_stream_blocks, *model.single_stream_blocks]
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile sets; None = the plain forward
    install_moe_dispatch(model, {"diffusers": "off"}.get(parts[0], parts[0]))
    (install_fold_padding if "fold" in parts else remove_fold_padding)(model)
    if "compile" in parts:
        for block in blocks:
            block.compile(backend=backend, fullgraph=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", choices=["random-full-size", "tiny"], default="random-full-size")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "meta")
    ap.add_argument("--models", default=",".join(NATIVE))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-sweep", default="1,2,4", help="micro-batch sizes timed for i1-fast (best variant)")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the card's dense bf16 rate; default: fullsize.PEAKS by the card's name (H200: 790 "
        "measured, 989 datasheet)",
    )
    args = ap.parse_args()
    variants = args.variants.split(",")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type in ("cuda", "meta") else torch.float32

    if args.weights == "tiny":
        from worker.runners.tiny import tiny_transformer

        torch.manual_seed(0)
        base = tiny_transformer().to(device)
        latent_side = 8 * 32  # so the tiny model sees a 32x32 latent, as for "1024²"
    else:
        base = build_transformer(device, dtype)
        latent_side = 1024
    real = cost(build_transformer("meta"), 1024, 1024)
    print(
        f"transformer ({args.weights}): {real.total_params / 1e9:.2f} B parameters, "
        f"{real.active_params / 1e9:.2f} B active per image token, "
        f"{real.flops_per_forward / 1e12:.1f} TFLOP per forward at 1024² ({real.image_tokens} image + "
        f"{real.text_tokens} text tokens)"
    )
    if device.type == "meta":
        for model, (width, height, wide, batch, steps) in NATIVE.items():
            c = cost(base, width * wide, height)
            print(
                f"  {model}: {width}x{height}, transformer input {width * wide}x{height} ({c.image_tokens} image "
                f"tokens), batch {batch}, {steps} steps: {c.flops_per_forward * batch / 1e12:.1f} TFLOP per step, "
                f"{c.flops_per_forward * batch * steps / 1e15:.2f} PFLOP per image"
            )
        print("meta device: shapes only; run on a GPU for timings")
        return
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
        args.peak_tflops = args.peak_tflops or card_peak(card)
        peak = f"peak {args.peak_tflops:.0f} TFLOP/s bf16 dense" if args.peak_tflops else "peak unknown (--peak-tflops)"
        print(f"device: {card}, {peak}, torch {torch.__version__}")

    for model in args.models.split(","):
        width, height, wide, batch, steps = NATIVE[model]
        scale = latent_side / 1024
        w, h = int(width * wide * scale), int(height * scale)
        base.max_seq = max(base.config.max_resolution[0] * base.config.max_resolution[1] // 4, (w // 16) * (h // 16))
        generator = torch.Generator(device).manual_seed(0)
        inputs = random_inputs(base, batch, w, h, device, dtype, generator)
        if args.weights == "tiny":
            inputs["encoder_hidden_states_t5"] = torch.randn(batch, 16, 32, device=device, dtype=dtype)
            inputs["encoder_hidden_states_llama3"] = torch.randn(2, batch, 16, 32, device=device, dtype=dtype)
            inputs["pooled_embeds"] = torch.randn(batch, 64, device=device, dtype=dtype)
        flops = cost(base, int(width * wide), height).flops_per_forward * batch if args.weights != "tiny" else None
        reference = None
        for name in variants:
            try:
                seconds, out = timed(variant(base, name), inputs, device, args.repeats)
            except Exception as exc:  # e.g. grouped_mm on a card or dtype it does not run on
                print(f"  {model} {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            reference = out if reference is None else reference
            diff = (out.float() - reference.float()).abs().max().item()
            line = (
                f"  {model} {name}: {seconds:.4f} s/step (batch {batch}), {seconds * steps:.2f} s/image ({steps} steps)"
            )
            if flops:
                achieved = flops / seconds / 1e12
                line += f", {achieved:.0f} TFLOP/s"
                if args.peak_tflops:
                    line += f", MFU {achieved / args.peak_tflops:.1%}"
            print(f"{line}, max |diff| vs diffusers {diff:.3g}")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # micro-batching on the device: s/image of i1-fast at 1024² for several items per forward, sync-free
    # routing where it runs
    best = variant(base, "grouped+fold" if device.type == "cuda" else "diffusers")
    width, height, _, _, steps = NATIVE["i1-fast"]
    side = int(width * latent_side / 1024)
    base.max_seq = base.config.max_resolution[0] * base.config.max_resolution[1] // 4
    for batch in (int(b) for b in args.batch_sweep.split(",")):
        inputs = random_inputs(base, batch, side, side, device, dtype)
        if args.weights == "tiny":
            inputs["encoder_hidden_states_t5"] = torch.randn(batch, 16, 32, device=device, dtype=dtype)
            inputs["encoder_hidden_states_llama3"] = torch.randn(2, batch, 16, 32, device=device, dtype=dtype)
            inputs["pooled_embeds"] = torch.randn(batch, 64, device=device, dtype=dtype)
        try:
            seconds, _ = timed(best, inputs, device, args.repeats)
        except torch.cuda.OutOfMemoryError:
            print(f"  i1-fast micro-batch {batch}: out of memory")
            break
        print(
            f"  i1-fast micro-batch {batch}: {seconds / batch:.4f} s/step per image, "
            f"{seconds * steps / batch:.2f} s/image"
        )


if __name__ == "__main__":
    main()
