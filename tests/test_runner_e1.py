"""HiDream-E1 runner on tiny random weights: layout, canvas, seeds, refine switching, guidance, weight lookup."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HiDreamImageTransformer2DModel
from PIL import Image
from safetensors import safe_open
from services import fake_hub_snapshot, load_offline, torch_threads

from jobs.errors import ModelError
from jobs.settings import RunnerSettings
from worker.runners.base import EditRequest
from worker.runners.hidream_e1 import HiDreamE1Runner, canvas_size, edit_prompts
from worker.runners.layout import LORA_FILE
from worker.runners.tiny import make_tiny
from worker.runners.weights import LLAMA_HUB_ID, WeightsNotFound
from worker.runners.weights_e1 import resolve_edit_weights, split_lora_file

EDITING = ["e1-1", "e1-full"]
CANVAS = {"e1-1": (64, 48), "e1-full": (48, 48)}  # what canvas_size gives a 4:3 input on the tiny models


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models spend their time in thread hand-offs; one thread is faster and steadier on a busy CI box."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-e1")
    return {model: make_tiny(model, root / model) for model in EDITING}


@pytest.fixture(scope="module")
def runners(tiny_dirs) -> dict[str, HiDreamE1Runner]:
    return load_offline(HiDreamE1Runner, EDITING, tiny_dirs)


def source_image(width: int, height: int) -> Image.Image:
    """A real picture, not noise: a colour gradient with a dark square in it."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, 255 - x], axis=-1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 20
    return Image.fromarray(pixels.astype(np.uint8))


def request(model: str, **overrides) -> EditRequest:
    width, height = CANVAS[model]
    fields = {
        "image": source_image(width, height),
        "instruction": "make it a watercolor painting",
        "target_description": "a watercolor painting of a lighthouse",
        "width": width,
        "height": height,
        "steps": 3,
        "seed": 7,
        "refine_strength": 0.0,
    } | overrides
    return EditRequest(**fields)


def pixels(image: Image.Image) -> bytes:
    return image.tobytes()


# ---- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", EDITING)
def test_tiny_weights_have_the_hub_layout_with_a_whole_i1_full_inside(tiny_dirs, model):
    folder = tiny_dirs[model]
    i1_full = json.loads((folder / "refine" / "model_index.json").read_text())
    assert i1_full["_class_name"] == "HiDreamImagePipeline" and i1_full["scheduler"][1] == "UniPCMultistepScheduler"
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) == 2 and all((folder / "transformer" / shard).is_file() for shard in shards), (
        "the transformer ships in shards with an index, as on the hub"
    )
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 8_000_000
    if model == "e1-1":
        assert not (folder / "model_index.json").exists(), "HiDream-E1-1 is read for its transformer alone"
    else:
        published = json.loads((folder / "model_index.json").read_text())
        assert published["_class_name"] == "HiDreamImageEditingPipeline"
        with safe_open(folder / LORA_FILE, "pt") as weights:
            keys = list(weights.keys())
        assert any(".lora_A.default." in key for key in keys) and any(".lora_B.default." in key for key in keys)
        assert [key for key in keys if ".lora_" not in key], "the full tensors E1 replaces ride along"


@pytest.mark.parametrize("model", EDITING)
def test_make_tiny_draws_the_shared_parity_weights(tiny_dirs, model):
    """`models make-tiny` (seed 0) made ../shared/parity's weights; only their arrangement differs. (The
    diffusers parts are compared: the text encoders' random init follows the installed transformers' own.)"""
    from test_parity import PARITY

    parity = PARITY / "weights" / model
    assert parity.is_dir(), f"no parity weights at {parity}"
    for part in ("refine/transformer", "refine/vae", *(["transformer"] * (model == "e1-1"))):
        ours, theirs = _tensors(tiny_dirs[model] / part), _tensors(parity / part)
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), part


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {key: value for file in sorted(folder.glob("*.safetensors")) for key, value in load_file(file).items()}


def test_e1_full_switch_runs_edit_steps_as_the_merged_transformer_and_refine_steps_with_the_lora_off(
    runners, tiny_dirs
):
    """Adapter on = the repo's merged E1 transformer; off = I1-Full's transformer with E1's full tensors kept
    (what the published script's aliased refine state dict leaves), not I1-Full as downloaded."""
    switch = runners["e1-full"].load().transformers
    merged = HiDreamImageTransformer2DModel.from_pretrained(tiny_dirs["e1-full"] / "transformer")
    i1_full = HiDreamImageTransformer2DModel.from_pretrained(tiny_dirs["e1-full"] / "refine" / "transformer")
    _, full = split_lora_file(_tensors(tiny_dirs["e1-full"]))
    kept = HiDreamImageTransformer2DModel.from_pretrained(tiny_dirs["e1-full"] / "refine" / "transformer")
    kept.load_state_dict(full, strict=False)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 4, 24, 24, generator=generator),
        "timesteps": torch.tensor([500.0]),
        "encoder_hidden_states_t5": torch.randn(1, 8, 32, generator=generator),
        "encoder_hidden_states_llama3": torch.randn(2, 1, 8, 32, generator=generator),
        "pooled_embeds": torch.randn(1, 64, generator=generator),
        "return_dict": False,
    }
    with torch.no_grad():
        torch.testing.assert_close(switch.edit()(**inputs)[0], merged(**inputs)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(switch.refine()(**inputs)[0], kept(**inputs)[0], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(kept(**inputs)[0], i1_full(**inputs)[0], atol=1e-3)
        torch.testing.assert_close(switch.edit()(**inputs)[0], merged(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_diffusers_format_lora_keys_are_read_as_hidream_names_them():
    lora, full = split_lora_file(
        {
            "transformer.final_layer.linear.lora_A.weight": 1,
            "final_layer.linear.lora_B.default.weight": 2,
            "x_embedder.proj.bias": 3,
        }
    )
    assert lora == {"final_layer.linear.lora_A.default.weight": 1, "final_layer.linear.lora_B.default.weight": 2}
    assert full == {"x_embedder.proj.bias": 3}


# ---- canvas ---------------------------------------------------------------------------------------


def test_canvas_keeps_aspect_within_the_pixel_budget_for_e1_1_and_is_fixed_for_e1_full(runners):
    assert runners["e1-1"].canvas_size(1024, 768) == (64, 48)
    assert runners["e1-1"].canvas_size(768, 1024) == (48, 64)
    assert runners["e1-1"].canvas_size(300, 300) == (64, 64)
    assert runners["e1-full"].canvas_size(1024, 768) == (48, 48)
    # the real models: about 1 MP for E1.1, 768² for E1-Full
    assert canvas_size(1024, 768, 1024, fixed=False) == (1168, 880)
    assert canvas_size(1024, 768, 768, fixed=True) == (768, 768)
    for width, height in [(1920, 1080), (1080, 1920), (333, 777), (4000, 64), (64, 4000), (5, 5)]:
        w, h = canvas_size(width, height, 1024, fixed=False)
        assert w % 16 == h % 16 == 0 and 16 <= min(w, h) and w * h <= 1024 * 1024, (width, height)


def test_a_canvas_the_model_cannot_take_is_refused(runners):
    with pytest.raises(ModelError, match="fit it to canvas_size"):
        runners["e1-full"].edit(request("e1-full", width=64, height=64))
    big = source_image(96, 64)
    with pytest.raises(ModelError, match="at most"):
        runners["e1-1"].edit(request("e1-1", image=big, width=96, height=64))


# ---- editing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", EDITING)
def test_edit_returns_images_at_the_request_size_same_seed_same_bytes(runners, model):
    runner = runners[model]
    first, again = runner.edit(request(model)), runner.edit(request(model))
    other = runner.edit(request(model, seed=8))
    assert len(first.images) == 1 and first.seed == 7 and first.inference_s > 0
    assert first.images[0].size == CANVAS[model] and first.images[0].mode == "RGB"
    assert pixels(first.images[0]) == pixels(again.images[0])
    assert pixels(first.images[0]) != pixels(other.images[0])


@pytest.mark.parametrize("model", EDITING)
def test_refine_changes_the_result_and_leaves_the_edit_weights_intact(runners, model):
    runner = runners[model]
    plain = runner.edit(request(model, steps=4))
    refined = runner.edit(request(model, steps=4, refine_strength=0.3))
    plain_again = runner.edit(request(model, steps=4))
    assert pixels(plain.images[0]) != pixels(refined.images[0])
    assert pixels(plain.images[0]) == pixels(plain_again.images[0])


def test_e1_1_refines_its_last_steps_on_its_own_transformer_without_the_source(runners):
    runner = runners["e1-1"]
    pipe = runner.load()
    switch = pipe.transformers
    assert switch.edit() is switch.refine() is pipe.base.transformer, "E1.1 holds one transformer"
    assert pipe.base.transformer.max_seq == 512, "the edit pass's token count, kept for the refine steps"
    shapes: list[tuple[int, ...]] = []
    hook = switch.edit().register_forward_pre_hook(
        lambda _m, _a, kwargs: shapes.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True
    )
    stages: list[str] = []
    try:
        runner.edit(request("e1-1", steps=10, refine_strength=0.3), on_step=lambda step: stages.append(step.stage))
    finally:
        hook.remove()
    assert stages == ["edit"] * 7 + ["refine"] * 3  # int(10 * 0.7) = 7
    assert shapes[:7] == [(3, 4, 24, 64)] * 7, "uncond, image, image+text; target | source"
    assert shapes[7:] == [(2, 4, 24, 32)] * 3, "2-way CFG on the target alone"


def test_e1_1_never_reads_i1_full_transformer_weights(tiny_dirs, tmp_path, monkeypatch):
    """Only the VAE, text encoders, tokenizers and scheduler come from I1-Full: its transformer may be absent."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = tmp_path / "e1-1"
    shutil.copytree(tiny_dirs["e1-1"], folder)
    for weights in (folder / "refine" / "transformer").glob("*.safetensors"):
        weights.unlink()
    runner = HiDreamE1Runner("e1-1", weights=str(folder))
    out = runner.edit(request("e1-1", steps=2, refine_strength=0.5))
    assert out.images[0].size == CANVAS["e1-1"]
    assert pixels(out.images[0]) == pixels(
        HiDreamE1Runner("e1-1", weights=str(tiny_dirs["e1-1"]))
        .edit(request("e1-1", steps=2, refine_strength=0.5))
        .images[0]
    )


def test_guidance_off_takes_one_pass(runners):
    runner = runners["e1-1"]
    shapes: list[tuple[int, ...]] = []
    hook = (
        runner.load()
        .transformers.edit()
        .register_forward_pre_hook(
            lambda _m, _a, kwargs: shapes.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True
        )
    )
    try:
        out = runner.edit(request("e1-1", guidance_scale=1.0))
    finally:
        hook.remove()
    assert shapes == [(1, 4, 24, 64)] * 3 and out.images[0].size == CANVAS["e1-1"]


def test_num_images_returns_that_many(runners):
    out = runners["e1-1"].edit(request("e1-1", num_images=2))
    assert len(out.images) == 2 and pixels(out.images[0]) != pixels(out.images[1])


@pytest.mark.parametrize(
    ("model", "clip_cfg_norm"), [("e1-1", True), ("e1-1", False), ("e1-full", False), ("e1-full", True)]
)
def test_first_step_guidance_is_the_published_formula(runners, model, clip_cfg_norm):
    """Step 0 recomputed by hand: three separate transformer calls, then HiDream's guidance arithmetic."""
    runner, g, g_img = runners[model], 5.0, 4.0
    pipe = runner.load()
    req = request(
        model,
        steps=2,
        guidance_scale=g,
        image_guidance_scale=g_img,
        clip_cfg_norm=clip_cfg_norm,
        negative_prompt="low resolution, blur",
    )
    seen = []
    runner.edit(req, on_step=seen.append)
    step = seen[0]
    latents = step.latents

    # the starting noise is the seed's first draw
    expected_noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(req.seed))
    assert torch.equal(latents, expected_noise)

    # the source: VAE mode, then HiDream's shift and scaling
    vae = pipe.base.vae
    image = torch.from_numpy(np.asarray(req.image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        source = (vae.encode(image).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor

    def predict(text: str, condition: torch.Tensor) -> torch.Tensor:
        embeds = pipe.encode_text(text)
        with torch.no_grad():
            out = pipe.transformers.edit()(
                hidden_states=torch.cat([latents, condition], dim=-1),
                timesteps=step.timestep.expand(1),
                encoder_hidden_states_t5=embeds.t5,
                encoder_hidden_states_llama3=embeds.llama,
                pooled_embeds=embeds.pooled,
                return_dict=False,
            )[0]
        return -out[..., : latents.shape[-1]]

    prompt, negative = edit_prompts(model, req)[0], req.negative_prompt
    uncond = predict(prompt if clip_cfg_norm else negative, torch.zeros_like(source))
    image_cond = predict(negative, source)
    full = predict(prompt, source)
    if clip_cfg_norm:
        text = image_cond + g * (full - image_cond)
        scale = (full.norm(dim=1, keepdim=True) / (text.norm(dim=1, keepdim=True) + 1e-8)).clamp(max=1.0)
        assert (scale < 1).any(), "the clip must bite somewhere, or this checks nothing"
        expected = uncond + g_img * (text * scale - uncond)
    else:
        expected = uncond + g_img * (image_cond - uncond) + g * (full - image_cond)
    assert step.index == 0 and step.stage == "edit"
    torch.testing.assert_close(step.noise_pred, expected, rtol=1e-4, atol=1e-5)


def test_e1_full_prompts_follow_its_training_format(runners):
    req = request(
        "e1-full",
        instruction="Convert the image into a Ghibli style.",
        target_description="A person in a light pink t-shirt, in a Ghibli style.",
        clip_cfg_norm=False,
    )
    prompt, refine = edit_prompts("e1-full", req)
    assert prompt == (
        "Editing Instruction: Convert the image into a Ghibli style. "
        "Target Image Description: A person in a light pink t-shirt, in a Ghibli style."
    )
    assert refine == "A person in a light pink t-shirt, in a Ghibli style."
    no_description = "Editing Instruction: make it a watercolor painting."
    assert edit_prompts("e1-full", request("e1-full", target_description="")) == (no_description, no_description)
    full = "Editing Instruction: add a hat. Target Image Description: a cat in a hat"
    assert edit_prompts("e1-full", request("e1-full", prompt=full, target_description="")) == (full, "a cat in a hat")
    assert edit_prompts("e1-1", request("e1-1")) == (
        "make it a watercolor painting",
        "a watercolor painting of a lighthouse",
    )
    with pytest.raises(ModelError, match="instruction or a prompt"):
        edit_prompts("e1-1", request("e1-1", instruction=""))

    pipe, encoded = runners["e1-full"].load(), []
    original = pipe.encode_text
    pipe.encode_text = lambda text: encoded.append(text) or original(text)
    try:
        runners["e1-full"].edit(replace(req, refine_strength=0.5, steps=2))
    finally:
        del pipe.encode_text
    assert encoded == [req.negative_prompt, prompt, refine]  # each text once: uncond, image, full; refine


def test_switch_cost_is_reported_for_both_directions(runners):
    for runner in runners.values():
        cost = runner.switch_cost(repeats=2)
        assert set(cost) == {"to_refine", "to_edit"} and all(0 <= s < 1.0 for s in cost.values())


# ---- weight lookup --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "hub_id"), [("e1-1", "HiDream-ai/HiDream-E1-1"), ("e1-full", "HiDream-ai/HiDream-E1-Full")]
)
def test_missing_weights_raise_weights_not_found_naming_the_hub_ids(tmp_path, monkeypatch, model, hub_id):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsNotFound) as caught:
        resolve_edit_weights(model)
    message = str(caught.value)
    assert hub_id in message and str(tmp_path / "hub") in message
    assert f"hf download {hub_id}" in message and "hf download HiDream-ai/HiDream-I1-Full" in message
    assert LLAMA_HUB_ID in message and "--weights tiny" in message
    assert str(pickle.loads(pickle.dumps(caught.value))) == message


def test_a_local_e1_folder_without_i1_full_names_where_it_looked(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bare = tmp_path / "e1-1"
    shutil.copytree(tiny_dirs["e1-1"], bare, ignore=shutil.ignore_patterns("refine"))
    with pytest.raises(WeightsNotFound, match="HiDream-ai/HiDream-I1-Full") as caught:
        resolve_edit_weights("e1-1", str(bare))
    message = str(caught.value)
    assert str(bare / "refine") in message and str(tmp_path / "hub") in message
    assert "DREAMBATCH_RUNNER__I1_FULL" in message and "--exclude 'transformer/*'" in message


def test_components_can_live_anywhere_named_by_settings(tiny_dirs, tmp_path, monkeypatch):
    """A transformer-only E1.1 folder, I1-Full in a folder of its own, Llama cached under its older name."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    tiny = tiny_dirs["e1-1"]
    transformer = tmp_path / "e1-1-transformer"
    shutil.copytree(tiny / "transformer", transformer)
    i1_full = tmp_path / "i1-full"
    shutil.copytree(tiny / "refine", i1_full, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    llama = fake_hub_snapshot(
        tmp_path / "hub", "meta-llama/Meta-Llama-3.1-8B-Instruct", tiny / "refine" / "text_encoder_4"
    )
    for file in (tiny / "refine" / "tokenizer_4").iterdir():
        shutil.copy(file, llama)

    with pytest.raises(WeightsNotFound, match="HiDream-I1-Full"):
        resolve_edit_weights("e1-1", str(transformer))
    options = RunnerSettings(i1_full=str(i1_full))
    found = resolve_edit_weights("e1-1", str(transformer), options)
    assert found.transformer_dir == transformer and found.components.pipeline_dir == i1_full
    assert found.components.llama_dir == llama, "the alias HiDream's READMEs use is found in the cache"
    named = RunnerSettings(i1_full=str(i1_full), llama=str(tiny / "refine" / "text_encoder_4"))
    explicit = resolve_edit_weights("e1-1", str(transformer), named)
    assert explicit.components.llama_dir == tiny / "refine" / "text_encoder_4"
    with pytest.raises(WeightsNotFound, match="DREAMBATCH_RUNNER__LLAMA"):
        resolve_edit_weights("e1-1", str(transformer), RunnerSettings(i1_full=str(i1_full), llama=str(tmp_path)))
    runner = HiDreamE1Runner("e1-1", weights=str(transformer), options=options)
    assert runner.edit(request("e1-1", steps=2)).images[0].size == CANVAS["e1-1"]


def test_e1_full_resolves_from_the_cache_with_only_its_lora_file(tiny_dirs, tmp_path, monkeypatch):
    """`hf download HiDream-ai/HiDream-E1-Full HiDream-E1-Full.safetensors` + I1-Full + Llama is enough."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    tiny = tiny_dirs["e1-full"]
    lora_only = tmp_path / "lora-only"
    lora_only.mkdir()
    shutil.copy(tiny / LORA_FILE, lora_only)
    e1 = fake_hub_snapshot(tmp_path, "HiDream-ai/HiDream-E1-Full", lora_only)
    i1 = fake_hub_snapshot(tmp_path, "HiDream-ai/HiDream-I1-Full", tiny / "refine", "text_encoder_4", "tokenizer_4")
    llama = fake_hub_snapshot(tmp_path, LLAMA_HUB_ID, tiny / "refine" / "text_encoder_4")
    for file in (tiny / "refine" / "tokenizer_4").iterdir():
        shutil.copy(file, llama)

    found = resolve_edit_weights("e1-full")
    assert found.lora_file == e1 / LORA_FILE and found.transformer_dir == i1 / "transformer"
    assert found.components.pipeline_dir == i1 and found.components.llama_dir == llama
    assert found.source == "hub:HiDream-ai/HiDream-E1-Full"
    runner = HiDreamE1Runner("e1-full", weights=None)
    out = runner.edit(request("e1-full", steps=2))
    assert out.images[0].size == CANVAS["e1-full"] and runner.source == found.source
