"""The runner seam: what a worker needs from a model, and nothing more.

A runner turns one validated item into PIL images. It owns the loaded pipeline; it never
touches Redis, S3 or webhooks. `on_step` is called after each denoising step; what it raises
(a cancel) stops the run at that step boundary. `process.py` calls it; tests about orchestration may pass a
tiny stand-in, the product always uses a real HiDream runner.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from jobs.models import MODELS
from worker.runners.lora import LoraChoice


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
    lora: LoraChoice | None = None  # a user LoRA adapter to run with (worker/runners/lora.py)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, params: dict[str, Any], **given: Any) -> GenerateRequest:
        """The request a row's params (or a model's defaults, `given` the rest) ask for: the fields both name."""
        names = ("prompt", "negative_prompt", "width", "height", "seed", "steps", "guidance_scale", "shift")
        found = {name: params[name] for name in (*names, "scheduler", "num_images") if name in params}
        return cls(**{**found, **given})


_E11 = MODELS["e1-1"].defaults  # an EditRequest's defaults are E1.1's published ones (the one table)


@dataclass(frozen=True)
class EditRequest:
    """One HiDream-E1 edit. `image` is RGB at exactly width×height (multiples of 16): the worker has
    already fitted it to the model's canvas; the runner returns images of that same size. Unset fields take
    E1.1's published defaults (`jobs.models.MODELS`); the worker always sets them from the item's params."""

    image: Image.Image
    instruction: str = ""
    target_description: str = ""
    prompt: str = ""  # a full prompt, used as is instead of instruction + description
    negative_prompt: str = _E11["negative_prompt"]
    width: int = 1024
    height: int = 1024
    seed: int = 0
    steps: int = _E11["steps"]
    guidance_scale: float = _E11["guidance_scale"]
    image_guidance_scale: float = _E11["image_guidance_scale"]
    refine_strength: float = _E11["refine_strength"]
    clip_cfg_norm: bool = _E11["clip_cfg_norm"]
    num_images: int = 1
    lora: LoraChoice | None = None  # a user LoRA adapter to run with (e1-1; e1-full carries its own)
    extra: dict[str, Any] = field(default_factory=dict)


STAGES = ("text_encode", "image_encode", "denoise", "refine", "vae_decode")  # what a model call's time is spent on


class Stages:
    """Seconds by stage of one model call: `mark(stage)` gives the time since the previous mark (or since the
    clock was made) to `stage`. `sync` (the device's synchronize) runs first when asked, so queued GPU work is
    counted to the stage that queued it; a runner asks only at a stage's end, never every step."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str, sync: bool = True) -> None:
        if sync:
            self.sync()
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now

    def share(self, n: int) -> dict[str, float]:
        """Each of `n` requests' share of a batch's stages."""
        return {stage: s / n for stage, s in self.seconds.items()}


@dataclass
class RunOutput:
    images: list[Image.Image]
    seed: int
    inference_s: float  # the model's time for this output (its share of a micro-batch's)
    started_at: float | None = None  # epoch s when the model began this work (a batch's start, for its items)
    stages: dict[str, float] = field(default_factory=dict)  # inference_s by stage (STAGES), as far as it splits


def step_index(info: Any) -> int:
    """The 0-based step an `on_step` argument names: I1 runners pass the index, E1's a StepInfo."""
    return info if isinstance(info, int) else info.index


class Runner(Protocol):
    """What a worker calls on its model: every caller (process.py, runtime.py, the micro-batcher) uses only
    this. Which of `generate` / `edit` an item needs is its model's kind in `jobs.models.MODELS`; a runner
    asked for the other raises ModelError."""

    @property
    def model(self) -> str:
        """dreambatch model name, e.g. "i1-fast"."""
        ...

    @property
    def source(self) -> str | None:
        """Where the weights came from ("tiny:…", "local:…", "hub:…"), once loaded."""
        ...

    @property
    def revision(self) -> str | None:
        """The weights' revision (worker.runners.revision), once loaded."""
        ...

    def load(self) -> object:
        """Load the weights (once); workers call it at start so a bad setup fails before any item."""
        ...

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput: ...

    def edit(self, request: EditRequest, on_step: Callable[[Any], None] | None = None) -> RunOutput: ...

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        """Edits: the canvas this model edits an input of width x height at (fit the image to it first)."""
        ...
