"""HiDream-I1 (Full, Dev, Fast) text-to-image: one loaded `HiDreamImagePipeline` per process.

The pipeline is built once, on first use, from `resolve_weights`; each request may pick its own
flow-matching scheduler and shift, built from the loaded scheduler's config and cached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchLCMScheduler,
    HiDreamImagePipeline,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import FrozenDict

from worker.runners.base import GenerateRequest, RunOutput
from worker.runners.weights import ResolvedWeights, resolve_weights

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


class SeededFlowMatchLCMScheduler(FlowMatchLCMScheduler):
    """The flash (LCM) flow scheduler, re-noising from the request's generator.

    `HiDreamImagePipeline` calls `scheduler.step` without a generator, so LCM's fresh noise would
    come from torch's global RNG and the same seed would not give the same image.
    """

    generator: torch.Generator | None = None

    def step(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("generator", self.generator)
        return super().step(*args, **kwargs)


def make_scheduler(name: str, shift: float, base_config: FrozenDict | dict | None = None) -> Any:
    """One of dreambatch's flow schedulers at `shift`, keeping what else `base_config` sets."""
    base = dict(base_config or {"num_train_timesteps": 1000})
    if name == "flow_unipc":
        return UniPCMultistepScheduler.from_config(
            base, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
            use_dynamic_shifting=False,
        )
    if name == "flash_flow":
        return FlowMatchLCMScheduler.from_config(base, shift=shift, use_dynamic_shifting=False)
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base, shift=shift, use_dynamic_shifting=False)
    raise ValueError(f"unknown scheduler {name!r}; expected flow_unipc, flash_flow or flow_euler")


def native_latent_side(patch_size: int, max_resolution: tuple[int, int] | list[int]) -> int:
    """Latent side whose token count fills the transformer's `max_seq` (128 for the real 128x128, patch 2)."""
    max_seq = max_resolution[0] * max_resolution[1] // (patch_size * patch_size)
    return patch_size * math.isqrt(max_seq)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(dtype: str | None, device: str) -> torch.dtype:
    """A runner's `dtype` argument ("bf16", "fp32", …) as a torch dtype; None = the device's default."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype] if dtype else default_dtype(device)


def load_pipeline(
    found: ResolvedWeights, device: str, dtype: torch.dtype, transformer: Any = None
) -> HiDreamImagePipeline:
    """The `HiDreamImagePipeline` in `found` on `device`, with the Llama text encoder found beside it.

    `transformer`, when given, replaces the folder's own (which is then not read).
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer_4 = PreTrainedTokenizerFast.from_pretrained(found.llama_tokenizer_dir)
    # The pipeline asks for hidden states on each call; setting them here trips a generation warning.
    text_encoder_4 = LlamaForCausalLM.from_pretrained(found.llama_dir, dtype=dtype)
    extra = {} if transformer is None else {"transformer": transformer}
    pipe = HiDreamImagePipeline.from_pretrained(
        found.pipeline_dir, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4, dtype=dtype, **extra
    ).to(device)
    # The pipeline hard-codes 128 latents a side; render at the area the transformer was built for.
    config = pipe.transformer.config
    pipe.default_sample_size = native_latent_side(config.patch_size, config.max_resolution)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _step_callback(on_step: Callable[[int], None]) -> Callable[..., dict]:
    """diffusers' `callback_on_step_end` shape around a plain `on_step(step_index)`."""

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        on_step(step)
        return tensors

    return callback


class HiDreamI1Runner:
    """Turns a `GenerateRequest` into images with a HiDream-I1 pipeline held in this process."""

    def __init__(self, model: str, weights: str | None, device: str = "cpu", dtype: str | None = None):
        self.model = model
        self.weights = weights
        self.device = device
        self.dtype = parse_dtype(dtype, device)
        self.source: str | None = None  # where the weights came from, once loaded
        self._pipe: HiDreamImagePipeline | None = None
        self._schedulers: dict[tuple[str, float], Any] = {}
        self._scheduler_config: FrozenDict | None = None  # the loaded model's own scheduler config

    def load(self) -> HiDreamImagePipeline:
        """Load the pipeline once; later calls return it."""
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _load(self) -> HiDreamImagePipeline:
        found = resolve_weights(self.model, self.weights)
        pipe = load_pipeline(found, self.device, self.dtype)
        self._scheduler_config = pipe.scheduler.config
        self.source = found.source
        return pipe

    def rendered_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the pipeline renders for a request: same area as its default, snapped."""
        pipe = self.load()
        division = pipe.vae_scale_factor * 2
        side = pipe.default_sample_size * pipe.vae_scale_factor
        scale = math.sqrt(side * side / (width * height))
        return int(width * scale // division * division), int(height * scale // division * division)

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput:
        """Render `request.num_images` images for one prompt, reproducibly for a given seed.

        `on_step(i)` runs after each denoising step (0-based); an exception it raises stops the run there."""
        pipe = self.load()
        generator = torch.Generator(self.device).manual_seed(request.seed)
        pipe.scheduler = self._scheduler(request.scheduler, request.shift)
        if isinstance(pipe.scheduler, SeededFlowMatchLCMScheduler):
            pipe.scheduler.generator = generator
        started = time.perf_counter()
        with torch.inference_mode():
            result = pipe(
                prompt=request.prompt,
                negative_prompt=request.negative_prompt if request.guidance_scale > 1 else None,
                width=request.width,
                height=request.height,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.num_images,
                generator=generator,
                output_type="pil",
                callback_on_step_end=None if on_step is None else _step_callback(on_step),
            )
        elapsed = time.perf_counter() - started
        return RunOutput(images=list(result.images), seed=request.seed, inference_s=elapsed)

    def _scheduler(self, name: str, shift: float) -> Any:
        """The scheduler for (name, shift), built once from the loaded model's scheduler config."""
        key = (name, float(shift))
        if key not in self._schedulers:
            self.load()
            scheduler = make_scheduler(name, shift, self._scheduler_config)
            if name == "flash_flow":
                scheduler = SeededFlowMatchLCMScheduler.from_config(scheduler.config)
            self._schedulers[key] = scheduler
        return self._schedulers[key]
