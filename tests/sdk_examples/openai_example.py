"""The Lumenfall seed page's Python example (openai), unchanged but for where it points: OPENAI_API_KEY is a
dreambatch key and OPENAI_BASE_URL the server's /v1. Prints what it saw as one JSON object. Arguments: an image."""

import base64
import io
import json
import sys

from openai import OpenAI
from PIL import Image

client = OpenAI()
seen = {}
response = client.images.edit(
    model="hidream-e1-1",
    image=open(sys.argv[1], "rb"),
    prompt="Add a starry night sky to this image",
    size="1024x768",
    extra_body={"steps": 1, "refine_strength": 0},
)
seen["edit"] = {
    "url": response.data[0].url,
    "revised_prompt": response.data[0].revised_prompt,
    "extra": response.model_extra,
}
generated = client.images.generate(
    model="hidream-i1-fast", prompt="a red chair", size="1024x768", response_format="b64_json", extra_body={"steps": 1}
)
seen["generate"] = {
    "size": Image.open(io.BytesIO(base64.b64decode(generated.data[0].b64_json))).size,
    "response_size": generated.size,
    "extra": generated.model_extra,
}
print(json.dumps(seen))
