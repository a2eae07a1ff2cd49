"""inference.sh's documented usage (inferencesh 0.36, the seed pages' examples), unchanged but for where it points:
INFERENCE_API_KEY is a dreambatch key and base_url names the server. Prints what it saw as one JSON object.
Arguments: an image file; HOOK_URL in the environment receives the webhook."""

import json
import os
import sys

from inferencesh import inference

image, seen = sys.argv[1], {}
# a PNG cut off inside its pixel data: its header passes the checks at submit, its decode fails on the worker
BROKEN = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAYElEQVR4nO3PQQ0A"
client = inference(base_url=os.environ["DREAMBATCH_URL"])

# "run and get result", with a local file that the SDK uploads (POST /files, then a PUT to upload_url)
result = client.run(
    {
        "app": "infsh/hidream-e1-full",
        "input": {
            "prompt": "Editing Instruction: make the square blue. Target Image Description: a blue square",
            "image": image,
            "num_inference_steps": 1,
            "refine_strength": 0,
            "seed": 3,
        },
    }
)
seen["run"] = result

# "stream live updates"
updates = []
for update in client.run(
    {
        "app": "infsh/hidream-i1-fast",
        "input": {
            "prompt": "a lighthouse",
            "width": 250,
            "height": 190,
            "num_inference_steps": 3,
            "scheduler_type": "flow_euler",
        },
    },
    stream=True,
):
    updates.append({"status": update.get("status"), "progress": update.get("progress"), "output": update.get("output")})
seen["stream"] = updates

# "webhooks": wait=False answers the task at once; the webhook gets it when it ends
task = client.run(
    {
        "app": "infsh/hidream-i1-fast",
        "input": {"prompt": "a boat", "num_inference_steps": 1},
        "webhook": os.environ["HOOK_URL"],
    },
    wait=False,
)
seen["no_wait"] = task
seen["waited"] = client.wait_for_completion(task["id"])

# cancel a task that waits in a queue no worker serves
waiting = client.run({"app": "infsh/hidream-i1-dev", "input": {"prompt": "never runs"}}, wait=False)
client.cancel(waiting["id"])
try:
    client.wait_for_completion(waiting["id"])
except RuntimeError as exc:
    seen["cancelled_wait"] = str(exc)
seen["cancelled"] = client.tasks.get(waiting["id"]).data

# a failed task and an unknown app, as the SDK reports them
try:
    client.run({"app": "infsh/hidream-e1-full", "input": {"prompt": "x", "image": BROKEN, "num_inference_steps": 1}})
except RuntimeError as exc:
    seen["failed"] = str(exc)
try:
    client.run({"app": "infsh/flux", "input": {"prompt": "x"}})
except Exception as exc:  # inferencesh.APIError
    seen["unknown_app"] = {"type": type(exc).__name__, "status": getattr(exc, "status_code", None), "message": str(exc)}
print(json.dumps(seen, default=str))
