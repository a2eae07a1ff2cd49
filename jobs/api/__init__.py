"""The HTTP API (`dreambatch api`): FastAPI over the same store, queues and records as the CLI.

    app.py          the application: routers, error shapes, /metrics, /healthz
    deps.py         what the routes depend on: the shared services, the API-key check (`require(scope)`)
    auth.py         API keys: minted, hashed at rest, scoped; the bearer-token check
    service.py      what the routes share: submit rows as a job, wait for it, status, image links
    jobs_routes.py  /v1/jobs…: manifests (upload or JSON rows), status, items, results, events, cancel, retry
    openai_routes.py  /v1/images/generations and /v1/images/edits, as OpenAI-compatible gateways serve them
    fal_routes.py   /queue/{namespace}/{name}…: fal's queue protocol
    keys_cli.py     `dreambatch keys create|list|revoke`

Needs the `api` extra (fastapi, uvicorn, python-multipart). Imports no torch and no `worker`.
"""
