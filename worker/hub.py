"""`dreambatch models download MODEL`: a model's weights into the local Hugging Face cache, where workers
look for them (workers themselves never download).

Each model needs what `worker.runners.weights` / `weights_e1` resolve: its own repo (E1.1: its transformer;
E1-Full: its LoRA file), HiDream-I1-Full for the E1 models (E1.1: everything but its transformer), and the
Llama 3.1 8B Instruct text encoder (gated: its licence must be accepted on the hub, and a token given).
The cache is huggingface_hub's (`HF_HOME`, `HF_HUB_CACHE`; default ~/.cache/huggingface), which the compose
GPU worker mounts. Before anything is fetched the hub is asked about each repo with a short timeout, so a
machine that cannot reach it is told so in seconds, with what to do instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jobs.errors import ConfigError, Unreachable
from jobs.models import I1_FULL_HUB_ID, MODELS
from worker.runners.layout import LORA_FILE

PROBE_TIMEOUT = 5.0  # s for the hub's answer about one repo, before anything is downloaded


@dataclass(frozen=True)
class Fetch:
    repo: str
    allow: list[str] | None = None  # only these files (huggingface_hub patterns)
    ignore: list[str] | None = None  # not these


def plan(model: str) -> list[Fetch]:
    """What `model` needs from the hub, in the order it is fetched."""
    from worker.runners.weights import LLAMA_HUB_ID  # (imports diffusers: after the hub answered about the model)

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    llama = Fetch(LLAMA_HUB_ID, ignore=["original/*"])  # original/: the same weights as .pth files
    spec = MODELS[model]
    if spec.kind == "generate":
        return [Fetch(spec.hub_id), llama]
    if model == "e1-1":  # its transformer; VAE, text encoders, tokenizers and scheduler from I1-Full
        return [
            Fetch(spec.hub_id, allow=["transformer/*", "*.json"]),
            Fetch(I1_FULL_HUB_ID, ignore=["transformer/*"]),
            llama,
        ]
    return [Fetch(spec.hub_id, allow=[LORA_FILE, "*.json"]), Fetch(I1_FULL_HUB_ID), llama]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(model: str, say=print) -> list[Path]:
    """Fetch everything `model` needs into the local hub cache; returns the snapshot folders. Raises
    ConfigError (offline mode, a gated repo without access) or Unreachable (no hub), with what to do."""
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if _offline():
        raise ConfigError(
            "HF_HUB_OFFLINE is set, so nothing can be downloaded; run this with HF_HUB_OFFLINE=0 "
            "(docker compose run --rm -e HF_HUB_OFFLINE=0 worker-gpu dreambatch models download "
            f"{model})"
        )
    from huggingface_hub import HfApi, constants, snapshot_download

    api = HfApi()
    _check(api, MODELS[model].hub_id, model, constants.ENDPOINT)  # 1. can the hub be reached at all?
    fetches = plan(model)
    for fetch in fetches[1:]:  # 2. ask about every other repo before fetching gigabytes
        _check(api, fetch.repo, model, constants.ENDPOINT)
    folders = []
    for fetch in fetches:  # 3. fetch
        say(f"{fetch.repo}: downloading into {constants.HF_HUB_CACHE}")
        try:
            folder = Path(snapshot_download(fetch.repo, allow_patterns=fetch.allow, ignore_patterns=fetch.ignore))
        except Exception as exc:
            raise _explain(exc, fetch.repo, model, constants.ENDPOINT) from None
        say(f"{fetch.repo}: {folder}")
        folders.append(folder)
    return folders


def _check(api, repo: str, model: str, endpoint: str) -> None:
    try:
        api.model_info(repo, timeout=PROBE_TIMEOUT)
    except Exception as exc:
        raise _explain(exc, repo, model, endpoint) from None


def _explain(exc: Exception, repo: str, model: str, endpoint: str) -> ConfigError | Unreachable:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return ConfigError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and log in "
            "(hf auth login, or set HF_TOKEN), then run this again"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ConfigError(
            f"{repo} not found on {endpoint} (or it is private: log in with hf auth login, or set HF_TOKEN)"
        )
    if isinstance(exc, HfHubHTTPError) and getattr(exc, "response", None) is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return ConfigError(
                f"{repo}: the hub refused access ({status}); accept its licence at "
                f"https://huggingface.co/{repo} and log in (hf auth login, or set HF_TOKEN)"
            )
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return Unreachable(
        f"cannot reach the Hugging Face hub at {endpoint} for {repo} ({cause}); on a machine that can, run "
        f"dreambatch models download {model} (or hf download {repo}), then copy its cache "
        "(HF_HOME, default ~/.cache/huggingface) here, or mount it into the GPU worker (docker-compose.yml)"
    )
