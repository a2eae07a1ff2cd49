"""The image formats dreambatch reads and writes (PNG, JPEG, WebP): one table, TABLE; every lookup the code
uses (by name, suffix, content type, first bytes) is derived from it here.

A format's name is what a row's `output_format` takes. Images in other formats are recognised by their
suffix (UNREAD_SUFFIXES) only to say so when they are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageFormat:
    name: str  # ours: a row's output_format
    pil: str  # Pillow's name (Image.open formats=, Image.save)
    content_type: str
    suffixes: tuple[str, ...]  # recognised in keys and file names; outputs are written with the first
    signature: tuple[tuple[int, bytes], ...]  # (offset, bytes) that every file of the format has
    also_types: tuple[str, ...] = ()  # other content types read as this format
    label: str = ""  # how messages name it (default: its Pillow name)

    @property
    def shown(self) -> str:
        return self.label or self.pil


TABLE = (
    ImageFormat("png", "PNG", "image/png", (".png",), ((0, b"\x89PNG\r\n\x1a\n"),)),
    ImageFormat("jpeg", "JPEG", "image/jpeg", (".jpg", ".jpeg"), ((0, b"\xff\xd8\xff"),), ("image/jpg",)),
    ImageFormat("webp", "WEBP", "image/webp", (".webp",), ((0, b"RIFF"), (8, b"WEBP")), label="WebP"),
)
FORMATS = {f.name: f for f in TABLE}

CONTENT_TYPES = {f.name: f.content_type for f in TABLE}  # png → image/png
EXTENSIONS = {f.name: f.suffixes[0][1:] for f in TABLE}  # jpeg → jpg: what an output's key ends with
SUFFIXES = {f.name: f.suffixes for f in TABLE}  # jpeg → (.jpg, .jpeg): accepted in an output_key
BY_SUFFIX = {s: f.name for f in TABLE for s in f.suffixes}  # .jpeg → jpeg
BY_CONTENT_TYPE = {t: f.name for f in TABLE for t in (f.content_type, *f.also_types)}  # image/jpg → jpeg
IMAGE_SUFFIXES = tuple(BY_SUFFIX)  # .png .jpg .jpeg .webp
PIL_NAMES = {f.pil for f in TABLE}  # what Pillow may open an input as
UNREAD_SUFFIXES = {
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
    ".avif",
    ".svg",
    ".psd",
    ".ico",
    ".jxl",
    ".raw",
    ".cr2",
    ".nef",
    ".dng",
}  # images, but in a format that is not read


def sniff(data: bytes) -> str | None:
    """The format of a file from its first bytes (its magic number), or None when it is none of ours."""
    for f in TABLE:
        if all(data[at : at + len(magic)] == magic for at, magic in f.signature):
            return f.name
    return None


def begins_like(data: bytes) -> str | None:
    """The format a file claims by its first bytes even when the rest is damaged: its magic number's first two
    bytes (a JPEG's SOI marker, PNG's \\x89P, RIFF) and every further part of the signature. For "damaged JPEG"
    rather than "not an image" when the bytes say what the file was meant to be."""
    for f in TABLE:
        (at, magic), rest = f.signature[0], f.signature[1:]
        if data[at : at + 2] == magic[:2] and all(data[o : o + len(m)] == m for o, m in rest):
            return f.name
    return None
