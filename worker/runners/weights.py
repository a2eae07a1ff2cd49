"""Where a HiDream-I1 model's weights come from: the local hub cache, a folder, or tiny random ones.

`resolve_weights` never downloads: a hub id is looked up in the local Hugging Face cache only, and a
model that is nowhere raises `WeightsNotFound` naming every place looked at and how to fill one.
`make_tiny` writes a random-weight pipeline with the real classes and the real folder layout, small
enough for tests and CPU smoke runs (`--weights tiny`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import ConfigError
from jobs.models import MODELS
from jobs.settings import RunnerSettings

MODEL_HUB_IDS = {name: spec.hub_id for name, spec in MODELS.items() if spec.kind == "generate"}
LLAMA_HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"  # text encoder 4; the HiDream repos do not ship it
LLAMA_HUB_IDS = (LLAMA_HUB_ID, "meta-llama/Meta-Llama-3.1-8B-Instruct")  # the same model under its older name
TINY_DIR_ENV = "DREAMBATCH_TINY_DIR"  # root for tiny weights, one folder per model
TINY = "tiny"  # the `weights` value that asks for tiny random weights

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_CORPUS = [
    "a photo of a cat holding a sign that says hello",
    "an astronaut riding a horse on the moon, cinematic lighting, 8k",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, studio photo, 85mm, shallow depth of field",
    "blurry, low quality, watermark, text, jpeg artifacts",
]
_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'\"-:;()")


class WeightsNotFound(ConfigError):
    """No weights for a model in any place looked at; the message says where we looked and how to fix it."""


@dataclass(frozen=True)
class ResolvedWeights:
    pipeline_dir: Path  # diffusers layout: model_index.json, transformer/, vae/, …
    llama_dir: Path  # LlamaForCausalLM weights (text encoder 4)
    source: str  # "hub:<id>", "local:<dir>" or "tiny:<dir>", for logs and results
    llama_tokenizer_dir: Path  # tokenizer 4; the same folder as llama_dir for a hub Llama


def resolve_weights(model: str, weights: str | None = None, options: RunnerSettings | None = None) -> ResolvedWeights:
    """Find a model's weights on this machine: None = its hub id, "tiny", a local folder or a hub id."""
    if model not in MODEL_HUB_IDS:
        raise ConfigError(f"unknown HiDream-I1 model {model!r}; expected one of {sorted(MODEL_HUB_IDS)}")
    wanted = weights or MODEL_HUB_IDS[model]
    if wanted == TINY:
        pipeline_dir = ensure_tiny(model)
        source = f"tiny:{pipeline_dir}"
    elif Path(wanted).expanduser().is_dir() or not _HUB_ID.match(wanted):
        pipeline_dir = Path(wanted).expanduser().resolve()
        if not (pipeline_dir / "model_index.json").is_file():
            looked = f"local folder {pipeline_dir} (missing, or no model_index.json)"
            raise WeightsNotFound(_not_found(model, wanted, [looked]))
        source = f"local:{pipeline_dir}"
    else:
        pipeline_dir, looked = cached_snapshot(wanted, "model_index.json")
        if pipeline_dir is None:
            raise WeightsNotFound(_not_found(model, wanted, [looked]))
        source = f"hub:{wanted}"
    llama_dir, llama_tokenizer_dir = llama_dirs(model, pipeline_dir, (options or RunnerSettings()).llama)
    return ResolvedWeights(pipeline_dir, llama_dir, source, llama_tokenizer_dir)


def tiny_dir(model: str) -> Path:
    """Where tiny weights for `model` live: $DREAMBATCH_TINY_DIR/<model>, default ~/.cache/dreambatch/tiny."""
    root = os.environ.get(TINY_DIR_ENV) or "~/.cache/dreambatch/tiny"
    return Path(root).expanduser() / model


TINY_LAYOUT = 2  # bumped when make_tiny lays folders out differently: an older build is made again
_TINY_MARK = ".dreambatch-tiny"  # written last into a finished build: its layout number


def ensure_tiny(model: str) -> Path:
    """Build tiny weights once; later calls (and racing processes) reuse the finished folder. A folder built
    to an older layout is replaced."""
    target = tiny_dir(model)

    def current() -> bool:
        mark = target / _TINY_MARK
        return mark.is_file() and mark.read_text().strip() == str(TINY_LAYOUT)

    if current():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=target.parent))
    try:
        make_tiny(model, staging)
        (staging / _TINY_MARK).write_text(f"{TINY_LAYOUT}\n")
        if target.exists() and not current():  # an older layout: set it aside (atomically), then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{model}-stale-", dir=target.parent))
            os.rename(target, stale / model)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(staging, target)  # atomic; fails if another process got there first
    except OSError:
        if not current():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _hub_cache() -> Path:
    """The hub cache folder as huggingface_hub would pick it, read now rather than at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser() / "hub"


def cached_snapshot(hub_id: str, required: str) -> tuple[Path | None, str]:
    """The cached snapshot of `hub_id` if it holds `required`, else None; and where we looked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache()
    try:
        folder = Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        return None, f"hub cache {cache} (no complete snapshot of {hub_id})"
    if not (folder / required).is_file():
        return None, f"hub cache {folder} (snapshot of {hub_id} has no {required})"
    return folder, str(folder)


def llama_dirs(model: str, pipeline_dir: Path, setting: str | None = None) -> tuple[Path, Path]:
    """Text encoder 4 and its tokenizer: `setting` (RunnerSettings.llama: a folder or a hub id) when given,
    else the pipeline folder's own when it ships one, else Llama 3.1 8B Instruct in the hub cache under
    either of its names (HiDream's READMEs use the older `Meta-Llama-3.1-8B-Instruct`)."""
    if setting:
        place = Path(setting).expanduser()
        if place.is_dir() or not _HUB_ID.match(setting):
            if (place / "config.json").is_file():
                return place.resolve(), place.resolve()
            looked = [f"DREAMBATCH_RUNNER__LLAMA={setting} (missing, or no config.json)"]
            raise WeightsNotFound(_not_found(model, setting, looked, llama=True))
        llama, where = cached_snapshot(setting, "config.json")
        if llama is None:
            raise WeightsNotFound(_not_found(model, setting, [f"DREAMBATCH_RUNNER__LLAMA={setting}: {where}"],
                                             llama=True))
        return llama, llama
    model_dir, tokenizer_dir = pipeline_dir / "text_encoder_4", pipeline_dir / "tokenizer_4"
    if (model_dir / "config.json").is_file() and tokenizer_dir.is_dir():
        return model_dir, tokenizer_dir
    looked = [f"{model_dir} and {tokenizer_dir} (absent)"]
    for hub_id in LLAMA_HUB_IDS:
        llama, where = cached_snapshot(hub_id, "config.json")
        if llama is not None:
            return llama, llama
        looked.append(where)
    raise WeightsNotFound(_not_found(model, LLAMA_HUB_ID, looked, llama=True))


def _not_found(model: str, wanted: str, looked: list[str], llama: bool = False) -> str:
    what = f"Llama text encoder ({wanted})" if llama else f"weights {wanted}"
    fixes = [] if llama else [f"hf download {MODEL_HUB_IDS[model]}  (huggingface-cli download on hub < 1.0)"]
    fixes += [
        f"accept the Llama 3.1 licence on huggingface.co/{LLAMA_HUB_ID}, then hf download {LLAMA_HUB_ID}",
        "pass a local diffusers folder (one with text_encoder_4/ and tokenizer_4/ needs no hub Llama)",
        "point DREAMBATCH_RUNNER__LLAMA (or --llama) at a Llama 3.1 8B Instruct folder or cached hub id",
        f"pass --weights {TINY} for tiny random weights (tests and smoke runs only)",
    ]
    lines = [f"no {what} for model {model!r}; looked in:", *(f"  - {place}" for place in looked)]
    return "\n".join([*lines, "to get them, one of:", *(f"  - {fix}" for fix in fixes)])


# ---- tiny random weights ---------------------------------------------------------------------------

_CLIP_DIM, _T5_DIM, _LLAMA_DIM, _LLAMA_LAYERS, _TEXT_LEN = 32, 32, 32, 2, 128


def make_tiny(model: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random pipeline for `model` to `out_dir`, laid out like the hub repos.

    HiDream-I1 models are built here; the E1 editing models (`kind == "edit"`) in `weights_e1`.
    """
    import torch

    from worker.runners.hidream_i1 import make_scheduler

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    if MODELS[model].kind == "edit":
        from worker.runners.weights_e1 import make_tiny_edit

        return make_tiny_edit(model, out_dir, seed)
    preset = MODELS[model].defaults
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = tiny_pipeline(make_scheduler(preset["scheduler"], preset["shift"]), tiny_transformer)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def save_sharded(module: Any, folder: Path) -> None:
    """Save a diffusers model in two safetensors shards with an index file, as the hub repos ship theirs."""
    shutil.rmtree(folder, ignore_errors=True)
    total = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    module.save_pretrained(folder, safe_serialization=True, max_shard_size=total * 3 // 5)  # greedy: 2 files


def tiny_pipeline(scheduler: Any, make_transformer: Any) -> Any:
    """A `HiDreamImagePipeline` of tiny random components; `make_transformer()` builds its transformer.

    Draws from torch's global RNG in a fixed order: seed it (under `fork_rng`) for reproducible builds.
    """
    from diffusers import HiDreamImagePipeline

    clip_tokenizer = _clip_tokenizer()
    llama_tokenizer = _llama_tokenizer()
    t5_tokenizer = _t5_tokenizer()
    return HiDreamImagePipeline(
        scheduler=scheduler,
        vae=_tiny_vae(),
        text_encoder=_tiny_clip(clip_tokenizer),
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_clip(clip_tokenizer),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=_tiny_t5(t5_tokenizer),
        tokenizer_3=t5_tokenizer,
        text_encoder_4=_tiny_llama(llama_tokenizer),
        tokenizer_4=llama_tokenizer,
        transformer=make_transformer(),
    )


def _corpus_words(pre_tokenizer: Any, normalizer: Any = None) -> list[str]:
    """The corpus split the way a tokenizer splits it, each word once, sorted."""
    texts = [normalizer.normalize_str(text) if normalizer else text for text in _CORPUS]
    return sorted({word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(text)})


def _byte_bpe(specials: list[str], words: list[str], suffix: str = "") -> tuple[dict[str, int], list]:
    """A byte-level BPE written from the corpus: every byte, then merges that spell each corpus word.

    Written rather than trained: `tokenizers`' trainers break ties in hash order, so two builds differ.
    """
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*specials, *alphabet, *([char + suffix for char in alphabet] if suffix else [])]
    vocab, merges = {token: i for i, token in enumerate(tokens)}, []
    for word in words:
        pieces = [*word[:-1], word[-1] + suffix]
        merged = pieces[0]
        for piece in pieces[1:]:
            if merged + piece not in vocab:
                vocab[merged + piece] = len(vocab)
                merges.append((merged, piece))
            merged += piece
    return vocab, merges


def _clip_tokenizer() -> Any:
    """CLIP's byte-level BPE (lower-cased, words end in </w>) with a vocabulary from the corpus."""
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer  # CLIP's own normalizer and pre-tokenizer
    words = _corpus_words(backend.pre_tokenizer, backend.normalizer)
    vocab, merges = _byte_bpe(["<|startoftext|>", "<|endoftext|>"], words, suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_TEXT_LEN)


def _llama_tokenizer() -> Any:
    """Llama 3's shape: byte-level BPE, <|begin_of_text|> prepended, saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _byte_bpe([bos, "<|end_of_text|>", eos], _corpus_words(byte_level))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer, backend.decoder = byte_level, decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, model_max_length=_TEXT_LEN
    )


def _t5_tokenizer() -> Any:
    """T5's shape: a SentencePiece-style Unigram with <pad>=0, </s>=1, <unk>=2; corpus words, then chars."""
    from transformers import T5Tokenizer

    words = _corpus_words(T5Tokenizer(extra_ids=0).backend_tokenizer.pre_tokenizer)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(word, -4.0) for word in words if word != "▁"] + [(char, -8.0) for char in _ALPHABET]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_TEXT_LEN)


def _tiny_clip(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=_CLIP_DIM, intermediate_size=64, projection_dim=_CLIP_DIM,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=_TEXT_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _tiny_t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=_T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _tiny_llama(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=_LLAMA_DIM, intermediate_size=64,
        num_hidden_layers=_LLAMA_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=_TEXT_LEN * 2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_vae() -> Any:
    """Two blocks, so 2x downsampling (the real VAE: 8x), with HiDream's scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def tiny_transformer() -> Any:
    """One double- and one single-stream MoE block; 32x32 latents, so 256 image tokens."""
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_channels=[_T5_DIM, _LLAMA_DIM],
        text_emb_dim=2 * _CLIP_DIM, num_routed_experts=4, num_activated_experts=2,
        axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=list(range(_LLAMA_LAYERS)),
    ).eval()
