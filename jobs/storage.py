"""Object storage behind one small interface: S3 (boto3, any S3-compatible endpoint) or a local folder.

A location is `s3://bucket/prefix` or a filesystem path. Keys are always relative to the location.
Writes are whole-object puts, so writing the same key twice with the same bytes is harmless.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from jobs.errors import ConfigError, InputError, StorageUnavailable, StorageUnreachable, TransientError
from jobs.settings import Settings


class ObjectStore(Protocol):
    location: str

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        """Write an object; returns its URI (s3://… or a local path)."""
        ...

    def put_file(self, key: str, path: Path, content_type: str) -> str: ...

    def uri(self, key: str) -> str:
        """The URI `put` returns for `key`, known before it is written."""
        ...

    def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes, or None when it does not exist; InputError when over `max_bytes`."""
        ...

    def keys(self, prefix: str) -> Iterator[str]: ...

    def head(self, key: str) -> dict | None:
        """The object's metadata (ContentLength, ETag where the store has one…), or None when it does not exist."""
        ...

    def delete(self, key: str) -> None: ...

    def url(self, key: str, expires: int | None = None) -> str | None:
        """A time-limited HTTPS URL (`expires` s, else the configured default), when the store has one."""
        ...


def split_s3(location: str) -> tuple[str, str]:
    rest = location.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"output {location!r}: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def split_s3_key(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key.jpg` → ("bucket", "some/key.jpg"): an object's bucket and its key, as given."""
    bucket, _ = split_s3(uri)
    return bucket, uri.removeprefix("s3://")[len(bucket) + 1 :]


# S3 error codes that say the setup is wrong (no such bucket, bad credentials): a ConfigError, never retried
SETUP_ERRORS = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")
_SETUP_FIXES = {
    "NoSuchBucket": "create the bucket (compose's minio-setup makes DREAMBATCH_BUCKET; else mc mb or aws s3 mb) "
    "or fix the s3:// location",
    "AccessDenied": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's policy",
    "InvalidAccessKeyId": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to keys the S3 endpoint knows",
    "SignatureDoesNotMatch": "set AWS_SECRET_ACCESS_KEY to the secret of AWS_ACCESS_KEY_ID",
}
ENDPOINT_FIX = "start it (docker compose up -d minio) or set AWS_ENDPOINT_URL_S3 to the endpoint you use"


def s3_error(location: str, exc: Exception, doing: str | None = None) -> ConfigError | TransientError:
    """What a boto error at `location` means to the caller: a ConfigError for a setup error (SETUP_ERRORS, no
    credentials), an Unreachable for an endpoint that does not answer, else a TransientError (try again later)
    naming what was being done, else S3's error code or HTTP status. Setup errors and unreachable endpoints say
    how to fix them."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError

    response = getattr(exc, "response", None)  # a ClientError's; a BotoCoreError got no answer from S3
    code = (response or {}).get("Error", {}).get("Code", "")
    if code in SETUP_ERRORS:
        return ConfigError(f"S3 {location}: {code}: {exc}; {_SETUP_FIXES[code]}")
    if isinstance(exc, NoCredentialsError):
        return ConfigError(
            f"S3 {location}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(in the environment, or in .env)"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return StorageUnreachable(f"cannot reach S3 for {location} ({exc}); {ENDPOINT_FIX}")
    if doing is None and response is not None:  # S3 answered: its code, or the HTTP status when it gave none
        doing = code or response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return StorageUnavailable(f"S3 {location}: {exc}" if doing is None else f"S3 {location}: {doing}: {exc}")


def s3_client(settings: Settings, *, endpoint: str | None = None, probe: bool = False):
    """A boto3 S3 client with explicit timeouts, standard retries and checksums that non-AWS stores accept.
    `endpoint` overrides the configured one (presigned links for clients: `s3.public_endpoint_url`); `probe`:
    one attempt with short timeouts, for a check that must answer within seconds."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint or settings.s3_endpoint()
    extra = {}
    if endpoint:  # MinIO, Ceph, moto…: only send checksums the operation requires
        extra = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    config = Config(
        connect_timeout=min(settings.s3.connect_timeout, 3.0) if probe else settings.s3.connect_timeout,
        read_timeout=5.0 if probe else settings.s3.read_timeout,
        retries={"mode": "standard", "total_max_attempts": 1}
        if probe
        else {"mode": "standard", "max_attempts": settings.s3.max_attempts},
        s3={"addressing_style": "path"} if endpoint else None,
        **extra,
    )
    with _SESSION_LOCK:  # (a session's client building is not thread-safe)
        global _session
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(
            "s3",
            endpoint_url=endpoint,
            region_name=settings.s3.region or os.environ.get("AWS_DEFAULT_REGION"),
            config=config,
        )


# One boto3 session per process: its loader keeps the S3 service model it read from disk, so a second client
# (the submit's probe, then its writer; a presigner) is built in ~10% of the first one's time.
_session: Any = None
_SESSION_LOCK = threading.Lock()


def check_location(location: str, settings: Settings) -> None:
    """Make sure an output location can be used before anything is written to it, answering in seconds: an
    s3:// bucket exists and the credentials reach it (one HEAD, no retries); raises ConfigError or Unreachable
    with the fix. A local folder is always usable (it is made when needed)."""
    if not location.startswith("s3://"):
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _ = split_s3(location)
    try:
        s3_client(settings, probe=True).head_bucket(Bucket=bucket)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 or code in ("404", "NoSuchBucket"):
            raise ConfigError(
                f"S3 {location}: bucket {bucket!r} does not exist at "
                f"{settings.s3_endpoint() or 'AWS'}; {_SETUP_FIXES['NoSuchBucket']}"
            ) from None
        if status == 403 or code in ("403", "AccessDenied"):
            raise ConfigError(
                f"S3 {location}: access denied to bucket {bucket!r}; {_SETUP_FIXES['AccessDenied']}"
            ) from None
        raise s3_error(location, exc) from None
    except BotoCoreError as exc:
        raise s3_error(location, exc) from None


class S3Store:
    def __init__(self, location: str, client, presign_expires: int = 0, presigner=None):
        """`presigner`: the client presigned links are made with, when clients reach S3 at another address than
        dreambatch does (`s3.public_endpoint_url`); default `client`."""
        self.location = location
        self.bucket, self.prefix = split_s3(location)
        self.client = client
        self.presign_expires = presign_expires
        self.presigner = presigner

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, fn, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("NoSuchKey", "404") or status == 404 and code != "NoSuchBucket":
                return None
            raise s3_error(self.location, exc) from None
        except BotoCoreError as exc:
            raise s3_error(self.location, exc) from None

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        self._call(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
            Metadata=metadata or {},
        )
        return self.uri(key)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        with path.open("rb") as fh:
            self._call(
                self.client.upload_fileobj,
                Fileobj=fh,
                Bucket=self.bucket,
                Key=self._key(key),
                ExtraArgs={"ContentType": content_type},
            )
        return self.uri(key)

    def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        resp = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        if resp is None:
            return None
        if max_bytes is not None and resp.get("ContentLength", 0) > max_bytes:
            resp["Body"].close()
            raise InputError(
                f"s3://{self.bucket}/{self._key(key)}: {resp['ContentLength']} bytes is over the {max_bytes}-byte limit"
            )
        return resp["Body"].read()

    def head(self, key: str) -> dict | None:
        """The object's HEAD response (ContentType, Metadata, ETag…), or None when it does not exist."""
        return self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key))

    def listing(self, prefix: str = "") -> Iterator[dict]:
        """The list entries (Key, with the store's prefix; Size, ETag…) of the objects under `prefix`, in S3's
        order; a failure to list raises what `s3_error` makes of it."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                yield from page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(self.location, exc, "listing failed") from None

    def versioned(self) -> bool | None:
        """Whether the bucket keeps versions (versioning Enabled or Suspended); None when it may not be asked."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_bucket_versioning(Bucket=self.bucket).get("Status") in ("Enabled", "Suspended")
        except ClientError:
            return None  # no s3:GetBucketVersioning: the versions are not known
        except BotoCoreError as exc:
            raise s3_error(self.location, exc, "versioning check failed") from None

    def version_listing(self, prefix: str = "") -> Iterator[dict]:
        """As `listing`, each object's current version (VersionId added), in key order; deleted ones (a delete
        marker on top) are left out."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_object_versions")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                yield from (v for v in page.get("Versions", []) if v.get("IsLatest"))
        except (ClientError, BotoCoreError) as exc:
            raise s3_error(self.location, exc, "listing failed") from None

    def keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :]

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def copy_from(self, key: str, source_uri: str) -> str | None:
        """Copy the object `source_uri` (s3://bucket/key) to `key`, server-side, its type and metadata kept;
        returns the new URI, or None when the source is not there."""
        bucket, source_key = split_s3_key(source_uri)
        source = {"Bucket": bucket, "Key": source_key}
        done = self._call(self.client.copy_object, Bucket=self.bucket, Key=self._key(key), CopySource=source)
        return None if done is None else f"s3://{self.bucket}/{self._key(key)}"

    def url(self, key: str, expires: int | None = None) -> str | None:
        expires = self.presign_expires if expires is None else expires
        if expires <= 0:
            return None
        return (self.presigner or self.client).generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires
        )


@lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask, read once (from /proc where there is one: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class LocalStore:
    """A folder standing in for a bucket (the `run` mode)."""

    def __init__(self, location: str):
        self.root = Path(location).expanduser().resolve()
        self.location = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ConfigError(f"key {key!r} escapes {self.root}")
        return path

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600: give it what any new file gets
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
        return str(path)

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def put_file(self, key: str, path: Path, content_type: str) -> str:
        return self.put(key, path.read_bytes(), content_type)

    def get(self, key: str, max_bytes: int | None = None) -> bytes | None:
        path = self._path(key)
        if not path.is_file():
            return None
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise InputError(f"{path}: {path.stat().st_size} bytes is over the {max_bytes}-byte limit")
        return path.read_bytes()

    def keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        folder = base if base.is_dir() else base.parent
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and rel.startswith(prefix) and not path.name.startswith(".tmp-"):
                yield rel

    def head(self, key: str) -> dict | None:
        path = self._path(key)
        return {"ContentLength": path.stat().st_size} if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        if path.parent != self.root and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()  # no empty `_open/` folder left beside the jobs

    def url(self, key: str, expires: int | None = None) -> str | None:
        return None


def key_of(location: str, uri: str) -> str | None:
    """The key, relative to `location`, of an object whose URI a store returned (None: not under it)."""
    if location.startswith("s3://"):
        bucket, prefix = split_s3(location)
        head = f"s3://{bucket}/{prefix}"
        return uri[len(head) :] if uri.startswith(head) else None
    root, path = Path(location).expanduser().resolve(), Path(uri)
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else None


def location_under(location: str, prefix: str | None) -> str:
    """`location` with `prefix` below it (an API key's output prefix): s3://b/api and acme → s3://b/api/acme."""
    return f"{location.rstrip('/')}/{prefix.strip('/')}" if prefix else location


def open_store(location: str, settings: Settings, client=None) -> ObjectStore:
    if location.startswith("s3://"):
        public = settings.s3.public_endpoint_url
        presigner = s3_client(settings, endpoint=public) if public and public != settings.s3_endpoint() else None
        return S3Store(location, client or s3_client(settings), settings.s3.presign_expires, presigner)
    return LocalStore(location)
