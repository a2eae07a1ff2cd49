"""A loaded model's weights revision: a short string that changes when its weights or configs change.

    a hub cache snapshot   → "<repo id>@<commit>": the snapshot folder is named by the commit it holds
    a local folder (tiny)  → "sha256:<16 hex>" of every config and tokenizer file's contents (*.json,
                             config*, tokenizer*, vocab*, merges*, *.model) and, for each weight file
                             (*.safetensors, *.bin…), its relative path, size and the bytes of its first and
                             last MiB: a few MiB read for a 30 GB model, the same for a copy of the folder
                             (paths are relative, mtimes ignored), different for new weights or configs

A model read from several places (E1 with I1-Full's components or Llama from the hub cache)
joins the revision of each place, in the order resolved: `HiDream-ai/HiDream-E1-1@…+meta-llama/…@…`.
Workers publish it in their heartbeat and record it on every item they run; the catalog compares it
with the revision each image was last edited with (docs/catalog.md).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from jobs.models import MODELS
from worker.runners.weights import resolve_weights
from worker.runners.weights_e1 import resolve_edit_weights

EDGE_BYTES = 1 << 20  # bytes hashed at each end of a weight file
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5"}
CONFIG_PREFIXES = ("config", "tokenizer", "vocab", "merges", "special_tokens", "spiece", "added_tokens")
MAX_CONFIG_BYTES = 64 << 20  # a larger "config" file is hashed like a weight file
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def weights_revision(model: str, weights: str | None) -> str:
    """The revision of the weights a runner for `model` loads from `weights` (as the runners resolve them)."""
    if MODELS[model].kind == "edit":
        return edit_revision(resolve_edit_weights(model, weights))
    return pipeline_revision(resolve_weights(model, weights))


def read_revision(model: str, revision: Callable[[], str]) -> str | None:
    """`revision()` of the weights a runner just loaded; None (logged) when it cannot be read: a worker
    without one still runs, the catalog just cannot compare its weights."""
    try:
        return revision()
    except Exception:
        logging.getLogger("dreambatch.worker").warning("model %s: weights revision not known", model, exc_info=True)
        return None


def pipeline_revision(found) -> str:
    """The revision of resolved I1 weights (`weights.ResolvedWeights`): what a runner loaded."""
    return places_revision([found.pipeline_dir, found.llama_dir, found.llama_tokenizer_dir])


def edit_revision(found) -> str:
    """The revision of resolved E1 weights (`weights_e1.resolve_edit_weights`): what a runner loaded."""
    return places_revision(
        [
            found.folder,
            found.transformer_dir,
            found.components.pipeline_dir,
            found.components.llama_dir,
            found.components.llama_tokenizer_dir,
        ]
    )


def places_revision(places: list[Path]) -> str:
    roots = list(dict.fromkeys(hub_snapshot(place) or place for place in places))
    roots = [root for root in roots if not any(root != other and root.is_relative_to(other) for other in roots)]
    return "+".join(dict.fromkeys(place_revision(root) for root in roots))


def hub_snapshot(path: Path) -> Path | None:
    """The hub cache snapshot folder (`…/models--org--name/snapshots/<commit>`) `path` lies in, if any."""
    parts = path.parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--") and _COMMIT.match(parts[i + 1]):
            return Path(*parts[: i + 2])
    return None


def place_revision(root: Path) -> str:
    snapshot = hub_snapshot(root)
    if snapshot is not None:
        repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
        return f"{repo}@{snapshot.name}"
    return folder_digest(root)


def folder_digest(folder: Path) -> str:
    """`sha256:<16 hex>` over the folder's config files and the edges of its weight files (module docstring)."""
    digest = hashlib.sha256()
    for rel, path in sorted(_files(folder)):
        suffix, name = path.suffix.lower(), path.name.lower()
        size = path.stat().st_size
        is_config = suffix == ".json" or suffix == ".model" or name.startswith(CONFIG_PREFIXES)
        if suffix in WEIGHT_SUFFIXES or (is_config and size > MAX_CONFIG_BYTES):
            digest.update(f"weights {rel} {size}\n".encode())
            with path.open("rb") as fh:
                digest.update(fh.read(EDGE_BYTES))
                if size > EDGE_BYTES:
                    fh.seek(max(EDGE_BYTES, size - EDGE_BYTES))
                    digest.update(fh.read(EDGE_BYTES))
        elif is_config:
            digest.update(f"config {rel} {size}\n".encode())
            digest.update(path.read_bytes())
    return f"sha256:{digest.hexdigest()[:16]}"


def _files(folder: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file under `folder`, following links (a `refine/` linked in), hidden
    names skipped, each real folder walked once."""
    found, walked = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(top) / name
            if not name.startswith(".") and path.is_file():
                found.append((path.relative_to(folder).as_posix(), path))
    return found
