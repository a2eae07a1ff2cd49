"""Speed work that must not change outputs: sync-free expert routing, padding folded into one token, the
prompt cache and micro-batching, on tiny random weights on the CPU. Timings live in bench/, not here."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from services import load_offline

from jobs.services import Services
from jobs.settings import RunnerSettings, Settings
from worker.runners.base import EditRequest, GenerateRequest
from worker.runners.batching import MicroBatcher
from worker.runners.fullsize import build_transformer, cost
from worker.runners.hidream_e1 import HiDreamE1Runner
from worker.runners.hidream_i1 import HiDreamI1Runner
from worker.runners.moe import grouped_agrees, install_moe_dispatch, moe_layers
from worker.runners.padding import install_fold_padding, remove_fold_padding
from worker.runners.tiny import _tiny_lora_over, make_tiny, tiny_transformer
from worker.runners.weights_e1 import add_lora_adapter, split_lora_file
from worker.runtime import Runtime


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def transformers() -> dict[str, torch.nn.Module]:
    """Tiny I1, E1.1 (a plain transformer seeing [target | source]) and E1-Full (experts LoRA-wrapped)."""
    torch.manual_seed(0)
    i1 = tiny_transformer()
    e1_1 = tiny_transformer()
    e1_1.max_seq = 2 * i1.max_seq
    e1_full = copy.deepcopy(i1)
    _, contents = _tiny_lora_over(i1)
    add_lora_adapter(e1_full, split_lora_file(contents)[0])
    e1_full.max_seq = 2 * i1.max_seq
    return {"i1": i1, "e1-1": e1_1, "e1-full": e1_full}


def forward(transformer, latents: torch.Tensor) -> torch.Tensor:
    batch = latents.shape[0]
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        return transformer(
            hidden_states=latents,
            timesteps=torch.full((batch,), 500.0),
            encoder_hidden_states_t5=torch.randn(batch, 16, 32, generator=generator),
            encoder_hidden_states_llama3=torch.randn(2, batch, 16, 32, generator=generator),
            pooled_embeds=torch.randn(batch, 64, generator=generator),
            return_dict=False,
        )[0]


# I1 square, 4:3 (25% padding: folded) and 36x26 (9%: below FOLD_MIN_SHARE, left padded); E1 [target | source]
# of a square canvas (fills max_seq) and of a 4:3 one (folded)
INPUTS = {"i1": [(32, 32), (24, 32), (36, 26)], "e1-1": [(32, 64), (24, 64)], "e1-full": [(32, 64), (24, 64)]}


@pytest.mark.parametrize("mode", ["grouped", "dense"])
def test_sync_free_expert_routing_gives_diffusers_outputs(mode):
    tiny = transformers()
    for name, transformer in tiny.items():
        routed = copy.deepcopy(transformer)
        assert install_moe_dispatch(routed, mode) == mode
        for shape in INPUTS[name]:
            latents = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(2))
            expected, got = forward(transformer, latents), forward(routed, latents)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name} {shape}")
        assert install_moe_dispatch(routed, "off") == "off"
        torch.testing.assert_close(forward(routed, latents), expected, rtol=0, atol=0)
    # "auto" leaves a CPU transformer on diffusers' path; on CUDA it first checks grouped against it, like this
    assert install_moe_dispatch(copy.deepcopy(tiny["i1"]), "auto") == "off"
    assert grouped_agrees(moe_layers(tiny["i1"])[0])
    assert not grouped_agrees(moe_layers(tiny["e1-full"])[0]), "stacked weights would drop the experts' LoRA"


def test_sync_free_routing_traces_as_one_graph_where_diffusers_breaks():
    """torch.compile(fullgraph=True) refuses any graph break: a .cpu(), .item() or data-dependent shape,
    the ops that sync a GPU with its host. The eager backend traces without compiling kernels."""
    torch._dynamo.reset()
    transformer = transformers()["i1"]
    layer = moe_layers(transformer)[0]
    tokens = torch.randn(2, 64, 32)

    def traces(module, *args, **kwargs) -> bool:
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                torch.compile(module, fullgraph=True, backend="eager")(*args, **kwargs)
        except torch._dynamo.exc.Unsupported:
            return False
        except torch._dynamo.exc.UserError:  # data-dependent sizes
            return False
        return True

    assert not traces(layer, tokens), "diffusers' routing syncs (bincount().cpu()) and breaks the graph"
    dense = copy.deepcopy(layer)
    install_moe_dispatch(torch.nn.ModuleList([dense]), "dense")
    assert traces(dense, tokens)
    grouped = copy.deepcopy(layer).to(torch.bfloat16)  # grouped_mm's tracing rule asks for bf16, as CUDA does
    install_moe_dispatch(torch.nn.ModuleList([grouped]), "grouped")
    assert traces(grouped, tokens.bfloat16())

    # whole blocks, attention included, trace as one graph once routing is sync-free
    captured = {}

    def keep(name):
        def hook(module, args, kwargs):
            captured[name] = kwargs

        return hook

    transformer.double_stream_blocks[0].register_forward_pre_hook(keep("double"), with_kwargs=True)
    transformer.single_stream_blocks[0].register_forward_pre_hook(keep("single"), with_kwargs=True)
    forward(transformer, torch.randn(1, 4, 32, 32))
    install_moe_dispatch(transformer, "dense")
    assert traces(transformer.double_stream_blocks[0], **captured["double"])
    assert traces(transformer.single_stream_blocks[0], **captured["single"])


def test_padding_folded_into_one_token_gives_the_padded_outputs():
    for name, transformer in transformers().items():
        folded = copy.deepcopy(transformer)
        install_fold_padding(folded)
        for shape in INPUTS[name]:
            latents = torch.randn(2, 4, *shape, generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(
                forward(folded, latents), forward(transformer, latents), rtol=1e-5, atol=1e-5, msg=f"{name} {shape}"
            )
        remove_fold_padding(folded)  # back to diffusers' own path (the benchmark switches in place)
        latents = torch.randn(2, 4, *INPUTS[name][-1], generator=torch.Generator().manual_seed(3))
        assert torch.equal(forward(folded, latents), forward(transformer, latents))

    # simply not padding is not the same model: zeroed keys still take attention weight
    transformer = transformers()["i1"]
    latents = torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(3))
    padded = forward(transformer, latents)
    transformer.max_seq = 12 * 16  # exactly the tokens of a 24x32 latent: no padding
    assert (forward(transformer, latents) - padded).abs().max() > 1e-3


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {model: make_tiny(model, root / model) for model in ["i1-fast", "i1-full", "e1-1"]}


@pytest.fixture(scope="module")
def runners(tiny_dirs):
    return load_offline(HiDreamI1Runner, ["i1-fast", "i1-full"], tiny_dirs)


def count_encoder_calls(pipe) -> list[int]:
    calls = [0]
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
        getattr(pipe, name).register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_a_second_item_with_the_same_prompts_skips_the_text_encoders(runners, tiny_dirs):
    runner = runners["i1-full"]
    pipe = runner.load()
    calls = count_encoder_calls(pipe)
    request = GenerateRequest(
        prompt="a watercolor painting of a lighthouse at dusk",
        negative_prompt="blurry",
        guidance_scale=5.0,
        steps=2,
        seed=4,
        scheduler="flow_unipc",
        width=48,
        height=64,
    )
    first = runner.generate(request)
    assert calls[0] == 8  # four encoders, prompt and negative prompt
    second = runner.generate(GenerateRequest(**{**request.__dict__, "seed": 5}))
    again = runner.generate(request)
    assert calls[0] == 8 and runner.prompts.hits >= 4
    assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))
    assert not np.array_equal(pixels(second.images[0]), pixels(first.images[0]))

    # the cached embeddings give the image diffusers' own prompt path gives
    pipe.scheduler = runner._scheduler("flow_unipc", 3.0)
    with torch.inference_mode():
        reference = pipe(
            prompt=request.prompt,
            negative_prompt="blurry",
            guidance_scale=5.0,
            width=48,
            height=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(4),
        ).images[0]
    assert np.abs(pixels(reference) - pixels(first.images[0])).max() <= 1

    # E1: the same instruction on another image encodes nothing
    options = RunnerSettings(text_encoders="cpu")  # on a CPU worker this keeps them where they are
    editor = load_offline(lambda model, weights: HiDreamE1Runner(model, weights, options=options), ["e1-1"], tiny_dirs)[
        "e1-1"
    ]
    edit_calls = count_encoder_calls(editor.load().base)
    images = [Image.new("RGB", (64, 48), colour) for colour in ("red", "navy")]
    edits = [
        editor.edit(
            EditRequest(image=image, instruction="make it snowy", width=64, height=48, steps=2, refine_strength=0.5)
        )
        for image in images
    ]
    assert edit_calls[0] == 8 and editor.prompts.hits > 0
    fresh = HiDreamE1Runner("e1-1", str(tiny_dirs["e1-1"]), options=RunnerSettings(prompt_cache_mb=0))
    uncached = fresh.edit(
        EditRequest(image=images[1], instruction="make it snowy", width=64, height=48, steps=2, refine_strength=0.5)
    )
    assert np.array_equal(pixels(uncached.images[0]), pixels(edits[1].images[0]))


def run_together(batcher: MicroBatcher, requests: list[GenerateRequest]) -> list:
    """Each request from its own thread, as the worker's item threads call the runner."""
    results: list = [None] * len(requests)

    def one(n: int) -> None:
        try:
            results[n] = batcher.generate(requests[n])
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("model, scheduler, guidance", [("i1-fast", "flash_flow", 0.0), ("i1-full", "flow_unipc", 5.0)])
def test_micro_batch_gives_each_item_its_own_image_and_a_bad_item_fails_alone(runners, model, scheduler, guidance):
    runner = runners[model]
    requests = [
        GenerateRequest(
            prompt=prompt,
            negative_prompt="blurry",
            seed=seed,
            steps=2,
            scheduler=scheduler,
            guidance_scale=guidance,
            width=64,
            height=48,
        )
        for prompt, seed in [("a photo of a cat", 11), ("an astronaut riding a horse", 12), ("a cat", 13)]
    ]
    alone = [runner.generate(request).images[0] for request in requests]

    batcher = MicroBatcher(runner, max_batch=3, window_s=30.0)  # the batch is full long before the window
    together = run_together(batcher, requests)
    assert batcher.batch_sizes == [3]
    for single, batched in zip(alone, together, strict=True):
        assert np.abs(pixels(single) - pixels(batched.images[0])).max() <= 2

    poisoned = [*requests[:2], GenerateRequest(**{**requests[2].__dict__, "seed": 2**64})]  # no generator takes it
    results = run_together(batcher, poisoned)
    assert batcher.batch_sizes == [3, 3]  # the batch failed, then its items ran one by one
    assert isinstance(results[2], ValueError)
    for single, batched in zip(alone[:2], results[:2], strict=True):
        assert np.array_equal(pixels(single), pixels(batched.images[0]))


def test_requests_that_render_at_one_size_batch_together_and_a_cancel_leaves_its_batch_at_a_step(runners):
    """Two requested sizes of one aspect render alike, so they share a batch; an item whose job is cancelled
    mid-batch stops at that step while the others finish with the images they get alone."""
    from jobs.errors import ItemCancelled

    runner = runners["i1-fast"]
    assert runner.rendered_size(64, 48) == runner.rendered_size(128, 96)
    requests = [
        GenerateRequest(prompt=f"a cat, take {n}", seed=n, steps=3, width=w, height=h)
        for n, (w, h) in enumerate([(64, 48), (128, 96), (64, 48)])
    ]
    alone = [runner.generate(request).images[0] for request in requests]
    steps: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def on_step(n: int, cancel_after: int | None = None):
        def check(step: int) -> None:
            steps[n].append(step)
            if cancel_after is not None and step >= cancel_after:
                raise ItemCancelled(f"stopped after step {step + 1}")

        return check

    batcher = MicroBatcher(runner, max_batch=3, window_s=30.0)
    results: list = [None] * 3

    def one(n: int, cancel_after: int | None) -> None:
        try:
            results[n] = batcher.generate(requests[n], on_step=on_step(n, cancel_after))
        except Exception as exc:
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n, 0 if n == 1 else None)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert batcher.batch_sizes == [3]
    assert isinstance(results[1], ItemCancelled) and steps[1] == [0]  # out of the batch after its first step
    assert steps[0] == steps[2] == [0, 1, 2]
    for n in (0, 2):
        assert np.abs(pixels(alone[n]) - pixels(results[n].images[0])).max() <= 2

    # every request of a batch cancelled: the batch stops there and nothing is run again one by one
    threads = [threading.Thread(target=one, args=(n, 1)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert batcher.batch_sizes == [3, 3] and all(isinstance(r, ItemCancelled) for r in results)


def test_compiled_blocks_with_sync_free_routing_give_the_same_image(runners, tiny_dirs):
    """RUNNER__COMPILE: every block compiled as one graph (aot_eager here: the CPU check of the trace; a GPU
    worker uses inductor), same pixels as the plain runner."""
    compiled = load_offline(
        lambda model, weights: HiDreamI1Runner(
            model, weights, options=RunnerSettings(moe="dense", compile="aot_eager")
        ),
        ["i1-fast"],
        tiny_dirs,
    )["i1-fast"]
    blocks = [*compiled.load().transformer.double_stream_blocks, *compiled.load().transformer.single_stream_blocks]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    request = GenerateRequest(prompt="a lighthouse", seed=3, steps=2, width=64, height=48)
    plain = runners["i1-fast"].generate(request).images[0]
    assert np.abs(pixels(plain) - pixels(compiled.generate(request).images[0])).max() <= 1


def test_the_prompt_cache_keeps_at_most_its_bytes_dropping_the_least_recently_used():
    from worker.runners.text_cache import PromptCache, TextEmbeds

    def embeds(value: float) -> TextEmbeds:  # 1,000 float32 values: 4,000 bytes
        return TextEmbeds(
            t5=torch.full((1, 10, 50), value),
            llama=torch.full((1, 1, 10, 49), value),
            pooled=torch.full((1, 10), value),
        )

    cache = PromptCache(max_bytes=10_000)  # room for two
    encoded: list[str] = []

    def get(text: str) -> TextEmbeds:
        return cache.get(text, lambda: (encoded.append(text), embeds(float(len(encoded))))[1])

    get("a")
    get("b")
    get("a")  # a is now the most recently used
    get("c")  # over the bound: b goes
    assert cache.nbytes == 8_000 and len(cache) == 2
    assert cache.peek("b") is None and cache.peek("a") is not None and cache.peek("c") is not None
    get("b")
    assert encoded == ["a", "b", "c", "b"] and cache.hits == 1 and cache.misses == 4
    assert PromptCache(max_bytes=3_000).get("big", lambda: embeds(1.0)).nbytes == 4_000  # too big to keep
    off = PromptCache(0)
    off.get("a", lambda: embeds(1.0))
    assert len(off) == 0


def test_gpu_workers_default_to_a_three_stage_pipeline_of_items_or_of_micro_batches():
    from worker.cli import PIPELINE_THREADS, default_threads
    from worker.runners.batching import AUTO_MAX

    assert default_threads("i1-fast", RunnerSettings()) == PIPELINE_THREADS == 3
    assert default_threads("e1-1", RunnerSettings(batch_max=4)) == 3  # edits are not batched
    assert default_threads("i1-fast", RunnerSettings(batch_max=4)) == 12
    assert default_threads("i1-dev", RunnerSettings(batch_max=0)) == 3 * AUTO_MAX


def test_a_batching_worker_runs_model_calls_on_the_batcher_thread_without_the_gpu_lock():
    settings = Settings(runner=RunnerSettings(batch_max=4))
    runtime = Runtime(Services(settings), model="i1-fast", weights="tiny")
    assert runtime.context().gpu_lock is not runtime.gpu_lock  # a no-op: the batcher's thread serializes
    plain = Runtime(Services(Settings()), model="i1-fast", weights="tiny")
    assert plain.context().gpu_lock is plain.gpu_lock


def test_real_size_architecture_has_hidreams_parameter_and_flop_counts():
    transformer = build_transformer("meta")  # shapes only: nothing allocated
    counted = cost(transformer, 1024, 1024)
    assert 17.0e9 < counted.total_params < 17.2e9
    assert 7.6e9 < counted.active_params < 7.8e9
    assert 77e12 < counted.flops_per_forward < 79e12 and counted.image_tokens == 4096
