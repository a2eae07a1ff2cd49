"""Image bytes in and out: an edit's input decoded (checked, EXIF-oriented, RGB), and model outputs encoded
into the requested file format."""

from __future__ import annotations

import io

from PIL import Image

from jobs import formats
from jobs.formats import CONTENT_TYPES


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


def requested_size(images: list[Image.Image], params: dict) -> list[Image.Image]:
    """A generation row with `exact_size` gets exactly the size it asked for: HiDream rendered the nearest size it
    supports (jobs.models.rendered_size: ~1 MP, same aspect), which is resized here (Lanczos). Others pass as is."""
    asked = params.get("requested_size")
    if not params.get("exact_size") or not asked:
        return images
    size = (int(asked[0]), int(asked[1]))
    return [i if i.size == size else i.resize(size, Image.Resampling.LANCZOS) for i in images]


BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white (the product-photo norm)


def decode_input(data: bytes, max_pixels: int) -> Image.Image:
    """Input bytes → an RGB image, EXIF orientation applied. Raises InputError for anything else.

    Only JPEG, PNG and WebP are opened; the pixel count is checked from the header before any
    decoding, so a decompression bomb fails its item instead of the worker. RGBA/LA/P-with-alpha
    are composited onto white; CMYK, grayscale and 16-bit modes are converted to RGB.
    """
    from PIL import ImageOps

    from jobs.errors import InputError
    from jobs.inputs import damaged, open_image

    image: Image.Image = open_image(data, max_pixels)  # the header checks submit made too
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{damaged(formats.sniff(data) or formats.begins_like(data))}: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("P", "RGB", "L") and "transparency" in image.info:  # palette or colour-key alpha
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")
