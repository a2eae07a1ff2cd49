"""The real-size HiDream transformer with random weights (`--weights random-full-size`), for benchmarks.

Built directly on the target device from the published HiDream-I1 transformer config (the E1 editing
transformer has the same architecture), so no download and no host copy: on a GPU for step-time and MFU
figures (bench/model_step.py), on the `meta` device anywhere to count parameters and FLOPs. Random
weights give the real shapes and therefore the real cost; the images they make are noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# HiDream-ai/HiDream-I1-{Full,Dev,Fast} transformer/config.json (one architecture for all three and E1)
I1_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
    "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096], "text_emb_dim": 2048,
    "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128], "llama_layers": [*range(32), *[31] * 16],
}
T5_TOKENS = LLAMA_TOKENS = 128  # the pipeline's max_sequence_length
LLAMA_HIDDEN_STATES = 33  # Llama 3.1 8B: embeddings + 32 layers
LATENT_FACTOR = 8  # the FLUX VAE HiDream uses: 8x down, 16 channels


def build_transformer(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16) -> Any:
    """HiDream-I1's transformer with random weights, created on `device` in `dtype` (no fp32 copy)."""
    from diffusers import HiDreamImageTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = HiDreamImageTransformer2DModel(**I1_TRANSFORMER_CONFIG)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


@dataclass(frozen=True)
class ModelCost:
    total_params: int
    active_params: int  # parameters one image token passes through (attention, shared + top-k routed experts)
    flops_per_forward: float  # one image, one transformer forward (batch 1, no CFG)
    image_tokens: int
    text_tokens: int


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cost(transformer: Any, width: int = 1024, height: int = 1024) -> ModelCost:
    """Parameters and the FLOPs of one forward at width x height: 2 per multiply-add of every linear a token
    passes through (image tokens through the top-k experts only), plus attention's two S×S products."""
    config = transformer.config
    patch = config.patch_size
    image = (height // LATENT_FACTOR // patch) * (width // LATENT_FACTOR // patch)
    dim = config.num_attention_heads * config.attention_head_dim
    k = config.num_activated_experts
    initial = T5_TOKENS + LLAMA_TOKENS  # carried text stream: T5 + Llama layer 0
    text = initial + LLAMA_TOKENS  # plus the block's own Llama layer
    tokens = image + text
    flops = 0.0
    active = _params(transformer.x_embedder) + _params(transformer.final_layer.linear)
    for block in (b.block for b in transformer.double_stream_blocks):
        attn = block.attn1
        image_attn = sum(_params(m) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out))
        text_attn = sum(_params(m) for m in (attn.to_q_t, attn.to_k_t, attn.to_v_t, attn.to_out_t))
        moe_active = _moe_active(block.ff_i, k)
        active += image_attn + moe_active
        flops += 2 * (image * (image_attn + moe_active) + text * (text_attn + _params(block.ff_t)))
        flops += 4 * tokens * tokens * dim
    for block in (b.block for b in transformer.single_stream_blocks):
        attn = block.attn1
        single_attn = sum(_params(m) for m in (attn.to_q, attn.to_k, attn.to_v, attn.to_out))
        flops += 2 * tokens * (single_attn + _moe_active(block.ff_i, k)) + 4 * tokens * tokens * dim
        active += single_attn + _moe_active(block.ff_i, k)
    projections = sum(_params(p) for p in transformer.caption_projection)
    flops += 2 * projections * LLAMA_TOKENS
    flops += 2 * image * (_params(transformer.x_embedder) + _params(transformer.final_layer.linear))
    return ModelCost(_params(transformer), active, flops, image, text)


def _moe_active(moe: Any, k: int) -> int:
    return _params(moe.shared_experts) + _params(moe.gate) + k * _params(moe.experts[0])


def random_inputs(transformer: Any, batch: int, width: int, height: int, device: Any, dtype: torch.dtype,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    """Transformer inputs of the real shapes (random latents and text states) for one denoising step."""
    config = transformer.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    return {
        "hidden_states": randn(batch, config.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR),
        "timesteps": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states_t5": randn(batch, T5_TOKENS, config.caption_channels[0]),
        "encoder_hidden_states_llama3": randn(LLAMA_HIDDEN_STATES, batch, LLAMA_TOKENS, config.caption_channels[1]),
        "pooled_embeds": randn(batch, config.text_emb_dim),
        "return_dict": False,
    }
