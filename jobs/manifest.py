"""Manifest files (CSV or JSONL) → validated rows, with every error named by line, field and value.

Rows are streamed: `read_rows` yields one raw row at a time, so a 100,000-row manifest never
lives in memory as 100,000 Python objects. Validation merges, in order of precedence:
the row, then the job defaults (`--set`), then the model's upstream preset.
"""

from __future__ import annotations

import csv
import functools
import json
import pickle
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from jobs import dialects, loras
from jobs.errors import InputError
from jobs.inputs import ImageChecks, InputPolicy, check_ref
from jobs.models import ID_PATTERN, MODELS, CommonParams, EditRow, GenerateRow, rendered_size, row_class
from jobs.settings import Settings

MAX_LINE_BYTES = 1 << 20  # one JSONL line; bounds memory on hostile input
MAX_ROWS = 1_000_000
MAX_DEPTH = 32  # arrays/objects inside a JSONL row's values: metadata is echoed, never walked deeper
csv.field_size_limit(MAX_LINE_BYTES)


@dataclass(frozen=True)
class Issue:
    """One problem with one field of one row (line 0 = the job defaults, -1 = the file)."""

    line: int
    field: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        where = {0: "defaults", -1: "file"}.get(self.line, f"line {self.line}")
        got = "" if self.value is None else f" (got {_show(self.value)})"
        return f"{where}: {self.field}: {self.message}{got}"


@dataclass
class RawRow:
    line: int
    values: dict[str, Any]


@dataclass
class CheckedRow:
    line: int
    item_id: str
    params: dict[str, Any] | None  # None when invalid
    metadata: dict[str, Any]
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= 80 else text[:77] + "..."


def manifest_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InputError(f"{path}: unknown manifest type {suffix!r}; use .csv or .jsonl")


def read_rows(path: Path) -> Iterator[RawRow | Issue]:
    """Yield each non-blank row with its first physical line number, or an Issue for an unreadable one."""
    kind = manifest_format(path)
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    with path.open("rb") as fh:
        lines = _Lines(fh)
        yield from (_read_csv(lines) if kind == "csv" else _read_jsonl(lines))


class _Lines:
    """Decodes a binary file line by line (BOM dropped); lines that are not UTF-8 are remembered."""

    def __init__(self, fh):
        self.fh = fh
        self.bad: set[int] = set()
        self.number = 0

    def __iter__(self) -> Iterator[str]:
        for raw in self.fh:
            self.number += 1
            if self.number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                self.bad.add(self.number)
                yield raw.decode("utf-8", errors="replace")

    def undecodable(self, first: int, last: int) -> Issue | None:
        bad = [n for n in range(first, last + 1) if n in self.bad]
        return Issue(first, "row", f"line {bad[0]} is not UTF-8 text") if bad else None


def _read_csv(lines: _Lines) -> Iterator[RawRow | Issue]:
    # strict: a stray quote is an error naming its line, not a silently rejoined field
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield Issue(-1, "header", f"line 1: malformed CSV: {_csv_error(exc, 1)}")
        return
    names = [h.strip() for h in header]
    if len(set(names)) != len(names) or "" in names:
        yield Issue(-1, "header", "line 1: column names must be unique and non-empty", ",".join(header))
        return
    if any(_has_control(name) for name in names):
        message = "line 1: a column name holds a control character; is this a CSV file?"
        yield Issue(-1, "header", message, ",".join(header))
        return
    start = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "end of data" in str(exc):  # a quote never closed: it swallowed every line after it
                yield Issue(-1, "row", f"line {start}: malformed CSV: {_csv_error(exc, start)}")
                return
            yield Issue(start, "row", f"malformed CSV: {_csv_error(exc, start)}")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not any(cell.strip() for cell in record):
            continue
        if issue := lines.undecodable(line, reader.line_num):
            yield issue
        elif len(record) != len(names):
            yield Issue(line, "row", f"has {len(record)} fields, the header has {len(names)}")
        else:
            yield RawRow(line, {k: v for k, v in zip(names, record, strict=True) if v.strip() != ""})


def _csv_error(exc: csv.Error, line: int) -> str:
    text = str(exc)
    if "end of data" in text:
        return (
            f"the quoted field opened on line {line} is never closed, so it runs to the end of the file; "
            'close the quote (a quote inside a quoted field is written "")'
        )
    if "expected after" in text:
        return f'{text}: a quote inside a quoted field is written "" (or quote the whole field)'
    return text


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _read_jsonl(lines: _Lines) -> Iterator[RawRow | Issue]:
    for number, text in enumerate(lines, start=1):
        if len(text) > MAX_LINE_BYTES:
            yield Issue(number, "row", f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        if not text.strip():
            continue
        if issue := lines.undecodable(number, number):
            yield issue
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Issue(number, "row", f"invalid JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield Issue(number, "row", f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
            continue
        except ValueError as exc:  # an integer of more than 4,300 digits (int_max_str_digits)
            yield Issue(number, "row", f"invalid JSON: {str(exc).split(';')[0]}")
            continue
        if not isinstance(value, dict):
            yield Issue(number, "row", "each line must be a JSON object", value)
            continue
        if (deep := _too_deep(value)) is not None:
            yield Issue(number, deep, f"nested deeper than {MAX_DEPTH} levels")
            continue
        yield RawRow(number, {k: v for k, v in value.items() if v is not None and v != ""})


def _well_formed_id(value: Any) -> str | None:
    """`value` as a row id (surrounding whitespace dropped, as validation drops it), or None if it is not one."""
    own = value.strip() if isinstance(value, str) else None
    return own if own and re.fullmatch(ID_PATTERN, own) else None


def _too_deep(row: dict[str, Any]) -> str | None:
    """The first field of `row` whose value nests more than MAX_DEPTH levels, else None (no recursion)."""
    for name, value in row.items():
        stack = [(value, 1)]
        while stack:
            item, depth = stack.pop()
            if depth > MAX_DEPTH:
                return name
            if isinstance(item, dict):
                stack.extend((v, depth + 1) for v in item.values())
            elif isinstance(item, list):
                stack.extend((v, depth + 1) for v in item)
    return None


def parse_sets(pairs: list[str], option: str = "--set") -> dict[str, str]:
    """`--set key=value` pairs (or another `option`'s) → a dict; a pair without `=` is an error naming it."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option} {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _issues_from(line: int, exc: ValidationError, values: dict[str, Any]) -> list[Issue]:
    issues = []
    for err in exc.errors(include_url=False):
        name = ".".join(str(p) for p in err["loc"]) or "row"
        value = values.get(str(err["loc"][0])) if err["loc"] else None
        if err["type"] == "missing":
            value = None
        message = err["msg"].removeprefix("Value error, ")
        message = message[:1].lower() + message[1:]  # "field required"; the rest as written ([A-Za-z0-9]…)
        issues.append(Issue(line, name, message, value))
    return issues


# columns that only an edit (E1) row has: in a generation manifest they mean the wrong model was asked for
EDIT_MARKERS = ("image", "instruction", "target_description")
CLOSE = 0.8  # difflib ratio above which an unknown column is taken for a misspelled field ("stpes", "widht")


def did_you_mean(name: str, known: set[str]) -> str | None:
    """The field `name` is most likely a misspelling of, if any."""
    return _did_you_mean(name, frozenset(known))


@functools.lru_cache(maxsize=1024)  # a column's answer, once per manifest rather than once per row
def _did_you_mean(name: str, known: frozenset[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, sorted(known - {name}), n=1, cutoff=CLOSE)
    return found[0] if found else None


class RowChecker:
    """Validates rows for one model with one set of job defaults.

    A column that is not a field is kept as metadata (echoed in results and webhooks), unless it looks like a
    misspelled field (`stpes`, `output_fromat`: an error with "did you mean"), or it is an edit column in a
    generation manifest (an error saying to use an edit model)."""

    def __init__(self, model: str, defaults: dict[str, Any] | None = None, inputs: InputPolicy | None = None):
        if model not in MODELS:
            raise InputError(f"--model: unknown model {model!r}; choose one of {', '.join(MODELS)}")
        self.spec = MODELS[model]
        self.cls = row_class(model)
        self.fields = set(self.cls.model_fields)
        self.spellings = self.fields | set(dialects.ALIASES) | dialects.NO_EFFECT | {"enable_base64_output"}
        self.defaults = dict(defaults or {})
        self.ids: set[str] = set()
        self.inputs = inputs or InputPolicy(Path.cwd())

    def check_defaults(self) -> list[Issue]:
        """Problems with `--set` values, reported once as `defaults: field: …`."""
        unknown = [
            Issue(
                0,
                k,
                "not a field of this model"
                + (f"; did you mean {guess!r}?" if (guess := did_you_mean(k, self.fields - {"id"})) else ""),
                v,
            )
            for k, v in self.defaults.items()
            if k not in self.fields or k == "id"
        ]
        if unknown:
            return unknown
        probe = {**self._required_placeholders(), **self.spec.defaults, **self.defaults}
        try:
            self.cls.model_validate(probe)
        except ValidationError as exc:
            return [i for i in _issues_from(0, exc, probe) if i.field in self.defaults]
        return []

    def _required_placeholders(self) -> dict[str, Any]:
        return {n: "x" for n, f in self.cls.model_fields.items() if f.is_required()}

    def check(self, raw: RawRow) -> CheckedRow:
        try:
            values = dialects.normalize(raw.values, self.spec.kind)
        except dialects.DialectConflict as exc:
            issue = Issue(raw.line, exc.field, exc.message, exc.value)
            return CheckedRow(raw.line, self.rejected_id(raw.line, raw.values.get("id")), None, {}, [issue])
        known = {k: v for k, v in values.items() if k in self.fields}
        metadata = {k: v for k, v in values.items() if k not in self.fields}
        merged = {**self.spec.defaults, **self.defaults, **known}
        issues = self._check_columns(raw.line, metadata)
        # the id as validated (whitespace stripped, no control characters), claimed before the rest is checked
        own = _well_formed_id(known.get("id"))
        claimed = own is not None and not (dup := self._check_unique(raw.line, own, explicit=True))
        if own is not None and not claimed:
            issues += dup
        try:
            row: CommonParams = self.cls.model_validate(merged)
        except ValidationError as exc:
            issues = _issues_from(raw.line, exc, merged) + issues
        else:
            if "id" not in known:
                issues += self._check_unique(raw.line, str(raw.line), explicit=False)
        if issues:
            return CheckedRow(raw.line, own if own and claimed else f"_line{raw.line}", None, metadata, issues)
        item_id = own or str(raw.line)
        params = row.model_dump(exclude={"id"})
        notes = self._fit_size(raw.line, params) if isinstance(row, GenerateRow) else []
        if isinstance(row, EditRow):
            try:
                params["image"] = check_ref(row.image, self.inputs)
            except InputError as exc:
                return CheckedRow(raw.line, item_id, None, metadata, [Issue(raw.line, "image", str(exc), row.image)])
        if row.lora is None:  # rows without one keep the params (and catalog fingerprints) they always had
            del params["lora"], params["lora_scale"]
        else:
            try:
                params["lora"] = loras.check_ref(row.lora, self.spec.name, self.inputs)
            except InputError as exc:
                return CheckedRow(raw.line, item_id, None, metadata, [Issue(raw.line, "lora", str(exc), row.lora)])
        return CheckedRow(raw.line, item_id, params, metadata, notes=notes)

    @staticmethod
    def named_id(raw: RawRow) -> str:
        """The id a row names (as validated), else its line number: what a repeated id repeats. A rejected row's
        item id may differ (`rejected_id`)."""
        return _well_formed_id(raw.values.get("id")) or str(raw.line)

    def unreadable(self, issue: Issue) -> CheckedRow:
        """A row that could not be read (bad JSON, malformed CSV): still a row, ending in the results as failed."""
        return CheckedRow(issue.line, self.rejected_id(issue.line), None, {}, [issue])

    def rejected_id(self, line: int, wanted: Any = None) -> str:
        """The id a rejected row is recorded under: its own when it is a well-formed id no other row holds, else
        `_lineN`. Ids a row may give start with a letter or digit, so `_lineN` never takes one a later row names:
        every item of a job keeps its own id (its record, S3 keys and webhook ids), and the job can end."""
        own = _well_formed_id(wanted)
        if own is not None and own not in self.ids:
            self.ids.add(own)
            return own
        return f"_line{line}"

    def _check_columns(self, line: int, extra: dict[str, Any]) -> list[Issue]:
        """Columns that are not fields but look like a mistake: an edit column for a generation model, a
        misspelled field. The others stay metadata."""
        issues = []
        edit_columns = [name for name in extra if name in EDIT_MARKERS] if self.spec.kind == "generate" else []
        if edit_columns:
            edit_models = " or ".join(m for m, spec in MODELS.items() if spec.kind == "edit")
            also = f" (so is {' and '.join(edit_columns[1:])})" if edit_columns[1:] else ""
            issues.append(
                Issue(
                    line,
                    edit_columns[0],
                    f"an edit column{also}, and {self.spec.name} generates images: "
                    "this looks like an edit manifest, so use an edit model "
                    f"(--model {edit_models})",
                )
            )
        for name, value in extra.items():
            if name in edit_columns:
                continue
            if name not in dialects.NO_EFFECT and (guess := did_you_mean(name, self.spellings)):
                issues.append(
                    Issue(
                        line,
                        name,
                        f"not a field; did you mean {guess!r}? (rename the column; columns "
                        "that are not fields are kept as metadata)",
                        value,
                    )
                )
        return issues

    def _check_unique(self, line: int, item_id: str, explicit: bool) -> list[Issue]:
        """Ids (explicit, or the line number) must be unique; every id seen is remembered."""
        if item_id not in self.ids:
            self.ids.add(item_id)
            return []
        if explicit:
            return [Issue(line, "id", "duplicate id; ids must be unique in a manifest", item_id)]
        return [Issue(line, "id", "an explicit id elsewhere already uses this line number", item_id)]

    def _fit_size(self, line: int, params: dict[str, Any]) -> list[str]:
        w, h = rendered_size(params["width"], params["height"], self.spec.base_size)
        notes = []
        if (w, h) != (params["width"], params["height"]):
            notes.append(
                f"line {line}: width/height: {params['width']}x{params['height']} "
                f"renders as {w}x{h} (HiDream renders ~{self.spec.base_size}² px, sides multiple of 16)"
            )
        params["requested_size"] = [params["width"], params["height"]]
        params["width"], params["height"] = w, h
        return notes


@dataclass
class CheckReport:
    rows: int = 0
    valid: int = 0
    issues: list[Issue] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata_columns: list[str] = field(default_factory=list)  # columns kept as metadata, in order of appearance


def check_manifest(path: Path, checker: RowChecker) -> Iterator[CheckedRow | Issue]:
    """Stream the manifest through the checker: one CheckedRow per row, or an Issue for an unreadable one."""
    count = 0
    for raw in read_rows(path):
        if isinstance(raw, Issue):
            # an unreadable row is still a row: it ends in the results as failed
            yield checker.unreadable(raw) if raw.line > 0 else raw
            continue
        count += 1
        if count > MAX_ROWS:
            yield Issue(-1, "rows", f"manifest has more than {MAX_ROWS} rows")
            return
        yield checker.check(raw)


CHECK_WINDOW = 256  # rows whose images are checked together (in parallel) while the manifest streams


def check_images(entries: Iterable[CheckedRow | Issue], checks: ImageChecks) -> Iterator[CheckedRow | Issue]:
    """The entries with each valid edit row's image checked (jobs.inputs.ImageChecks): a bad image makes its row
    invalid, `line N: image: …`, like every other error. Order is kept; rows are checked a window at a time."""
    window: list[CheckedRow | Issue] = []

    def drain() -> Iterator[CheckedRow | Issue]:
        edits = [e for e in window if isinstance(e, CheckedRow) and e.params and "image" in e.params]
        rows = [(e, e.params["image"]) for e in edits if e.params]
        for (row, ref), found in zip(rows, checks.check_all([ref for _, ref in rows]), strict=True):
            if found.error is not None:
                row.issues.append(Issue(row.line, "image", str(found.error), ref))
                row.params = None
        yield from window
        window.clear()

    for entry in entries:
        window.append(entry)
        if len(window) >= CHECK_WINDOW:
            yield from drain()
    yield from drain()


def input_policy(path: Path, settings: Settings | None = None) -> InputPolicy:
    """Local inputs of a manifest may come from its own folder and the configured roots."""
    if settings is None:
        return InputPolicy(path.resolve().parent)
    return InputPolicy(path.resolve().parent, tuple(Path(r) for r in settings.roots()), settings.inputs.max_bytes)


def validate_manifest(
    path: Path,
    model: str,
    defaults: dict[str, Any] | None = None,
    inputs: InputPolicy | None = None,
    checks: ImageChecks | None = None,
    keep: IO[bytes] | None = None,
) -> CheckReport:
    """Check a whole manifest; collects every issue (rows themselves are not kept in memory). `checks`: also check
    each edit row's image (its header; S3 objects and URLs unless remote checks are off). `keep`: a temporary file
    each checked row is written to, for `kept_rows` to read back, so the fan-out does not check every row twice."""
    checker = RowChecker(model, defaults, inputs or input_policy(path))
    report = CheckReport(issues=checker.check_defaults())
    if report.issues:
        return report
    columns: dict[str, None] = {}
    entries = check_manifest(path, checker)
    for entry in check_images(entries, checks) if checks else entries:
        if isinstance(entry, Issue):
            report.issues.append(entry)
            continue
        if keep is not None:
            pickle.dump((entry.line, entry.item_id, entry.params, entry.metadata, entry.issues), keep, _KEEP_PROTOCOL)
        report.rows += 1
        report.valid += entry.ok
        report.issues.extend(entry.issues)
        report.notes.extend(entry.notes)
        if entry.ok:
            columns.update(dict.fromkeys(entry.metadata))
    report.metadata_columns = list(columns)
    if report.rows == 0 and not report.issues:  # submit refuses it too: say so here
        report.issues.append(Issue(-1, "rows", "the manifest has no rows"))
    for why, count in (checks.unchecked() if checks else {}).items():
        report.notes.append(f"{count} input image(s) not checked before queueing ({why}); the worker checks them")
    return report


_KEEP_PROTOCOL = pickle.HIGHEST_PROTOCOL  # the rows kept by `validate_manifest`: written and read by one process


def kept_rows(keep: IO[bytes]) -> Iterator[CheckedRow]:
    """The rows `validate_manifest(..., keep=keep)` checked, in manifest order, one at a time (their notes are in
    its report). Only a file this process wrote is read: pickle is no format for anything received."""
    keep.seek(0)
    while True:
        try:
            line, item_id, params, metadata, issues = pickle.load(keep)
        except EOFError:
            return
        yield CheckedRow(line, item_id, params, metadata, issues)
