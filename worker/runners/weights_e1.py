"""Where a HiDream-E1 editing model's weights come from, and tiny random ones in the same layout.

What each model needs, found without downloading (as `weights.resolve_weights` does), as HiDream's own
scripts (HiDream-ai/HiDream-E1 @ f6f0631) put it together:

- e1-1 (`inference_e1_1.py`): the E1.1 editing transformer (HiDream-ai/HiDream-E1-1's `transformer/`, or a
  transformer-only folder) — one transformer for both the edit and the refine steps;
- e1-full (`inference.py`): HiDream-I1-Full's transformer with `HiDream-E1-Full.safetensors` over it (a LoRA
  plus the few full tensors E1 replaces);
- both: the VAE, text encoders 1-3, tokenizers and scheduler of HiDream-I1-Full's pipeline folder (for e1-1
  never its transformer), and Llama 3.1 8B Instruct (text encoder 4).

The I1-Full folder is looked for in `RunnerSettings.i1_full` (a folder or hub id), then `<E1 folder>/refine/`,
then the hub cache; e1-1 falls back to its own folder when that is a whole pipeline. Llama as for I1
(`weights.llama_dirs`).

`worker.runners.tiny.make_tiny_edit` writes the E1 folder with a whole tiny I1-Full pipeline in `refine/`,
so tests and smoke runs load tiny weights through the same code as real ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import ConfigError
from jobs.models import I1_FULL_HUB_ID, MODELS
from jobs.settings import RunnerSettings
from worker.runners.layout import LORA_FILE, REFINE_DIR, TRANSFORMER_CLASS
from worker.runners.tiny import ensure_tiny
from worker.runners.weights import (
    _HUB_ID,
    LLAMA_HUB_ID,
    TINY,
    ResolvedWeights,
    WeightsNotFound,
    cached_snapshot,
    llama_dirs,
)

EDIT_HUB_IDS = {name: spec.hub_id for name, spec in MODELS.items() if spec.kind == "edit"}


@dataclass(frozen=True)
class ResolvedEditWeights:
    folder: Path  # the E1 weights folder itself (or e1-1's transformer-only folder)
    components: ResolvedWeights  # pipeline folder for VAE, text encoders, tokenizers, scheduler; Llama
    transformer_dir: Path  # e1-1: the E1.1 transformer; e1-full: HiDream-I1-Full's (the LoRA's base)
    lora_file: Path | None  # e1-full: LoRA + full tensors over the I1-Full transformer
    source: str  # "hub:<id>", "local:<dir>" or "tiny:<dir>"


def resolve_edit_weights(
    model: str, weights: str | None = None, options: RunnerSettings | None = None
) -> ResolvedEditWeights:
    """Find an E1 model's weights on this machine: None = its hub id, "tiny", a local folder or a hub id.

    For e1-1 the folder may be the E1 download (with `transformer/`) or a transformer-only folder."""
    if model not in EDIT_HUB_IDS:
        raise ConfigError(f"unknown HiDream-E1 model {model!r}; expected one of {sorted(EDIT_HUB_IDS)}")
    options = options or RunnerSettings()
    wanted = weights or EDIT_HUB_IDS[model]
    required = LORA_FILE if model == "e1-full" else "transformer/config.json"
    if wanted == TINY:
        folder, source = ensure_tiny(model), "tiny"
    elif Path(wanted).expanduser().is_dir() or not _HUB_ID.match(wanted):
        folder, source = Path(wanted).expanduser().resolve(), "local"
        if not ((folder / required).is_file() or (model == "e1-1" and _is_transformer(folder))):
            place = f"local folder {folder} (missing, or no {required}" + (
                " and not a transformer folder)" if model == "e1-1" else ")"
            )
            raise WeightsNotFound(_not_found(model, f"weights {wanted}", [place]))
    else:
        found, where = cached_snapshot(wanted, required)
        if found is None:
            raise WeightsNotFound(_not_found(model, f"weights {wanted}", [where]))
        folder, source = found, "hub"
    transformer_dir = folder if _is_transformer(folder) else folder / "transformer"
    needs = "transformer/config.json" if model == "e1-full" else "model_index.json"
    i1_full, looked = _i1_full(folder, needs, options.i1_full)
    if i1_full is None and model == "e1-1" and (folder / "model_index.json").is_file():
        i1_full = folder  # an E1.1 folder that is a whole pipeline brings its own components
    if i1_full is None:
        what = f"HiDream-I1-Full ({I1_FULL_HUB_ID}; " + (
            "the LoRA's base transformer and the pipeline components)"
            if model == "e1-full"
            else "VAE, text encoders, tokenizers, scheduler; not its transformer)"
        )
        raise WeightsNotFound(_not_found(model, what, looked))
    if model == "e1-full":
        transformer_dir = i1_full / "transformer"
    components_dir = i1_full if (i1_full / "model_index.json").is_file() else folder
    if not (components_dir / "model_index.json").is_file():
        neither = [f"{i1_full} and {folder} (neither has a model_index.json)"]
        raise WeightsNotFound(_not_found(model, "pipeline components (VAE, text encoders)", neither))
    llama_dir, llama_tokenizer_dir = llama_dirs(model, components_dir, options.llama)
    label = f"{source}:{wanted if source == 'hub' else folder}"
    return ResolvedEditWeights(
        folder=folder,
        components=ResolvedWeights(components_dir, llama_dir, label, llama_tokenizer_dir),
        transformer_dir=transformer_dir,
        lora_file=folder / LORA_FILE if model == "e1-full" else None,
        source=label,
    )


def _is_transformer(folder: Path) -> bool:
    """Whether `folder` is a transformer-only folder (its config.json names the HiDream transformer class)."""
    try:
        return json.loads((folder / "config.json").read_text()).get("_class_name") == TRANSFORMER_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def _i1_full(folder: Path, required: str, setting: str | None) -> tuple[Path | None, list[str]]:
    """HiDream-I1-Full's folder holding `required`: the setting, else `<folder>/refine/`, else the hub cache."""
    looked: list[str] = []
    if setting:
        place = Path(setting).expanduser()
        if place.is_dir() or not _HUB_ID.match(setting):
            if (place / required).is_file():
                return place.resolve(), looked
            return None, [f"DREAMBATCH_RUNNER__I1_FULL={setting} (missing, or no {required})"]
        found, where = cached_snapshot(setting, required)
        return found, [] if found else [f"DREAMBATCH_RUNNER__I1_FULL={setting}: {where}"]
    inside = folder / REFINE_DIR
    if (inside / required).is_file():
        return inside, looked
    looked.append(f"{inside} (absent, or no {required})")
    found, where = cached_snapshot(I1_FULL_HUB_ID, required)
    if found is None:
        looked.append(where)
    return found, looked


def _not_found(model: str, what: str, looked: list[str]) -> str:
    hub_id = EDIT_HUB_IDS[model]
    fixes = [
        f"hf download {hub_id}  (for e1-full, the file {LORA_FILE} is enough)"
        if model == "e1-full"
        else f"hf download {hub_id} --include 'transformer/*'",
        f"hf download {I1_FULL_HUB_ID}"
        + (
            " --exclude 'transformer/*'  (its transformer is not needed for e1-1)"
            if model == "e1-1"
            else "  (the LoRA's base and the components)"
        ),
        f"accept the Llama 3.1 licence on huggingface.co/{LLAMA_HUB_ID}, then hf download {LLAMA_HUB_ID}",
        "point at folders you have: DREAMBATCH_RUNNER__I1_FULL (or --i1-full) for HiDream-I1-Full, "
        "DREAMBATCH_RUNNER__LLAMA (or --llama) for Llama; or put (or link) HiDream-I1-Full in the E1 folder's "
        f"{REFINE_DIR}/",
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

    down = {
        key.split(".lora_A.")[0]: (key.split(".lora_A.")[1].split(".")[0], value)
        for key, value in lora.items()
        if ".lora_A." in key
    }
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
        raise ConfigError(
            f"LoRA weights do not fit the transformer: unexpected {loaded.unexpected_keys[:5]}, missing {missing[:5]}"
        )
    return adapter


def load_full_tensors(transformer: Any, full: dict[str, Any]) -> None:
    """Copy E1-Full's full tensors into the transformer in place (they replace I1-Full's for good: the
    published script loads them once and its refine state dict aliases them)."""
    import torch

    tensors = dict(transformer.named_parameters()) | dict(transformer.named_buffers())
    unknown = sorted(set(full) - set(tensors))
    if unknown:
        raise ConfigError(f"E1-Full full tensors name no transformer tensor: {unknown[:5]}")
    with torch.no_grad():
        for name, value in full.items():
            tensors[name].copy_(value)
