"""Sync-free expert routing for the HiDream transformer's MoE feed-forward layers.

diffusers' `MOEFeedForwardSwiGLU.moe_infer` counts tokens per expert with `bincount().cpu()` and slices
per expert by those counts: one GPU→CPU sync in every MoE block (48 per forward on HiDream-I1), which
stalls the launch queue, breaks `torch.compile(fullgraph=True)` and rules out CUDA graphs.

`install_moe_dispatch(transformer, mode)` replaces each MoE layer's forward with one whose shapes
depend only on the input's shape:

- "grouped": the token-expert pairs sorted by expert, gathered (T·k rows, a fixed number), run through
  the experts with one `torch.nn.functional.grouped_mm` per projection (w1, w3, w2) whose group offsets
  stay on the device (`searchsorted`, no count leaves the GPU), weighted, and summed back per token.
  Same FLOPs as diffusers' path. The experts' weights are stacked once at install; each expert's
  `nn.Linear.weight` then views its slice, so nothing is held twice and state dicts are unchanged.
  Needs a device/dtype that `grouped_mm` runs on (bf16 on CUDA SM≥80; fp32 and bf16 on CPU) and plain
  `nn.Linear` experts: asked for explicitly, layers whose experts carry LoRA adapters (E1-Full) or int8
  weights (worker.runners.memory) get "dense".
- "dense": every routed expert runs on every token and the routing weights (zero for experts not
  picked) mix the results. No gather at all and it calls the expert modules, so LoRA adapters apply;
  costs num_routed/num_activated (2× on HiDream) the routed-expert FLOPs.
- "off": diffusers' own path.

"auto" picks "grouped" on CUDA (bf16, SM≥80, plain experts) once a check on the first layer — a random
input through diffusers' path and the grouped one, on this device — runs and agrees; otherwise "off".
It never picks "dense": doubling the routed experts (about 2/3 of the model's FLOPs) costs far more than
the syncs it removes; "dense" is for tracing, compile experiments and LoRA'd experts when asked for.
On a CPU "auto" is "off" (no launch queue to stall). Outputs equal diffusers' within float rounding
(tests/test_speed.py). The grouped path has not yet run on a GPU: the check is what guards a worker.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jobs.errors import ConfigError

MODES = ("auto", "grouped", "dense", "off")


def moe_layers(transformer: Any) -> list[nn.Module]:
    """The routed feed-forward layers of a HiDream transformer (one per block when it has experts)."""
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    return [module for module in transformer.modules() if isinstance(module, MOEFeedForwardSwiGLU)]


def install_moe_dispatch(transformer: Any, mode: str = "auto") -> str:
    """Route every MoE layer of `transformer` by `mode`; returns the mode installed ("off" when none).

    Install once the transformer is on its device and in its dtype: "grouped" stacks the expert weights
    there, and a later `.to()` would leave the stacks behind (the grouped GEMMs then fail on the mismatch).
    """
    if mode not in MODES:
        raise ConfigError(f"unknown moe mode {mode!r}; expected one of {', '.join(MODES)}")
    layers = moe_layers(transformer)
    if mode == "grouped" and not hasattr(F, "grouped_mm"):
        raise ConfigError(
            f"moe mode 'grouped' needs torch.nn.functional.grouped_mm (torch {torch.__version__} "
            "has none); use 'auto', 'dense' or 'off'"
        )
    if mode == "auto":
        mode = _auto_mode(layers)
    for layer in layers:
        if mode == "off":
            layer.__dict__.pop("forward", None)  # back to the class's own forward
        elif mode == "dense" or not _plain(layer):  # LoRA-wrapped experts (E1-Full) cannot be stacked
            layer.forward = types.MethodType(_dense_forward, layer)
        else:
            _stack_expert_weights(layer)
            layer.forward = types.MethodType(_grouped_forward, layer)
    return mode if layers else "off"


def _auto_mode(layers: list[Any]) -> str:
    if not layers:
        return "off"
    weight = layers[0].experts[0].w1.weight
    if weight.device.type != "cuda" or weight.dtype != torch.bfloat16:
        return "off"
    if torch.cuda.get_device_capability(weight.device)[0] < 8 or not all(_plain(layer) for layer in layers):
        return "off"
    return "grouped" if grouped_agrees(layers[0]) else "off"


def grouped_agrees(layer: Any, tokens: int = 256) -> bool:
    """Whether the grouped path runs on this layer's device and matches diffusers' on a random input."""
    import logging

    weight = layer.experts[0].w1.weight
    x = torch.randn(1, tokens, weight.shape[1], device=weight.device, dtype=weight.dtype)
    probe = types.SimpleNamespace(
        gate=layer.gate,
        experts=layer.experts,
        shared_experts=layer.shared_experts,
        _stacked={name: torch.stack([getattr(e, name).weight for e in layer.experts]) for name in ("w1", "w2", "w3")},
    )
    try:
        with torch.no_grad():
            expected = type(layer).forward(layer, x)
            got = _grouped_forward(probe, x)
        agrees = torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
    except Exception as exc:  # a device or dtype grouped_mm does not run on
        logging.getLogger("dreambatch.worker").warning(
            "grouped expert routing unavailable (%s: %s); using diffusers' routing", type(exc).__name__, exc
        )
        return False
    if not agrees:
        logging.getLogger("dreambatch.worker").warning(
            "grouped expert routing disagrees with diffusers' here; using diffusers' routing"
        )
    return agrees


def _plain(layer: Any) -> bool:
    """Experts of plain `nn.Linear`s with plain weights: no LoRA wrapper, no quantized (int8) weight subclass."""
    return all(
        type(getattr(expert, name)) is nn.Linear and type(getattr(expert, name).weight) is nn.Parameter
        for expert in layer.experts
        for name in ("w1", "w2", "w3")
    )


def _route(layer: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens as rows, top-k expert ids, their weights), as diffusers' gate computes them."""
    topk_idx, topk_weight, _ = layer.gate(x)
    return x.reshape(-1, x.shape[-1]), topk_idx, topk_weight


def _dense_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token; weights are zero for the experts a token did not pick."""
    tokens, topk_idx, topk_weight = _route(self, x)
    # per token and expert: the gate weight if picked, else 0 (the top-k ids of a token are distinct)
    weights = torch.zeros(tokens.shape[0], len(self.experts), dtype=topk_weight.dtype, device=x.device)
    weights.scatter_(1, topk_idx, topk_weight)
    routed = torch.zeros_like(tokens)
    for e, expert in enumerate(self.experts):  # in expert order, as diffusers accumulates
        routed = routed + expert(tokens) * weights[:, e : e + 1]
    return routed.view(x.shape) + self.shared_experts(x)


def _stack_expert_weights(layer: Any) -> None:
    """Stack w1/w2/w3 of the experts into (E, out, in) tensors; each expert's weight becomes a view of its
    slice (same Parameter objects, so optimizers, state dicts and in-place copies keep working)."""
    if getattr(layer, "_stacked", None) is not None:
        return
    stacked = {}
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            params = [getattr(expert, name).weight for expert in layer.experts]
            stack = torch.stack([p.detach() for p in params])
            for i, param in enumerate(params):
                param.data = stack[i]
            stacked[name] = stack
    layer._stacked = stacked


def _grouped_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """Token-expert pairs sorted by expert through grouped GEMMs; offsets never leave the device."""
    tokens, topk_idx, topk_weight = _route(self, x)
    k, experts = topk_idx.shape[1], len(self.experts)
    flat_idx = topk_idx.reshape(-1)
    order = flat_idx.argsort(stable=True)  # pair positions, grouped by expert
    sorted_idx = flat_idx[order]
    ends = torch.searchsorted(sorted_idx, torch.arange(experts, device=x.device, dtype=sorted_idx.dtype), right=True)
    offs = ends.to(torch.int32)
    rows = tokens[order // k]  # (T·k, D): each token once per expert it picked
    w = self._stacked
    hidden = F.silu(F.grouped_mm(rows, w["w1"].transpose(1, 2), offs=offs))
    hidden = hidden * F.grouped_mm(rows, w["w3"].transpose(1, 2), offs=offs)
    out = F.grouped_mm(hidden, w["w2"].transpose(1, 2), offs=offs)
    out = out * topk_weight.reshape(-1, 1)[order]
    # back to (token, k) order, then the k contributions of each token summed
    pairs = torch.empty_like(out).index_copy_(0, order, out)
    routed = pairs.view(tokens.shape[0], k, -1).sum(dim=1)
    return routed.view(x.shape) + self.shared_experts(x)


def describe(transformer: Any) -> dict[str, Any]:
    """What a transformer's MoE layers are set to, for logs and benchmarks."""
    layers = moe_layers(transformer)
    modes = {
        (
            "grouped"
            if getattr(layer.forward, "__func__", None) is _grouped_forward
            else "dense"
            if getattr(layer.forward, "__func__", None) is _dense_forward
            else "off"
        )
        for layer in layers
    }
    return {"moe_layers": len(layers), "modes": sorted(modes)}
