"""Where a HiDream-I1 model's weights come from: the local hub cache, a folder, or tiny random ones.

`resolve_weights` never downloads: a hub id is looked up in the local Hugging Face cache only, and a
model that is nowhere raises `WeightsNotFound` naming every place looked at and how to fill one.
`--weights tiny` takes the tiny random-weight build of `worker.runners.tiny`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import ConfigError
from jobs.models import MODELS
from jobs.settings import RunnerSettings
from worker.runners.tiny import ensure_tiny

MODEL_HUB_IDS = {name: spec.hub_id for name, spec in MODELS.items() if spec.kind == "generate"}
LLAMA_HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"  # text encoder 4; the HiDream repos do not ship it
LLAMA_HUB_IDS = (LLAMA_HUB_ID, "meta-llama/Meta-Llama-3.1-8B-Instruct")  # the same model under its older name
TINY = "tiny"  # the `weights` value that asks for tiny random weights

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class WeightsNotFound(ConfigError):
    """No weights for a model in any place looked at; the message says where we looked and how to fix it."""


@dataclass(frozen=True)
class ResolvedWeights:
    pipeline_dir: Path  # diffusers layout: model_index.json, transformer/, vae/, …
    llama_dir: Path  # LlamaForCausalLM weights (text encoder 4)
    source: str  # "hub:<id>", "local:<dir>" or "tiny:<dir>", for logs and results
    llama_tokenizer_dir: Path  # tokenizer 4; the same folder as llama_dir for a hub Llama


def resolve_weights(model: str, weights: str | None = None, options: RunnerSettings | None = None) -> ResolvedWeights:
    """Find a model's weights on this machine: None = its hub id, "tiny", a local folder or a hub id."""
    if model not in MODEL_HUB_IDS:
        raise ConfigError(f"unknown HiDream-I1 model {model!r}; expected one of {sorted(MODEL_HUB_IDS)}")
    wanted = weights or MODEL_HUB_IDS[model]
    if wanted == TINY:
        pipeline_dir = ensure_tiny(model)
        source = f"tiny:{pipeline_dir}"
    elif Path(wanted).expanduser().is_dir() or not _HUB_ID.match(wanted):
        pipeline_dir = Path(wanted).expanduser().resolve()
        if not (pipeline_dir / "model_index.json").is_file():
            looked = f"local folder {pipeline_dir} (missing, or no model_index.json)"
            raise WeightsNotFound(_not_found(model, wanted, [looked]))
        source = f"local:{pipeline_dir}"
    else:
        cached, looked = cached_snapshot(wanted, "model_index.json")
        if cached is None:
            raise WeightsNotFound(_not_found(model, wanted, [looked]))
        pipeline_dir, source = cached, f"hub:{wanted}"
    llama_dir, llama_tokenizer_dir = llama_dirs(model, pipeline_dir, (options or RunnerSettings()).llama)
    return ResolvedWeights(pipeline_dir, llama_dir, source, llama_tokenizer_dir)


def _hub_cache() -> Path:
    """The hub cache folder as huggingface_hub would pick it, read now rather than at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


def cached_snapshot(hub_id: str, required: str) -> tuple[Path | None, str]:
    """The cached snapshot of `hub_id` if it holds `required`, else None; and where we looked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        return None, f"hub cache {cache} (no complete snapshot of {hub_id})"
    if not (folder / required).is_file():
        return None, f"hub cache {folder} (snapshot of {hub_id} has no {required})"
    return folder, str(folder)


def llama_dirs(model: str, pipeline_dir: Path, setting: str | None = None) -> tuple[Path, Path]:
    """Text encoder 4 and its tokenizer: `setting` (RunnerSettings.llama: a folder or a hub id) when given,
    else the pipeline folder's own when it ships one, else Llama 3.1 8B Instruct in the hub cache under
    either of its names (HiDream's READMEs use the older `Meta-Llama-3.1-8B-Instruct`)."""
    if setting:
        place = Path(setting).expanduser()
        if place.is_dir() or not _HUB_ID.match(setting):
            if (place / "config.json").is_file():
                return place.resolve(), place.resolve()
            looked = [f"DREAMBATCH_RUNNER__LLAMA={setting} (missing, or no config.json)"]
            raise WeightsNotFound(_not_found(model, setting, looked, llama=True))
        llama, where = cached_snapshot(setting, "config.json")
        if llama is None:
            raise WeightsNotFound(
                _not_found(model, setting, [f"DREAMBATCH_RUNNER__LLAMA={setting}: {where}"], llama=True)
            )
        return llama, llama
    model_dir, tokenizer_dir = pipeline_dir / "text_encoder_4", pipeline_dir / "tokenizer_4"
    if (model_dir / "config.json").is_file() and tokenizer_dir.is_dir():
        return model_dir, tokenizer_dir
    looked = [f"{model_dir} and {tokenizer_dir} (absent)"]
    for hub_id in LLAMA_HUB_IDS:
        llama, where = cached_snapshot(hub_id, "config.json")
        if llama is not None:
            return llama, llama
        looked.append(where)
    raise WeightsNotFound(_not_found(model, LLAMA_HUB_ID, looked, llama=True))


def _not_found(model: str, wanted: str, looked: list[str], llama: bool = False) -> str:
    what = f"Llama text encoder ({wanted})" if llama else f"weights {wanted}"
    fixes = [] if llama else [f"hf download {MODEL_HUB_IDS[model]}  (huggingface-cli download on hub < 1.0)"]
    fixes += [
        f"accept the Llama 3.1 licence on huggingface.co/{LLAMA_HUB_ID}, then hf download {LLAMA_HUB_ID}",
        "pass a local diffusers folder (one with text_encoder_4/ and tokenizer_4/ needs no hub Llama)",
        "point DREAMBATCH_RUNNER__LLAMA (or --llama) at a Llama 3.1 8B Instruct folder or cached hub id",
        f"pass --weights {TINY} for tiny random weights (tests and smoke runs only)",
    ]
    lines = [f"no {what} for model {model!r}; looked in:", *(f"  - {place}" for place in looked)]
    return "\n".join([*lines, "to get them, one of:", *(f"  - {fix}" for fix in fixes)])
