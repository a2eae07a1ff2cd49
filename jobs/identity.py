"""What an input image reference holds right now, cheaply: the part of a manifest row's fingerprint that
changes when its image changes (a scheduled manifest source re-runs a row whose image changed).

    s3://bucket/key   its ETag and size (one HEAD)
    a local path      the sha256 of the file (size-capped, as inputs are)
    data: URI         the sha256 of the URI (its data)
    https:// URL      its ETag, else Last-Modified (+ Content-Length), from one HEAD checked like a download;
                      a server that gives neither: unknown, so the row runs every time (and the report says so)

A reference that cannot be read now (a missing object or file) has an identity too ("missing: …"), so it
changes when the image appears.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs import netguard
from jobs.errors import ConfigError, InputError, TransientError
from jobs.inputs import InputPolicy, confined_path, kind_of
from jobs.storage import ObjectStore, split_s3_key


@dataclass
class Identity:
    value: str  # goes into the fingerprint
    known: bool = True  # False: nothing tells whether the content changed (it runs every time)
    why: str | None = None  # when not known: why, for the report


@dataclass
class Identities:
    """Identities of image references, each looked up once per run."""

    objects: Callable[[str], ObjectStore]  # "s3://bucket" → store
    policy: InputPolicy
    netpolicy: netguard.Policy
    timeout: float = 10.0
    _seen: dict[str, Identity] = field(default_factory=dict)

    def of(self, ref: str) -> Identity:
        if ref not in self._seen:
            self._seen[ref] = self._look_up(ref)
        return self._seen[ref]

    def _look_up(self, ref: str) -> Identity:
        try:
            kind = kind_of(ref)
            if kind == "s3":
                bucket, key = split_s3_key(ref)
                head = self.objects(f"s3://{bucket}").head(key)
                if head is None:
                    return Identity("missing: no such object")
                return Identity(f"etag:{str(head.get('ETag', '')).strip(chr(34))}:{head.get('ContentLength')}")
            if kind == "data":
                return Identity(f"sha256:{hashlib.sha256(ref.encode()).hexdigest()}")
            if kind == "url":
                return self._url(ref)
            return Identity(f"sha256:{_file_sha256(confined_path(ref, self.policy))}")
        except (InputError, ConfigError) as exc:  # TransientError propagates: the run is retried
            return Identity(f"missing: {exc}")

    def _url(self, url: str) -> Identity:
        try:
            headers = netguard.head(url, self.netpolicy, timeout=self.timeout)
        except (InputError, TransientError) as exc:
            return Identity("unknown", False, f"HEAD {url} failed ({exc})")
        if headers.get("etag"):
            return Identity(f"etag:{headers['etag']}")
        if headers.get("last-modified"):
            return Identity(f"modified:{headers['last-modified']}:{headers.get('content-length', '')}")
        return Identity("unknown", False, f"{url} gives no ETag or Last-Modified")


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
