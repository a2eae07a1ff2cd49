"""Every name that crosses a process boundary: queues, task names, Redis keys, S3 keys."""

from __future__ import annotations

# --- Celery queues -----------------------------------------------------------------------
GPU_QUEUE = "gpu.{model}"  # one queue per model, e.g. gpu.i1-fast; GPU workers consume only theirs
IO_QUEUE = "io"  # finalize + webhooks, so a GPU never waits on an HTTP call

# --- Celery task names (stable: renaming one strands queued messages) ---------------------
TASK_RUN_ITEM = "dreambatch.run_item"  # args: job_id, item_id
TASK_FINALIZE_JOB = "dreambatch.finalize_job"  # args: job_id
TASK_SEND_WEBHOOK = "dreambatch.send_webhook"  # args: job_id, item_id | None, event_id
TASK_RUN_SCHEDULE = "dreambatch.run_schedule"  # args: schedule name, slot (ISO UTC) it fires for

# --- Redis keys (live state) ---------------------------------------------------------------
REDIS_PREFIX = "db"
JOB = "db:job:{job_id}"  # hash: record (JSON), total, done, n_<status> counters, terminal status
ITEM = "db:item:{job_id}:{item_id}"  # hash: status, attempts, record (JSON)
JOB_ORDER = "db:job:{job_id}:order"  # list: item ids in manifest order
JOB_EVENTS = "db:job:{job_id}:events"  # set of webhook event ids; list "<key>:<event_id>" = attempts
JOBS_INDEX = "db:jobs"  # sorted set: job_id by created time
BEAT_LOCK = "db:beat:lock"  # string: the id of the one beat process allowed to fire (expires unless renewed)
SCHEDULE_FIRED = "db:schedule:{name}:fired"  # string: the last cron slot (ISO UTC) beat fired or skipped
SCHEDULE_SLOT = "db:schedule:{name}:slot:{slot}"  # string, NX: claimed once per slot, so a slot fires once
SCHEDULE_RUNNING = "db:schedule:{name}:running"  # string, NX with expiry: one run of a schedule at a time
SCHEDULE_LAST_RUN = "db:schedule:{name}:last"  # string: JSON summary of the last run (job id, counts)

# --- S3 keys (durable record, next to the outputs) -----------------------------------------
S3_JOB_SPEC = "{prefix}{job_id}/job.json"  # normalized job spec, written at submit
S3_JOB_ROWS = "{prefix}{job_id}/rows.jsonl"  # normalized rows, one per manifest row, at submit
S3_ITEM_RESULT = "{prefix}{job_id}/items/{item_id}.json"  # one small record when an item ends
S3_RESULTS = "{prefix}{job_id}/results.jsonl"  # one line per manifest row when the job ends
S3_OUTPUT = "{prefix}{job_id}/{item_id}{suffix}.{ext}"  # suffix "" or "_{n}" for several images
S3_SHEET = "{prefix}{job_id}/sheet{page}.{ext}"  # review contact sheet (html, png); page "" or "-2", "-3"…
S3_CATALOG_LEDGER = "{prefix}_catalog/{name}/ledger.json"  # what each source image was last edited as
S3_CATALOG_RUN = "{prefix}_catalog/{name}/runs/{job_id}.json"  # one scheduled run: its items and fingerprints


def gpu_queue(model: str) -> str:
    return GPU_QUEUE.format(model=model)


def job_key(job_id: str) -> str:
    return JOB.format(job_id=job_id)


def prefixed(prefix: str) -> str:
    """Normalize an output prefix so it is empty or ends with exactly one slash."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""
