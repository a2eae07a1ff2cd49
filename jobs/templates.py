"""Text templates with `{name}` placeholders (instructions, presets) and key templates that read names
out of object keys (`products/{category}/{sku}.jpg`).

Only plain names are substituted (`{sku}`, `{meta.color}`); there is no attribute access, indexing or
format spec, so a template from a file cannot reach into Python objects. `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from jobs.errors import InputError
from jobs.formats import IMAGE_SUFFIXES

NAME = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)?"
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(" + NAME + r")\}|\{[^{}]*\}?|\}")


def names(template: str, where: str) -> list[str]:
    """The placeholder names of `template`, in order; InputError for a malformed one."""
    found = []
    for match in _PLACEHOLDER.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if match.group(1) is None:
            raise InputError(
                f"{where}: bad placeholder {token!r} in {template!r}; use {{name}} "
                f"(letters, digits, _), {{meta.key}}, or {{{{ }}}} for literal braces"
            )
        found.append(match.group(1))
    return found


def render(template: str, values: Mapping[str, str], where: str) -> str:
    """Fill every placeholder; an unknown name is an InputError naming it and the names there are."""
    names(template, where)

    def fill(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        if name not in values:
            known = ", ".join(sorted(values)) or "none"
            raise InputError(f"{where}: unknown placeholder {{{name}}} (known here: {known})")
        return str(values[name])

    return _PLACEHOLDER.sub(fill, template)


class KeyTemplate:
    """`products/{category}/{sku}.jpg` → a matcher for object keys.

    `{name}` matches one path segment (no `/`); `{name*}` matches one or more segments (nested folders).
    A trailing image extension is not matched literally: any of .jpg .jpeg .png .webp (any case) matches,
    so one template covers a catalog of mixed formats.
    """

    _PART = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")

    def __init__(self, template: str, where: str):
        self.template = template
        body = template
        for suffix in IMAGE_SUFFIXES:
            if body.lower().endswith(suffix):
                body = body[: -len(suffix)]
                self.any_image_suffix = True
                break
        else:
            self.any_image_suffix = False
        pattern, pos = "", 0
        self.names: list[str] = []
        for match in self._PART.finditer(body):
            pattern += re.escape(body[pos : match.start()])
            name, many = match.group(1), match.group(2)
            if name in self.names:
                raise InputError(f"{where}: {{{name}}} appears twice in {template!r}")
            self.names.append(name)
            pattern += f"(?P<{name}>[^/]+(?:/[^/]+)*?)" if many else f"(?P<{name}>[^/]+?)"
            pos = match.end()
        pattern += re.escape(body[pos:])
        if self.any_image_suffix:
            pattern += r"\.(?i:" + "|".join(re.escape(s[1:]) for s in IMAGE_SUFFIXES) + ")"
        self.regex = re.compile(pattern + "$")
        leftover = self._PART.sub("", body)
        if "{" in leftover or "}" in leftover:
            raise InputError(f"{where}: bad placeholder in {template!r}; use {{name}} or {{name*}}")

    def match(self, key: str) -> dict[str, str] | None:
        found = self.regex.match(key)
        return found.groupdict() if found else None
