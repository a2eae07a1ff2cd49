"""A row's LoRA adapter (`lora`, `lora_scale`): checked at the edge, staged once for every worker.

A reference is a local `.safetensors` file or `s3://bucket/key`, in diffusers' LoRA format (what
`HiDreamImagePipeline.save_lora_weights` writes and most trainers export).
- Local files resolve like input images (inside the manifest's folder or `DREAMBATCH_INPUT_ROOTS`), their
  header is read (a safetensors file holding LoRA tensors), and at submit they are copied once, by content,
  to `_loras/{sha256}.safetensors` in the job's storage: every row and job naming the same file shares it.
- `s3://` references are read by the worker.
Workers name an adapter by its content's sha256, so one file loaded for many rows is loaded once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from pathlib import Path

from jobs import keys
from jobs.errors import InputError
from jobs.inputs import InputPolicy, confined_path, kind_of
from jobs.models import MODELS
from jobs.storage import ObjectStore

SUFFIX = ".safetensors"
MAX_BYTES = 4 * 2**30  # a LoRA of a 17 B transformer at rank 128 in fp32 is about 3 GiB
_MAX_HEADER = 100 * 2**20
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_A.weight", "lora_B.weight")


def check_ref(ref: str, model: str, policy: InputPolicy) -> str:
    """Validate a row's `lora`; returns it normalized (a local path made absolute). Raises InputError."""
    if not MODELS[model].loras:
        takers = ", ".join(name for name, spec in MODELS.items() if spec.loras)
        raise InputError(f"{model} carries its own LoRA and takes no other; LoRA rows run on {takers}")
    kind = kind_of(ref)
    if kind == "s3":
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key.endswith(SUFFIX):
            raise InputError(f"expected s3://bucket/key{SUFFIX}")
        return ref
    if kind != "local":
        raise InputError(f"a LoRA is a local {SUFFIX} file or s3://bucket/key{SUFFIX}, not a {kind} reference")
    if not ref.endswith(SUFFIX):
        raise InputError(f"expected a {SUFFIX} file (diffusers' LoRA format)")
    path = confined_path(ref, InputPolicy(policy.base_dir, policy.roots, MAX_BYTES))
    check_header(_head(path))
    return str(path)


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(8 + _MAX_HEADER)


def check_header(data: bytes) -> None:
    """InputError unless `data` starts like a safetensors file that holds LoRA tensors."""
    if len(data) < 8:
        raise InputError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or len(data) < 8 + size:
        raise InputError("not a safetensors file (its header length is wrong)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise InputError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError("not a safetensors file (its header is not a table)")
    if not any(marker in name for name in header for marker in _LORA_MARKERS):
        raise InputError("the file holds no LoRA tensors (names with lora_A/lora_B); is it a full checkpoint?")


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            sha.update(chunk)
    return sha.hexdigest()


def digest(path: str) -> str:
    """The sha256 of a local file, computed once per (path, size, mtime) in this process."""
    st = Path(path).stat()
    return _digest(path, st.st_size, st.st_mtime_ns)


def stage(ref: str, objects: ObjectStore) -> tuple[str, str | None]:
    """(the reference workers read, its sha256 when known): a local file is copied once, by content, into
    `_loras/` of the job's storage; an s3:// reference is left as it is (the worker hashes what it reads)."""
    if kind_of(ref) != "local":
        return ref, None
    sha = digest(ref)
    key = keys.S3_LORA.format(prefix="", sha256=sha)
    if objects.head(key) is None:
        return objects.put(key, Path(ref).read_bytes(), "application/octet-stream"), sha
    return f"{objects.location.rstrip('/')}/{key}", sha
