"""Input image references on edit rows: checked at the edge, staged next to the job.

A reference is a local path, `s3://bucket/key`, an `https://` (or `http://`) URL, or a `data:` URI.
- Local paths resolve against the manifest's folder and must stay inside it or a configured root
  (`DREAMBATCH_INPUT_ROOTS`): no `..` escapes, no symlinks pointing out; size-capped.
- Local files and data URIs are copied at submit to `{job_id}/inputs/` in the job's storage, so
  any worker can read them and messages never carry image bytes.
- URLs and S3 keys are fetched by the worker (jobs.netguard checks URL hosts then).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from jobs import records
from jobs.errors import InputError
from jobs.formats import BY_CONTENT_TYPE, EXTENSIONS
from jobs.storage import ObjectStore

DATA_URI = re.compile(
    r"^data:(?P<type>" + "|".join(map(re.escape, BY_CONTENT_TYPE)) + r");base64,"
    r"(?P<data>[A-Za-z0-9+/=\s]+)$",
    re.I,
)
EXT_FOR_TYPE = {t: f".{EXTENSIONS[name]}" for t, name in BY_CONTENT_TYPE.items()}  # image/jpg → .jpg


@dataclass(frozen=True)
class InputPolicy:
    base_dir: Path  # the manifest's folder
    roots: tuple[Path, ...] = ()  # operator-configured extra folders
    max_bytes: int = 50 * 2**20


def kind_of(ref: str) -> str:
    lowered = ref[:8].lower()
    if lowered.startswith("data:"):
        return "data"
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.startswith(("https://", "http://")):
        return "url"
    if re.match(r"^[a-z][a-z0-9+.-]*://", lowered):
        raise InputError(f"unsupported scheme {urlsplit(ref).scheme!r}; use a path, s3://, https:// or data:")
    return "local"


def check_ref(ref: str, policy: InputPolicy) -> str:
    """Validate one reference; returns it normalized (local paths made absolute). Raises InputError."""
    if bad := next((c for c in ref if ord(c) < 32 or ord(c) == 127), None):
        raise InputError(f"holds a control character ({bad!r}); a path or URL never does")
    kind = kind_of(ref)
    if kind == "data":
        decode_data_uri(ref, policy.max_bytes)
        return ref
    if kind == "s3":
        bucket, _, key = ref[5:].partition("/")
        if not bucket or not key:
            raise InputError("expected s3://bucket/key")
        return ref
    if kind == "url":
        parts = urlsplit(ref)
        if not parts.hostname:
            raise InputError("URL has no host")
        return ref
    return str(confined_path(ref, policy))


def confined_path(ref: str, policy: InputPolicy) -> Path:
    raw = Path(ref).expanduser()
    path = raw if raw.is_absolute() else policy.base_dir / raw
    resolved = path.resolve()  # follows symlinks: a link pointing out lands outside every root
    roots = [policy.base_dir.resolve(), *(r.resolve() for r in policy.roots)]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InputError(f"path escapes the manifest folder{' and input roots' if policy.roots else ''}")
    if not resolved.is_file():
        raise InputError("file not found")
    size = resolved.stat().st_size
    if size > policy.max_bytes:
        raise InputError(f"file is {size} bytes, over the {policy.max_bytes}-byte limit")
    return resolved


def decode_data_uri(ref: str, max_bytes: int) -> tuple[bytes, str]:
    match = DATA_URI.match(ref)
    if not match:
        raise InputError("data URI must be data:image/png|jpeg|webp;base64,…")
    if len(match["data"]) * 3 // 4 > max_bytes:
        raise InputError(f"data URI is over the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(match["data"], validate=False)
    except (binascii.Error, ValueError):
        raise InputError("data URI is not valid base64") from None
    return data, match["type"].lower()


def stage(ref: str, objects: ObjectStore, job_id: str, item_id: str, max_bytes: int) -> str:
    """Copy a local file or data URI into the job's storage; returns the reference workers use."""
    kind = kind_of(ref)
    if kind == "local":
        path = Path(ref)
        return records.write_input(
            objects, job_id, item_id, path.suffix.lower(), path.read_bytes(), "application/octet-stream"
        )
    if kind == "data":
        data, content_type = decode_data_uri(ref, max_bytes)
        return records.write_input(objects, job_id, item_id, EXT_FOR_TYPE[content_type], data, content_type)
    return ref
