"""The data plane: Celery tasks, the HiDream runners, image I/O, output writes and webhook delivery.
Depends on `jobs`; `jobs` never imports it.

The flow of one item (a message carries ids only):

    tasks.py        thin Celery tasks: run_item, finalize_job, send_webhook, run_schedule
    local.py        `dreambatch run`: the same item path in one process, no Redis, no S3
    runtime.py      per-process resources, built on first use: the root's services (jobs.services), the runner
    process.py      one item, in numbered steps: load → lease → attempt → fetch input → model → encode +
                    upload → end (jobs.ending); and one job's finalization (results.jsonl)
    inputs.py       an edit's input bytes (S3, checked URLs, staged files); loras.py a row's LoRA file in the
                    local cache; imaging.py decodes and encodes;
                    geometry.py fits an input to the model's canvas and back
    runners/        base.py is the seam; one file per model family (hidream_i1.py, hidream_e1.py); weights*.py
                    and layout.py load what users download, tiny.py builds random-weight copies, memory.py and
                    fullsize.py plan and build real-size ones, batching.py groups items into one model call
    webhooks.py     payloads, signatures and one delivery attempt

Around it: cli.py (the `dreambatch` command), leases.py (one execution of an item at a time),
heartbeat.py, metrics.py, sweeper.py (periodic reconcile on I/O workers; cli.py adds their expiry sweep), recovery.py
(a dead worker's items queued again), periodic.py (the timer both run on),
contact_sheet.py (the review sheet a finished job may write), safety.py (the optional NSFW checker),
hub.py (`models download`), progress.py (denoising steps as they happen).
"""
