"""The plan: what every row of a schedule's run shares (defaults, text templates, names), and fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from jobs import templates
from jobs.catalog.schedules import Schedule
from jobs.errors import ConfigError
from jobs.identity import Identity
from jobs.manifest import CheckedRow, RawRow
from jobs.models import MODELS, row_class
from jobs.presets import get_preset
from jobs.settings import Settings

BUILTIN_NAMES = ("key", "path", "dir", "name", "stem", "ext")
RESERVED_METADATA = ("source_key", "source_etag", "source_version")


@dataclass
class Plan:
    """What every row of a schedule's run shares: job defaults, text templates and their constant values."""

    defaults: dict[str, Any]
    texts: dict[str, str]
    values: dict[str, str]
    metadata_names: list[str]  # the {meta.KEY} names the texts use (one HEAD per object when any)

    @property
    def uses_metadata(self) -> bool:
        return bool(self.metadata_names)


def make_plan(schedule: Schedule, sets: dict[str, Any], settings: Settings | None = None) -> Plan:
    """`--set` pairs naming a row field override params; any other name fills a placeholder."""
    fields = set(row_class(schedule.model).model_fields)
    preset = get_preset(schedule.preset, settings) if schedule.preset else None
    values = {
        **(preset.vars if preset else {}),
        **schedule.vars,
        **{k: str(v) for k, v in sets.items() if k not in fields},
    }
    defaults = {
        **(preset.params if preset else {}),
        **schedule.params,
        **{k: v for k, v in sets.items() if k in fields},
    }
    texts = dict(preset.texts()) if preset else {}
    for name in ("instruction", "target_description", "negative_prompt"):
        if getattr(schedule, name):
            texts[name] = getattr(schedule, name)
        defaults.pop(name, None)
    template = schedule.key_template()
    path_names = template.names if template else []
    known = set(values) | set(BUILTIN_NAMES) | set(path_names)
    metadata_names: list[str] = []
    for text_field, text in texts.items():
        for name in templates.names(text, f"schedule {schedule.name}: {text_field}"):
            if name.startswith("meta."):
                metadata_names.append(name.lower())
            elif name not in known:
                raise ConfigError(
                    f"schedule {schedule.name}: {text_field}: unknown placeholder {{{name}}} "
                    f"(known: {', '.join(sorted(known))}, meta.<object metadata key>)"
                )
    clash = sorted(
        set(path_names)
        & (fields | set(RESERVED_METADATA) | {"image_url", "edit_instruction", "target_image_description", "n"})
    )
    if clash:
        raise ConfigError(f"schedule {schedule.name}: source.path: {{{clash[0]}}} is a row field's name; rename it")
    return Plan(defaults, texts, values, sorted(set(metadata_names)))


def fingerprint(etag: str, size: int, row: dict[str, Any], defaults: dict[str, Any], schedule: Schedule) -> str:
    """Content + every input of the edit: a change to any of them changes this."""
    basis = {
        "etag": etag,
        "size": size,
        "model": schedule.model,
        "weights": MODELS[schedule.model].hub_id,
        "revision": schedule.revision,
        "defaults": defaults,
        "row": {k: v for k, v in row.items() if k not in ("id", *RESERVED_METADATA)},
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


def row_fingerprint(
    row: CheckedRow, raw: RawRow, image: Identity | None, defaults: dict[str, Any], schedule: Schedule
) -> str:
    """A manifest row's fingerprint: its normalized fields (its raw values when invalid), the job defaults,
    model and `revision` label, and its image's identity (jobs.identity; None for a prompt-only row)."""
    basis = {
        "model": schedule.model,
        "weights": MODELS[schedule.model].hub_id,
        "revision": schedule.revision,
        "defaults": defaults,
        "image": image.value if image else None,
        "row": {"params": row.params, "metadata": row.metadata} if row.ok else {"invalid": raw.values},
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()


def item_id_for(rel: str) -> str:
    """A valid, stable item id for a key: readable part + 8 hex of its hash (unique per key)."""
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", rel)[-100:].lstrip("._-") or "image"
    return f"{readable}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
