"""dreambatch's defaults reproduce HiDream's published inference code, on the shared parity fixtures.

`../shared/parity/` holds tiny random-weight HiDream folders, inputs, `cases.json` and the final latents and
PNGs that HiDream's own code produced on them (its README says how). Every case runs here through
dreambatch's public path — a manifest row, `run_local` (what `dreambatch run` calls) or the CLI itself —
in float32 on the CPU, and is compared with the tolerance the fixtures state: final latents within 1e-4
(max abs), each PNG byte-equal or within 1 on every channel. A changed default, refine switch or guidance
rule moves latents by 0.5-2.5 and pixels by 28-130, so any of them fails here.

The fixtures are not optional: without the folder these tests fail and say where they looked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from services import torch_threads

from jobs.models import JobSpec
from jobs.settings import Settings
from worker.local import run_local

PARITY_ENV = "DREAMBATCH_PARITY_DIR"
PARITY = Path(os.environ.get(PARITY_ENV) or Path(__file__).resolve().parents[2] / "shared" / "parity")


def _cases() -> list[dict]:
    index = PARITY / "cases.json"
    if not index.is_file():
        return []
    return json.loads(index.read_text())["cases"]


CASES = _cases()
GROUPS: dict[tuple[str, str], list[dict]] = defaultdict(list)  # (model, weights) → its cases, in file order
for _case in CASES:
    GROUPS[(_case["model"], _case["weights"])].append(_case)


def test_the_parity_fixtures_are_present():
    assert CASES, (
        f"no parity fixtures at {PARITY} (cases.json missing or empty): the shared folder must lie "
        f"beside the checkout as ../shared, or set {PARITY_ENV}; these tests never pass without it"
    )
    models = {case["model"] for case in CASES}
    assert models == {"e1-1", "e1-full", "i1-full", "i1-dev", "i1-fast"}, models


@pytest.fixture(scope="module", autouse=True)
def cpu_fp32():
    """The fixtures' conditions: float32 on the CPU with torch's default two intra-op threads."""
    with torch_threads(2):
        yield


def write_manifest(cases: list[dict], folder: Path) -> Path:
    """The cases' manifest rows as one JSONL file, each input copied next to it (rows name them relatively)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for case in cases:
        row = dict(case["manifest_row"])
        if "image" in row:
            shutil.copy(PARITY / row["image"], folder / Path(row["image"]).name)
            row["image"] = Path(row["image"]).name
        lines.append(json.dumps(row))
    manifest = folder / "parity.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def compare_images(case: dict, out_dir: Path) -> list[str]:
    """Problems with a case's PNGs against the expected ones (none when each is within 1 on every channel)."""
    problems = []
    for expected_path in case["expected"]["images"]:
        name = Path(expected_path).name
        produced = out_dir / name
        if not produced.is_file():
            problems.append(f"{case['id']}: no {name} in {out_dir}")
            continue
        expected = np.asarray(Image.open(PARITY / expected_path).convert("RGB"), dtype=np.int16)
        got = np.asarray(Image.open(produced).convert("RGB"), dtype=np.int16)
        if got.shape != expected.shape:
            problems.append(
                f"{case['id']}: {name} is {got.shape[1]}x{got.shape[0]}, expected "
                f"{expected.shape[1]}x{expected.shape[0]}"
            )
        elif (diff := int(np.abs(got - expected).max())) > 1:
            problems.append(f"{case['id']}: {name} differs by up to {diff} on a pixel channel (tolerance 1)")
    return problems


class DecodeRecorder:
    """Records what each VAE decode is handed (the final latents, scaled and shifted), per item."""

    def __init__(self, monkeypatch):
        self.pending: list[torch.Tensor] = []
        self.by_item: dict[str, torch.Tensor] = {}
        original = AutoencoderKL.decode

        def decode(vae, z, *args, **kwargs):
            self.pending.append(z.detach().clone())
            return original(vae, z, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "decode", decode)

    def item_ended(self, item_id: str, status: str) -> None:
        assert status == "completed", f"{item_id} ended {status}"
        assert len(self.pending) == 1, f"{item_id}: {len(self.pending)} VAE decodes, expected 1"
        self.by_item[item_id] = self.pending.pop()


def latent_difference(case: dict, vae_input: torch.Tensor) -> float:
    """Max abs difference of the final latents (recovered from the VAE input) against the expected ones."""
    expected = load_file(PARITY / case["expected"]["latents"])
    vae = json.loads((PARITY / case["weights"] / _vae_config(case)).read_text())
    latents = (vae_input - vae["shift_factor"]) * vae["scaling_factor"]
    assert latents.shape == expected["latents"].shape, (case["id"], latents.shape, expected["latents"].shape)
    return (latents - expected["latents"]).abs().max().item()


def _vae_config(case: dict) -> str:
    return "refine/vae/config.json" if case["model"].startswith("e1-") else "vae/config.json"


@pytest.mark.parametrize("group", sorted(GROUPS), ids=[f"{m}" for m, _ in sorted(GROUPS)])
def test_every_case_matches_the_published_code_through_the_local_run(group, tmp_path, monkeypatch):
    model, weights = group
    cases = GROUPS[group]
    manifest = write_manifest(cases, tmp_path / "in")
    recorder = DecodeRecorder(monkeypatch)
    sub = run_local(
        manifest,
        JobSpec(model=model, output=str(tmp_path / "out")),
        settings=Settings(),
        weights=str(PARITY / weights),
        device="cpu",
        on_item=recorder.item_ended,
    )
    out_dir = tmp_path / "out" / sub.job.job_id
    problems = []
    for case in cases:
        problems += compare_images(case, out_dir)
        difference = latent_difference(case, recorder.by_item[case["id"]])
        if difference > 1e-4:
            problems.append(f"{case['id']}: final latents differ by {difference:.3g} (tolerance 1e-4)")
    assert not problems, "\n".join(problems)


def test_dreambatch_run_on_a_parity_manifest_writes_the_expected_pngs(tmp_path):
    """The command a person runs, as cases.json's `cli` gives it, on the E1.1 refine cases."""
    cases = [case for case in GROUPS[("e1-1", "weights/e1-1")] if case["params"]["refine_strength"] > 0]
    manifest = write_manifest(cases, tmp_path / "in")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker",
            "run",
            str(manifest),
            "--model",
            "e1-1",
            "--weights",
            str(PARITY / "weights" / "e1-1"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (job_dir,) = [path for path in out.iterdir() if path.is_dir()]
    problems = [problem for case in cases for problem in compare_images(case, job_dir)]
    assert not problems, "\n".join(problems)
