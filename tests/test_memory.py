"""Memory plans: the planner on HiDream's real sizes (meta tensors), and every mechanism that runs on a CPU
(int8 weight-only, streaming hooks) on tiny random weights, against the resident pipeline's images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from services import load_offline

from jobs.errors import ConfigError
from jobs.models import MODELS
from jobs.settings import RunnerSettings, Settings
from worker.runners import memory
from worker.runners.base import GenerateRequest
from worker.runners.fullsize import random_inputs
from worker.runners.hidream_i1 import HiDreamI1Runner
from worker.runners.memory import PLANS, GiB, choose_plan, module_bytes, peak_bytes, real_sizes
from worker.runners.tiny import make_tiny, tiny_transformer

# what torch.cuda.mem_get_info reports as total on a card of each size (RTX 4090, L40S, H100, H200)
CARDS = {"24 GB": 23.6 * GiB, "48 GB": 44.4 * GiB, "80 GB": 79.1 * GiB, "141 GB": 139.8 * GiB}
REQUEST = GenerateRequest(
    prompt="a cat holding a sign that says hello",
    steps=2,
    seed=7,
    width=64,
    height=64,
    guidance_scale=5.0,
    negative_prompt="blurry",
    scheduler="flow_unipc",
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    return {"i1-full": make_tiny("i1-full", tmp_path_factory.mktemp("tiny") / "i1-full")}


def runner(tiny_dirs, plan: str, **options) -> HiDreamI1Runner:
    def build(model, weights):
        return HiDreamI1Runner(model, weights, options=RunnerSettings(memory_plan=plan, **options))

    return load_offline(build, ["i1-full"], tiny_dirs)["i1-full"]


@pytest.fixture(scope="module")
def resident(tiny_dirs) -> np.ndarray:
    return pixels(runner(tiny_dirs, "resident").generate(REQUEST).images[0])


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# ---- the planner, on HiDream's real sizes --------------------------------------------------------


def test_real_sizes_come_from_the_published_configs_on_meta_tensors():
    sizes = real_sizes()
    published = {
        "transformer": 17_105_733_184,
        "text_encoder_4": 8_030_261_248,
        "text_encoder_3": 4_762_310_656,
        "text_encoder": 123_781_632,
        "text_encoder_2": 694_878_720,
        "vae": 83_819_683,
    }  # parameters
    assert sizes.weights.keys() == published.keys()
    for name, count in published.items():  # bf16: two bytes a parameter, + a few buffers (rotary, position ids)
        assert 0 <= sizes.weights[name] - 2 * count < 4096, name
    assert 17.5e9 < sizes.int8["transformer"] < 17.8e9  # 16.56 B block weights in int8, the rest bf16
    assert 8.5e9 < sizes.int8["text_encoder_4"] < 8.6e9  # the embedding table stays bf16 (1 GB)
    assert sizes.largest_group["transformer"] < GiB and sizes.largest_group["text_encoder_4"] < 1.1e9
    assert sizes.activations["e1-1"] > sizes.activations["e1-full"] > sizes.activations["i1-full"] > GiB
    assert 0 < sizes.extra["e1-full"] < 0.5e9  # rank-16 LoRA and two copies of the full tensors


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize(
    ("card", "plan"), [("24 GB", "int8"), ("48 GB", "text-cpu"), ("80 GB", "resident"), ("141 GB", "resident")]
)
def test_planner_picks_the_fastest_plan_that_fits_the_card(model, card, plan):
    card_bytes = int(CARDS[card])
    choice = choose_plan(model, card_bytes, real_sizes())
    assert choice.plan.name == plan
    assert choice.peak_bytes <= choice.budget_bytes == int(memory.USABLE * card_bytes)
    assert choice.reason.startswith(f"{plan}: needs ")


@pytest.mark.parametrize(("card", "plan"), [("80 GB", "text-cpu"), ("141 GB", "resident")])
def test_memory_already_taken_on_the_card_counts_against_the_plan(card, plan):
    """A worker plans on the free memory: E1.1 as it loads today puts its editing transformer on the card
    before the pipeline, so on an 80 GB card the text encoders stay in CPU memory (as TEXT_ENCODERS=auto did)."""
    free = int(CARDS[card]) - real_sizes().weights["transformer"]
    assert choose_plan(None, free, real_sizes()).plan.name == plan


def test_a_card_smaller_than_24_gb_streams_the_int8_transformer_and_a_tiny_one_is_refused():
    assert choose_plan("i1-full", 12 * GiB, real_sizes()).plan.name == "int8-stream"
    with pytest.raises(ConfigError, match=r"no memory plan fits i1-full in 4\.0 GiB.*int8-stream \d+\.\d GiB"):
        choose_plan("i1-full", 4 * GiB, real_sizes())


def test_plan_peaks_shrink_down_the_auto_order():
    peaks = [peak_bytes(PLANS[name], "e1-1", real_sizes()) for name in memory.AUTO_ORDER]
    assert peaks == sorted(peaks, reverse=True)
    # streaming holds two leaves in flight while encoding (Llama's 1 GB embedding table, prefetched)
    streamed, on_cpu = (peak_bytes(PLANS[name], "i1-full", real_sizes()) for name in ("text-stream", "text-cpu"))
    assert streamed > on_cpu


def test_the_worker_logs_the_plan_it_chose_and_why(monkeypatch, caplog):
    """A GPU cannot run here: the device's memory and the loaded pipeline's sizes stand in for one."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(22.9 * GiB), int(CARDS["24 GB"])))
    monkeypatch.setattr(memory, "pipeline_sizes", lambda pipe: real_sizes())
    with caplog.at_level(logging.INFO, "dreambatch.worker"):
        choice = memory.plan_for("auto", "i1-full", "cuda:0", pipe=None)
    assert choice.plan.name == "int8"
    assert "memory plan int8 (transformer and Llama int8 weight-only" in caplog.text
    assert "resident 59.6 GiB, text-cpu 34.3 GiB would not fit" in caplog.text
    assert "22.9 of 23.6 GiB free on cuda:0" in caplog.text


def test_memory_plan_comes_from_the_environment_and_text_encoders_stays_its_older_spelling(monkeypatch):
    assert RunnerSettings.model_fields["memory_plan"].annotation.__args__ == memory.PLAN_NAMES
    monkeypatch.setenv("DREAMBATCH_RUNNER__MEMORY_PLAN", "int8")
    assert Settings().runner.effective_memory_plan() == "int8"
    assert RunnerSettings().effective_memory_plan() == "auto"
    assert RunnerSettings(text_encoders="cpu").effective_memory_plan() == "text-cpu"
    assert RunnerSettings(text_encoders="device").effective_memory_plan() == "resident"
    with pytest.raises(ValueError, match="text_encoders='cpu' and runner.memory_plan='int8' are both set"):
        RunnerSettings(memory_plan="int8", text_encoders="cpu")


# ---- int8 weight-only ----------------------------------------------------------------------------


def test_int8_weight_only_transformer_stays_close_to_fp32_in_a_quarter_of_the_block_bytes():
    torch.manual_seed(0)
    transformer = tiny_transformer()
    inputs = random_inputs(transformer, 1, 256, 256, "cpu", torch.float32, torch.Generator().manual_seed(1))
    blocks = [*transformer.double_stream_blocks, *transformer.single_stream_blocks]
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        fp32_blocks, computed = sum(module_bytes(b) for b in blocks), memory.int8_bytes("transformer", transformer)
        memory.quantize_int8("transformer", transformer)
        got = transformer(**inputs)[0]
    assert module_bytes(transformer) == computed  # the planner's int8 size is torchao's layout
    assert sum(module_bytes(b) for b in blocks) < 0.3 * fp32_blocks  # 1 byte a weight instead of 4, + row scales
    assert type(transformer.x_embedder.proj.weight) is torch.nn.Parameter  # outside the blocks: untouched
    assert (got - expected).norm() / expected.norm() < 0.01


def test_int8_weight_only_llama_hidden_states_stay_close_to_fp32(tiny_dirs):
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(tiny_dirs["i1-full"] / "text_encoder_4")
    ids = torch.randint(0, llama.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = llama(ids, output_hidden_states=True).hidden_states[-1]
        before, computed = module_bytes(llama), memory.int8_bytes("text_encoder_4", llama)
        memory.quantize_int8("text_encoder_4", llama)
        got = llama(ids, output_hidden_states=True).hidden_states[-1]
    assert module_bytes(llama) == computed < before
    assert type(llama.model.embed_tokens.weight) is torch.nn.Parameter
    assert (got - expected).norm() / expected.norm() < 0.01


@pytest.fixture(scope="module")
def int8_image(tiny_dirs) -> np.ndarray:
    quantized = runner(tiny_dirs, "int8")
    pipe = quantized.load()
    assert type(pipe.transformer.single_stream_blocks[0].block.attn1.to_q.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder_4.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert type(pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight) is torch.nn.Parameter
    return pixels(quantized.generate(REQUEST).images[0])


def test_int8_plan_images_stay_within_a_pixel_or_so_of_resident(int8_image, resident):
    assert psnr(int8_image, resident) > 40 and np.abs(int8_image - resident).max() <= 4


def test_quantized_experts_are_never_stacked_for_grouped_routing():
    from worker.runners.moe import describe, install_moe_dispatch

    transformer = tiny_transformer()
    memory.quantize_int8("transformer", transformer)
    assert install_moe_dispatch(transformer, "grouped") == "grouped"
    assert describe(transformer)["modes"] == ["dense"]  # as for LoRA'd experts: int8 weights cannot stack


# ---- streaming (diffusers group offloading) ------------------------------------------------------


def grouped_tensors(module: torch.nn.Module) -> set[int]:
    """ids of every tensor some group-offloading hook under `module` moves."""
    found: set[int] = set()
    for sub in module.modules():
        hook = getattr(sub, "_diffusers_hook", None) and sub._diffusers_hook.get_hook("group_offloading")
        if hook:
            group = hook.group
            found |= {id(t) for m in group.modules for t in (*m.parameters(), *m.buffers())}
            found |= {id(t) for t in (*group.parameters, *group.buffers)}
    return found


@pytest.mark.parametrize(
    ("plan", "streamed", "same_as"),
    [
        ("text-stream", memory.TEXT_ENCODERS, "resident"),
        ("stream", (*memory.TEXT_ENCODERS, "transformer"), "resident"),
        ("int8-stream", (*memory.TEXT_ENCODERS, "transformer"), "int8"),
    ],
)
def test_streamed_components_are_hooked_whole_and_give_the_same_images(
    tiny_dirs, resident, int8_image, monkeypatch, plan, streamed, same_as
):
    """On a CPU the onload device is the CPU, so streaming moves nothing; what can be checked is that every
    weight of a streamed component belongs to an offload group (on a GPU one left out is a device mismatch),
    that the groups onload as the pipeline runs, and that the images are those of the unstreamed plan."""
    from diffusers.hooks.group_offloading import ModuleGroup

    onloads: list[ModuleGroup] = []
    original = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: (onloads.append(self), original(self))[1])
    pipe = (streaming := runner(tiny_dirs, plan)).load()
    for name in streamed:
        module = getattr(pipe, name)
        assert memory.streamed_onto(module) == torch.device("cpu"), name
        assert grouped_tensors(module) == {id(t) for t in (*module.parameters(), *module.buffers())}, name
    assert memory.streamed_onto(pipe.vae) is None
    image = pixels(streaming.generate(REQUEST).images[0])
    assert onloads, "the hooks moved groups while the pipeline ran"
    if "transformer" in streamed:  # one block at a time
        assert any(group.modules == [pipe.transformer.double_stream_blocks[0]] for group in onloads)
    assert np.array_equal(image, resident if same_as == "resident" else int8_image)


def test_auto_on_a_cpu_device_is_resident_and_leaves_outputs_unchanged(tiny_dirs, resident):
    default = runner(tiny_dirs, "auto")
    pipe = default.load()
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in pipe.transformer.parameters())
    assert all(memory.streamed_onto(getattr(pipe, name)) is None for name in memory.TEXT_ENCODERS)
    assert np.array_equal(pixels(default.generate(REQUEST).images[0]), resident)
