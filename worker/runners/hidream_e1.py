"""HiDream-E1 (E1.1, E1-Full) instruction-based editing, on diffusers' HiDream-I1 components.

diffusers ships no E1 pipeline; `HiDreamE1Pipeline` is dreambatch's, written from HiDream's published method:

- The source image's VAE latents (shift and scaling applied) are concatenated with the noisy target latents
  along the width; the transformer sees both, and only the target half (the first W latent columns) of
  its prediction drives the scheduler.
- Guidance is three-way, one batch of [unconditional, image-conditioned, image+text-conditioned]; the
  unconditional branch has the source latents zeroed. Two rules, as HiDream's pipelines have them:
    additive (`clip_cfg_norm=False`, E1-Full's):  branches (neg, 0), (neg, img), (prompt, img);
        pred = u + s_img * (i - u) + s_txt * (f - i)
    clipped (`clip_cfg_norm=True`, E1.1's):  branches (prompt, 0), (neg, img), (prompt, img);
        t = i + s_txt * (f - i), rescaled per latent pixel so its norm over channels is at most f's:
        t *= clamp(|f| / (|t| + 1e-8), 0, 1);   pred = u + s_img * (t - u)
  With `guidance_scale <= 1` there is no guidance: one pass, (prompt, img).
- Refine: from step int(steps * (1 - refine_strength)) on, the denoising continues (same scheduler, same
  latents) on the target alone, no source image, with the usual two-way CFG, conditioned on the target
  description (the text after "Target Image Description:" in the prompt, else the whole prompt).
  refine_strength 0 never reaches that step.

Which weights the refine steps run on is what HiDream's published scripts (HiDream-ai/HiDream-E1 @ f6f0631)
do as shipped, not what their names suggest: each hands its pipeline an edit/refine pair of state dicts
that alias the live parameters, so E1.1 refines on the E1.1 transformer itself, and E1-Full refines on its
own transformer with the LoRA adapter disabled but E1's full tensors kept. So each model holds ONE
transformer; `AdapterSwitch` turns the adapter on for edit steps and off for refine steps (E1.1 has none).
The text encoders, VAE and scheduler are one set, shared by both stages. ../shared/parity/ holds the
outputs those scripts produce; tests/test_parity.py holds this module to them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel
from diffusers.pipelines.hidream_image.pipeline_hidream_image import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from jobs.errors import ModelError
from jobs.models import MODELS
from jobs.settings import RunnerSettings
from worker.runners.base import EditRequest, GenerateRequest, RunOutput, Stages
from worker.runners.hidream_i1 import HiDreamRunner, load_pipeline, native_latent_side
from worker.runners.revision import edit_revision, read_revision
from worker.runners.text_cache import PromptCache, TextEmbeds, encode_text
from worker.runners.weights_e1 import add_lora_adapter, load_full_tensors, resolve_edit_weights, split_lora_file

CANVAS_MULTIPLE = 16  # canvas sides: VAE factor x patch size on the real model (8 x 2)
REFERENCE_SIDE = 1024  # the real I1 transformer's native side, in pixels; ModelSpec.base_size is relative to it


@dataclass(frozen=True)
class StepInfo:
    """What one denoising step did, for `on_step` hooks (tests, previews)."""

    index: int
    timestep: torch.Tensor
    stage: str  # "edit" or "refine"
    latents: torch.Tensor  # the target latents going into the step
    noise_pred: torch.Tensor  # the guided prediction handed to the scheduler (target half, sign applied)


def guide_edit(
    uncond: torch.Tensor,
    image: torch.Tensor,
    full: torch.Tensor,
    guidance_scale: float,
    image_guidance_scale: float,
    clip_cfg_norm: bool,
) -> torch.Tensor:
    """Three-way guidance of the edit stage (the module docstring has both rules)."""
    if not clip_cfg_norm:
        return uncond + image_guidance_scale * (image - uncond) + guidance_scale * (full - image)
    text = image + guidance_scale * (full - image)
    scale = (full.norm(dim=1, keepdim=True) / (text.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    return uncond + image_guidance_scale * (text * scale - uncond)


class AdapterSwitch:
    """The one transformer of an E1 model, with its LoRA adapter (E1-Full's) on for edit steps and off for
    refine steps, as HiDream's scripts switch it; E1.1's has no adapter, so both stages are the same module.
    Full tensors E1 replaces stay in place for both stages (the scripts' refine state dict aliases them)."""

    def __init__(self, transformer: HiDreamImageTransformer2DModel):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.transformer = transformer
        # the LoRA-wrapped layers, found once: walking all modules (12k on the real model) per switch costs ~2x
        self._lora_layers = [module for module in transformer.modules() if isinstance(module, BaseTunerLayer)]
        self.active: str | None = None  # which stage the transformer is set up for now

    def edit(self) -> HiDreamImageTransformer2DModel:
        if self.active != "edit":
            self._adapters(True, "edit")
        return self.transformer

    def refine(self) -> HiDreamImageTransformer2DModel:
        if self.active != "refine":
            self._adapters(False, "refine")
        return self.transformer

    def _adapters(self, enabled: bool, active: str) -> None:
        for layer in self._lora_layers:
            layer.enable_adapters(enabled)
        self.active = active


class HiDreamE1Pipeline:
    """Instruction-based editing with HiDream-E1; holds diffusers' I1 components (`base`, its transformer the E1
    one) and the switch that sets that transformer up for each stage."""

    def __init__(
        self,
        base: HiDreamImagePipeline,
        transformers: AdapterSwitch,
        token_budget: int,
        prompts: PromptCache | None = None,
        cache_key: tuple = (),
    ):
        self.base = base  # VAE, text encoders, tokenizers, scheduler: one set for both stages
        self.transformers = transformers
        self.prompts = prompts  # encoded texts kept across calls, keyed by cache_key + (text,)
        self.cache_key = cache_key
        self.token_budget = token_budget  # most target tokens per image; the edit pass sees twice that
        self.vae_scale_factor = base.vae_scale_factor
        self.patch_size = base.transformer.config.patch_size

    @property
    def device(self) -> torch.device:
        return self.base.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.vae.dtype

    def encode_text(self, prompt: str) -> TextEmbeds:
        """`prompt` through the four text encoders; from the prompt cache when it holds it."""

        def encode() -> TextEmbeds:
            return encode_text(self.base, prompt, self.device, self.dtype)

        return encode() if self.prompts is None else self.prompts.get((*self.cache_key, prompt), encode)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """The source image as normalized VAE latents (the distribution's mode, so no randomness)."""
        pixels = self.base.image_processor.preprocess(image).to(self.device, self.dtype)
        latents = self.base.vae.encode(pixels).latent_dist.mode()
        return (latents - self.base.vae.config.shift_factor) * self.base.vae.config.scaling_factor

    def check_canvas(self, width: int, height: int) -> None:
        step = self.vae_scale_factor * self.patch_size
        if width % step or height % step:
            raise ModelError(f"canvas {width}x{height}: each side must be a multiple of {step}")
        tokens = (width // step) * (height // step)
        if tokens > self.token_budget:
            raise ModelError(
                f"canvas {width}x{height} is {tokens} tokens; this model takes at most "
                f"{self.token_budget} (fit the image with canvas_size first)"
            )

    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        refine_prompt: str | None = None,
        steps: int = 28,
        guidance_scale: float = 5.0,
        image_guidance_scale: float = 4.0,
        clip_cfg_norm: bool = True,
        refine_strength: float = 0.0,
        num_images: int = 1,
        generator: torch.Generator | None = None,
        on_step: Callable[[StepInfo], None] | None = None,
        clock: Stages | None = None,
    ) -> list[Image.Image]:
        # 1. check inputs
        width, height = image.size
        self.check_canvas(width, height)
        if not 0.0 <= refine_strength <= 1.0:
            raise ModelError(f"refine_strength {refine_strength} is outside 0.0-1.0")
        guided = guidance_scale > 1.0
        refine_from = int(steps * (1.0 - refine_strength))  # HiDream's rule; 0.0 gives `steps`: no refine

        # 2. encode the prompts (each distinct text once) and the source image
        texts: dict[str, TextEmbeds] = {}

        def embeds(text: str) -> TextEmbeds:
            if text not in texts:
                texts[text] = self.encode_text(text)
            return texts[text]

        clock = clock or Stages()
        source = self.encode_image(image).repeat(num_images, 1, 1, 1)
        clock.mark("image_encode")
        if guided:
            uncond_text = prompt if clip_cfg_norm else negative_prompt
            edit_text = TextEmbeds.batch([embeds(uncond_text), embeds(negative_prompt), embeds(prompt)], num_images)
            edit_source = torch.cat([torch.zeros_like(source), source, source])
        else:
            edit_text, edit_source = TextEmbeds.batch([embeds(prompt)], num_images), source
        refine_text = edit_text  # (unused when no refine step comes)
        if refine_from < steps:
            target = embeds(refine_prompt or prompt)
            refine_text = TextEmbeds.batch([embeds(negative_prompt), target] if guided else [target], num_images)
        clock.mark("text_encode")

        # 3. initial noise, the target's size
        latents = randn_tensor(source.shape, generator=generator, device=self.device, dtype=self.dtype)

        # 4. timesteps
        scheduler = self.base.scheduler
        shift = {"mu": calculate_shift(2 * self.token_budget)} if scheduler.config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(steps, device=self.device, **shift)

        # 5. denoise: edit steps on [target | source], then refine steps on the target alone
        latent_width = latents.shape[-1]
        for index, timestep in enumerate(scheduler.timesteps):
            stage = "edit" if index < refine_from else "refine"
            if stage == "edit":
                transformer, text = self.transformers.edit(), edit_text
                branches = 3 if guided else 1
                model_input = torch.cat([latents.repeat(branches, 1, 1, 1), edit_source], dim=-1)
            else:
                transformer, text = self.transformers.refine(), refine_text
                model_input = latents.repeat(2 if guided else 1, 1, 1, 1)
            raw = transformer(
                hidden_states=model_input,
                timesteps=timestep.expand(model_input.shape[0]),
                encoder_hidden_states_t5=text.t5,
                encoder_hidden_states_llama3=text.llama,
                pooled_embeds=text.pooled,
                return_dict=False,
            )[0]
            pred = -raw[..., :latent_width]  # HiDream predicts the negated flow; keep the target half
            if guided and stage == "edit":
                uncond, image_cond, full_cond = pred.chunk(3)
                pred = guide_edit(uncond, image_cond, full_cond, guidance_scale, image_guidance_scale, clip_cfg_norm)
            elif guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            if on_step is not None:
                on_step(StepInfo(index, timestep, stage, latents, pred))
            latents = scheduler.step(pred, timestep, latents, return_dict=False)[0]
            clock.mark("denoise" if stage == "edit" else "refine", sync=index in (refine_from - 1, steps - 1))

        # 6. decode
        latents = latents / self.base.vae.config.scaling_factor + self.base.vae.config.shift_factor
        decoded = self.base.vae.decode(latents, return_dict=False)[0]
        images = self.base.image_processor.postprocess(decoded, output_type="pil")
        clock.mark("vae_decode")
        return images


def edit_prompts(model: str, request: EditRequest) -> tuple[str, str]:
    """(edit prompt, refine prompt) for a request, in the form each E1 model was trained on.

    e1-1 takes the instruction as is; e1-full "Editing Instruction: …. Target Image Description: …".
    A full `prompt` is used as is by both. The refine steps are conditioned on the target description:
    the request's, else what follows "Target Image Description:" in the prompt, else the whole prompt
    (HiDream's editing pipeline: `prompt.split("Target Image Description:")[1].strip()`, else the prompt).
    """
    instruction, description = request.instruction.strip(), request.target_description.strip()
    if request.prompt.strip():
        prompt = request.prompt.strip()
    elif not instruction:
        raise ModelError("an edit needs an instruction or a prompt")
    elif model == "e1-full":
        prompt = f"Editing Instruction: {instruction.rstrip('. ')}."
        prompt += f" Target Image Description: {description}" if description else ""
    else:
        prompt = instruction
    marker = "Target Image Description:"
    described = prompt.split(marker)[1].strip() if marker in prompt else ""
    return prompt, description or described or prompt


def canvas_size(width: int, height: int, side: int, fixed: bool) -> tuple[int, int]:
    """The processing canvas for an input of width x height: `fixed` gives side x side, else the input's
    aspect in at most side² pixels, each side a multiple of 16 (the largest of HiDream's round/floor picks)."""
    if fixed:
        return side, side
    step, budget = CANVAS_MULTIPLE, side * side
    scale = math.sqrt(budget / (width * height))
    picks = [
        (snap_w(width * scale) // step * step, snap_h(height * scale) // step * step)
        for snap_w in (round, math.floor)
        for snap_h in (round, math.floor)
    ]
    fitting = [(w, h) for w, h in picks if w * h <= budget]  # (floor, floor) always fits
    w, h = max(fitting, key=lambda size: size[0] * size[1])
    w, h = max(w, step), max(h, step)  # a very thin input: one 16-pixel row, the other side shortened
    if w * h > budget:
        w, h = (budget // (h * step) * step, h) if w > h else (w, budget // (w * step) * step)
    return w, h


class HiDreamE1Runner(HiDreamRunner):
    """Turns an `EditRequest` into edited images with a HiDream-E1 pipeline held in this process."""

    kind = "edit"

    def __init__(
        self,
        model: str,
        weights: str | None,
        device: str = "cpu",
        dtype: str | None = None,
        options: RunnerSettings | None = None,
    ):
        super().__init__(model, weights, device, dtype, options)
        self._side: int | None = None  # canvas side (e1-full) or side of the pixel budget (e1-1)

    def _load(self) -> HiDreamE1Pipeline:
        from safetensors.torch import load_file

        found = resolve_edit_weights(self.model, self.weights, self.options)
        # the one transformer: E1.1's own, or I1-Full's with E1-Full's file over it (LoRA + full tensors,
        # loaded in place as the script does); the memory plan places it with the rest
        transformer = HiDreamImageTransformer2DModel.from_pretrained(found.transformer_dir, dtype=self.dtype)
        if found.lora_file is not None:
            lora, full = split_lora_file(load_file(found.lora_file))
            add_lora_adapter(transformer, lora)
            load_full_tensors(transformer, full)
        base = load_pipeline(
            found.components, self.device, self.dtype, transformer=transformer, options=self.options, model=self.model
        )
        base.transformer.requires_grad_(False)
        # the canvas: ModelSpec.base_size (768 e1-full, 1024 e1-1) scaled to this transformer's native side
        config = base.transformer.config
        native_side = native_latent_side(config.patch_size, config.max_resolution) * base.vae_scale_factor
        self._side = MODELS[self.model].base_size * native_side // REFERENCE_SIDE
        tokens = (self._side // (base.vae_scale_factor * config.patch_size)) ** 2
        # the edit pass sees target + source: twice the tokens (8192 for E1.1, 4608 for E1-Full, as the scripts
        # set it); the refine steps keep it
        base.transformer.max_seq = 2 * tokens
        self.source = found.source
        self.revision = read_revision(self.model, lambda: edit_revision(found))
        return HiDreamE1Pipeline(
            base,
            AdapterSwitch(base.transformer),
            token_budget=tokens,
            prompts=self.prompts,
            cache_key=(self.model, found.source, str(self.dtype)),
        )

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) this model edits an input of width x height at; fit the image to it first.

        e1-1: the input's aspect in the model's pixel budget (about 1 MP real; 64² px tiny), sides multiples
        of 16. e1-full: its fixed square (768 real; 48 tiny).
        """
        self.load()
        assert self._side is not None
        return canvas_size(width, height, self._side, fixed=self.model == "e1-full")

    def switch_cost(self, repeats: int = 3) -> dict[str, float]:
        """Seconds for one switch to the refine weights and one back (best of `repeats`), for benchmarks."""
        switch = self.load().transformers
        switch.edit()
        best = {"to_refine": math.inf, "to_edit": math.inf}
        for _ in range(repeats):
            for name, go in (("to_refine", switch.refine), ("to_edit", switch.edit)):
                _synchronize(self.device)
                started = time.perf_counter()
                go()
                _synchronize(self.device)
                best[name] = min(best[name], time.perf_counter() - started)
        return best

    def generate(self, request: GenerateRequest, on_step: Callable[[int], None] | None = None) -> RunOutput:
        raise ModelError(f"{self.model} edits an input image; it does not generate from text alone (use i1-*)")

    def edit(self, request: EditRequest, on_step: Callable[[StepInfo], None] | None = None) -> RunOutput:
        """Edit `request.image` into `request.num_images` images of the same size, reproducibly for a seed."""
        pipe = self.load()
        if request.image.size != (request.width, request.height):
            raise ModelError(
                f"image is {request.image.size[0]}x{request.image.size[1]} but the request says "
                f"{request.width}x{request.height}; fit it to canvas_size() first"
            )
        prompt, refine_prompt = edit_prompts(self.model, request)
        self.use_lora(request.lora, pipe.base.transformer)
        generator = torch.Generator(self.device).manual_seed(request.seed)
        started, started_at = time.perf_counter(), time.time()
        clock = Stages(lambda: _synchronize(self.device))
        images = pipe(
            image=request.image.convert("RGB"),
            prompt=prompt,
            negative_prompt=request.negative_prompt,
            refine_prompt=refine_prompt,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            image_guidance_scale=request.image_guidance_scale,
            clip_cfg_norm=request.clip_cfg_norm,
            refine_strength=request.refine_strength,
            num_images=request.num_images,
            generator=generator,
            on_step=on_step,
            clock=clock,
        )
        elapsed = time.perf_counter() - started
        return RunOutput(
            images=images, seed=request.seed, inference_s=elapsed, started_at=started_at, stages=clock.seconds
        )


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
