"""Background-swap presets: named bundles of an E1 instruction and parameters (`--preset NAME`).

They live in one documented TOML file, `ops/presets.toml` (shipped next to the packages), plus the
operator's own file (`DREAMBATCH_CATALOG__PRESETS_FILE`) whose presets are added, or replace ours by name.
`--set name=value` fills a preset's `{name}` placeholders; other `--set` pairs stay job defaults.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import templates
from jobs.errors import ConfigError, InputError
from jobs.settings import Settings

# ours: next to the packages in a checkout (or editable install), else in the working directory (the image)
BUILTIN_CANDIDATES = (Path(__file__).resolve().parent.parent / "ops" / "presets.toml", Path("ops") / "presets.toml")
TEXT_FIELDS = ("instruction", "target_description", "negative_prompt")
MAX_FILE_BYTES = 1 << 20


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    instruction: str = Field(..., min_length=1, max_length=4000)
    target_description: str = Field("", max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    vars: dict[str, str] = Field(default_factory=dict)  # placeholder defaults, replaced by --set name=value
    params: dict[str, Any] = Field(default_factory=dict)  # E1 job defaults (steps, guidance_scale…)
    source: str = ""  # the file it came from

    def texts(self) -> dict[str, str]:
        """The text templates it sets, unrendered."""
        return {f: getattr(self, f) for f in TEXT_FIELDS if getattr(self, f)}


def read_config_text(path: Path, what: str) -> str:
    """A configuration file's text (UTF-8, at most MAX_FILE_BYTES); ConfigError names `what` and the file."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}: file not found")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    text = read_config_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def load_presets(settings: Settings | None = None) -> dict[str, Preset]:
    """Ours, then the operator's file on top."""
    builtin = next((p for p in BUILTIN_CANDIDATES if p.is_file()), None)
    if builtin is None:
        raise ConfigError(f"presets file not found (looked at {', '.join(str(p) for p in BUILTIN_CANDIDATES)})")
    files = [builtin]
    if settings is not None and settings.catalog.presets_file:
        files.append(Path(settings.catalog.presets_file).expanduser())
    presets: dict[str, Preset] = {}
    for path in files:
        for name, table in read_toml(path, "presets file").items():
            if not isinstance(table, dict):
                raise ConfigError(f"presets file {path}: {name!r} must be a table ([{name}])")
            try:
                presets[name] = Preset.model_validate({**table, "name": name, "source": str(path)})
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                field = ".".join(str(p) for p in first["loc"]) or "preset"
                raise ConfigError(f"presets file {path}: [{name}] {field}: {first['msg']}") from None
            for text in presets[name].texts().values():
                templates.names(text, f"presets file {path}: [{name}]")
    return presets


def get_preset(name: str, settings: Settings | None = None) -> Preset:
    presets = load_presets(settings)
    if name not in presets:
        raise InputError(f"--preset: unknown preset {name!r}; choose one of {', '.join(sorted(presets))}")
    return presets[name]


def apply_preset(name: str, sets: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Job defaults for `--preset NAME --set …`: the preset's params, its texts with placeholders filled
    from its vars and the matching `--set` pairs, then every other `--set` pair (they win)."""
    preset = get_preset(name, settings)
    values = {**preset.vars, **{k: str(v) for k, v in sets.items() if k in preset.vars}}
    rest = {k: v for k, v in sets.items() if k not in preset.vars}
    texts = {f: templates.render(t, values, f"preset {name}: {f}") for f, t in preset.texts().items()}
    return {**preset.params, **texts, **rest}


def job_defaults(preset: str | None, sets: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """The job defaults of a command: `--set` pairs alone, or a preset filled and overridden by them."""
    return apply_preset(preset, sets, settings) if preset else sets
