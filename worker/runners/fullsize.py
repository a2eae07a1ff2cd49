"""The real-size HiDream models with random weights (`--weights random-full-size`), for benchmarks.

Built directly on the target device from the published configs (the E1 editing transformer has I1's
architecture), so no download and no host copy: on a GPU for step-time and MFU figures (bench/model_step.py,
bench/gpu.py), on the `meta` device anywhere to count parameters and FLOPs. `build_transformer` makes the
transformer alone; `build_pipeline` the whole HiDream-I1 pipeline (~31 B parameters, 57 GiB in bf16: too big
for a small disk as files, so it is made in memory). Random weights give the real shapes and therefore the
real cost; the images they make are noise. `PEAKS` holds the cards' bf16 rates that MFU is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# HiDream-ai/HiDream-I1-{Full,Dev,Fast} transformer/config.json (one architecture for all three and E1)
I1_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 16,
    "num_single_layers": 32,
    "attention_head_dim": 128,
    "num_attention_heads": 20,
    "caption_channels": [4096, 4096],
    "text_emb_dim": 2048,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [64, 32, 32],
    "max_resolution": [128, 128],
    "llama_layers": [*range(32), *[31] * 16],
}
# HiDream-ai/HiDream-I1-Full text_encoder/config.json: CLIP ViT-L/14's text tower, 248 positions (Long-CLIP)
CLIP_L_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 248,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower (the "CLIP-G" of SDXL), 248 positions
CLIP_G_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 248,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# text_encoder_3/config.json: google/t5-v1_1-xxl, encoder only
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
# meta-llama/Llama-3.1-8B-Instruct config.json (text encoder 4, LlamaForCausalLM as dreambatch loads it)
LLAMA_8B_CONFIG: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}
# vae/config.json: FLUX.1's AutoencoderKL, 8x down, 16 latent channels
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
T5_TOKENS = LLAMA_TOKENS = 128  # the pipeline's max_sequence_length
LLAMA_HIDDEN_STATES = 33  # Llama 3.1 8B: embeddings + 32 layers
LATENT_FACTOR = 8  # the FLUX VAE HiDream uses: 8x down, 16 channels


# dense bf16 rates (TFLOP/s, no sparsity) by the name CUDA reports: (datasheet, measured on this workplace's
# cards). MFU is taken against the measured rate where there is one (H200: an 8192³ bf16 matmul runs at
# 769-798 TFLOP/s there), else the datasheet's; --peak-tflops overrides either.
PEAKS: dict[str, tuple[float, float | None]] = {
    "H200": (989.0, 790.0),
    "H100 SXM": (989.0, None),
    "H100 80GB HBM3": (989.0, None),
    "H100 NVL": (835.0, None),
    "H100 PCIe": (756.0, None),
    "A100": (312.0, None),
    "L40S": (362.0, None),
    "B200": (2250.0, None),
    "GH200": (989.0, None),
}


def card_peak(name: str) -> float | None:
    """The bf16 rate MFU is measured against for a card named `name`: measured where known, else datasheet."""
    datasheet, measured = next((rates for key, rates in PEAKS.items() if key in name), (None, None))
    return measured or datasheet


def datasheet_peak(name: str) -> float | None:
    return next((rates[0] for key, rates in PEAKS.items() if key in name), None)


def _created(device: str | torch.device, dtype: torch.dtype, make: Any) -> Any:
    """`make()`'s module, created on `device` in `dtype` (no fp32 copy, no host copy), eval, no grads."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = make()
    finally:
        torch.set_default_dtype(default)
    return module.eval().requires_grad_(False)


def build_transformer(device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16) -> Any:
    """HiDream-I1's transformer with random weights, created on `device` in `dtype` (no fp32 copy)."""
    from diffusers import HiDreamImageTransformer2DModel

    return _created(device, dtype, lambda: HiDreamImageTransformer2DModel(**I1_TRANSFORMER_CONFIG))


def build_components(
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
    token_ids: dict[str, dict[str, Any]] | None = None,
    transformer: Any = None,
) -> dict[str, Any]:
    """HiDream-I1's modules at real size with random weights, each created on `device` in `dtype`, keyed by
    their pipeline names. `token_ids` overrides the text encoders' special-token ids ("clip", "t5", "llama");
    `transformer` (optional) is used as given, else one is built."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    ids = token_ids or {}
    clip = {"clip_l": CLIP_L_CONFIG, "clip_g": CLIP_G_CONFIG}
    return {
        "vae": _created(device, dtype, lambda: AutoencoderKL(**FLUX_VAE_CONFIG)),
        "text_encoder": _created(
            device,
            dtype,
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**clip["clip_l"], **ids.get("clip", {})})),
        ),
        "text_encoder_2": _created(
            device,
            dtype,
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**{**clip["clip_g"], **ids.get("clip", {})})),
        ),
        "text_encoder_3": _created(
            device, dtype, lambda: T5EncoderModel(T5Config(**{**T5_XXL_CONFIG, **ids.get("t5", {})}))
        ),
        "text_encoder_4": _created(
            device, dtype, lambda: LlamaForCausalLM(LlamaConfig(**{**LLAMA_8B_CONFIG, **ids.get("llama", {})}))
        ),
        "transformer": transformer if transformer is not None else build_transformer(device, dtype),
    }


def build_pipeline(
    scheduler: Any, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16, transformer: Any = None
) -> Any:
    """A `HiDreamImagePipeline` at real shapes with random weights, every component created on `device`.

    The tokenizers are the tiny ones (`tiny._clip_tokenizer` …): every id they give lies inside the real
    vocabularies, and the encoders' special-token ids are set to theirs, so the encoders see what they would
    with the real tokenizers' padding (128 tokens each) at the real cost. `transformer` (optional) is used
    as given; else one is built.
    """
    from diffusers import HiDreamImagePipeline

    from worker.runners.tiny import _clip_tokenizer, _llama_tokenizer, _t5_tokenizer

    clip, t5, llama = _clip_tokenizer(), _t5_tokenizer(), _llama_tokenizer()

    def ids(tokenizer: Any, *names: str) -> dict[str, Any]:
        return {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in names}

    for tokenizer, size in (
        (clip, CLIP_L_CONFIG["vocab_size"]),
        (t5, T5_XXL_CONFIG["vocab_size"]),
        (llama, LLAMA_8B_CONFIG["vocab_size"]),
    ):
        assert len(tokenizer) <= size, f"tokenizer of {len(tokenizer)} ids for a vocabulary of {size}"
    token_ids = {"clip": ids(clip, "bos", "eos", "pad"), "t5": ids(t5, "pad", "eos"), "llama": ids(llama, "bos", "eos")}
    components = build_components(device, dtype, token_ids, transformer)
    return HiDreamImagePipeline(
        scheduler=scheduler, tokenizer=clip, tokenizer_2=clip, tokenizer_3=t5, tokenizer_4=llama, **components
    )


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


def random_inputs(
    transformer: Any,
    batch: int,
    width: int,
    height: int,
    device: Any,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
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
