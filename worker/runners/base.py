"""The runner seam: what a worker needs from a model, and nothing more.

A runner turns one validated item into PIL images. It owns the loaded pipeline; it never
touches Redis, S3 or webhooks. `process.py` calls it; tests about orchestration may pass a
tiny stand-in, the product always uses a real HiDream runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image


@dataclass(frozen=True)
class GenerateRequest:
    """One HiDream-I1 call. Sizes are the ones asked for; the runner reports what it rendered."""

    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 0
    steps: int = 16
    guidance_scale: float = 0.0
    shift: float = 3.0
    scheduler: str = "flash_flow"
    num_images: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutput:
    images: list[Image.Image]
    seed: int
    inference_s: float


class Runner(Protocol):
    model: str  # dreambatch model name, e.g. "i1-fast"

    def generate(self, request: GenerateRequest) -> RunOutput: ...
