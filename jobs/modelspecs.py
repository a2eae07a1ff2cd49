"""The models dreambatch serves and each one's upstream defaults: plain data, no pydantic, so that the console
script's options can name the models without loading the record classes (jobs.models re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class ModelSpec:
    name: str  # dreambatch's name, used in queues and on the CLI
    hub_id: str  # the upstream weights
    kind: Literal["generate", "edit"]
    defaults: dict[str, Any] = field(default_factory=dict)  # upstream preset
    base_size: int = 1024  # the pipeline renders at about base_size² pixels
    loras: bool = True  # takes a row's LoRA adapter (e1-full's transformer already carries its own LoRA)


# The upstream defaults of each model: what its published inference code uses when a caller passes nothing.
# These are the one table of per-model defaults; rows and `--set` override them. Sources:
#   i1-*:    HiDream-ai/HiDream-I1 inference.py MODEL_CONFIGS (steps, guidance, shift, scheduler per variant)
#   e1-1:    HiDream-ai/HiDream-E1 @ f6f0631, inference_e1_1.py edit_image() defaults
#   e1-full: the same commit's inference.py pipe(...) call; clip_cfg_norm is not passed there, so it is the
#            editing pipeline's own default (True)
# ../shared/parity/ holds the outputs those scripts produce; tests/test_parity.py holds us to them.
MODELS: dict[str, ModelSpec] = {
    "i1-full": ModelSpec(
        "i1-full",
        "HiDream-ai/HiDream-I1-Full",
        "generate",
        {"steps": 50, "guidance_scale": 5.0, "shift": 3.0, "scheduler": "flow_unipc"},
    ),
    "i1-dev": ModelSpec(
        "i1-dev",
        "HiDream-ai/HiDream-I1-Dev",
        "generate",
        {"steps": 28, "guidance_scale": 0.0, "shift": 6.0, "scheduler": "flash_flow"},
    ),
    "i1-fast": ModelSpec(
        "i1-fast",
        "HiDream-ai/HiDream-I1-Fast",
        "generate",
        {"steps": 16, "guidance_scale": 0.0, "shift": 3.0, "scheduler": "flash_flow"},
    ),
    # E1.1: direct instructions, dynamic resolution around 1 MP (sides multiple of 16)
    "e1-1": ModelSpec(
        "e1-1",
        "HiDream-ai/HiDream-E1-1",
        "edit",
        {
            "steps": 28,
            "guidance_scale": 3.0,
            "image_guidance_scale": 1.5,
            "refine_strength": 0.3,
            "negative_prompt": "low quality, blurry, distorted",
            "clip_cfg_norm": True,
        },
    ),
    # E1-Full: 768×768, "Editing Instruction: …. Target Image Description: …" prompts; LoRA on I1-Full
    "e1-full": ModelSpec(
        "e1-full",
        "HiDream-ai/HiDream-E1-Full",
        "edit",
        {
            "steps": 28,
            "guidance_scale": 5.0,
            "image_guidance_scale": 4.0,
            "refine_strength": 0.3,
            "negative_prompt": "low resolution, blur",
            "clip_cfg_norm": True,
        },
        base_size=768,
        loras=False,
    ),
}
# HiDream-I1-Full: E1-Full's base transformer, and where both E1 scripts take the VAE, text encoders 1-3,
# tokenizers and scheduler from
I1_FULL_HUB_ID = "HiDream-ai/HiDream-I1-Full"
