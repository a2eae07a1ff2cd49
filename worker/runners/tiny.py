"""Tiny random-weight HiDream models, laid out like the hub repositories, for tests and CPU smoke runs.

`make_tiny(model, dir)` writes one with the real classes and the real folder layout (`--weights tiny`,
`dreambatch models make-tiny`); `ensure_tiny(model)` builds it once per machine under $DREAMBATCH_TINY_DIR.
Builds are deterministic for a seed: `../shared/parity/` holds weights made this way.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jobs.errors import ConfigError
from jobs.models import MODELS
from worker.runners.layout import EDITING_PIPELINE, LORA_FILE, LORA_TARGETS, REFINE_DIR

TINY_DIR_ENV = "DREAMBATCH_TINY_DIR"  # root for tiny weights, one folder per model
_CORPUS = [
    "a photo of a cat holding a sign that says hello",
    "an astronaut riding a horse on the moon, cinematic lighting, 8k",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, studio photo, 85mm, shallow depth of field",
    "blurry, low quality, watermark, text, jpeg artifacts",
]
_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'\"-:;()")


_TINY_LORA_RANK = 4  # the real one: 16
_TINY_FULL_TENSORS = [
    "x_embedder.proj.weight",
    "x_embedder.proj.bias",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.adaLN_modulation.1.bias",
]


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


_CLIP_DIM, _T5_DIM, _LLAMA_DIM, _LLAMA_LAYERS, _TEXT_LEN = 32, 32, 32, 2, 128


def make_tiny(model: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random pipeline for `model` to `out_dir`, laid out like the hub repos.

    HiDream-I1 models are built here; the E1 editing models (`kind == "edit"`) in `weights_e1`.
    """
    import torch

    from worker.runners.schedulers import make_scheduler  # (diffusers: only to build the weights)

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; expected one of {sorted(MODELS)}")
    if MODELS[model].kind == "edit":
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
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, model_max_length=_TEXT_LEN)


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
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_DIM,
        intermediate_size=64,
        projection_dim=_CLIP_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_TEXT_LEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _tiny_t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _tiny_llama(tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=_LLAMA_DIM,
        intermediate_size=64,
        num_hidden_layers=_LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TEXT_LEN * 2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_vae() -> Any:
    """Two blocks, so 2x downsampling (the real VAE: 8x), with HiDream's scaling and shift factors."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def tiny_transformer() -> Any:
    """One double- and one single-stream MoE block; 32x32 latents, so 256 image tokens."""
    from diffusers import HiDreamImageTransformer2DModel

    return HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[_T5_DIM, _LLAMA_DIM],
        text_emb_dim=2 * _CLIP_DIM,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=list(range(_LLAMA_LAYERS)),
    ).eval()


def make_tiny_edit(model: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random E1 folder for `model` to `out_dir`, laid out like its hub repository, with a whole
    tiny HiDream-I1-Full pipeline in `refine/` (the components both E1 scripts load from I1-Full).

    e1-1: `transformer/` is a separately drawn editing transformer, in two shards with an index file (the
    hub repo ships it sharded); nothing else, as the scripts read nothing else of HiDream-E1-1.
    e1-full: `HiDream-E1-Full.safetensors` holds a LoRA (random, non-zero) and a few perturbed full tensors
    over the I1-Full stand-in; around it a whole pipeline folder (`model_index.json` naming HiDream's editing
    pipeline class, as published) whose sharded `transformer/` is that LoRA merged in.
    """
    import torch
    from safetensors.torch import save_file

    from worker.runners.schedulers import make_scheduler  # (diffusers: only to build the weights)

    if model not in MODELS or MODELS[model].kind != "edit":
        raise ConfigError(f"unknown HiDream-E1 model {model!r}; expected e1-1 or e1-full")
    out_dir = Path(out_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        refine = tiny_transformer()
        if model == "e1-1":
            edit, adapter_file = tiny_transformer(), None
        else:
            edit, adapter_file = _tiny_lora_over(refine)
        pipe = tiny_pipeline(make_scheduler("flow_unipc", 3.0), lambda: refine)  # I1-Full's scheduler
    pipe.save_pretrained(out_dir / REFINE_DIR, safe_serialization=True)
    if adapter_file is None:
        save_sharded(edit, out_dir / "transformer")
    else:
        pipe.register_modules(transformer=edit)
        pipe.save_pretrained(out_dir, safe_serialization=True)
        index = json.loads((out_dir / "model_index.json").read_text())
        (out_dir / "model_index.json").write_text(json.dumps({**index, "_class_name": EDITING_PIPELINE}, indent=2))
        save_sharded(edit, out_dir / "transformer")
        save_file(adapter_file, out_dir / LORA_FILE)
    return out_dir


def _tiny_lora_over(base: Any) -> tuple[Any, dict[str, Any]]:
    """(merged transformer, LoRA file contents) for a random LoRA + full tensors over `base`."""
    import torch
    from peft import LoraConfig

    adapted = copy.deepcopy(base)
    config = LoraConfig(r=_TINY_LORA_RANK, lora_alpha=_TINY_LORA_RANK, target_modules=LORA_TARGETS)
    adapted.add_adapter(config)  # adapter "default", as in HiDream's file
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: a LoRA that changes nothing tests nothing
                param.normal_(0.0, 0.05)
            elif name in _TINY_FULL_TENSORS:
                param.add_(torch.randn_like(param), alpha=0.05)
    state = adapted.state_dict()
    contents = {key: value.contiguous() for key, value in state.items() if ".lora_" in key or key in _TINY_FULL_TENSORS}
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in merged.named_parameters():
            module, kind = name.rsplit(".", 1)
            a, b = state.get(f"{module}.lora_A.default.{kind}"), state.get(f"{module}.lora_B.default.{kind}")
            if kind == "weight" and a is not None and b is not None:
                param.add_(b @ a)  # scale alpha / rank = 1
            if name in _TINY_FULL_TENSORS:
                param.copy_(state[name])
    return merged, contents


def make_tiny_lora(path: Path, seed: int = 0, rank: int = _TINY_LORA_RANK) -> Path:
    """A random user LoRA for every tiny transformer (they share one shape), in diffusers' LoRA format: what a
    trainer exports and a row's `lora` names. Its B matrices are random, so it changes the image."""
    import torch
    from diffusers import HiDreamImagePipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = tiny_transformer()
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name="user")
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05)
    state = get_peft_model_state_dict(transformer, adapter_name="user")
    path.parent.mkdir(parents=True, exist_ok=True)
    HiDreamImagePipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name)
    return path
