"""Memory plans: which pipeline components a worker keeps on its GPU, which in CPU memory, which in int8.

HiDream in bf16 is a 34 GB transformer (17.1 B parameters), Llama 3.1 8B (16 GB), T5-XXL's encoder (9.5 GB),
two CLIPs (1.6 GB) and a VAE (0.2 GB). A plan says where each part lives; the libraries do the moving:

| plan          | transformer              | text encoders                                   | fits (I1, computed) |
|---------------|--------------------------|-------------------------------------------------|---------------------|
| `resident`    | GPU, bf16                | GPU, bf16                                       | 80 GB cards and up  |
| `text-cpu`    | GPU, bf16                | CPU memory, encoding on the CPU                 | 48 GB               |
| `text-stream` | GPU, bf16                | CPU memory, streamed to the GPU layer by layer  | 48 GB               |
| `int8`        | GPU, int8 weight-only    | streamed; Llama int8 weight-only                | 24 GB               |
| `stream`      | streamed block by block  | streamed                                        | < 24 GB (asked for) |
| `int8-stream` | streamed, int8           | streamed; Llama int8 weight-only                | < 24 GB, down to 8  |

- int8 weight-only is torchao's `Int8WeightOnlyConfig` (per-row scales): every `nn.Linear` of the transformer's
  48 blocks and of Llama's 32 layers (and its `lm_head`), quantized on the device it will run on. The
  embedders, norms, final layer and any LoRA adapter stay in bf16, so E1-Full's adapter and full tensors
  work unchanged. Weights are stored in int8 and dequantized per matmul: half the bytes of bf16, the same FLOPs.
- Streaming is diffusers' group offloading (`diffusers.hooks.apply_group_offloading`): the weights stay in
  (pinned) CPU memory and each group moves to the GPU just before it runs, the next one prefetched on a side
  CUDA stream while the current one computes. Text encoders stream leaf by leaf (any architecture), the
  transformer one block at a time. No module is ever whole on the GPU.
- `text-cpu` is the old `RUNNER__TEXT_ENCODERS=cpu`: the encoders run in CPU memory, on the CPU.

`choose_plan` is pure: (model, device memory, `ComponentSizes`) → the first plan of `AUTO_ORDER` whose
computed peak fits, with the reason. `real_sizes()` computes the sizes from the published configs on the
`meta` device (no weights); a worker measures the pipeline it loaded (`pipeline_sizes`). `apply_plan` carries
a plan out on a loaded pipeline. On a CPU device "auto" is `resident`: one memory, nothing to plan.

Peaks are estimates: weights are exact byte counts, activations come from the tensor shapes
(`activation_bytes`), and `RUNTIME_OVERHEAD` stands for the CUDA context, cuBLAS workspaces and allocator
slack. None of it has been measured on a GPU yet (docs/memory.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

from jobs.errors import ConfigError
from jobs.models import MODELS
from worker.runners.layout import LORA_TARGETS

log = logging.getLogger("dreambatch.worker")

Where = Literal["device", "cpu", "stream"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
TRANSFORMER_BLOCKS = ("double_stream_blocks", "single_stream_blocks")
# the modules int8 plans quantize, by component: every nn.Linear under one of these names
INT8_UNDER: dict[str, tuple[str, ...]] = {
    "transformer": TRANSFORMER_BLOCKS,
    "text_encoder_4": ("model.layers", "lm_head"),
}
GiB = 2**30
RUNTIME_OVERHEAD = GiB  # CUDA context, cuBLAS workspaces: device memory no tensor of ours accounts for
USABLE = 0.95  # share of the device's memory a plan may fill (the allocator's fragmentation takes the rest)


@dataclass(frozen=True)
class MemoryPlan:
    """Where each part of the pipeline lives. `int8`: components stored int8 weight-only (`INT8_UNDER`)."""

    name: str
    transformer: Where  # "device" or "stream"
    text_encoders: Where  # "device", "cpu" or "stream"
    int8: tuple[str, ...]
    summary: str


_INT8 = ("transformer", "text_encoder_4")
PLANS: dict[str, MemoryPlan] = {
    plan.name: plan
    for plan in (
        MemoryPlan("resident", "device", "device", (), "every component on the GPU in its loaded dtype"),
        MemoryPlan("text-cpu", "device", "cpu", (), "the text encoders in CPU memory, encoding there"),
        MemoryPlan(
            "text-stream",
            "device",
            "stream",
            (),
            "the text encoders in CPU memory, streamed to the GPU layer by layer to encode",
        ),
        MemoryPlan(
            "int8",
            "device",
            "stream",
            _INT8,
            "transformer and Llama int8 weight-only; the text encoders streamed from CPU memory",
        ),
        MemoryPlan(
            "stream",
            "stream",
            "stream",
            (),
            "every component in CPU memory, the transformer streamed to the GPU block by block in bf16",
        ),
        MemoryPlan(
            "int8-stream",
            "stream",
            "stream",
            _INT8,
            "transformer and Llama int8 weight-only, every component streamed from CPU memory",
        ),
    )
}
# what "auto" tries, fastest first. Not among them: text-stream beats text-cpu only where the host's CPU
# encodes slower than PCIe moves 27 GB, and text-cpu is what 48 GB cards already ran; stream keeps bf16 on a
# 24 GB card, and by FLOPs about int8's speed when PCIe keeps up, but pins 61 GB in host memory (int8
# pins 20 GB), more than a 24 GB card's desktop usually has. Neither has run on a GPU yet.
AUTO_ORDER = ("resident", "text-cpu", "int8", "int8-stream")
PLAN_NAMES = ("auto", *PLANS)


# ---- sizes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentSizes:
    """What a plan's peak is computed from, all in bytes."""

    weights: Mapping[str, int]  # each component as loaded
    int8: Mapping[str, int]  # the components `INT8_UNDER` names, with those linears int8 weight-only
    largest_group: Mapping[str, int]  # the most one streamed group moves at once (a block; a leaf module)
    activations: Mapping[str, int]  # per model: the peak of one call's activations (`activation_bytes`)
    extra: Mapping[str, int] = field(default_factory=dict)  # per model: resident bytes beyond the components


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao quantized tensor counts its inner tensors (int8 data, scales)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    return sum(tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))


def int8_targets(component: str, module: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linears of `component` that int8 plans quantize: under `INT8_UNDER`, never a LoRA adapter's own."""
    under = INT8_UNDER.get(component, ())
    return [
        (name, m)
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear)
        and any(name == p or name.startswith(p + ".") for p in under)
        and ".lora_" not in name
    ]


def int8_bytes(component: str, module: nn.Module) -> int:
    """`module`'s bytes once `int8_targets` are int8 weight-only: torchao's per-row layout (an int8 per weight,
    a float32 scale and an int8 zero point per output row); works on `meta` modules."""
    saved = 0
    for _, linear in int8_targets(component, module):
        rows, weights = linear.weight.shape[0], linear.weight.numel()
        saved += tensor_bytes(linear.weight) - (weights + rows * 5)
    return module_bytes(module) - saved


def largest_group(component: str, module: nn.Module) -> int:
    """Bytes of the largest group streaming moves at once: a transformer block, else one leaf module (as
    loaded: an int8 plan streams less, so its peak is over-counted by up to a block)."""
    if component == "transformer":
        blocks = [b for name in TRANSFORMER_BLOCKS for b in getattr(module, name, ())]
        return max((module_bytes(b) for b in blocks), default=module_bytes(module))
    leaves = [m for m in module.modules() if not list(m.children())]
    return max(
        (sum(tensor_bytes(t) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))) for m in leaves),
        default=0,
    )


def activation_bytes(model: str, transformer_config: Any, vae_config: Any, bytes_per_value: int = 2) -> int:
    """Peak activation bytes of one `model` call at its native size: the larger of a transformer block's
    working set and the VAE decode's. An estimate from the shapes, not a measurement:

    - a block at batch B (guidance branches: 2 for I1 rows that ask for guidance, 3 for E1's edit pass) over
      S tokens (image tokens, twice for E1's [target | source], + 384 text): the residual, normed input, q, k,
      v and attention output (6 × D wide), and the routed experts' hidden states (3 × k × F: w1, w3 and their
      product, each token through k experts); flash attention keeps no S × S matrix. Plus Llama's 33 hidden
      states, the input of every block.
    - the VAE decode of one image: its last up block at full resolution, where the upsampled input (the
      second channel width) and three tensors of the first width are live at once.
    """
    config = transformer_config
    dim = config.num_attention_heads * config.attention_head_dim
    patch, (rows_max, cols_max) = config.patch_size, config.max_resolution
    tokens_a_side = math.isqrt(rows_max * cols_max // patch**2)  # 64 real: 1024 px / (8 × patch 2)
    spec = MODELS[model]
    edit = spec.kind == "edit"
    image_tokens = tokens_a_side**2 * spec.base_size**2 // 1024**2 * (2 if edit else 1)
    text_tokens, llama_states = 3 * 128, 33 * 128 * config.caption_channels[1]
    batch = 3 if edit else 2
    expert_hidden = _expert_hidden(config, dim)
    per_token = 6 * dim + 3 * config.num_activated_experts * expert_hidden
    block = batch * ((image_tokens + text_tokens) * per_token + llama_states) * bytes_per_value
    channels = vae_config.block_out_channels
    latent_side = patch * tokens_a_side * spec.base_size // 1024
    pixels = (latent_side * 2 ** (len(channels) - 1)) ** 2
    decode = (channels[min(1, len(channels) - 1)] + 3 * channels[0]) * pixels * bytes_per_value
    return max(block, decode)


def _expert_hidden(config: Any, dim: int) -> int:
    """The hidden width of HiDream's routed experts: SwiGLU's 2/3 of 4 × D, rounded up to 256 (6,912 real)."""
    hidden = int(2 * 4 * dim / 3)
    return 256 * ((hidden + 255) // 256)


def sizes_of(components: Mapping[str, nn.Module]) -> ComponentSizes:
    """`ComponentSizes` of a pipeline's modules (loaded or on `meta`), activations for every model."""
    transformer, vae = components["transformer"], components["vae"]
    return ComponentSizes(
        weights={name: module_bytes(m) for name, m in components.items()},
        int8={name: int8_bytes(name, m) for name, m in components.items() if name in INT8_UNDER},
        largest_group={name: largest_group(name, m) for name, m in components.items()},
        activations={model: activation_bytes(model, transformer.config, vae.config) for model in MODELS},
    )


def pipeline_sizes(pipe: Any) -> ComponentSizes:
    """The sizes of the pipeline a worker loaded, measured off its modules."""
    return sizes_of({name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)})


E1_FULL_LORA_RANK = 16  # HiDream-E1-Full's published LoraConfig (r = alpha = 16)


@lru_cache(maxsize=1)
def real_sizes() -> ComponentSizes:
    """HiDream's component sizes in bf16, computed from the published configs on the `meta` device (no weights).

    E1.1 runs on one transformer of I1's architecture; E1-Full adds its LoRA (its full tensors replace I1-Full's
    in place: no copies are kept)."""
    components = real_components("meta")
    sizes = sizes_of(components)
    transformer = components["transformer"]
    return ComponentSizes(
        sizes.weights,
        sizes.int8,
        sizes.largest_group,
        sizes.activations,
        extra={"e1-full": lora_bytes(transformer, E1_FULL_LORA_RANK)},
    )


def lora_bytes(transformer: nn.Module, rank: int) -> int:
    """Bytes of a rank-`rank` LoRA (A: rank × in, B: out × rank) on the linears E1-Full adapts."""
    linears = [
        m
        for name, m in transformer.named_modules()
        if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS)
    ]
    return sum(rank * (m.in_features + m.out_features) * m.weight.element_size() for m in linears)


def real_components(device: str | torch.device = "meta") -> dict[str, nn.Module]:
    """HiDream-I1's modules at real size, random weights, in bf16 on `device` (`meta`: shapes only)."""
    from worker.runners.fullsize import build_components

    return build_components(device, torch.bfloat16)


# ---- the planner ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    plan: MemoryPlan
    peak_bytes: int  # computed peak device memory under the plan
    budget_bytes: int  # what the plan could use: USABLE × the device's memory
    reason: str


def peak_bytes(plan: MemoryPlan, model: str | None, sizes: ComponentSizes) -> int:
    """Computed peak device memory of running `model` (None: the most demanding one) under `plan`.

    Resident weights, plus the larger of the two phases: encoding (two streamed leaves in flight: one
    running, one prefetched) and denoising or decoding (activations, and two streamed blocks in flight)."""

    def stored(name: str) -> int:
        return sizes.int8[name] if name in plan.int8 else sizes.weights[name]

    where = {
        name: plan.text_encoders if name in TEXT_ENCODERS else plan.transformer if name == "transformer" else "device"
        for name in sizes.weights
    }
    extra = sizes.extra.get(model, 0) if model else max(sizes.extra.values(), default=0)
    resident = sum(stored(name) for name, at in where.items() if at == "device") + extra
    streamed = [name for name, at in where.items() if at == "stream" and name in TEXT_ENCODERS]
    encode = max((2 * sizes.largest_group[name] for name in streamed), default=0)
    activations = sizes.activations[model] if model else max(sizes.activations.values())
    denoise = activations + (2 * sizes.largest_group["transformer"] if where["transformer"] == "stream" else 0)
    return resident + max(encode, denoise) + RUNTIME_OVERHEAD


def choose_plan(
    model: str | None, device_bytes: int, sizes: ComponentSizes, order: Iterable[str] = AUTO_ORDER
) -> Choice:
    """The first plan of `order` whose computed peak fits in USABLE × `device_bytes`; pure."""
    budget = int(USABLE * device_bytes)
    tried: list[str] = []
    for name in order:
        plan, peak = PLANS[name], peak_bytes(PLANS[name], model, sizes)
        if peak <= budget:
            skipped = f" ({', '.join(tried)} would not fit)" if tried else ""
            reason = (
                f"{name}: needs {peak / GiB:.1f} GiB of the {budget / GiB:.1f} GiB usable "
                f"({USABLE:.0%} of {device_bytes / GiB:.1f} GiB){skipped}"
            )
            return Choice(plan, peak, budget, reason)
        tried.append(f"{name} {peak / GiB:.1f} GiB")
    raise ConfigError(
        f"no memory plan fits {model or 'these models'} in {device_bytes / GiB:.1f} GiB of device "
        f"memory ({budget / GiB:.1f} GiB usable): {', '.join(tried)}; use a larger card"
    )


def plan_for(setting: str, model: str | None, device: str, pipe: Any) -> Choice:
    """The plan a worker runs `pipe` with: `setting` itself, or with "auto" the planner's pick for this device's
    free memory (a CPU device: `resident`). Logs the choice and why."""
    if setting != "auto" and setting not in PLANS:
        raise ConfigError(f"unknown memory plan {setting!r}; expected one of {', '.join(PLAN_NAMES)}")
    if torch.device(device).type != "cuda":
        plan = PLANS["resident" if setting == "auto" else setting]
        choice = Choice(
            plan,
            0,
            0,
            f"{plan.name}: {'auto on ' if setting == 'auto' else ''}a {device} device (one memory, nothing to plan)",
        )
    else:
        free, total = torch.cuda.mem_get_info(device)
        sizes = pipeline_sizes(pipe)
        if setting == "auto":
            choice = choose_plan(model, free, sizes)
        else:
            peak = peak_bytes(PLANS[setting], model, sizes)
            choice = Choice(
                PLANS[setting],
                peak,
                int(USABLE * free),
                f"{setting}: set by RUNNER__MEMORY_PLAN; needs {peak / GiB:.1f} GiB",
            )
            if peak > choice.budget_bytes:
                log.warning(
                    "memory plan %s needs %.1f GiB but %.1f GiB are usable on %s: it may run out of memory",
                    setting,
                    peak / GiB,
                    choice.budget_bytes / GiB,
                    device,
                )
        choice = Choice(
            choice.plan,
            choice.peak_bytes,
            choice.budget_bytes,
            f"{choice.reason}; {free / GiB:.1f} of {total / GiB:.1f} GiB free on {device}",
        )
    log.info("memory plan %s (%s): %s", choice.plan.name, choice.plan.summary, choice.reason)
    return choice


# ---- carrying a plan out -------------------------------------------------------------------------


def apply_plan(pipe: Any, plan: MemoryPlan, device: str | torch.device) -> None:
    """Quantize, place and stream `pipe`'s components on `device` as `plan` says."""
    device = torch.device(device)
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, nn.Module)}
    for name, module in modules.items():
        where = plan.text_encoders if name in TEXT_ENCODERS else plan.transformer if name == "transformer" else "device"
        # 1. int8 on the device it will run on, linear by linear: the bf16 module is never whole there
        if name in plan.int8:
            quantize_int8(name, module, device if where == "device" else None)
        # 2. place: on the device, left in CPU memory, or streamed from there
        if where == "device":
            module.to(device)
        elif where == "stream":
            stream(name, module.to("cpu"), device)


def quantize_int8(component: str, module: nn.Module, device: torch.device | None = None) -> None:
    """torchao int8 weight-only (per-row scales) on `int8_targets`, each moved to `device` first if given."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = {id(linear) for _, linear in int8_targets(component, module)}
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, _: id(m) in targets, device=device)


def stream(component: str, module: nn.Module, device: torch.device) -> None:
    """diffusers' group offloading: weights in CPU memory, each group onloaded to `device` as it runs. The
    transformer moves one block at a time, anything else leaf module by leaf module; on a CUDA device the next
    group is prefetched on a side stream from pinned memory, overlapping the copy with compute."""
    from diffusers.hooks import apply_group_offloading

    use_stream = device.type == "cuda"
    if component == "transformer":
        apply_group_offloading(
            module,
            onload_device=device,
            offload_device="cpu",
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=use_stream,
        )
    else:
        apply_group_offloading(
            module, onload_device=device, offload_device="cpu", offload_type="leaf_level", use_stream=use_stream
        )


def streamed_onto(module: nn.Module) -> torch.device | None:
    """The device a streamed module runs on (None: not streamed); its weights idle in CPU memory."""
    from diffusers.hooks.group_offloading import _get_group_onload_device

    try:
        return _get_group_onload_device(module)
    except ValueError:
        return None
