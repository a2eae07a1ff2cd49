"""One rooted error hierarchy, split by what the caller should do, and the kind each error is recorded as.

    DreambatchError
    ├── InputError          bad input: permanent, reported per row, never retried
    │   ├── ManifestInvalid (jobs.submit, jobs.remote) rows are bad and nothing was queued: every issue, one per line
    │   └── BlockedAddress  (jobs.netguard) a URL points at an address dreambatch refuses to reach
    ├── TransientError      infrastructure hiccup (S3, network, Redis): retry with backoff
    │   ├── Unreachable     a service (Redis, S3, the model hub) does not answer: names it, the cause and the fix
    │   └── StorageUnavailable  object storage failed for now: waited out, however long, without spending attempts
    ├── ModelError          the model failed on this item: fail the item, keep the worker
    ├── ConfigError         the deployment is wrong (missing weights, bad settings): tell the operator
    ├── JobNotFound         no such job
    ├── JobStateError       the job is not in a state that allows this (cancel a job that ended): 409
    └── ItemCancelled       the item's job was cancelled: stop at this step boundary, end it cancelled

Every exception keeps its message in `args`, so it pickles across Celery and process boundaries.

An item that ends without its output records why twice: `error`, the message for people ("InputError: not a
JPEG, PNG or WebP image"), and `error_kind`, an `ErrorKind` for code. The kind is decided once, from the
exception's type, by the `KINDS` table; readers (the catalog's failure cap, the OpenAI routes) branch on the
kind and never parse the message. `recorded_kind` reads it back from a record, and is the one place that
works out the kind of a record written before kinds were stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class DreambatchError(Exception):
    """Root of every error dreambatch raises on purpose."""


class InputError(DreambatchError):
    """A row, a field or a file the user gave is not acceptable; retrying will not help."""


class ManifestInvalid(InputError):
    """The manifest has bad rows and nothing was queued (found here or by the API). `issues` lists every one."""

    def __init__(self, message: str, issues: list[str] | None = None):
        super().__init__(message, issues or [])
        self.issues = issues or []

    def __str__(self) -> str:
        return self.args[0]


class TransientError(DreambatchError):
    """Something outside us failed for now; the same call may succeed later."""


class Unreachable(TransientError):
    """A service dreambatch needs did not answer. The message says which one, at what address, why, and what to
    do ("cannot reach Redis at redis://…: connection refused; start it … or set DREAMBATCH_REDIS_URL"): a command a
    person runs prints it as one line and exits; a long-running process logs it and keeps trying."""


class StorageUnavailable(TransientError):
    """Object storage (S3) failed or did not answer, for now. An item waits an outage out, for minutes if need
    be, and the time does not count as one of its attempts (worker.process)."""


class StorageUnreachable(Unreachable, StorageUnavailable):
    """The S3 endpoint does not answer: the fix is in the message, as for every Unreachable."""


class ModelError(DreambatchError):
    """The model could not produce an output for this item."""


class ConfigError(DreambatchError):
    """The deployment is misconfigured; an operator must act."""


class JobNotFound(DreambatchError):
    """No job with this id is known to the store or the durable record."""


class JobStateError(DreambatchError):
    """The job exists but cannot do what was asked in its current state."""


class ItemCancelled(DreambatchError):
    """Raised between steps of a running item whose job was cancelled; the item ends `cancelled`."""


class ErrorKind(StrEnum):
    """Why an item ended without its output, as its readers need to know it."""

    INPUT = "input"  # the row or its input: fix them; running it again as it is will not help
    TRANSIENT = "transient"  # an outage outlasted the item's attempts: it may well work later
    MODEL = "model"  # the model failed on this item
    CONFIG = "config"  # the deployment is wrong: an operator must act
    LOST = "lost"  # none of its attempts finished (the worker was lost or timed out each time)
    CANCELLED = "cancelled"  # it was stopped, not failed (its submission never committed)
    INTERNAL = "internal"  # an exception nothing here expected: a bug


# An exception's kind: that of the first class in this table it is an instance of; anything else is INTERNAL.
KINDS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (InputError, ErrorKind.INPUT),
    (TransientError, ErrorKind.TRANSIENT),
    (ModelError, ErrorKind.MODEL),
    (ConfigError, ErrorKind.CONFIG),
    (ItemCancelled, ErrorKind.CANCELLED),
)


def kind_of(exc: BaseException) -> ErrorKind:
    return next((kind for cls, kind in KINDS if isinstance(exc, cls)), ErrorKind.INTERNAL)


@dataclass(frozen=True)
class Failure:
    """Why an item ended without its output: a message for people and a kind for code."""

    kind: ErrorKind
    message: str

    @classmethod
    def of(cls, exc: BaseException, message: str | None = None) -> Failure:
        """The failure an exception stands for; its message is "Type: text" unless given."""
        return cls(kind_of(exc), f"{type(exc).__name__}: {exc}" if message is None else message)


# Records written before kinds were stored: the message began with the exception's class name.
_KIND_OF_PREFIX = {
    "invalid row": ErrorKind.INPUT,
    "InputError": ErrorKind.INPUT,
    "BlockedAddress": ErrorKind.INPUT,
    "TransientError": ErrorKind.TRANSIENT,
    "ModelError": ErrorKind.MODEL,
    "ConfigError": ErrorKind.CONFIG,
    "WeightsNotFound": ErrorKind.CONFIG,
}


def recorded_kind(record: Mapping[str, Any]) -> ErrorKind | None:
    """The kind of the failure an item record or a results line holds; None when it holds no error.

    A record from before kinds were stored has only its message: the kind is read from that here, and
    nowhere else (its exception's name; a failure never attempted was a row rejected at submit)."""
    if record.get("error_kind"):
        return ErrorKind(record["error_kind"])
    error = record.get("error")
    if not error:
        return None
    if record.get("status") == "cancelled":
        return ErrorKind.CANCELLED
    if (kind := _KIND_OF_PREFIX.get(error.split(":", 1)[0])) is not None:
        return kind
    if not record.get("attempts"):
        return ErrorKind.INPUT
    if error.startswith("gave up after "):  # "… attempts that did not finish (worker lost or timed out)"
        return ErrorKind.LOST
    if error.endswith(" attempts)"):  # a TransientError's message, "… (after N attempts)"
        return ErrorKind.TRANSIENT
    return ErrorKind.INTERNAL
