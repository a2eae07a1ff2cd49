"""dreambatch's flow-matching schedulers, built from a loaded model's scheduler config.

`flow_unipc` (I1-Full's), `flash_flow` (I1-Dev/Fast's LCM flow) and `flow_euler`, each at a given shift.
`SeededFlowMatchLCMScheduler` draws LCM's per-step noise from the request's generator, which diffusers'
`HiDreamImagePipeline` does not hand it, so the same seed gives the same image.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, UniPCMultistepScheduler
from diffusers.configuration_utils import FrozenDict

from jobs.errors import ModelError


class SeededFlowMatchLCMScheduler(FlowMatchLCMScheduler):
    """The flash (LCM) flow scheduler, re-noising from the request's generator.

    `HiDreamImagePipeline` calls `scheduler.step` without a generator, so LCM's fresh noise would
    come from torch's global RNG and the same seed would not give the same image.
    """

    generator: torch.Generator | list[torch.Generator] | None = None  # a list: one per batch row

    def step(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("generator", self.generator)
        return super().step(*args, **kwargs)


def make_scheduler(name: str, shift: float, base_config: FrozenDict | dict | None = None) -> Any:
    """One of dreambatch's flow schedulers at `shift`, keeping what else `base_config` sets."""
    base = dict(base_config or {"num_train_timesteps": 1000})
    if name == "flow_unipc":
        return UniPCMultistepScheduler.from_config(
            base,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            flow_shift=shift,
            use_dynamic_shifting=False,
        )
    if name == "flash_flow":
        return FlowMatchLCMScheduler.from_config(base, shift=shift, use_dynamic_shifting=False)
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base, shift=shift, use_dynamic_shifting=False)
    raise ModelError(f"unknown scheduler {name!r}; expected flow_unipc, flash_flow or flow_euler")
