"""What bench/compare.py and bench/fanout.py rest on, checked fast: the plain loop and the minimal Celery app make
dreambatch's bytes (generations and edits), `--setting` reaches dreambatch's settings, fan-out's queue length counts
every priority, and the finalizer's closing writes (records.close_job) leave the record reconcile reads. Figures live
in bench/, not here."""

from __future__ import annotations

import uuid

import pytest

from jobs import broker, keys, records
from jobs.errors import InputError
from jobs.models import JobRecord
from jobs.settings import Settings
from jobs.storage import LocalStore

AT = "2026-12-02T00:00:00+00:00"


def test_the_plain_loop_makes_the_bytes_dreambatchs_runner_makes(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bench.minimal_celery import PlainModel
    from jobs.settings import RunnerSettings
    from worker import imaging
    from worker.runners.base import GenerateRequest
    from worker.runners.hidream_i1 import HiDreamI1Runner

    plain = PlainModel("i1-fast")
    runner = HiDreamI1Runner("i1-fast", "tiny", options=RunnerSettings())
    defaults = plain.defaults
    for seed, prompt in [(7, "a red chair"), (8, "a blue lamp")]:
        ours = runner.generate(GenerateRequest.of(defaults, prompt=prompt, seed=seed, width=1024, height=1024))
        assert plain.render(prompt, seed) == imaging.encode(ours.images[0], "png", 90)[0]
    assert plain.render("a red chair", 7) != plain.render("a red chair", 8)


def test_the_plain_edit_makes_the_bytes_dreambatchs_edit_runner_makes(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from bench.compare import input_png
    from bench.minimal_celery import PlainEditModel
    from jobs.settings import RunnerSettings
    from worker import imaging
    from worker.runners.base import EditRequest
    from worker.runners.hidream_e1 import HiDreamE1Runner

    plain = PlainEditModel("e1-1")
    runner = HiDreamE1Runner("e1-1", "tiny", options=RunnerSettings())
    defaults = plain.defaults
    data = input_png(1)
    source = imaging.decode_input(data, max_pixels=10**6)
    assert runner.canvas_size(*source.size) == source.size  # the bench's inputs need no fitting
    made = {}
    for seed in (7, 8):
        ours = runner.edit(
            EditRequest(
                image=source,
                instruction="make the background light grey",
                negative_prompt=defaults["negative_prompt"],
                width=source.width,
                height=source.height,
                seed=seed,
                steps=defaults["steps"],
                guidance_scale=defaults["guidance_scale"],
                image_guidance_scale=defaults["image_guidance_scale"],
                refine_strength=defaults["refine_strength"],
                clip_cfg_norm=defaults["clip_cfg_norm"],
            )
        )
        made[seed] = plain.edit(data, "make the background light grey", seed)
        assert made[seed] == imaging.encode(ours.images[0], "png", 90)[0]
    assert made[7] != made[8]


def test_a_setting_option_reaches_dreambatchs_settings(monkeypatch):
    from bench.compare import setting_env

    env = setting_env(["runner__model_cpus=off", "WEBHOOKS__TIMEOUT=2.5"])
    assert env == {"DREAMBATCH_RUNNER__MODEL_CPUS": "off", "DREAMBATCH_WEBHOOKS__TIMEOUT": "2.5"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.runner.model_cpus, settings.webhooks.timeout) == ("off", 2.5)
    with pytest.raises(InputError, match="--setting 'RUNNER__MODEL_CPUS': expected key=value"):
        setting_env(["RUNNER__MODEL_CPUS"])


def test_fanout_counts_the_queued_messages_of_every_priority(redis_server):
    from bench.fanout import queued_messages

    settings = Settings(redis_url=redis_server.url)
    app = broker.make_celery(settings)
    model = f"i1-fast-{uuid.uuid4().hex[:6]}"  # a queue of this test's own
    broker.publish_items(app, model, "j", ["a", "b", "c"], priority="low")
    broker.publish_items(app, model, "j", ["d"], priority="high")
    broker.publish_items(app, model, "j", ["e", "f"], priority="normal")
    client = redis_server.client()
    assert client.llen(keys.gpu_queue(model)) == 1  # (what fanout.py read before: the high list alone)
    assert queued_messages(client, keys.gpu_queue(model)) == 6


def test_closing_a_job_writes_its_final_spec_and_leaves_its_open_marker_to_the_finalizer(tmp_path):
    objects = LocalStore(str(tmp_path / "out"))
    job = JobRecord(job_id="j1", model="i1-fast", output=objects.location, total=1, created_at=AT, updated_at=AT)
    records.write_job_spec(objects, job)
    records.mark_open(objects, job)
    assert records.open_jobs(objects) == ["j1"]

    job.finished_at = AT
    records.close_job(objects, job)
    assert records.open_jobs(objects) == ["j1"]  # (removed once Redis has the end: worker.process.finalize_job)
    assert records.read_job(objects, "j1") == job
