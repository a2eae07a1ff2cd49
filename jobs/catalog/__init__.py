"""The catalog: scheduled runs that scan a source, keep only what is new or changed, and submit one job.

    S3 prefix ─ list ─► images (others skipped, with the reason) ─► rows (templated instruction,
    mirrored output key) ─► fingerprint ─► diff against the ledger ─► job (only new/changed rows)
    manifest ─ read ─► checked rows ─► fingerprint (fields + the image's identity) ─► diff by row id ─► job

Where each step lives:

    schedules.py  the schedules file: one `Schedule` per entry (cron, source, output, texts, params)
    beat.py       `dreambatch beat`: fires each schedule's cron slots (one beat at a time), as io-queue tasks
    plan.py       what every row of a run shares (defaults, texts, names) and the fingerprints
    scan.py       a source prefix, object by object: an image to edit (a candidate row) or skipped, and why
    ledger.py     what each key was last edited as; runs folded in once their job ended; the diff
    lock.py       one run of a schedule at a time (a short-TTL Redis lock, renewed while the run goes)
    run.py        one run, step by step (plan, ledger, scan or manifest, diff, record, submit); the beat-fired
                  run and its retries
    report.py     what a run found and did
    cli.py        `dreambatch schedules list|run`, `beat`, `presets`

The ledger is durable and lives next to the outputs: `{output}/_catalog/{name}/ledger.json` (a snapshot) and
`ledger/{seq}.json` (each save's changed keys, compacted into a new snapshot now and then) say, for each
source key, the fingerprint it was last edited with and the weights revision it ran with. A
fingerprint covers the image's content (ETag + size) and everything that decides the edit: instruction,
target description, parameters, output key and format, model and the schedule's `revision` label. When the
live workers of the model all publish one weights revision (their heartbeat) and an image was last edited
with another, it is changed too ("model revision changed"). Each run also writes
`_catalog/{name}/runs/{job_id}.json` (its items and their fingerprints) and is listed as pending in the
ledger; the next run folds a pending run in once its job has ended, recording the items that completed
and counting, per key, the runs in a row that failed with the same fingerprint: after
`catalog.max_failures` of them the key is skipped (with the reason) until its image or parameters change or
a run asks for `retry_failed` (a prefix scan's image after one such run: the same bytes fail the same way, so a
corrupt upload fails and is reported once). A run still in flight keeps its items from being queued twice.

Hygiene, reported in the run record, the job's `catalog` block (its webhook, its sheet) and `schedules list`:
keys the ledger holds that the scan no longer finds are `deleted` (their outputs kept, deleted or moved, as
`on_deleted` says; held back when over half are gone at once); `source.exclude` folders and globs are counted,
not listed; empty and unreadable objects are the run's `problems`; first input failures are its `alerts`.

Two runs of one schedule never overlap: a run holds `keys.SCHEDULE_RUNNING`, a lock with a short TTL that a
thread renews while the run goes, so a crashed holder blocks the schedule for one TTL, not for hours. A
beat-fired run that fails for a transient reason (S3 or Redis unreachable, another run in progress) is
retried with backoff (`run_fired`), until shortly before the schedule's next slot.

The catalog is a wing beside the spine and uses the spine's parts: jobs.storage (S3 listing and errors),
jobs.formats (which objects are images), jobs.store (Redis and its lock primitive), jobs.submit (the job).
"""
