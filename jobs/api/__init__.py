"""The HTTP API (`dreambatch api`): FastAPI over the same store, queues and records as the CLI.

    app.py          the application: routers, error handlers, /metrics, /healthz; TLS in `serve`
    deps.py         what the routes depend on: the shared services, the API-key check (`require(scope)`)
    auth.py         API keys: minted, hashed at rest, scoped; the bearer-token check
    keyring.py      where keys live: durably next to the outputs (jobs.records), Redis as the cache
    tenancy.py      whose jobs a key sees (`job_for`: 404 for another tenant's; `jobs_of`), where its jobs write
                    (`own`: its tenant and output prefix), its rate limit (429); every route naming a job uses it
    service.py      what the routes share: submit rows as a job, wait for it, status, image links
    shapes.py       errors in each client's own shape; every status code a route answers, for OpenAPI
    retries.py      a retried request attaches to its first attempt's job; waits end before the client's timeout
    uploads.py      vendor file uploads: signed PUT URLs, the files' URLs mapped back to their objects
    jobs_routes.py  /v1/jobs…: manifests (upload or JSON rows), status, items, results, events, cancel, retry
    openai_routes.py  /v1/images/generations and /v1/images/edits, as OpenAI-compatible gateways serve them
    fal_routes.py   /{fal-ai|dreambatch}/{name}… and /run/…: fal's queue, run and stream protocols
    inferencesh_routes.py  /apps/run, /tasks/…, /files: inference.sh's
    wavespeed_routes.py    /api/v3/…: WaveSpeedAI's
    keys_cli.py     `dreambatch keys create|list|revoke`

The vendors' own shapes (data only, shared with the workers' webhooks) are in jobs.vendors.

Needs the `api` extra (fastapi, uvicorn, python-multipart). Imports no torch and no `worker`.
"""
