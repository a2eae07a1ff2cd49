"""Where a HiDream-E1 editing model's weights come from, and tiny random ones in the same layout.

An edit model needs three things, found without downloading (as `weights.resolve_weights` does):

- the E1 folder: HiDream-ai/HiDream-E1-1 (a diffusers folder whose `transformer/` is the editing
  transformer) or HiDream-ai/HiDream-E1-Full (whose `HiDream-E1-Full.safetensors` holds a LoRA over
  HiDream-I1-Full plus the few full tensors that differ from it);
- HiDream-I1-Full's transformer: the refine stage, and E1-Full's base. Looked for in `<E1 folder>/refine/`
  first (a copy or a link to an I1-Full folder, or just its `transformer/`), then in the hub cache;
- Llama 3.1 8B Instruct (text encoder 4), as for I1.

VAE, text encoders 1-3, tokenizers and scheduler come from the I1-Full folder when it is a whole pipeline,
as in HiDream's own E1 scripts (its UniPC flow scheduler included), else from the E1 folder.

`make_tiny_edit` writes the E1 folder with `refine/transformer/` and Llama inside, so tests and smoke runs
load tiny weights through the same code as real ones.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import ConfigError
from jobs.models import MODELS, REFINE_HUB_ID
from worker.runners.weights import (
    _HUB_ID,
    LLAMA_HUB_ID,
    TINY,
    ResolvedWeights,
    WeightsNotFound,
    cached_snapshot,
    ensure_tiny,
    llama_dirs,
    tiny_pipeline,
    tiny_transformer,
)

EDIT_HUB_IDS = {name: spec.hub_id for name, spec in MODELS.items() if spec.kind == "edit"}
LORA_FILE = "HiDream-E1-Full.safetensors"  # E1-Full's LoRA + full tensors over I1-Full, as its repo ships it
REFINE_DIR = "refine"  # inside an E1 folder: HiDream-I1-Full (at least its transformer/)
# The modules HiDream's E1-Full LoRA adapts (its published LoraConfig); the tiny build adapts the same.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out", "to_k_t", "to_q_t", "to_v_t", "to_out_t",
                "w1", "w2", "w3", "final_layer.linear"]
_TINY_LORA_RANK = 4  # the real one: 16
_TINY_FULL_TENSORS = ["x_embedder.proj.weight", "x_embedder.proj.bias",
                      "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]


@dataclass(frozen=True)
class ResolvedEditWeights:
    components: ResolvedWeights  # pipeline folder for VAE, text encoders, tokenizers, scheduler; Llama
    refine_transformer_dir: Path  # HiDream-I1-Full's transformer: the refine stage and E1-Full's base
    edit_transformer_dir: Path | None  # E1.1: the editing transformer
    lora_file: Path | None  # E1-Full: LoRA + full tensors over the I1-Full transformer
    source: str  # "hub:<id>", "local:<dir>" or "tiny:<dir>"


def resolve_edit_weights(model: str, weights: str | None = None) -> ResolvedEditWeights:
    """Find an E1 model's weights on this machine: None = its hub id, "tiny", a local folder or a hub id."""
    if model not in EDIT_HUB_IDS:
        raise ConfigError(f"unknown HiDream-E1 model {model!r}; expected one of {sorted(EDIT_HUB_IDS)}")
    wanted = weights or EDIT_HUB_IDS[model]
    required = LORA_FILE if model == "e1-full" else "transformer/config.json"
    if wanted == TINY:
        folder, source = ensure_tiny(model), "tiny"
    elif Path(wanted).expanduser().is_dir() or not _HUB_ID.match(wanted):
        folder, source = Path(wanted).expanduser().resolve(), "local"
        if not (folder / required).is_file():
            looked = f"local folder {folder} (missing, or no {required})"
            raise WeightsNotFound(_not_found(model, f"weights {wanted}", [looked]))
    else:
        found, looked = cached_snapshot(wanted, required)
        if found is None:
            raise WeightsNotFound(_not_found(model, f"weights {wanted}", [looked]))
        folder, source = found, "hub"
    refine_dir = _refine_transformer(model, folder)
    components_dir = next((d for d in (refine_dir.parent, folder) if (d / "model_index.json").is_file()), None)
    if components_dir is None:
        looked = f"{refine_dir.parent} and {folder} (neither has a model_index.json)"
        raise WeightsNotFound(_not_found(model, "pipeline components (VAE, text encoders)", [looked]))
    llama_dir, llama_tokenizer_dir = llama_dirs(model, components_dir)
    label = f"{source}:{wanted if source == 'hub' else folder}"
    return ResolvedEditWeights(
        components=ResolvedWeights(components_dir, llama_dir, label, llama_tokenizer_dir),
        refine_transformer_dir=refine_dir,
        edit_transformer_dir=folder / "transformer" if model == "e1-1" else None,
        lora_file=folder / LORA_FILE if model == "e1-full" else None,
        source=label,
    )


def _refine_transformer(model: str, folder: Path) -> Path:
    """HiDream-I1-Full's transformer folder: `<folder>/refine/transformer`, else the hub cache's."""
    inside = folder / REFINE_DIR / "transformer"
    if (inside / "config.json").is_file():
        return inside
    cached, looked = cached_snapshot(REFINE_HUB_ID, "transformer/config.json")
    if cached is None:
        places = [f"{inside} (absent)", looked]
        raise WeightsNotFound(_not_found(model, f"HiDream-I1-Full transformer ({REFINE_HUB_ID})", places))
    return cached / "transformer"


def _not_found(model: str, what: str, looked: list[str]) -> str:
    hub_id = EDIT_HUB_IDS[model]
    fixes = [
        f"hf download {hub_id}  (for e1-full, the file {LORA_FILE} is enough)" if model == "e1-full"
        else f"hf download {hub_id}",
        f"hf download {REFINE_HUB_ID}  (the refine stage{' and the LoRA base' if model == 'e1-full' else ''})",
        f"accept the Llama 3.1 licence on huggingface.co/{LLAMA_HUB_ID}, then hf download {LLAMA_HUB_ID}",
        f"pass a local E1 folder; put (or link) HiDream-I1-Full in its {REFINE_DIR}/ subfolder",
        f"pass --weights {TINY} for tiny random weights (tests and smoke runs only)",
    ]
    lines = [f"no {what} for model {model!r}; looked in:", *(f"  - {place}" for place in looked)]
    return "\n".join([*lines, "to get them, one of:", *(f"  - {fix}" for fix in fixes)])


# ---- LoRA file (E1-Full) ----------------------------------------------------------------------------


_UNNAMED_LORA = re.compile(r"^(.+)\.(lora_[AB])\.(weight|bias)$")  # diffusers' format: no adapter name


def split_lora_file(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(LoRA tensors, full tensors) of an E1-Full weights file, keyed as the peft-wrapped transformer names them.

    HiDream's file is in that form already (`….to_q.lora_A.default.weight`); diffusers-format files
    (`transformer.` prefix, no adapter name) are brought to it.
    """
    lora, full = {}, {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        if ".lora_A." in key or ".lora_B." in key:
            lora[_UNNAMED_LORA.sub(r"\1.\2.default.\3", key)] = value
        else:
            full[key] = value
    return lora, full


def add_lora_adapter(transformer: Any, lora: dict[str, Any]) -> str:
    """Wrap the modules `lora` names in a peft LoRA adapter and load its weights; returns the adapter name.

    The file carries no config: the rank is read off the tensors, alpha = rank (HiDream's own config),
    the adapted modules are exactly those the file has weights for.
    """
    from peft import LoraConfig

    down = {key.split(".lora_A.")[0]: (key.split(".lora_A.")[1].split(".")[0], value)
            for key, value in lora.items() if ".lora_A." in key}
    if not down:
        raise ConfigError("the E1-Full weights file holds no LoRA tensors (no '.lora_A.' keys)")
    adapters = {name for name, _ in down.values()}
    ranks = {value.shape[0] for _, value in down.values()}
    if len(adapters) != 1 or len(ranks) != 1:
        raise ConfigError(f"expected one LoRA adapter of one rank; found adapters {adapters}, ranks {ranks}")
    (adapter,), (rank,) = adapters, ranks
    pattern = "|".join(re.escape(module) for module in sorted(down))
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=f"^(?:{pattern})$")
    transformer.add_adapter(config, adapter_name=adapter)
    loaded = transformer.load_state_dict(lora, strict=False)
    missing = [key for key in loaded.missing_keys if ".lora_" in key]
    if loaded.unexpected_keys or missing:
        raise ConfigError(f"LoRA weights do not fit the transformer: unexpected {loaded.unexpected_keys[:5]}, "
                          f"missing {missing[:5]}")
    return adapter


# ---- tiny random weights ---------------------------------------------------------------------------


def make_tiny_edit(model: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random E1 folder for `model` to `out_dir`, with `refine/transformer/` (I1-Full) inside.

    e1-1: `transformer/` is a separately drawn editing transformer.
    e1-full: `HiDream-E1-Full.safetensors` holds a LoRA (random, non-zero) and a few perturbed full tensors
    over the I1-Full stand-in; `transformer/` is that LoRA merged in, as the hub repo ships a merged one.
    """
    import torch
    from safetensors.torch import save_file

    from worker.runners.hidream_i1 import make_scheduler

    if model not in EDIT_HUB_IDS:
        raise ConfigError(f"unknown HiDream-E1 model {model!r}; expected one of {sorted(EDIT_HUB_IDS)}")
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refine = tiny_transformer()
        if model == "e1-1":
            edit, adapter_file = tiny_transformer(), None
        else:
            edit, adapter_file = _tiny_lora_over(refine)
        pipe = tiny_pipeline(make_scheduler("flow_unipc", 3.0), lambda: edit)  # I1-Full's scheduler
    pipe.save_pretrained(out_dir, safe_serialization=True)
    refine.save_pretrained(out_dir / REFINE_DIR / "transformer", safe_serialization=True)
    if adapter_file is not None:
        save_file(adapter_file, out_dir / LORA_FILE)
    return out_dir


def _tiny_lora_over(base: Any) -> tuple[Any, dict[str, Any]]:
    """(merged transformer, LoRA file contents) for a random LoRA + full tensors over `base`."""
    import torch
    from peft import LoraConfig

    adapted = copy.deepcopy(base)
    config = LoraConfig(r=_TINY_LORA_RANK, lora_alpha=_TINY_LORA_RANK, target_modules=LORA_TARGETS)
    adapted.add_adapter(config)  # adapter "default", as in HiDream's file
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: a LoRA that changes nothing tests nothing
                param.normal_(0.0, 0.05)
            elif name in _TINY_FULL_TENSORS:
                param.add_(torch.randn_like(param), alpha=0.05)
    state = adapted.state_dict()
    contents = {key: value.contiguous() for key, value in state.items()
                if ".lora_" in key or key in _TINY_FULL_TENSORS}
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in merged.named_parameters():
            module, kind = name.rsplit(".", 1)
            a, b = state.get(f"{module}.lora_A.default.{kind}"), state.get(f"{module}.lora_B.default.{kind}")
            if kind == "weight" and a is not None and b is not None:
                param.add_(b @ a)  # scale alpha / rank = 1
            if name in _TINY_FULL_TENSORS:
                param.copy_(state[name])
    return merged, contents
