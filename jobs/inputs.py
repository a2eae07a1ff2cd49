"""Input image references on edit rows: checked at the edge, staged next to the job.

A reference is a local path, `s3://bucket/key`, an `https://` (or `http://`) URL, or a `data:` URI.
- Local paths resolve against the manifest's folder and must stay inside it or a configured root
  (`DREAMBATCH_INPUT_ROOTS`): no `..` escapes, no symlinks pointing out; size-capped.
- Local files and data URIs are copied at submit to `{job_id}/inputs/` in the job's storage, so
  any worker can read them and messages never carry image bytes.
- Before any GPU time (`ImageChecks`, at `validate` and `submit`): every image's header is read (format, pixel
  count), `s3://` objects are HEADed and URLs fetched through jobs.netguard with the worker's caps; a URL fetched
  then is staged like a local file, so the worker reads that copy. `--no-remote-checks` (or
  DREAMBATCH_INPUTS__CHECK_REMOTE=false) leaves S3 keys and URLs to the worker, for inputs that exist only later.
"""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from jobs import netguard, records
from jobs.errors import InputError
from jobs.formats import BY_CONTENT_TYPE, EXTENSIONS
from jobs.models import JobRecord
from jobs.settings import Settings
from jobs.storage import ObjectStore, split_s3_key

DATA_URI = re.compile(
    r"^data:(?P<type>" + "|".join(map(re.escape, BY_CONTENT_TYPE)) + r");base64,"
    r"(?P<data>[A-Za-z0-9+/=\s]+)$",
    re.I,
)
_FOLDER_LOCK = threading.Lock()  # the check threads make an ImageChecks' copy folder once
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


# --- reading an input: what a worker (and the review page) does with a checked reference ---------------------------
def fetch(ref: str, job: JobRecord, settings: Settings, objects, max_bytes: int | None = None) -> bytes:
    """The bytes behind a reference, bounded by `max_bytes` (default settings.inputs.max_bytes).

    `objects(location)` gives an ObjectStore; S3 references are read with the job's S3 client.
    Local paths are accepted only inside the job's own local output folder (where submit staged them).
    """
    limit = max_bytes or settings.inputs.max_bytes
    if ref.startswith("s3://"):
        bucket, key = split_s3_key(ref)
        data = objects(f"s3://{bucket}").get(key, max_bytes=limit)
        if data is None:
            raise InputError(f"{ref}: no such object")
        return data
    if ref.startswith(("https://", "http://")):
        return netguard.fetch(ref, settings.netpolicy(), max_bytes=limit, timeout=settings.inputs.download_timeout)
    path = Path(ref)
    root = Path(job.output).resolve() if not job.output.startswith("s3://") else None
    if root is None or not path.resolve().is_relative_to(root):
        raise InputError(f"{ref}: local paths are read only from the job's own staged inputs")
    if not path.is_file():
        raise InputError(f"{ref}: file not found")
    if path.stat().st_size > limit:
        raise InputError(f"{ref}: {path.stat().st_size} bytes is over the {limit}-byte limit")
    return path.read_bytes()


# --- submit-time checks: every edit row's image before any GPU time ----------------------------------------------


def open_image(data: bytes | Path, max_pixels: int) -> Any:
    """The image opened lazily (Pillow reads its header; no pixel is decoded), under the rules every reader of
    an input shares, here at submit and on the worker (worker/imaging.py): JPEG, PNG or WebP, at most
    `max_pixels` (a decompression bomb fails before any decoding). Raises InputError saying what is wrong:
    "damaged JPEG" when the first bytes say which format the file was meant to be."""
    import io

    from PIL import Image, UnidentifiedImageError

    from jobs.formats import PIL_NAMES, begins_like

    source: IO[bytes] | Path
    if isinstance(data, bytes):
        head, source = data[:64], io.BytesIO(data)
    else:
        with data.open("rb") as fh:
            head, source = fh.read(64), data
    try:
        image = Image.open(source, formats=sorted(PIL_NAMES))
    except UnidentifiedImageError:
        if claimed := begins_like(head):
            raise InputError(f"{damaged(claimed)}: it begins like one but its data cannot be read") from None
        raise InputError("not a JPEG, PNG or WebP image") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{damaged(begins_like(head))}: {exc}") from None
    w, h = image.size
    if w * h > max_pixels:
        image.close()
        raise InputError(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit")
    return image


def damaged(fmt: str | None) -> str:
    """ "damaged JPEG" (or PNG, WebP) when the bytes say which format the file was meant to be."""
    from jobs.formats import FORMATS

    return f"damaged {FORMATS[fmt].shown}" if fmt else "image file is damaged or truncated"


def check_header(data: bytes | Path, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height) of an image from its header alone (`open_image`). Raises InputError as the
    worker would."""
    with open_image(data, max_pixels) as image:
        return image.format or "", *image.size


@dataclass
class Checked:
    """What the submit-time check of one reference found: an error (the row is bad), nothing (it is fine), or
    `unchecked` with why (the network part was off, the budget ran out, the network failed: the worker checks it).
    `copy` is a fetched URL's bytes on disk, which submit stages so the worker does not fetch it again."""

    error: InputError | None = None
    unchecked: str | None = None
    copy: Path | None = None


class ImageChecks:
    """The submit-time checks of edit rows' input images, for `validate` and for both passes of a submission.

    Local files and data URIs: the header is read (format, pixel count), always. With `remote` on: `s3://` objects
    are HEADed (exists, size cap) and URLs fetched through jobs.netguard's guard with the worker's caps, then their
    header read; the fetched bytes are kept (`copy`) for submit to stage. Up to `inputs.check_workers` checks run at
    once, and no network check starts once `inputs.check_budget_s` is spent (the rest are left to the worker and
    counted in `unchecked`).
    Network results are cached by reference, so the second pass of a submission fetches nothing twice."""

    def __init__(self, settings, objects=None, *, remote: bool | None = None):
        """`objects(location)`: an ObjectStore (the S3 client for `s3://bucket`); None: S3 objects go unchecked."""
        import time

        self.settings = settings
        self.objects = objects
        self.remote = settings.inputs.check_remote if remote is None else remote
        self.deadline = time.monotonic() + settings.inputs.check_budget_s
        self.results: dict[str, Checked] = {}
        self._folder: tempfile.TemporaryDirectory | None = None  # made for the first URL copy

    def close(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()

    def __enter__(self) -> ImageChecks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_all(self, refs: list[str]) -> list[Checked]:
        """Check each reference (in parallel, bounded), cached; results in the order given."""
        from concurrent.futures import ThreadPoolExecutor

        todo = list(dict.fromkeys(r for r in refs if self.result(r) is None))
        if len(todo) > 1:
            workers = min(self.settings.inputs.check_workers, len(todo))
            with ThreadPoolExecutor(workers, thread_name_prefix="input-check") as pool:
                found = dict(zip(todo, pool.map(self._check, todo), strict=True))
        else:
            found = {r: self._check(r) for r in todo}
        for ref, result in found.items():
            if kind_of(ref) in ("s3", "url"):  # a header read again costs little; a fetch is what is kept
                self.results[_digest(ref)] = result
        return [self.result(r) or found[r] for r in refs]

    def result(self, ref: str) -> Checked | None:
        """The cached check of an S3 object or URL (None for a local file or data URI: those are read again)."""
        return self.results.get(_digest(ref)) if kind_of(ref) in ("s3", "url") else None

    def unchecked(self) -> dict[str, int]:
        """Why references went unchecked → how many."""
        counts: dict[str, int] = {}
        for found in self.results.values():
            if found.unchecked:
                counts[found.unchecked] = counts.get(found.unchecked, 0) + 1
        return counts

    def _check(self, ref: str) -> Checked:
        from jobs.errors import ConfigError, TransientError

        kind = kind_of(ref)
        limit, pixels = self.settings.inputs.max_bytes, self.settings.inputs.max_pixels
        try:
            if kind == "local":
                check_header(Path(ref), pixels)
                return Checked()
            if kind == "data":
                check_header(decode_data_uri(ref, limit)[0], pixels)
                return Checked()
            if not self.remote:
                return Checked(unchecked="remote checks are off (--no-remote-checks)")
            if self._time_left() <= 0:  # a check started in time runs to its own cap (download_timeout)
                return Checked(unchecked=f"the {self.settings.inputs.check_budget_s:g}s check budget ran out")
            return self._check_s3(ref, limit) if kind == "s3" else self._check_url(ref, limit, pixels)
        except InputError as exc:
            return Checked(error=exc)
        except (TransientError, ConfigError) as exc:  # not the row's fault: the worker tries it again
            return Checked(unchecked=f"{type(exc).__name__}: {exc}")

    def _time_left(self) -> float:
        import time

        return self.deadline - time.monotonic()

    def _check_s3(self, ref: str, limit: int) -> Checked:
        from jobs.storage import S3Store, split_s3_key

        bucket, key = split_s3_key(ref)
        store = self.objects(f"s3://{bucket}") if self.objects else None
        if not isinstance(store, S3Store):
            return Checked(unchecked="no S3 client to check s3:// inputs with")
        head = store.head(key)
        if head is None:
            raise InputError(f"{ref}: no such object")
        if head.get("ContentLength", 0) > limit:
            raise InputError(f"{ref}: {head['ContentLength']} bytes is over the {limit}-byte limit")
        return Checked()

    def _check_url(self, ref: str, limit: int, pixels: int) -> Checked:
        import uuid

        from jobs import netguard

        # the worker's caps, so a verdict here is the one the worker would reach
        timeout = self.settings.inputs.download_timeout
        data = netguard.fetch(ref, self.settings.netpolicy(), max_bytes=limit, timeout=timeout)
        check_header(data, pixels)
        with _FOLDER_LOCK:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="dreambatch-inputs-")
        path = Path(self._folder.name) / uuid.uuid4().hex
        path.write_bytes(data)
        return Checked(copy=path)


def _digest(ref: str) -> str:
    import hashlib

    return hashlib.sha256(ref.encode()).hexdigest()


def stage_copy(copy: Path, objects: ObjectStore, job_id: str, item_id: str) -> str:
    """Stage a URL's bytes fetched at submit next to the job, as a local file is; returns the reference workers
    read (so the worker does not fetch the URL a second time)."""
    from jobs.formats import CONTENT_TYPES, sniff

    data = copy.read_bytes()
    fmt = sniff(data) or "png"
    return records.write_input(objects, job_id, item_id, EXT_FOR_TYPE[CONTENT_TYPES[fmt]], data, CONTENT_TYPES[fmt])
