"""User LoRA adapters on a HiDream transformer: loaded with diffusers' LoRA loading, kept in a bounded cache.

A request names its adapter (`LoraChoice`: a local safetensors file, a name from its digest, a scale). Before
each model call the runner calls `Adapters.use(choice)` on the thread that runs the model: the adapter is
loaded on first use (`load_lora_adapter`), the least recently used one is deleted when more than `capacity`
are loaded, and only the chosen one is active at its scale. A request without one runs with every adapter
disabled: exactly the base model's output. The micro-batcher batches only requests with the same adapter and
scale (they are part of the batch key).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("dreambatch.worker")


@dataclass(frozen=True)
class LoraChoice:
    file: str  # a local .safetensors file in diffusers' LoRA format
    name: str  # the adapter's name: from the file's sha256, so one file is one adapter
    scale: float = 1.0

    def key(self) -> tuple[str, float]:
        return self.name, float(self.scale)


class Adapters:
    """The user adapters one transformer holds (at most `capacity`; see the module docstring)."""

    def __init__(self, transformer: Any, capacity: int):
        self.transformer = transformer
        self.capacity = max(1, capacity)
        self.loads = 0  # adapters loaded from files (for tests and benchmarks)
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._active: tuple[str, float] | None = None

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def use(self, choice: LoraChoice | None) -> None:
        t = self.transformer
        if choice is None:
            if self._active is not None:
                t.disable_adapters()
                self._active = None
            return
        if choice.name not in self._loaded:
            while len(self._loaded) >= self.capacity:
                old, _ = self._loaded.popitem(last=False)
                t.delete_adapters(old)
                log.info("LoRA %s unloaded (cache of %d adapters full)", old, self.capacity)
                if self._active and self._active[0] == old:
                    self._active = None
            t.load_lora_adapter(choice.file, adapter_name=choice.name, prefix="transformer")
            self._loaded[choice.name] = None
            self.loads += 1
            log.info("LoRA %s loaded from %s", choice.name, choice.file)
        self._loaded.move_to_end(choice.name)
        if self._active != choice.key():
            t.enable_adapters()
            t.set_adapters([choice.name], weights=[float(choice.scale)])
            self._active = choice.key()
