"""WaveSpeed's documented usage (wavespeed 2.0.5), unchanged but for where it points: WAVESPEED_API_KEY is a
dreambatch key and base_url names the server. Prints what it saw as one JSON object. Arguments: an image file;
HOOK_URL in the environment receives the webhook."""

import json
import os
import sys

import requests
import wavespeed

image, seen = sys.argv[1], {}
# a PNG cut off inside its pixel data: its header passes the checks at submit, its decode fails on the worker
BROKEN = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAYElEQVR4nO3PQQ0A"
client = wavespeed.Client(base_url=os.environ["DREAMBATCH_URL"])

# upload a file, then edit it (the seed page's model and fields)
url = client.upload(image)
seen["upload"] = url
seen["run"] = client.run(
    "wavespeed-ai/hidream-e1-full",
    {"prompt": "make the square blue", "image": url, "seed": 5, "num_inference_steps": 1, "refine_strength": 0},
)

# base64 output, in sync mode (one request that waits)
seen["sync_base64"] = client.run(
    "wavespeed-ai/hidream-e1-full",
    {
        "prompt": "make it green",
        "image": url,
        "enable_base64_output": True,
        "output_format": "png",
        "num_inference_steps": 1,
        "refine_strength": 0,
    },
    enable_sync_mode=True,
)

# run_no_throw on a prediction that fails (its image cannot be fetched), and get_result of it
failed = client.run_no_throw("wavespeed-ai/hidream-e1-full", {"prompt": "x", "image": BROKEN, "num_inference_steps": 1})
seen["failed"] = failed
seen["failed_result"] = client.get_result(failed["task_id"])

# the seed page's REST calls, as curl makes them: submit with a webhook, then the result
headers = {"Authorization": f"Bearer {os.environ['WAVESPEED_API_KEY']}"}
base = os.environ["DREAMBATCH_URL"]
submitted = requests.post(
    f"{base}/api/v3/wavespeed-ai/hidream-e1-full",
    params={"webhook": os.environ["HOOK_URL"]},
    json={
        "prompt": "add a star",
        "image": url,
        "seed": -1,
        "output_format": "jpeg",
        "enable_base64_output": False,
        "num_inference_steps": 1,
        "refine_strength": 0,
    },
    headers=headers,
    timeout=30,
)
seen["rest_submit"] = {"status": submitted.status_code, "body": submitted.json()}
seen["rest_result"] = requests.get(submitted.json()["data"]["urls"]["get"], headers=headers, timeout=30).json()
seen["unknown"] = requests.get(f"{base}/api/v3/predictions/nope/result", headers=headers, timeout=30).json()
print(json.dumps(seen))
