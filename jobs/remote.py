"""`dreambatch submit --api URL`: the manifest handed to a running `dreambatch api` (`POST /v1/jobs`), which makes
the job in its warm process. For people who reach the API and not Redis or S3 (an API key is all they hold), and
for a submit that must start fast: this side loads no Redis client, Celery, boto3 or pydantic, only the standard
library's HTTP (`import worker.cli` and this: ~0.17 s against ~0.45 s for the direct path's imports, and no S3
client to build).

The API decides what the direct path decides from local settings: the output location (its own, under the
key's prefix) and the input policy (a row's local file path means nothing to it: name s3:// or https://
inputs). Errors become the CLI's: bad rows a ManifestInvalid listing every one, a refused key a ConfigError,
no answer an Unreachable, each naming its fix.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jobs.errors import ConfigError, InputError, JobNotFound, ManifestInvalid, TransientError, Unreachable

TIMEOUT_S = 60.0  # a large manifest is validated before the API answers
MANIFEST_TYPES = {".csv": "text/csv", ".jsonl": "application/x-ndjson"}


def submit(api: str, key: str | None, manifest: Path, fields: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """POST `manifest` with the job's form `fields` (model, set, webhook, …: the API's multipart fields);
    returns the API's answer (the job's status object with `queued`, `rejected`)."""
    kind = MANIFEST_TYPES.get(manifest.suffix.lower())
    if kind is None:
        raise InputError(f"{manifest}: unknown manifest type {manifest.suffix!r}; use .csv or .jsonl")
    try:
        data = manifest.read_bytes()
    except OSError as exc:
        raise InputError(f"{manifest}: cannot read it ({exc.strerror or exc})") from None
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"; filename="{manifest.name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    )
    body = b"".join([*parts, head.encode(), data, f"\r\n--{boundary}--\r\n".encode()])
    return _call(api, key, "POST", "/v1/jobs", body, f"multipart/form-data; boundary={boundary}", manifest)


def job(api: str, key: str | None, job_id: str) -> dict[str, Any]:
    """The job's status object (`GET /v1/jobs/{id}`)."""
    return _call(api, key, "GET", f"/v1/jobs/{job_id}")


def _call(
    api: str,
    key: str | None,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    manifest: Path | None = None,
) -> dict[str, Any]:
    if not api.startswith(("http://", "https://")):
        raise ConfigError(f"--api / DREAMBATCH_API_URL: expected the API's http:// or https:// address (got {api!r})")
    url = api.rstrip("/") + path
    headers = {"Accept": "application/json", "User-Agent": "dreambatch-cli"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, body, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise _refused(api, exc.code, _error(exc), manifest) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(
            f"cannot reach the dreambatch API at {api} ({reason}); start it there (`dreambatch api`), or set "
            "--api / DREAMBATCH_API_URL to where it listens (unset it to submit straight to Redis and S3)"
        ) from None
    except json.JSONDecodeError:
        raise Unreachable(f"{url} answered, but not as the dreambatch API does (no JSON); check --api") from None


def _error(exc: urllib.error.HTTPError) -> dict[str, Any]:
    """The API's `{"error": {"message", "code", "errors"?}}`, or the status line when the answer is not one."""
    try:
        found = json.loads(exc.read() or b"{}").get("error")
    except (json.JSONDecodeError, AttributeError, OSError):
        found = None
    return found if isinstance(found, dict) else {"message": f"{exc.code} {exc.reason}"}


def _refused(api: str, status: int, error: dict[str, Any], manifest: Path | None) -> Exception:
    message = str(error.get("message") or status)
    if status == 401:
        return ConfigError(
            f"the API at {api} refused the key ({message}); set --api-key / DREAMBATCH_API_KEY to a key with the "
            "jobs:write scope (`dreambatch keys create --tenant NAME --scope jobs:write` where the API runs)"
        )
    if status == 403:
        return ConfigError(f"the API at {api} refused the request: {message}; use a key with the jobs:write scope")
    if status == 404 and manifest is None:  # a job's status: the job is not there
        return JobNotFound(message)
    if status == 404:
        return ConfigError(f"{api} has no dreambatch API ({message}); check --api / DREAMBATCH_API_URL")
    if status == 422 and manifest is not None:  # (the API names the manifest "manifest")
        text = f"{manifest}{message.removeprefix('manifest')}" if message.startswith("manifest:") else message
        return ManifestInvalid(text, [str(line) for line in error.get("errors") or []])
    if status == 429 or status >= 500:
        return TransientError(f"the API at {api}: {message} (HTTP {status}); try again")
    return InputError(f"the API at {api}: {message} (HTTP {status})")
