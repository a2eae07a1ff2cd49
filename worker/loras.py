"""A row's LoRA adapter on the worker: the file behind its reference, in this machine's LoRA cache.

Submit staged local files by content (jobs/loras.py); `s3://` references are read here. Either way the bytes
land once in `runner.lora_dir` as `{sha256}.safetensors` and the adapter is named by that digest, so the
runner loads each distinct file once (worker/runners/lora.py keeps the loaded ones).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from jobs import inputs, loras
from jobs.errors import InputError
from jobs.models import ItemRecord, JobRecord
from jobs.settings import Settings
from jobs.storage import split_s3_key
from worker.runners.lora import LoraChoice

_by_etag: dict[tuple[str, str], str] = {}  # (s3 reference, its ETag) → the sha256 of its bytes
_lock = threading.Lock()


def choice(item: ItemRecord, job: JobRecord, settings: Settings, objects: Any) -> LoraChoice | None:
    """The adapter `item` runs with (None: none), its file in the local cache; InputError when it can't be read."""
    p = item.params
    ref = p.get("lora")
    if not ref:
        return None
    folder = Path(settings.runner.lora_dir).expanduser()
    sha = p.get("lora_sha256")
    if ref.startswith("s3://"):
        bucket, key = split_s3_key(ref)
        store = objects(f"s3://{bucket}")
        head = store.head(key)
        if head is None:
            raise InputError(f"{ref}: no such object")
        etag = str(head.get("ETag", ""))
        sha = sha or _by_etag.get((ref, etag))
        if sha is None or not (folder / f"{sha}{loras.SUFFIX}").is_file():
            data = inputs.fetch(ref, job, settings, objects, max_bytes=loras.MAX_BYTES)
            sha = _keep(folder, data, p.get("lora_sha256"), ref)
            if etag:
                _by_etag[(ref, etag)] = sha
    elif sha is None or not (folder / f"{sha}{loras.SUFFIX}").is_file():  # staged at submit, in the job's storage
        sha = _keep(folder, inputs.fetch(ref, job, settings, objects, max_bytes=loras.MAX_BYTES), sha, ref)
    return LoraChoice(
        file=str(folder / f"{sha}{loras.SUFFIX}"), name=f"lora_{sha[:16]}", scale=float(p.get("lora_scale", 1.0))
    )


def _keep(folder: Path, data: bytes, expected: str | None, ref: str) -> str:
    """Write `data` into the cache under its digest (atomically); the digest. InputError when it is not a LoRA
    or not the file submit staged."""
    loras.check_header(data)
    sha = hashlib.sha256(data).hexdigest()
    if expected and sha != expected:
        raise InputError(f"{ref}: its content changed since submit (sha256 {sha[:12]}…, expected {expected[:12]}…)")
    target = folder / f"{sha}{loras.SUFFIX}"
    with _lock:
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
    return sha


def recorded(item: ItemRecord, used: LoraChoice | None) -> dict[str, Any] | None:
    """What an item's output record says of its adapter: where it came from, its digest and strength."""
    if used is None:
        return None
    p = item.params
    return {"source": p.get("lora_source", p["lora"]), "sha256": Path(used.file).stem, "scale": used.scale}
