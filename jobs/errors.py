"""One rooted error hierarchy, split by what the caller should do.

    DreambatchError
    ├── InputError          bad input: permanent, reported per row, never retried
    ├── TransientError      infrastructure hiccup (S3, network, Redis): retry with backoff
    ├── ModelError          the model failed on this item: fail the item, keep the worker
    ├── ConfigError         the deployment is wrong (missing weights, bad settings): tell the operator
    ├── JobNotFound         no such job
    ├── JobStateError       the job is not in a state that allows this (cancel a job that ended): 409
    └── ItemCancelled       the item's job was cancelled: stop at this step boundary, end it cancelled

Every exception keeps its message in `args`, so it pickles across Celery and process boundaries.
"""

from __future__ import annotations


class DreambatchError(Exception):
    """Root of every error dreambatch raises on purpose."""


class InputError(DreambatchError):
    """A row, a field or a file the user gave is not acceptable; retrying will not help."""


class TransientError(DreambatchError):
    """Something outside us failed for now; the same call may succeed later."""


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
