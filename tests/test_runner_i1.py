"""HiDream-I1 runner on tiny random weights: layout, loading, sizes, seeds, CFG, and weight lookup."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from services import fake_hub_snapshot, load_offline

from worker.runners.base import GenerateRequest
from worker.runners.hidream_i1 import HiDreamI1Runner, native_latent_side
from worker.runners.tiny import make_tiny
from worker.runners.weights import LLAMA_HUB_ID, WeightsNotFound, resolve_weights

GENERATING = ["i1-fast", "i1-full"]
PRESET_SCHEDULERS = {"i1-full": "flow_unipc", "i1-fast": "flash_flow"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {model: make_tiny(model, root / model) for model in ["i1-fast", "i1-full", "i1-dev"]}


@pytest.fixture(scope="module")
def runners(tiny_dirs) -> dict[str, HiDreamI1Runner]:
    return load_offline(HiDreamI1Runner, GENERATING, tiny_dirs)


def request(model: str, **overrides) -> GenerateRequest:
    fields = {
        "prompt": "a cat holding a sign that says hello",
        "steps": 2,
        "seed": 7,
        "scheduler": PRESET_SCHEDULERS[model],
    } | overrides
    return GenerateRequest(**fields)


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("model", ["i1-fast", "i1-full", "i1-dev"])
def test_tiny_weights_have_the_hub_layout_and_upstream_scheduler(tiny_dirs, model):
    folder = tiny_dirs[model]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "HiDreamImagePipeline"
    assert index["transformer"] == ["diffusers", "HiDreamImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["text_encoder_4"] == ["transformers", "LlamaForCausalLM"]
    assert index["tokenizer"] == index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_3"] == ["transformers", "T5Tokenizer"]
    for part in [
        "scheduler",
        "vae",
        "transformer",
        *(f"text_encoder{s}" for s in ["", "_2", "_3", "_4"]),
        *(f"tokenizer{s}" for s in ["", "_2", "_3", "_4"]),
    ]:
        assert (folder / part).is_dir(), part
    assert list(folder.glob("*/*.safetensors")), "weights are saved as safetensors"
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 5_000_000

    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if model == "i1-full":
        assert scheduler["_class_name"] == "UniPCMultistepScheduler"
        assert scheduler["use_flow_sigmas"] and scheduler["prediction_type"] == "flow_prediction"
        assert scheduler["flow_shift"] == 3.0
    else:
        assert scheduler["_class_name"] == "FlowMatchLCMScheduler"
        assert scheduler["shift"] == {"i1-dev": 6.0, "i1-fast": 3.0}[model]


def test_tiny_builds_are_byte_identical(tmp_path):
    first, second = make_tiny("i1-fast", tmp_path / "a"), make_tiny("i1-fast", tmp_path / "b")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_real_transformer_config_renders_at_128_latents_a_side():
    assert native_latent_side(2, (128, 128)) == 128


@pytest.mark.parametrize("model", GENERATING)
def test_generates_one_image_at_the_rendered_size(runners, model):
    runner = runners[model]
    assert runner.rendered_size(1024, 1024) == (64, 64)
    out = runner.generate(request(model))
    assert len(out.images) == 1 and out.seed == 7 and out.inference_s > 0
    assert out.images[0].size == (64, 64)

    wide = runner.generate(request(model, width=1024, height=768))
    assert wide.images[0].size == runner.rendered_size(1024, 768) == (72, 52)


@pytest.mark.parametrize("model", GENERATING)
def test_same_seed_gives_same_pixels_and_another_seed_does_not(runners, model):
    runner = runners[model]
    first, again = runner.generate(request(model)), runner.generate(request(model))
    other = runner.generate(request(model, seed=8))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_num_images_returns_that_many(runners):
    out = runners["i1-fast"].generate(request("i1-fast", num_images=2))
    assert len(out.images) == 2
    assert not np.array_equal(pixels(out.images[0]), pixels(out.images[1]))


def test_guidance_with_a_negative_prompt_takes_the_cfg_path(runners):
    runner = runners["i1-full"]
    plain = runner.generate(request("i1-full"))
    guided = runner.generate(request("i1-full", guidance_scale=5.0, negative_prompt="blurry, watermark"))
    assert guided.images[0].size == (64, 64)
    assert not np.array_equal(pixels(plain.images[0]), pixels(guided.images[0]))


def test_each_scheduler_name_runs_deterministically(runners):
    runner = runners["i1-fast"]
    for name in ["flow_unipc", "flash_flow", "flow_euler"]:
        a, b = (runner.generate(request("i1-fast", scheduler=name, shift=6.0)) for _ in range(2))
        assert np.array_equal(pixels(a.images[0]), pixels(b.images[0])), name


def test_hub_id_missing_from_the_cache_raises_weights_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights("i1-fast", "HiDream-ai/HiDream-I1-Fast")
    message = str(caught.value)
    assert "HiDream-ai/HiDream-I1-Fast" in message and str(tmp_path / "hub") in message
    assert "hf download HiDream-ai/HiDream-I1-Fast" in message and "--weights tiny" in message
    assert str(pickle.loads(pickle.dumps(caught.value))) == message


def test_pipeline_without_llama_needs_the_cached_llama(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model_index.json").write_text((tiny_dirs["i1-fast"] / "model_index.json").read_text())
    with pytest.raises(WeightsNotFound, match=LLAMA_HUB_ID):
        resolve_weights("i1-fast", str(bare))


def test_tiny_weights_are_built_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMBATCH_TINY_DIR", str(tmp_path))
    first = resolve_weights("i1-fast", "tiny")
    built = (first.pipeline_dir / "model_index.json").stat().st_mtime_ns
    second = resolve_weights("i1-fast", "tiny")
    assert second == first and first.pipeline_dir == tmp_path / "i1-fast"
    assert (second.pipeline_dir / "model_index.json").stat().st_mtime_ns == built
    assert first.llama_dir == first.pipeline_dir / "text_encoder_4"
    assert [p.name for p in tmp_path.iterdir()] == ["i1-fast"], "no staging folder left behind"


def test_hub_ids_resolve_from_the_local_cache_with_the_cached_llama(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    tiny = tiny_dirs["i1-fast"]
    without_llama = ("text_encoder_4", "tokenizer_4")
    pipeline = fake_hub_snapshot(tmp_path, "HiDream-ai/HiDream-I1-Fast", tiny, *without_llama)
    llama = fake_hub_snapshot(tmp_path, LLAMA_HUB_ID, tiny / "text_encoder_4")
    for file in (tiny / "tokenizer_4").iterdir():
        shutil.copy(file, llama)

    found = resolve_weights("i1-fast")
    assert (found.pipeline_dir, found.llama_dir, found.llama_tokenizer_dir) == (pipeline, llama, llama)
    assert found.source == "hub:HiDream-ai/HiDream-I1-Fast"


def test_a_generation_model_asked_to_edit_says_which_models_edit(runners):
    from jobs.errors import ModelError

    with pytest.raises(ModelError, match="e1-1 or e1-full"):
        runners["i1-fast"].canvas_size(64, 64)
