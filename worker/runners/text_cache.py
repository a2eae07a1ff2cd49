"""Encoded prompts, kept per worker process: a catalog job's rows often share their prompt, instruction
and negative prompt, and HiDream encodes each text with four encoders (Llama 3.1 8B among them).

`PromptCache` is a bounded LRU from (model, text, encoder settings) to `TextEmbeds`; it is bounded by
bytes, because one real-size entry is large: Llama's hidden states of every layer for 128 tokens
(33 × 128 × 4096 bf16 ≈ 34 MiB) plus T5's and the pooled CLIP vectors.

`encode_text` runs the pipeline's own `encode_prompt` for one text, on whatever device the encoders are:
with `text_encoders="cpu"` (for a GPU short of memory: in bf16 the four take about 27 GB — Llama 3.1 8B
16 GB, T5-XXL's encoder 9.5 GB, the two CLIPs 1.6 GB — beside the transformer's 34 GB) `load_pipeline`
leaves them in CPU memory, they encode there, and the result moves to the denoising device. With the
cache, that slower encode is paid once per distinct text.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
MAX_SEQUENCE_LENGTH = 128  # the HiDream pipeline's default, used for every text dreambatch encodes


@dataclass(frozen=True)
class TextEmbeds:
    """One prompt through the four text encoders (batch 1, or a batch made by `batch`)."""

    t5: torch.Tensor  # (batch, tokens, dim)
    llama: torch.Tensor  # (layers, batch, tokens, dim)
    pooled: torch.Tensor  # (batch, dim)

    @staticmethod
    def batch(parts: list[TextEmbeds], repeat: int = 1) -> TextEmbeds:
        """The prompts of `parts`, each `repeat` times, in that order, as one batch."""
        return TextEmbeds(
            t5=torch.cat([p.t5.repeat(repeat, 1, 1) for p in parts]),
            llama=torch.cat([p.llama.repeat(1, repeat, 1, 1) for p in parts], dim=1),
            pooled=torch.cat([p.pooled.repeat(repeat, 1) for p in parts]),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.t5, self.llama, self.pooled))


class PromptCache:
    """A thread-safe LRU of encoded prompts holding at most `max_bytes` of tensors (0 disables it)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, TextEmbeds] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, encode: Callable[[], TextEmbeds]) -> TextEmbeds:
        """The embeddings for `key`, encoded by `encode()` only when not cached."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        embeds = encode()  # outside the lock: encoders are slow; a racing duplicate just encodes twice
        if 0 < embeds.nbytes <= self.max_bytes:
            with self._lock:
                if key not in self._entries:
                    self._entries[key] = embeds
                    self._bytes += embeds.nbytes
                while self._bytes > self.max_bytes:
                    _, dropped = self._entries.popitem(last=False)
                    self._bytes -= dropped.nbytes
        return embeds

    def peek(self, key: Hashable) -> TextEmbeds | None:
        """The cached embeddings for `key`, or None; counts nothing and does not refresh."""
        with self._lock:
            return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


def encoder_device(pipe) -> torch.device:
    """Where the encoders run: the GPU they stream to (worker.runners.memory), else where their weights are."""
    from worker.runners.memory import streamed_onto

    return streamed_onto(pipe.text_encoder_4) or pipe.text_encoder_4.device


@torch.no_grad()
def encode_text(pipe, text: str, device: torch.device, dtype: torch.dtype) -> TextEmbeds:
    """`text` through the pipeline's four encoders, wherever they are, as tensors on `device`."""
    return encode_texts(pipe, [text], device, dtype)[0]


@torch.no_grad()
def encode_texts(pipe, texts: list[str], device: torch.device, dtype: torch.dtype) -> list[TextEmbeds]:
    """Several texts through the encoders as one batch (every text is padded to the same 128 tokens, so
    each row is what it would be alone, within float rounding); one `TextEmbeds` per text."""
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        prompt=list(texts),
        device=encoder_device(pipe),
        dtype=dtype,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    t5, llama, pooled = t5.to(device), llama.to(device), pooled.to(device)
    # each row its own storage: a cached view would keep the whole batch alive behind a one-row size
    return [
        TextEmbeds(t5=t5[i : i + 1].clone(), llama=llama[:, i : i + 1].clone(), pooled=pooled[i : i + 1].clone())
        for i in range(len(texts))
    ]
