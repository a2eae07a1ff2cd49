"""Scanning a source prefix: every object is an image to edit (a candidate row) or skipped, with the reason."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import Any

from jobs import templates
from jobs.catalog.plan import Plan, fingerprint, item_id_for
from jobs.catalog.report import Skipped
from jobs.catalog.schedules import Schedule
from jobs.errors import ConfigError, InputError
from jobs.formats import BY_CONTENT_TYPE, BY_SUFFIX, EXTENSIONS, UNREAD_SUFFIXES
from jobs.models import OUTPUT_KEY_PATTERN
from jobs.settings import Settings
from jobs.storage import S3Store


@dataclass
class Candidate:
    key: str
    item_id: str
    fingerprint: str
    row: dict[str, Any]


@dataclass(frozen=True)
class SourceObject:
    key: str
    etag: str
    size: int
    fmt: str  # jpeg, png, webp
    metadata: dict[str, str]
    version: str | None = None  # its S3 version id, in a bucket that keeps versions


def excluded_by(rel: str, patterns: list[str]) -> str | None:
    """The first of `patterns` (a schedule's source.exclude) that leaves out the key `rel` (below the prefix):
    `name/` a folder of that name (a glob) at any depth, `a/b/` that folder, else a glob over the key (or, for a
    glob without /, its file name)."""
    parts = rel.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            folder = pattern.rstrip("/")
            if "/" in folder:
                if fnmatchcase(rel, f"{folder}/*"):
                    return pattern
            elif any(fnmatchcase(part, folder) for part in parts[:-1]):
                return pattern
        elif fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatchcase(parts[-1], pattern)):
            return pattern
    return None


def scan(
    source: S3Store,
    settings: Settings,
    want_metadata: bool,
    exclude: list[str] | None = None,
    excluded: dict[str, int] | None = None,
) -> Iterator[SourceObject | Skipped]:
    """Every object under the source prefix: an image to edit, or the reason it is skipped; the ones `exclude`
    leaves out are counted by pattern in `excluded`, not listed. In a bucket that keeps versions, each image's
    version id comes with it. S3 errors are jobs.storage's (ConfigError for a missing bucket or bad
    credentials, else TransientError)."""
    limit, max_bytes = settings.catalog.max_objects, settings.inputs.max_bytes
    count = 0
    listing = source.version_listing() if source.versioned() else source.listing()
    for obj in listing:
        count += 1
        if count > limit:
            raise ConfigError(
                f"{source.location}: more than {limit} objects (DREAMBATCH_CATALOG__MAX_OBJECTS); narrow the prefix"
            )
        if exclude and (pattern := excluded_by(obj["Key"][len(source.prefix) :], exclude)):
            if excluded is not None:
                excluded[pattern] = excluded.get(pattern, 0) + 1
            continue
        yield _classify(source, obj, max_bytes, want_metadata)


def _classify(source: S3Store, obj: dict, max_bytes: int, want_metadata: bool) -> SourceObject | Skipped:
    key, size = obj["Key"], int(obj.get("Size", 0))
    etag = str(obj.get("ETag", "")).strip('"')
    if key.endswith("/"):
        return Skipped(key, "folder marker", "folder")
    if size == 0:
        return Skipped(key, "empty object (0 bytes)", "empty")
    suffix = PurePosixPath(key).suffix.lower()
    fmt = BY_SUFFIX.get(suffix)
    if suffix in UNREAD_SUFFIXES:
        return Skipped(key, f"unsupported image format {suffix} (JPEG, PNG and WebP are read)", "unsupported")
    if fmt is None and suffix and not suffix[1:].isdigit():
        return Skipped(key, f"not an image ({suffix} file)", "not_image")
    head = None
    if fmt is None or want_metadata:
        head = source.head(key[len(source.prefix) :])
        if head is None:
            return Skipped(key, "deleted while scanning")
    if fmt is None:
        content_type = ((head or {}).get("ContentType") or "").split(";")[0].strip().lower()
        fmt = BY_CONTENT_TYPE.get(content_type)
        if fmt is None:
            return Skipped(key, f"not an image (no extension, content-type {content_type or 'unset'})", "not_image")
    if size > max_bytes:
        return Skipped(key, f"{size} bytes, over the {max_bytes}-byte input limit", "too_large")
    version = obj.get("VersionId")
    metadata = {k.lower(): v for k, v in (head or {}).get("Metadata", {}).items()}
    return SourceObject(key, etag, size, fmt, metadata, version if version and version != "null" else None)


def candidates(
    schedule: Schedule,
    plan: Plan,
    source: S3Store,
    settings: Settings,
    skipped: list[Skipped],
    excluded: dict[str, int] | None = None,
) -> Iterator[Candidate]:
    """One row per image under the prefix, in listing order; what is not an image lands in `skipped`, what
    source.exclude leaves out is counted in `excluded`."""
    template = schedule.key_template()
    taken: dict[str, str] = {}  # output key → the source key that writes it
    out_format = str(plan.defaults.get("output_format", "png")).lower().replace("jpg", "jpeg")
    for entry in scan(source, settings, plan.uses_metadata, schedule.source.exclude, excluded):
        if isinstance(entry, Skipped):
            skipped.append(entry)
            continue
        key, rel = entry.key, entry.key[len(source.prefix) :]
        parts = template.match(key) if template else {}
        if parts is None:
            skipped.append(Skipped(key, f"does not match source.path {schedule.source.path!r}"))
            continue
        path = PurePosixPath(rel)
        values = {
            **plan.values,
            "key": key,
            "path": rel,
            "dir": str(path.parent) if str(path.parent) != "." else "",
            "name": path.name,
            "stem": path.stem,
            "ext": path.suffix.lstrip("."),
            **parts,
            **{f"meta.{k}": v for k, v in entry.metadata.items()},
        }
        missing = [n for n in plan.metadata_names if n not in values]
        if missing:
            name = missing[0].removeprefix("meta.")
            skipped.append(Skipped(key, f"no object metadata x-amz-meta-{name} (the instruction uses {{meta.{name}}})"))
            continue
        try:
            texts = {f: templates.render(t, values, f) for f, t in plan.texts.items()}
        except InputError as exc:
            skipped.append(Skipped(key, str(exc)))
            continue
        row: dict[str, Any] = {"id": item_id_for(rel), "image": f"s3://{source.bucket}/{key}", **texts}
        fmt = entry.fmt if schedule.keep_format else out_format
        if schedule.keep_format:
            row["output_format"] = entry.fmt
        if schedule.mirror:
            if not schedule.keep_format:
                out_key = f"{path.with_suffix('')}.{EXTENSIONS[fmt]}"
            elif path.suffix.lower() in BY_SUFFIX:
                out_key = rel
            else:  # no image extension (its Content-Type said what it is): the output key gets its format's
                out_key = f"{rel}.{EXTENSIONS[fmt]}"
            if not re.match(OUTPUT_KEY_PATTERN, out_key) or len(out_key.encode()) > 900:
                skipped.append(
                    Skipped(
                        key,
                        f"mirror layout: {out_key!r} cannot be an output key "
                        f"(control characters, backslash, or over 900 bytes)",
                    )
                )
                continue
            if out_key in taken:
                hint = (
                    "set keep_format = true to keep both"
                    if not schedule.keep_format
                    else "an image without an extension takes its format's; rename one of them"
                )
                skipped.append(Skipped(key, f"its output {out_key} is also {taken[out_key]}'s ({hint})"))
                continue
            taken[out_key] = key
            row["output_key"] = out_key
        row.update({"source_key": key, "source_etag": entry.etag, **parts})
        if entry.version:
            row["source_version"] = entry.version
        yield Candidate(key, row["id"], fingerprint(entry.etag, entry.size, row, plan.defaults, schedule), row)
