"""Every name that crosses a process boundary: queues, task names, Redis keys, S3 keys."""

from __future__ import annotations

# --- Celery queues -----------------------------------------------------------------------
GPU_QUEUE = "gpu.{model}"  # one queue per model, e.g. gpu.i1-fast; GPU workers consume only theirs
IO_QUEUE = "io"  # finalize + webhooks, so a GPU never waits on an HTTP call

# --- Celery task names (stable: renaming one strands queued messages) ---------------------
TASK_RUN_ITEM = "dreambatch.run_item"  # args: job_id, item_id; kwargs: outage_since (waiting for S3)
TASK_FINALIZE_JOB = "dreambatch.finalize_job"  # args: job_id
TASK_SEND_WEBHOOK = "dreambatch.send_webhook"  # args: job_id, item_id | None, event_id[, first_at, tries]
TASK_RUN_SCHEDULE = "dreambatch.run_schedule"  # args: schedule name, slot (ISO UTC) it fires for

# --- Redis keys (live state) ---------------------------------------------------------------
REDIS_PREFIX = "db"
JOB = "db:job:{job_id}"  # hash: record (JSON), total, done, n_<status> counters, terminal status
ITEM = "db:item:{job_id}:{item_id}"  # hash: status, attempts, record (JSON), step; stop: a running item's cancel
ITEM_LEASE = "db:item:{job_id}:{item_id}:lease"  # string: token of the execution running the item; expires
JOB_ENDED = "db:ended:{job_id}"  # pub/sub channel: finish_job publishes the terminal status as the job ends
JOB_ORDER = "db:job:{job_id}:order"  # list: item ids in manifest order
JOB_EVENTS = "db:job:{job_id}:events"  # set of webhook event ids; list "<key>:<event_id>" = attempts
JOB_SENT = "db:job:{job_id}:sent"  # set of event ids whose webhook message was published (marked after)
JOB_PROGRESS_SENT = "db:job:{job_id}:progress"  # string with a TTL: a job.progress event went out lately
JOB_FINALIZE_NUDGE = "db:job:{job_id}:nudge"  # string with a TTL: a redelivery sent this job a finalize lately
EXECUTIONS = "db:executions"  # hash: EXECUTION → the worker holding the item's message ("": the broker does)
EXECUTION = "{job_id}/{item_id}"  # a field of EXECUTIONS
RECOVERY_LOCK = "db:recovery:lock"  # string with a TTL: one worker scans for items of dead workers at a time
RECONCILE_LOCK = "db:reconcile:lock"  # string with a TTL: one io worker sweeps unfinished jobs at a time
PURGED = "db:purged:{job_id}"  # JSON {output, status, finished_at, purged_at, why}: its live state was purged; expires
JOBS_INDEX = "db:jobs"  # sorted set: job_id by created time
TENANT_JOBS = "db:tenant:{tenant}:jobs"  # sorted set: one tenant's job_ids by created time (jobs.api.tenancy)
API_KEY = "db:apikey:{key_id}"  # string: ApiKeyRecord JSON (the token's SHA-256, never the token)
API_KEYS = "db:apikeys"  # sorted set: key_id by created time
IDEMPOTENCY = "db:idem:{key_id}:{digest}"  # JSON {fingerprint, job_id}, per API key, expires after a day
RATE = "db:rate:{key_id}:{window}"  # counter with a TTL: requests an API key made in one minute (its rate limit)
RECENT_REQUEST = "db:recent:{key_id}:{digest}"  # string: the job a request body made ("" while it is being made)
UPLOAD = "db:upload:{upload_id}"  # JSON UploadRecord of a vendor file upload (POST /files, media/uploads); expires
JOB_STEPS = "db:job:{job_id}:steps"  # hash: item id → "step/steps" its run reached (pruned of ended items as read)
JOB_GPU = "gpu_s"  # field of the job hash: seconds its items held the model, every attempt, summed (HINCRBYFLOAT)
JOB_SLOTS = "db:job:{job_id}:slots"  # sorted set: item ids holding a --max-concurrency slot, score = lease end
WORKER = "db:worker:{name}"  # string: a worker's last heartbeat (JSON: model, model_revision, active…); expires
WORKERS = "db:workers"  # set: names of workers that have sent a heartbeat

# --- priorities (kombu's Redis transport: one list per step, BRPOP takes the lowest step first) ----
PRIORITIES = {"high": 0, "normal": 3, "low": 6}  # job priority → Celery message priority (0 = first)
PRIORITY_STEPS = [0, 3, 6]  # broker_transport_options["priority_steps"]
PRIORITY_SEP = "\x06\x16"  # kombu's separator: "gpu.i1-fast\x06\x166" is that queue's low list

# --- schedules (jobs.catalog.beat fires them, jobs.catalog.run runs them) ---------------------
BEAT_LOCK = "db:beat:lock"  # string: the id of the one beat process allowed to fire (expires unless renewed)
SCHEDULE_FIRED = "db:schedule:{name}:fired"  # string: the last cron slot (ISO UTC) beat fired or skipped
SCHEDULE_SLOT = "db:schedule:{name}:slot:{slot}"  # string, NX: claimed once per slot, so a slot fires once
SCHEDULE_RUNNING = "db:schedule:{name}:running"  # string, NX with expiry: one run of a schedule at a time
SCHEDULE_LAST_RUN = "db:schedule:{name}:last"  # string: JSON summary of the last run (job id, counts)

# --- S3 keys (durable record, next to the outputs) -----------------------------------------
S3_JOB_FOLDER = "{prefix}{job_id}/"  # everything of one job (its record, staged inputs, default output keys)
S3_JOB_SPEC = "{prefix}{job_id}/job.json"  # normalized job spec, written at submit
S3_JOB_ROWS = "{prefix}{job_id}/rows.jsonl"  # normalized rows, one per manifest row, at submit
S3_INPUT = "{prefix}{job_id}/inputs/{item_id}{ext}"  # a local file or data URI a row named, staged at submit
S3_ITEMS = "{prefix}{job_id}/items/"  # the folder of the item records below
S3_ITEM_RESULT = "{prefix}{job_id}/items/{item_id}.json"  # one small record when an item ends
S3_OPEN_JOB = "{prefix}_open/{job_id}"  # exists from a job's commit until it ends: what periodic reconcile scans
S3_OUTBOX = "{prefix}_outbox/{job_id}/{until}"  # an ended job's webhook events may be pending until `until` (epoch s)
S3_RESULTS = "{prefix}{job_id}/results.jsonl"  # one line per manifest row when the job ends
S3_OUTPUT = "{prefix}{job_id}/{item_id}{suffix}.{ext}"  # suffix "" or "_{n}" for several images
S3_SHEET = "{prefix}{job_id}/sheet{page}.{ext}"  # review contact sheet (html, png); page "" or "-2", "-3"…
S3_CATALOG_LEDGER = "{prefix}_catalog/{name}/ledger.json"  # what each source image was last edited as
S3_CATALOG_LEDGER_DELTAS = "{prefix}_catalog/{name}/ledger/"  # the ledger's changes since ledger.json, one per save
S3_CATALOG_LEDGER_DELTA = "{prefix}_catalog/{name}/ledger/{seq:010d}.json"  # one save's changed keys (seq order)
S3_CATALOG_RUN = "{prefix}_catalog/{name}/runs/{job_id}.json"  # one scheduled run: its items and fingerprints
S3_LORA = "{prefix}_loras/{sha256}.safetensors"  # a LoRA a row named as a local file, staged once by content
S3_UPLOAD = "{prefix}_uploads/{upload_id}/{filename}"  # a file a client PUT to a vendor upload URL
S3_API_KEYS = "{prefix}_keys/"  # the folder of the API key records below
S3_API_KEY = "{prefix}_keys/{key_id}.json"  # an ApiKeyRecord (the token's SHA-256, never the token): Redis caches it
S3_IDEMPOTENCY = "{prefix}_idempotency/{key_id}/{digest}.json"  # {fingerprint, job_id, expires}: an Idempotency-Key


def gpu_queue(model: str) -> str:
    return GPU_QUEUE.format(model=model)


def priority_lists(queue: str) -> dict[str, str]:
    """The Redis list behind each priority of a queue (step 0 is the queue's own name)."""
    return {name: queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for name, step in PRIORITIES.items()}


def job_key(job_id: str) -> str:
    return JOB.format(job_id=job_id)


def prefixed(prefix: str) -> str:
    """Normalize an output prefix so it is empty or ends with exactly one slash."""
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""
