"""The safety checker: which outputs may show NSFW concepts, decided on the worker with local weights.

Three of the vendor shapes report it (fal's `has_nsfw_concepts`, WaveSpeed's `has_nsfw_contents`, the
`enable_safety_checker` flag of both), so it is a real checker, not a constant:

    DREAMBATCH_SAFETY__CHECKER = off        nothing runs; every result says "off: no safety checker configured"
                               = tiny       a tiny random-weight checker (tests, CPU smoke runs): built once under
                                            $DREAMBATCH_TINY_DIR/safety-checker, never flags an image
                               = <folder>   weights laid out as CompVis/stable-diffusion-safety-checker (config.json,
                                            model weights, preprocessor_config.json), or that hub id in the local
                                            cache: diffusers' StableDiffusionSafetyChecker behind CLIP's processor

`screen` is the one call the item path makes (worker/process.py, after the model and before encoding). An item
whose row says `safety_check: false` (fal's and WaveSpeed's `enable_safety_checker`) is not checked, and its
output says so. `DREAMBATCH_SAFETY__ACTION=black` also replaces flagged images with black ones, as diffusers'
pipelines do; the default keeps them and reports the flags.

The checker is built once per worker process, on first use (after the fork), and runs where the model does.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from jobs.errors import ConfigError, ModelError
from jobs.settings import SafetySettings

log = logging.getLogger("dreambatch.safety")

TINY = "tiny"
TINY_FOLDER = "safety-checker"  # under $DREAMBATCH_TINY_DIR, beside the tiny models
OFF_UNCONFIGURED = "off: no safety checker configured on this worker"
OFF_BY_REQUEST = "off: disabled by the request (safety_check / enable_safety_checker = false)"


class SafetyChecker(Protocol):
    name: str  # what results report as `safety`

    def check(self, images: list[Image.Image]) -> list[bool]:
        """One flag per image: True when it may show an NSFW concept."""
        ...


class ClipSafetyChecker:
    """diffusers' StableDiffusionSafetyChecker (a CLIP vision tower, a projection and concept embeddings with
    per-concept thresholds) with the CLIP image processor saved beside it."""

    def __init__(self, source: str, device: str = "cpu", name: str | None = None):
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        self.name = name or Path(source).name or source
        self.device = device
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        try:
            self.processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
            model = StableDiffusionSafetyChecker.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"safety checker {source!r}: cannot load it ({exc}); DREAMBATCH_SAFETY__CHECKER takes "
                "off, tiny, or a folder laid out as CompVis/stable-diffusion-safety-checker"
            ) from None
        self.model = model.to(device=device, dtype=self.dtype).eval()
        # its own warning says it returns black images; whether we do is `action`'s business
        logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(logging.ERROR)

    def check(self, images: list[Image.Image]) -> list[bool]:
        import numpy as np
        import torch

        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        placeholders = np.zeros((len(images), 1, 1, 3), dtype=np.float32)  # it blacks these out, not our images
        with torch.inference_mode():
            _, flags = self.model(clip_input=pixels.to(self.device, self.dtype), images=placeholders)
        return [bool(f) for f in flags]


def make_tiny_checker(folder: Path, *, flags_everything: bool = False, seed: int = 0) -> Path:
    """Write a tiny random-weight checker in the real layout. Its thresholds decide its verdict whatever the random
    weights: 2.0 (a cosine never exceeds it: nothing is flagged) or, with `flags_everything`, -2.0."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    generator = torch.Generator().manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 64,
            "max_position_embeddings": 16,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    model = StableDiffusionSafetyChecker(config)
    threshold = -2.0 if flags_everything else 2.0
    with torch.no_grad():
        for param in model.parameters():  # matrices from this build's own generator: a build is deterministic
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.concept_embeds.copy_(torch.randn(model.concept_embeds.shape, generator=generator))
        model.special_care_embeds.copy_(torch.randn(model.special_care_embeds.shape, generator=generator))
        model.concept_embeds_weights.fill_(threshold)
        model.special_care_embeds_weights.fill_(threshold)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def ensure_tiny_checker() -> Path:
    """The tiny checker under $DREAMBATCH_TINY_DIR, built once (a finished build has its processor config)."""
    from worker.runners.tiny import tiny_dir

    folder = tiny_dir(TINY_FOLDER)
    if not (folder / "preprocessor_config.json").is_file():
        staging = folder.with_name(f".{folder.name}-{os.getpid()}")
        make_tiny_checker(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first: theirs is as good
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load(settings: SafetySettings, device: str) -> SafetyChecker | None:
    """The checker the settings name, loaded; None when it is off."""
    source = settings.checker.strip()
    if source.lower() in ("", "off", "none"):
        return None
    device = settings.device or device or "cpu"
    if source.lower() == TINY:
        return ClipSafetyChecker(str(ensure_tiny_checker()), device, name=TINY)
    return ClipSafetyChecker(source, device)


class Lazy:
    """One checker per process, built on first use (never at import, never before a fork)."""

    def __init__(self, settings: SafetySettings, device: str):
        self.settings, self.device = settings, device
        self._lock = threading.Lock()
        self._loaded = False
        self._checker: SafetyChecker | None = None

    def __call__(self) -> SafetyChecker | None:
        with self._lock:
            if not self._loaded:
                self._checker = load(self.settings, self.device)
                self._loaded = True
                if self._checker is not None:
                    log.info("safety checker %s loaded on %s", self._checker.name, self.settings.device or self.device)
            return self._checker


def screen(
    checker: Callable[[], SafetyChecker | None],
    params: dict[str, Any],
    images: list[Image.Image],
    lock: AbstractContextManager | None = None,
    action: str = "flag",
) -> tuple[list[Image.Image], list[bool] | None, str]:
    """Check an item's images unless its row turned the checker off. Returns the images (flagged ones blacked out
    when `action` is black), a flag per image (None when nothing ran) and what ran, or why nothing did."""
    if params.get("safety_check") is False:
        return images, None, OFF_BY_REQUEST
    found = checker()
    if found is None:
        return images, None, OFF_UNCONFIGURED
    try:
        with lock or nullcontext():
            flags = found.check(images)
    except Exception as exc:
        log.exception("the safety checker failed")
        raise ModelError(f"safety checker {found.name}: {type(exc).__name__}: {exc}") from exc
    if action == "black":
        images = [Image.new("RGB", i.size) if flag else i for i, flag in zip(images, flags, strict=True)]
    return images, flags, found.name
