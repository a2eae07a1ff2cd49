"""Fetching an edit row's input image: S3 objects, checked URLs, or files staged next to the job."""

from __future__ import annotations

from pathlib import Path

from jobs import netguard
from jobs.errors import InputError
from jobs.models import JobRecord
from jobs.settings import Settings
from jobs.storage import split_s3_key


def fetch(ref: str, job: JobRecord, settings: Settings, objects) -> bytes:
    """The bytes behind a reference, bounded by settings.inputs.max_bytes.

    `objects(location)` gives an ObjectStore; S3 references are read with the job's S3 client.
    Local paths are accepted only inside the job's own local output folder (where submit staged them).
    """
    limit = settings.inputs.max_bytes
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
