"""Non-square latents without the padding: the same outputs from max_seq − n fewer tokens.

The HiDream transformer pads every non-square latent to `max_seq` tokens (4,096 on the real model; an
E1 edit, whose [target | source] input is always twice as wide as high, to twice its token budget) and
"masks" the padding by zeroing its keys. A zero key is not a removed key: every query still gives each
padded token a score of exactly 0 and weight e⁰, and reads its value. So the padding changes the output,
and simply not padding (max_seq = n) would change the images.

But the padded tokens are all the same token: each starts as the patch embedding of zeros with position
ids (0, 0, 0), and every layer treats them alike (identical queries over identical keys, per-token MLPs
and routing), so they stay identical through every block. P identical keys of score 0 are one key of
score log P. `install_fold_padding` makes the transformer keep n + 1 image tokens — the real ones and
one padding token standing for all P — and gives that token's key the weight P:

- `patchify` trims the padded sequence to n + 1 and marks the last token's mask entry with −P (a folded
  mask is float64: the attention processor tells it from diffusers' 0/1 masks by dtype, without reading
  the device);
- `FoldedAttnProcessor` zeroes keys whose mask is ≤ 0 (as diffusers does) and adds log P to the folded
  key's score. The bias rides in two extra head dimensions (q gets 1, 1; k gets log P / scale split
  into a high and a low part in the working dtype), padded to a multiple of 8, so SDPA keeps its fused
  kernels and bf16 does not round log P (a bf16 attention mask would, by up to 3% of the weight).

Attention cost falls with the token count; images equal the padded path's within float rounding
(tests/test_speed.py). Square latents, and non-square ones that fill max_seq exactly, are untouched.

Where it pays: dreambatch renders every aspect ratio at the model's native area (I1's `rendered_size`,
E1's `canvas_size`), so its padding is only the snap to multiples of 16: 0.4–3% of the tokens. The two
bias dims make every attention head 8 wider (128 → 136: +6% attention FLOPs, and GPU attention kernels
may round 136 up to a slower tile), so folding a few percent would not pay. Only padding of at least
`FOLD_MIN_SHARE` of max_seq is folded; below that the transformer runs as diffusers' does. The threshold
is an estimate from FLOP counts, not a GPU measurement (bench/model_step.py times a 25%-padded case).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F

EXTRA_DIMS = 8  # two carry the fold bias; the rest keep the head dim a multiple of 8
FOLDED = torch.float64  # the dtype that marks a folded mask
FOLD_MIN_SHARE = 0.10  # fold only padding of at least this share of max_seq (see the module docstring)


def install_fold_padding(transformer: Any) -> None:
    """Fold the padding of non-square inputs into one token (see the module docstring). Idempotent."""
    from diffusers.models.transformers.transformer_hidream_image import HiDreamAttention

    if "patchify" in transformer.__dict__:
        return
    transformer.patchify = types.MethodType(_folded_patchify, transformer)
    for module in transformer.modules():
        if isinstance(module, HiDreamAttention):
            module.processor = FoldedAttnProcessor()


def remove_fold_padding(transformer: Any) -> None:
    """Undo `install_fold_padding`: diffusers' own patchify and attention processors again."""
    from diffusers.models.transformers.transformer_hidream_image import HiDreamAttention, HiDreamAttnProcessor

    transformer.__dict__.pop("patchify", None)
    for module in transformer.modules():
        if isinstance(module, HiDreamAttention) and isinstance(module.processor, FoldedAttnProcessor):
            module.processor = HiDreamAttnProcessor()


def _folded_patchify(self: Any, hidden_states: torch.Tensor):
    tokens, masks, img_sizes, img_ids = type(self).patchify(self, hidden_states)
    if masks is None:
        return tokens, masks, img_sizes, img_ids
    patch = self.config.patch_size
    real = (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)
    folded = self.max_seq - real
    if folded == 0:  # fills max_seq exactly: the all-ones mask changes nothing
        return tokens, None, img_sizes, img_ids
    if folded < FOLD_MIN_SHARE * self.max_seq:  # too little to pay for the wider heads
        return tokens, masks, img_sizes, img_ids
    fold = torch.ones(tokens.shape[0], real + 1, dtype=FOLDED, device=tokens.device)
    fold[:, real] = -float(folded)
    return tokens[:, : real + 1], fold, img_sizes, img_ids[:, : real + 1]


class FoldedAttnProcessor:
    """HiDream attention where a key's mask entry m means: m > 0 a key; m = 0 a zeroed key; m < 0 a zeroed
    key standing for −m identical ones. Without a mask it computes what diffusers' processor computes."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        hidden_states_masks: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        dtype, batch = hidden_states.dtype, hidden_states.shape[0]
        heads = attn.heads
        query = attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype)
        key = attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim) for t in (query, key, value))
        if hidden_states_masks is not None:
            key = key * (hidden_states_masks > 0).to(key.dtype).view(batch, -1, 1, 1)
        image_tokens = query.shape[1]
        if not attn.single:
            query_t = attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype)
            key_t = attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype)
            value_t = attn.to_v_t(encoder_hidden_states)
            query = torch.cat([query, query_t.view(batch, -1, heads, head_dim)], dim=1)
            key = torch.cat([key, key_t.view(batch, -1, heads, head_dim)], dim=1)
            value = torch.cat([value, value_t.view(batch, -1, heads, head_dim)], dim=1)
        assert image_rotary_emb is not None, "HiDream's blocks always pass the rotary embedding"
        query, key = _rope(query, key, image_rotary_emb)

        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (batch, heads, tokens, dim)
        scale = head_dim**-0.5
        if hidden_states_masks is not None and hidden_states_masks.dtype == FOLDED:  # (values unread: no sync)
            query, key, value = _with_fold_bias(query, key, value, hidden_states_masks, scale)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)
        out = out[..., :head_dim].transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        if attn.single:
            return attn.to_out(out)
        out_i, out_t = out.split([image_tokens, out.shape[1] - image_tokens], dim=1)
        return attn.to_out(out_i), attn.to_out_t(out_t)


def _rope(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding on the whole head, or on its first half when the table covers half (as diffusers)."""
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    if query.shape[-1] == freqs.shape[-3] * 2:
        return apply_rope(query, key, freqs)
    (q1, q2), (k1, k2) = query.chunk(2, dim=-1), key.chunk(2, dim=-1)
    q1, k1 = apply_rope(q1, k1, freqs)
    return torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)


def _with_fold_bias(query, key, value, masks: torch.Tensor, scale: float):
    """q, k, v with EXTRA_DIMS more dims so that the score of a key standing for P tokens gains log P."""
    batch, heads, tokens, _ = key.shape
    weight = torch.ones(batch, tokens, dtype=torch.float32, device=key.device)
    weight[:, : masks.shape[1]] = torch.where(masks < 0, -masks.float(), 1.0)
    shift = weight.log() / scale  # q·k gains this; SDPA multiplies by scale
    high = shift.to(key.dtype)
    low = (shift - high.float()).to(key.dtype)
    extra_q = query.new_zeros(batch, heads, query.shape[2], EXTRA_DIMS)
    extra_q[..., :2] = 1
    extra_k = key.new_zeros(batch, heads, tokens, EXTRA_DIMS)
    extra_k[..., 0] = high[:, None, :]
    extra_k[..., 1] = low[:, None, :]
    extra_v = value.new_zeros(batch, heads, tokens, EXTRA_DIMS)
    return (torch.cat([query, extra_q], -1), torch.cat([key, extra_k], -1), torch.cat([value, extra_v], -1))


def folded_tokens(max_seq: int, height: int, width: int, patch: int = 2) -> tuple[int, int]:
    """(tokens diffusers attends over, tokens with folding) for a latent of height x width."""
    real = (height // patch) * (width // patch)
    if height == width or real == max_seq:
        return real, real
    return max_seq, real + 1


def attention_saving(max_seq: int, height: int, width: int, text_tokens: int, patch: int = 2) -> float:
    """Share of attention score FLOPs saved by folding, for a latent of height x width (image + text tokens)."""
    padded, folded = folded_tokens(max_seq, height, width, patch)
    return 1 - math.pow((folded + text_tokens) / (padded + text_tokens), 2)
