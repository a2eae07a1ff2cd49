"""Structured logs: every record made while an item runs carries its job and item ids.

`context(job_id=…, item_id=…)` sets the ids for the current thread (contextvars), a filter copies them
onto each record, and `configure(level, "json")` prints one JSON object per line (`ts`, `level`,
`logger`, `msg`, `job_id`, `item_id`, plus any `extra=` fields). The text format keeps the classic
line and appends `job=… item=…` when they are set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_JOB: ContextVar[str | None] = ContextVar("dreambatch_job_id", default=None)
_ITEM: ContextVar[str | None] = ContextVar("dreambatch_item_id", default=None)

# attributes every LogRecord has; anything else on a record came from `extra=` and is printed
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "ids"}


@contextmanager
def context(*, job_id: str | None = None, item_id: str | None = None) -> Iterator[None]:
    tokens = [_JOB.set(job_id), _ITEM.set(item_id)]
    try:
        yield
    finally:
        _ITEM.reset(tokens[1])
        _JOB.reset(tokens[0])


class ContextFilter(logging.Filter):
    """Puts the current job/item ids on every record (an `extra=` value given explicitly wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__  # the ids travel as extra attributes of the record
        if fields.get("job_id") is None:
            fields["job_id"] = _JOB.get()
        if fields.get("item_id") is None:
            fields["item_id"] = _ITEM.get()
        ids = " ".join(f"{k}={v}" for k, v in (("job", fields["job_id"]), ("item", fields["item_id"])) if v)
        fields["ids"] = f" [{ids}]" if ids else ""
        return True


class JsonFormatter(logging.Formatter):
    def converter(self, secs: float | None = None) -> time.struct_time:
        return time.gmtime(secs)

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and v is not None})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s%(ids)s"


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging for a dreambatch process: `fmt` is "text" or "json"."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json (got {fmt!r})")
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
