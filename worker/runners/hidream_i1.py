"""HiDream-I1 (Full, Dev, Fast) text-to-image: one loaded `HiDreamImagePipeline` per process.

The pipeline is built once, on first use, from `resolve_weights`; each request may pick its own
flow-matching scheduler and shift, built from the loaded scheduler's config and cached.

Prompts are encoded through a per-process `PromptCache` and handed to the pipeline as embeddings.
`generate_batch` denoises several requests that share a `batch_key` (size, steps, guidance, scheduler)
as one batch, each from its own seeded generator, so each image equals the one its request alone gives.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import HiDreamImagePipeline
from diffusers.configuration_utils import FrozenDict

from jobs.errors import ConfigError, InputError, ModelError
from jobs.models import MODELS, rendered_size
from jobs.settings import RunnerSettings
from worker.runners.base import EditRequest, GenerateRequest, RunOutput, Stages
from worker.runners.lora import Adapters, LoraChoice
from worker.runners.memory import apply_plan, plan_for
from worker.runners.moe import install_moe_dispatch
from worker.runners.padding import install_fold_padding
from worker.runners.revision import pipeline_revision, read_revision
from worker.runners.schedulers import SeededFlowMatchLCMScheduler, make_scheduler
from worker.runners.text_cache import PromptCache, TextEmbeds, encode_text, encode_texts
from worker.runners.weights import ResolvedWeights, resolve_weights

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def native_latent_side(patch_size: int, max_resolution: tuple[int, int] | list[int]) -> int:
    """Latent side whose token count fills the transformer's `max_seq` (128 for the real 128x128, patch 2)."""
    max_seq = max_resolution[0] * max_resolution[1] // (patch_size * patch_size)
    return patch_size * math.isqrt(max_seq)


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def parse_dtype(dtype: str | None, device: str) -> torch.dtype:
    """A runner's `dtype` argument ("bf16", "fp32", …) as a torch dtype; None = the device's default."""
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype] if dtype else default_dtype(device)


def load_pipeline(
    found: ResolvedWeights,
    device: str,
    dtype: torch.dtype,
    transformer: Any = None,
    options: RunnerSettings | None = None,
    model: str | None = None,
) -> HiDreamImagePipeline:
    """The `HiDreamImagePipeline` in `found` on `device`, with the Llama text encoder found beside it.

    `transformer`, when given, replaces the folder's own (which is then not read). `options` picks the
    expert routing, the memory plan and padding folding (`RunnerSettings`); `model` sizes the plan's
    activations (None: the most demanding model's).
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    options = options or RunnerSettings()

    tokenizer_4 = PreTrainedTokenizerFast.from_pretrained(found.llama_tokenizer_dir)
    # The pipeline asks for hidden states on each call; setting them here trips a generation warning.
    text_encoder_4 = LlamaForCausalLM.from_pretrained(found.llama_dir, dtype=dtype)
    extra = {} if transformer is None else {"transformer": transformer}
    pipe = HiDreamImagePipeline.from_pretrained(
        found.pipeline_dir, tokenizer_4=tokenizer_4, text_encoder_4=text_encoder_4, dtype=dtype, **extra
    )
    # where each component lives (GPU, CPU memory, streamed from it) and which are int8: worker.runners.memory
    apply_plan(pipe, plan_for(options.effective_memory_plan(), model, device, pipe).plan, device)
    return prepare_pipeline(pipe, options)


def prepare_pipeline(pipe: HiDreamImagePipeline, options: RunnerSettings) -> HiDreamImagePipeline:
    """What every dreambatch pipeline gets once its components are placed: the native render area, no
    progress bars, and the transformer sped up as `options` ask."""
    # The pipeline hard-codes 128 latents a side; render at the area the transformer was built for.
    config = pipe.transformer.config
    pipe.default_sample_size = native_latent_side(config.patch_size, config.max_resolution)
    pipe.set_progress_bar_config(disable=True)
    speed_up_transformer(pipe.transformer, options)
    return pipe


def _step_callback(on_step: Callable[[int], None] | None, clock: Stages | None = None) -> Callable[..., dict]:
    """diffusers' `callback_on_step_end` shape around a plain `on_step(step_index)`; with a `clock`, each step's
    time is its "denoise" (the device synchronized after the last step only, so what follows is the VAE's)."""

    def callback(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
        if on_step is not None:
            on_step(step)
        if clock is not None:
            clock.mark("denoise", sync=step == pipe.num_timesteps - 1)
        return tensors

    return callback


def synchronize(device: str) -> None:
    """Wait for the work queued on a CUDA device (nothing to wait for elsewhere)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def speed_up_transformer(transformer: Any, options: RunnerSettings) -> None:
    """Sync-free expert routing, padding folding and compiled blocks, as `options` ask (outputs stay equal)."""
    routing = install_moe_dispatch(transformer, options.moe)
    if options.fold_padding:
        install_fold_padding(transformer)
    if options.compile != "off":
        compile_blocks(transformer, options.compile, fullgraph=routing != "off")


def compile_blocks(transformer: Any, backend: str, fullgraph: bool) -> None:
    """torch.compile every double- and single-stream block in place. `fullgraph` needs routing with no host
    sync (diffusers' own breaks the graph at each MoE layer)."""
    for block in (*transformer.double_stream_blocks, *transformer.single_stream_blocks):
        # dynamic=None: the first new shape recompiles, then its sizes go symbolic (batch sizes and aspect
        # buckets stay within torch's recompile limit instead of falling back to eager)
        block.compile(backend=backend, fullgraph=fullgraph)


class HiDreamRunner:
    """What both HiDream runners hold: the model's name (of the kind `kind` in MODELS), where its weights are,
    device and dtype, the prompt cache, and the pipeline once loaded (`_load`, on first use)."""

    kind = ""  # "generate" or "edit"

    def __init__(
        self,
        model: str,
        weights: str | None,
        device: str = "cpu",
        dtype: str | None = None,
        options: RunnerSettings | None = None,
    ):
        if model not in MODELS or MODELS[model].kind != self.kind:
            names = ", ".join(name for name, spec in MODELS.items() if spec.kind == self.kind)
            raise ConfigError(f"{type(self).__name__} runs {names}; not {model!r}")
        self.model = model
        self.weights = weights
        self.device = device
        self.dtype = parse_dtype(dtype, device)
        self.options = options or RunnerSettings()
        self.prompts = PromptCache(self.options.prompt_cache_mb * 2**20)
        self.source: str | None = None  # where the weights came from, once loaded
        self.revision: str | None = None  # their revision (worker.runners.revision), once loaded
        self._pipe: Any = None
        self.adapters: Adapters | None = None  # user LoRA adapters, from the first request that names one

    def load(self) -> Any:
        """Load the pipeline (and its weights) once; later calls return it."""
        if self._pipe is None:
            self._pipe = self._load()
        return self._pipe

    def _load(self) -> Any:
        raise NotImplementedError

    def use_lora(self, choice: LoraChoice | None, transformer: Any) -> None:
        """Make `choice` the only active adapter of `transformer` (None: none); on the thread running the model."""
        if choice is not None and not MODELS[self.model].loras:
            raise ModelError(f"{self.model} carries its own LoRA and takes no other")
        if choice is None and self.adapters is None:
            return
        if self.adapters is None:
            self.adapters = Adapters(transformer, self.options.lora_cache)
        try:
            self.adapters.use(choice)
        except (ValueError, KeyError, OSError) as exc:
            assert choice is not None
            raise InputError(f"LoRA {choice.file}: it does not fit {self.model}'s transformer ({exc})") from None


class HiDreamI1Runner(HiDreamRunner):
    """Turns a `GenerateRequest` into images with a HiDream-I1 pipeline held in this process."""

    kind = "generate"

    def __init__(
        self,
        model: str,
        weights: str | None,
        device: str = "cpu",
        dtype: str | None = None,
        options: RunnerSettings | None = None,
    ):
        super().__init__(model, weights, device, dtype, options)
        self._schedulers: dict[tuple[str, float], Any] = {}
        self._scheduler_config: FrozenDict | None = None  # the loaded model's own scheduler config

    def use_pipeline(self, pipe: HiDreamImagePipeline, source: str) -> None:
        """Run on `pipe`, already built and prepared (`prepare_pipeline`), instead of loading weights: a
        benchmark's random full-size pipeline, shared with the code it is compared with."""
        self._pipe, self._scheduler_config, self._schedulers = pipe, pipe.scheduler.config, {}
        self.source, self.revision = source, None

    def _load(self) -> HiDreamImagePipeline:
        found = resolve_weights(self.model, self.weights, self.options)
        pipe = load_pipeline(found, self.device, self.dtype, options=self.options, model=self.model)
        self._scheduler_config = pipe.scheduler.config
        self.source = found.source
        self.revision = read_revision(self.model, lambda: pipeline_revision(found))
        return pipe

    def rendered_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the pipeline renders for a request: `jobs.models.rendered_size` (the rule the
        submit side reports) at the loaded pipeline's native area, snapped to its own multiple."""
        pipe = self.load()
        return rendered_size(
            width, height, pipe.default_sample_size * pipe.vae_scale_factor, multiple=pipe.vae_scale_factor * 2
        )

    def edit(self, request: EditRequest, on_step: Callable[[Any], None] | None = None) -> RunOutput:
        raise ModelError(f"{self.model} generates images from text; it does not edit (use e1-1 or e1-full)")

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        raise ModelError(f"{self.model} generates images from text; it has no edit canvas (edits: e1-1 or e1-full)")

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput:
        """Render `request.num_images` images for one prompt, reproducibly for a given seed.

        `on_step(i)` runs after each denoising step (0-based); an exception it raises stops the run there."""
        return self.generate_batch([request], on_step)[0]

    def batch_key(self, request: GenerateRequest) -> tuple | None:
        """Requests with equal keys can be denoised as one batch; None: this one runs alone. Sizes count as
        the size they render at (its aspect bucket), so 800x600 and 1600x1200 batch together."""
        if request.num_images != 1 or request.extra:
            return None
        return (
            "generate",
            request.lora.key() if request.lora else None,
            *self.rendered_size(request.width, request.height),
            request.steps,
            float(request.guidance_scale),
            request.scheduler,
            float(request.shift),
        )

    def embeds(self, texts: list[str]) -> TextEmbeds:
        """`texts` through the four text encoders as one batch, each text encoded once per process while it
        stays in the prompt cache; those not cached are encoded together."""
        pipe = self.load()

        def key(text: str) -> tuple:
            return (self.model, self.source, text, str(self.dtype))

        missing = [text for text in dict.fromkeys(texts) if self.prompts.peek(key(text)) is None]
        fresh = dict(zip(missing, encode_texts(pipe, missing, pipe.device, self.dtype), strict=True)) if missing else {}

        def encoded(text: str) -> TextEmbeds:
            return fresh.get(text) or encode_text(pipe, text, pipe.device, self.dtype)

        return TextEmbeds.batch([self.prompts.get(key(text), functools.partial(encoded, text)) for text in texts])

    def generate_batch(
        self, requests: list[GenerateRequest], on_step: Callable[[int], None] | None = None
    ) -> list[RunOutput]:
        """Render several requests with one denoising loop; each gets the images it would get alone.

        More than one request: all must share a `batch_key` (so one image each). `inference_s` of each
        output is its share of the batch's time. `on_step` sees every step of the whole batch.
        """
        pipe = self.load()
        first = requests[0]
        if len(requests) > 1 and (
            self.batch_key(first) is None or any(self.batch_key(r) != self.batch_key(first) for r in requests)
        ):
            raise ValueError("requests denoised together must share one batch key")
        generators = [torch.Generator(self.device).manual_seed(r.seed) for r in requests]
        generator = generators[0] if len(requests) == 1 else generators  # one per row of the batch
        pipe.scheduler = self._scheduler(first.scheduler, first.shift)
        self.use_lora(first.lora, pipe.transformer)
        if isinstance(pipe.scheduler, SeededFlowMatchLCMScheduler):
            pipe.scheduler.generator = generator
        started, started_at = time.perf_counter(), time.time()
        clock = Stages(functools.partial(synchronize, self.device))
        guided = first.guidance_scale > 1
        text = self.embeds([r.prompt for r in requests])
        negative = self.embeds([r.negative_prompt for r in requests]) if guided else None
        clock.mark("text_encode")
        with torch.inference_mode():
            result = pipe(
                prompt_embeds_t5=text.t5,
                prompt_embeds_llama3=text.llama,
                pooled_prompt_embeds=text.pooled,
                negative_prompt_embeds_t5=negative.t5 if negative else None,
                negative_prompt_embeds_llama3=negative.llama if negative else None,
                negative_pooled_prompt_embeds=negative.pooled if negative else None,
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                num_images_per_prompt=first.num_images,
                generator=generator,
                output_type="pil",
                callback_on_step_end=_step_callback(on_step, clock),
            )
        clock.mark("vae_decode")  # (and the pipeline's conversion to PIL images)
        share = (time.perf_counter() - started) / len(requests)
        images, n = list(result.images), first.num_images
        stages = clock.share(len(requests))
        return [
            RunOutput(
                images=images[i * n : (i + 1) * n], seed=r.seed, inference_s=share, started_at=started_at, stages=stages
            )
            for i, r in enumerate(requests)
        ]

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
