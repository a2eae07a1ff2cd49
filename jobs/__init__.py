"""The control plane: manifests, job and item records, the status lifecycle, key names, submission,
job control and the CLI/API. Imports no torch, no diffusers and nothing from `worker`.

The flow, in the order an item meets it:

    manifest.py     CSV/JSONL → validated rows (dialects.py: the hosted APIs' field names → ours;
                    inputs.py: image references checked and staged; presets.py, templates.py)
    models.py       rows, job and item records: data only
    submit.py       fan-out: the job record, item records, one Celery task per valid row (broker.py publishes)
    lifecycle.py    statuses and the moves between them; store.py makes each move, atomically, in Redis
    ending.py       how an item ends, for every caller: its record, the move, its webhook, the finalize
    records.py      the durable record in object storage (storage.py): job.json, rows.jsonl, items/, results.jsonl
    (worker/)       the tasks run the model and write the outputs; see worker/__init__.py
    control.py      cancel, retry, resume, expiry; reconcile.py rebuilds the live state from the durable record

Beside the spine:
    settings.py     one typed Settings, built lazily      errors.py   the error tree, and each error's kind
    keys.py         every name crossing a process: queues, task names, Redis and S3 keys
    netguard.py     which addresses may be reached for a user (image URLs, webhooks)
    cli.py          validate, submit, status, results…    api/        the HTTP API over the same functions
    catalog.py      scheduled catalog runs (schedules.py, beat.py, identity.py, catalog_cli.py)
    metrics.py, logs.py, export.py, fal.py
"""
