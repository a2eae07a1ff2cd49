"""The hosted APIs' field names (the seed pages) → dreambatch's, so their manifests run unchanged.

| dialect | their field | ours |
|---|---|---|
| fal.ai | `image_url` | `image` |
| fal.ai | `edit_instruction` | `instruction` |
| fal.ai | `target_image_description` | `target_description` |
| fal.ai, WaveSpeed | `num_inference_steps` | `steps` |
| fal.ai, WaveSpeed | `enable_safety_checker` | `safety_check` |
| fal.ai | `sync_mode` | accepted, no effect on a row (kept in metadata); the fal API answers data URIs |
| WaveSpeed | `enable_base64_output` = true | `response_format` = `b64_json` |
| Lumenfall (OpenAI) | `n` | `num_images` |
| Lumenfall (OpenAI) | `output_compression` | `output_quality` |
| Lumenfall | `cfg_scale` | `guidance_scale` |
| inference.sh, WaveSpeed, Lumenfall | `prompt` on an edit row | see below |

An edit row's `prompt` in the E1 format (`Editing Instruction: X. Target Image Description: Y`) becomes
`instruction` X and `target_description` Y; any other text is the `instruction`.

A row that gives both a dialect name and ours for the same field is an error naming both.
"""

from __future__ import annotations

import re
from typing import Any

ALIASES: dict[str, str] = {
    "image_url": "image",
    "edit_instruction": "instruction",
    "target_image_description": "target_description",
    "num_inference_steps": "steps",
    "n": "num_images",
    "output_compression": "output_quality",
    "cfg_scale": "guidance_scale",
    "enable_safety_checker": "safety_check",
}
NO_EFFECT = {"sync_mode"}  # kept as metadata
# Two anchors found by plain scans, in time linear in the prompt (one pattern spanning both backtracked for
# minutes on `Editing Instruction:` and a run of spaces, and the API answered nothing else meanwhile)
E1_HEAD = re.compile(r"\s*editing instruction\s*:", re.IGNORECASE)
E1_TARGET = re.compile(r"target image description\s*:", re.IGNORECASE)
TRUE = {"1", "true", "yes", "on"}


class DialectConflict(ValueError):
    def __init__(self, field: str, message: str, value: Any = None):
        super().__init__(field, message, value)
        self.field, self.message, self.value = field, message, value


def split_e1_prompt(prompt: str) -> tuple[str, str] | None:
    """`Editing Instruction: X. Target Image Description: Y` → (X, Y), or None for any other text."""
    head = E1_HEAD.match(prompt)
    target = E1_TARGET.search(prompt, head.end()) if head else None
    if head is None or target is None:
        return None
    instruction = prompt[head.end() : target.start()].strip()
    instruction = instruction.removesuffix(".").strip()
    return instruction, prompt[target.end() :].strip()


def normalize(values: dict[str, Any], kind: str) -> dict[str, Any]:
    """Rename dialect fields to ours; raises DialectConflict when a row says one thing twice."""
    out = dict(values)
    for theirs, ours in ALIASES.items():
        if theirs in out:
            if ours in out:
                raise DialectConflict(theirs, f"both {theirs!r} and {ours!r} given; keep one", out[theirs])
            out[ours] = out.pop(theirs)
    if "enable_base64_output" in out:
        flag = out.pop("enable_base64_output")
        if str(flag).strip().lower() in TRUE and "response_format" not in out:
            out["response_format"] = "b64_json"
    if kind == "edit" and out.get("prompt"):
        if out.get("instruction"):
            raise DialectConflict("prompt", "both 'prompt' and 'instruction' given; keep one", out["prompt"])
        prompt = str(out.pop("prompt"))
        parts = split_e1_prompt(prompt)
        if parts:
            out["instruction"], description = parts
            if description and not out.get("target_description"):
                out["target_description"] = description
        else:
            out["instruction"] = prompt
    return out
