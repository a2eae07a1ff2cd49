"""fal's documented Python usage (fal-client 1.0.3), unchanged but for where it points: FAL_KEY is a dreambatch key,
FAL_QUEUE_RUN_HOST=HOST:PORT and FAL_RUN_HOST=HOST:PORT/run name the server, SSL_CERT_FILE trusts its certificate.
Prints what it saw as one JSON object. Arguments: an image file; HOOK_URL in the environment receives the webhook."""

import json
import os
import sys
import time

import fal_client

image, seen = sys.argv[1], {}

# "Submit a request": subscribe waits, with the queue updates and their logs
updates = []
result = fal_client.subscribe(
    "fal-ai/hidream-e1-full",
    arguments={
        "image_url": fal_client.encode_file(image),
        "edit_instruction": "Convert the image into a 3D animated style.",
        "num_inference_steps": 1,
        "refine_strength": 0,
    },
    with_logs=True,
    on_queue_update=lambda update: updates.append(
        type(update).__name__
        + (f":{len(update.logs or [])}" if isinstance(update, fal_client.InProgress | fal_client.Completed) else "")
    ),
)
seen["subscribe"] = {"result": result, "updates": updates}

# "Queue": submit with a webhook, status with logs, result
handle = fal_client.submit(
    "fal-ai/hidream-e1-full",
    arguments={
        "image_url": fal_client.encode_file(image),
        "edit_instruction": "make it blue",
        "num_inference_steps": 1,
        "refine_strength": 0,
        "enable_safety_checker": False,
        "sync_mode": True,
    },
    webhook_url=os.environ["HOOK_URL"],
)
first = fal_client.status("fal-ai/hidream-e1-full", handle.request_id, with_logs=True)
seen["first_status"] = type(first).__name__
seen["first_position"] = getattr(first, "position", None)
while not isinstance(
    status := fal_client.status("fal-ai/hidream-e1-full", handle.request_id, with_logs=True), fal_client.Completed
):
    time.sleep(0.2)
seen["completed"] = {"logs": status.logs, "metrics": status.metrics, "error": status.error}
seen["queued"] = {
    "request_id": handle.request_id,
    "result": fal_client.result("fal-ai/hidream-e1-full", handle.request_id),
}

# cancel a request that waits in a queue no worker serves
waiting = fal_client.submit("fal-ai/hidream-i1-dev", arguments={"prompt": "never runs"})
fal_client.cancel("fal-ai/hidream-i1-dev", waiting.request_id)
while not isinstance(ended := fal_client.status("fal-ai/hidream-i1-dev", waiting.request_id), fal_client.Completed):
    time.sleep(0.2)
seen["cancelled"] = {
    "status": type(ended).__name__,
    "error": getattr(ended, "error", None),
    "error_type": getattr(ended, "error_type", None),
}
try:
    fal_client.cancel("fal-ai/hidream-i1-dev", waiting.request_id)
except fal_client.FalClientHTTPError as exc:
    seen["cancel_again"] = exc.status_code

# fal.run (synchronous) and fal.stream (server-sent events) on the run host
seen["run"] = fal_client.run(
    "fal-ai/hidream-i1-fast",
    arguments={"prompt": "a red chair", "image_size": "landscape_4_3", "num_inference_steps": 1, "seed": 4},
)
seen["stream"] = list(
    fal_client.stream(
        "fal-ai/hidream-i1-fast",
        arguments={"prompt": "a blue chair", "image_size": {"width": 320, "height": 240}, "num_inference_steps": 2},
    )
)

# errors come back as fal's: FalClientHTTPError with the server's detail
try:
    fal_client.submit("fal-ai/hidream-nope", arguments={"prompt": "x"})
except fal_client.FalClientHTTPError as exc:
    seen["unknown_model"] = {"status": exc.status_code, "message": str(exc)}
print(json.dumps(seen))
