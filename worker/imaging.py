"""Encoding model outputs into the requested file format."""

from __future__ import annotations

import io

from PIL import Image

from jobs.models import CONTENT_TYPES


def encode(image: Image.Image, fmt: str, quality: int) -> tuple[bytes, str]:
    """PIL image → (bytes, content type). `quality` applies to jpeg and webp."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, "JPEG", quality=quality, optimize=True)
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=quality)
    elif fmt == "png":
        image.save(buf, "PNG", compress_level=6)
    else:
        raise ValueError(f"unknown output format {fmt!r}")
    return buf.getvalue(), CONTENT_TYPES[fmt]
