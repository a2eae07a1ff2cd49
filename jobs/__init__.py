"""The control plane: manifests, job and item records, the status lifecycle, key names, submission,
job control and the CLI/API. Imports no torch, no diffusers and nothing from `worker`.

The flow, in the order an item meets it:

    manifest.py     CSV/JSONL → validated rows (dialects.py: the hosted APIs' field names → ours;
                    inputs.py: image references checked (headers, S3, URLs) and staged; loras.py: a row's
                    LoRA file checked and staged; presets.py, templates.py)
    models.py       rows, the job spec (JobSpec: every job option), job and item records: data only
    submit.py       fan-out: create_job(spec, manifest, services), the one way a job is made: the job record,
                    item records, one Celery task per valid row (broker.py publishes)
    lifecycle.py    statuses and the moves between them; store.py makes each move, atomically, in Redis
    ending.py       how an item ends, for every caller: its record, the move, its webhook, the finalize
    records.py      the durable record in object storage (storage.py), read and written here alone: job.json,
                    rows.jsonl, inputs/, items/, results.jsonl
    (worker/)       the tasks run the model and write the outputs; see worker/__init__.py
    control.py      cancel, retry, resume, expiry; reconcile.py rebuilds the live state from the durable record
                    (and sends its pending webhook events again); retention.py purges ended jobs' live state

Beside the spine:
    settings.py     one typed Settings, built lazily      errors.py   the error tree, and each error's kind
    services.py     the composition root: a process's Redis client, store, Celery app and object stores, built
                    from Settings on first use and handed to whoever needs them
    keys.py         every name crossing a process: queues, task names, Redis and S3 keys
    netguard.py     which addresses may be reached for a user (image URLs, webhooks); netclient.py: the one
                    pooled HTTP client that connects only to the address netguard checked
    pace.py         one rule for rates and ETAs (a job's own, a watcher's)
    cli.py          validate, submit, status, results…    api/        the HTTP API over the same functions
    catalog/        scheduled catalog runs: plan, scan, ledger, lock, run, report, schedules, beat, cli
                    (identity.py: what a source image is, to tell when it changed)
    vendors/        the hosted APIs' request and response shapes (fal, inference.sh, WaveSpeedAI, OpenAI),
                    served by api/*_routes.py
    metrics.py, logs.py, export.py (results as CSV/Parquet…), formats.py (the one image-format table)
"""
