"""Product-safe geometry for edits: the output keeps the input's size and proportions by default.

    input ──to_shape──► the output's aspect (pad | crop | stretch; a no-op when the size is 'same')
          ──fit──────► the model's canvas (pad: scaled to fit, centred, borders filled; stretch: resized)
          ──model────► edited canvas
          ──unfit────► the content box cut out and resized to the output size

The reference scripts stretch every photo to the canvas (`geometry=stretch` here), which distorts
products whose aspect differs from the canvas.
"""

from __future__ import annotations

import math

from PIL import Image, ImageStat

Box = tuple[int, int, int, int]
MAX_SIDE = 8192
TIERS = {"0.5K": 512 * 512, "1K": 1024 * 1024, "2K": 2048 * 2048, "4K": 4096 * 4096}


def output_size(
    input_size: tuple[int, int], size: str = "same", aspect_ratio: str | None = None, resolution: str | None = None
) -> tuple[int, int]:
    """Lumenfall semantics: `size` WxH wins; else `aspect_ratio` sets the shape and `resolution` the
    scale (each defaulting to the input's); 'same' with neither keeps the input's size."""
    if size != "same":
        w, h = (int(v) for v in size.split("x"))
    else:
        iw, ih = input_size
        pixels = _tier_pixels(resolution) if resolution else iw * ih
        if aspect_ratio:
            a, b = (int(v) for v in aspect_ratio.split(":"))
        else:
            a, b = iw, ih
        if not (aspect_ratio or resolution):
            return input_size
        w = round(math.sqrt(pixels * a / b))
        h = round(w * b / a)
    if not (16 <= w <= MAX_SIDE and 16 <= h <= MAX_SIDE):
        raise ValueError(f"output size {w}x{h} is outside 16..{MAX_SIDE} px per side")
    return w, h


def _tier_pixels(resolution: str) -> int:
    return TIERS.get(resolution.upper()) or int(float(resolution) * 1024 * 1024)


def to_shape(image: Image.Image, target: tuple[int, int], mode: str) -> Image.Image:
    """The input brought to the target's aspect ratio at about its own pixel count; unchanged when the
    aspects match. The pixel count is kept so an extreme target cannot blow up memory."""
    w, h = image.size
    tw, th = target
    if abs(w * th - h * tw) <= max(tw, th):  # the same aspect, up to a pixel of rounding
        return image
    # the shaped image: the target's aspect, the input's pixel count
    sw = max(1, round(math.sqrt(w * h * tw / th)))
    sh = max(1, round(sw * th / tw))
    if mode == "stretch":
        return image.resize((sw, sh), Image.Resampling.LANCZOS)
    if mode == "crop":
        if w * th > h * tw:  # too wide: keep the full height
            cw = max(1, round(h * tw / th))
            return image.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
        ch = max(1, round(w * th / tw))
        return image.crop((0, (h - ch) // 2, w, (h - ch) // 2 + ch))
    scale = min(sw / w, sh / h)
    inner = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    return _pad_into(inner, (sw, sh), (sw - inner.width) // 2, (sh - inner.height) // 2)


def fit(image: Image.Image, canvas: tuple[int, int], mode: str) -> tuple[Image.Image, Box]:
    """Put the image on the model's canvas; returns the canvas image and the box the content fills."""
    cw, ch = canvas
    if mode == "stretch":
        return image.resize(canvas, Image.Resampling.LANCZOS), (0, 0, cw, ch)
    w, h = image.size
    scale = min(cw / w, ch / h)
    nw, nh = max(1, min(cw, round(w * scale))), max(1, min(ch, round(h * scale)))
    x0, y0 = (cw - nw) // 2, (ch - nh) // 2
    resized = image.resize((nw, nh), Image.Resampling.LANCZOS)
    return _pad_into(resized, canvas, x0, y0), (x0, y0, x0 + nw, y0 + nh)


def unfit(edited: Image.Image, box: Box, target: tuple[int, int]) -> Image.Image:
    """The edited content cut from its box and resized to the output size."""
    return edited.crop(box).resize(target, Image.Resampling.LANCZOS)


def _pad_into(image: Image.Image, canvas: tuple[int, int], x0: int, y0: int) -> Image.Image:
    """Centre the image on a canvas filled with its own mean border colour (a neutral backdrop)."""
    if image.size == canvas:
        return image
    w, h = image.size
    border = [image.crop(b) for b in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))]
    means = [ImageStat.Stat(b).mean for b in border]
    fill = tuple(round(sum(m[c] for m in means) / len(means)) for c in range(len(means[0])))
    out = Image.new(image.mode, canvas, fill)
    out.paste(image, (x0, y0))
    return out
