"""A job's review contact sheet: before/after pairs a merchandiser checks before publishing (for a generation
job, which has no input image, each card shows the prompt beside the output).

    {prefix}{job_id}/sheet.html   one card per row, headed by the row's own name (its sku, else its source
                                  object or path, else its row id): line, status, metadata (no etags), the
                                  input and the output side by side, a link to each output; images inlined as
                                  small JPEG thumbnails, so the page is one self-contained file. A scheduled
                                  run's sheet names its schedule and date at the top
    {prefix}{job_id}/sheet.png    the same pairs as one PNG grid
Large jobs are split into pages of `page_size` rows: sheet.html, sheet-2.html, … (and .png).

Built from the job's durable record (job.json, rows.jsonl, results.jsonl), so it works after the job
ended, from any machine that can read the output location.
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from jobs import inputs, keys, records
from jobs.errors import DreambatchError, InputError, JobNotFound
from jobs.formats import CONTENT_TYPES
from jobs.lifecycle import ItemStatus
from jobs.models import JobRecord
from jobs.settings import Settings
from jobs.storage import ObjectStore
from worker import imaging

THUMB = 192  # px, the longer side of each thumbnail
GRID_COLUMNS = 4
MAX_PAGE_SIZE = 1000
NAME_FIELDS = ("sku", "source_key", "source_path", "path")  # metadata that names a row, first found wins


def row_name(metadata: dict, row_id: str) -> tuple[str, str | None]:
    """What a person calls a row, and the metadata field it came from (None: the manifest's row id)."""
    for field_name in NAME_FIELDS:
        if metadata.get(field_name):
            return str(metadata[field_name]), field_name
    return row_id, None


def shown_metadata(metadata: dict, named_by: str | None) -> dict:
    """The metadata worth a reader's eye: not the field the heading already shows, no etags."""
    return {k: v for k, v in metadata.items() if k != named_by and not str(k).lower().endswith("etag")}


@dataclass
class Pair:
    item_id: str
    line: int
    status: str
    metadata: dict
    error: str | None
    before: Image.Image | None
    before_error: str | None
    after: list[Image.Image] = field(default_factory=list)
    prompt: str | None = None  # a generation row: what the output was made from, shown where an input would be
    links: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return row_name(self.metadata, self.item_id)[0]


@dataclass
class SheetPage:
    html_uri: str
    png_uri: str
    pairs: int


def _thumb(data: bytes, max_pixels: int) -> Image.Image:
    image = imaging.decode_input(data, max_pixels)
    image.thumbnail((THUMB, THUMB))
    return image


def _lines_and_inputs(job: JobRecord, objects: ObjectStore) -> tuple[list[dict], dict[str, dict]]:
    """The results lines, and each row's params by id (its input image, or its prompt)."""
    lines = records.read_results(objects, job.job_id)
    if lines is None:
        raise InputError(f"job {job.job_id} has no results.jsonl yet: make the sheet when the job has ended")
    params = {row["id"]: row.get("params") or {} for row in records.read_rows(objects, job.job_id) or []}
    return lines, params


def _load_pairs(
    job: JobRecord,
    lines: list[dict],
    params: dict[str, dict],
    settings: Settings,
    fetch_store: Callable[[str], ObjectStore],
) -> list[Pair]:
    """The thumbnails of one page's rows (a page at a time, so a large job never holds every image)."""
    pairs = []
    for line in lines:
        pair = Pair(line["id"], line["line"], line["status"], line["metadata"], line["error"], None, None)
        row = params.get(line["id"], {})
        ref = row.get("image")
        try:
            if ref is not None:
                pair.before = _thumb(inputs.fetch(ref, job, settings, fetch_store), settings.inputs.max_pixels)
            elif row.get("prompt"):  # a generation row: nothing came before the output but its prompt
                pair.prompt = str(row["prompt"])
            else:
                raise InputError("no input image on this row")
        except DreambatchError as exc:
            pair.before_error = str(exc)
        for out in line["output"]["images"]:
            pair.links.append(out.get("url") or out["s3_uri"])
            try:
                pair.after.append(
                    _thumb(inputs.fetch(out["s3_uri"], job, settings, fetch_store), settings.inputs.max_pixels)
                )
            except DreambatchError as exc:
                pair.error = f"output not readable: {exc}"
        pairs.append(pair)
    return pairs


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=82)
    return f"data:{CONTENT_TYPES['jpeg']};base64," + base64.b64encode(buf.getvalue()).decode()


def _href(link: str) -> str:
    return link if link.startswith(("https://", "http://", "s3://")) else Path(link).as_uri()


CSS = """
body{font:14px system-ui,sans-serif;margin:16px;background:#f4f4f4;color:#222}
h1{font-size:18px} h2.name{font-size:14px;margin:0 0 2px;word-break:break-all}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
.card.failed{border-color:#d33} .pair{display:flex;gap:6px;align-items:flex-start}
.pair figure{margin:0;flex:1} figcaption{font-size:11px;color:#666}
img{max-width:192px;max-height:192px;display:block;background:#eee}
.meta{font-size:12px;color:#444;word-break:break-all} .error{color:#b00;font-size:12px}
.prompt{font-size:12px;color:#333;max-width:192px;white-space:pre-wrap}
"""
COUNT_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-loaded', ok);
  document.getElementById('loaded').textContent = ok + ' of ' + imgs.length + ' images shown';
});
"""


def render_html(job: JobRecord, pairs: list[Pair], page: int, pages: int) -> str:
    e = html.escape
    cards = []
    for p in pairs:
        name, named_by = row_name(p.metadata, p.item_id)
        meta = " · ".join(f"{e(str(k))}: {e(str(v))}" for k, v in shown_metadata(p.metadata, named_by).items())
        if p.before:
            before = f'<img class="before" alt="before {e(name)}" src="{_data_uri(p.before)}">'
        elif p.prompt is not None:
            before = f'<div class="prompt">{e(p.prompt)}</div>'
        else:
            before = f'<div class="error">input: {e(p.before_error or "")}</div>'
        caption = "prompt" if p.prompt is not None else "before"
        afters = "".join(
            f'<a href="{e(_href(link))}"><img class="after" alt="after {e(name)}" src="{_data_uri(img)}"></a>'
            for img, link in zip(p.after, p.links, strict=False)
        )
        links = " ".join(f'<a class="output" href="{e(_href(link))}">{e(link)}</a>' for link in p.links)
        error = f'<div class="error">{e(p.error)}</div>' if p.error else ""
        cards.append(
            f'<section class="card {e(p.status)}" data-id="{e(p.item_id)}">'
            f'<h2 class="name">{e(name)}</h2><div>line {p.line} · {e(p.status)}</div><div class="meta">{meta}</div>'
            f'<div class="pair"><figure>{before}<figcaption>{caption}</figcaption></figure>'
            f"<figure>{afters or '<div class=error>no output</div>'}<figcaption>after</figcaption></figure></div>"
            f'{error}<div class="meta">{links}</div></section>'
        )
    what = f"{job.schedule} · {job.created_at[:10]}" if job.schedule else job.job_id  # a scheduled run: its name, date
    title = f"{what} — review ({job.model}{f', page {page} of {pages}' if pages > 1 else ''})"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style>'
        f'<script>{COUNT_SCRIPT}</script></head><body data-pairs="{len(pairs)}"><h1>{e(title)}</h1>'
        f"<p>job {e(job.job_id)} · {len(pairs)} row(s) · "
        f"{sum(p.status == ItemStatus.COMPLETED for p in pairs)} completed · "
        f'<span id="loaded"></span></p><div class="grid">{"".join(cards)}</div>'
        f"{_catalog_section(job) if page == 1 else ''}</body></html>"
    )


def _catalog_section(job: JobRecord) -> str:
    """A scheduled run's job: the source objects it did not edit and why (empty, a format not read, failed
    before), and the images deleted from the source; from the run's record (`job.catalog`)."""
    found = job.catalog or {}
    e = html.escape
    rows = [(p["key"], p["reason"]) for p in found.get("problems", [])]
    rows += [(d["key"], f"{d['why']}; outputs {d['action']}") for d in found.get("deleted", [])]
    if not rows:
        return ""
    more = found.get("problems_total", 0) + found.get("deleted_total", 0) - len(rows)
    items = "".join(f'<li data-key="{e(k)}"><b>{e(k)}</b>: {e(why)}</li>' for k, why in rows)
    return (
        f'<section class="catalog-skipped"><h2>Not edited in this run ({e(str(found.get("schedule")))})</h2>'
        f"<ul>{items}</ul>{f'<p>… and {more} more (the run record lists them)</p>' if more > 0 else ''}</section>"
    )


def render_png(pairs: list[Pair]) -> bytes:
    font = ImageFont.load_default()
    cell_w, label_h, pad = 2 * THUMB + 12, 34, 8
    cell_h = THUMB + label_h + pad
    rows = max(1, -(-len(pairs) // GRID_COLUMNS))
    sheet = Image.new("RGB", (GRID_COLUMNS * cell_w + pad, rows * cell_h + pad), (244, 244, 244))
    draw = ImageDraw.Draw(sheet)
    for n, p in enumerate(pairs):
        x, y = pad + (n % GRID_COLUMNS) * cell_w, pad + (n // GRID_COLUMNS) * cell_h
        for k, image in enumerate([p.before, p.after[0] if p.after else None]):
            left = x + k * (THUMB + 4)
            if image is None and k == 0 and p.prompt is not None:  # a generation row: its prompt, wrapped
                draw.rectangle((left, y, left + THUMB - 1, y + THUMB - 1), outline=(190, 190, 190))
                lines = textwrap.wrap(p.prompt, 30)[:13]
                draw.multiline_text((left + 6, y + 6), "\n".join(lines), fill=(40, 40, 40), font=font)
            elif image is None:
                draw.rectangle((left, y, left + THUMB - 1, y + THUMB - 1), outline=(200, 40, 40))
                draw.text((left + 6, y + 6), "input failed" if k == 0 else p.status, fill=(180, 0, 0), font=font)
            else:
                sheet.paste(image, (left + (THUMB - image.width) // 2, y + (THUMB - image.height) // 2))
        name = p.name if len(p.name) <= 60 else "…" + p.name[-59:]  # a long path: its end says the most
        draw.text((x, y + THUMB + 4), name, fill=(20, 20, 20), font=font)
        draw.text((x, y + THUMB + 18), f"line {p.line} · {p.status}"[:60], fill=(90, 90, 90), font=font)
    buf = io.BytesIO()
    sheet.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def make_sheet(
    job_id: str,
    objects: ObjectStore,
    settings: Settings,
    fetch_store: Callable[[str], ObjectStore],
    page_size: int = 200,
    copy_to: Path | None = None,
) -> list[SheetPage]:
    """Write the job's sheet page(s) next to it (and into `copy_to` when given); returns them."""
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InputError(f"--page-size must be 1..{MAX_PAGE_SIZE} (got {page_size})")
    job = records.read_job(objects, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r} under {objects.location}")
    lines, params = _lines_and_inputs(job, objects)
    chunks = [lines[i : i + page_size] for i in range(0, len(lines), page_size)] or [[]]
    pages = []
    for n, chunk_lines in enumerate(chunks, start=1):
        suffix = "" if n == 1 else f"-{n}"
        chunk = _load_pairs(job, chunk_lines, params, settings, fetch_store)
        page_html = render_html(job, chunk, n, len(chunks)).encode()
        page_png = render_png(chunk)
        html_key = keys.S3_SHEET.format(prefix="", job_id=job_id, page=suffix, ext="html")
        png_key = keys.S3_SHEET.format(prefix="", job_id=job_id, page=suffix, ext="png")
        pages.append(
            SheetPage(
                objects.put(html_key, page_html, "text/html; charset=utf-8"),
                objects.put(png_key, page_png, CONTENT_TYPES["png"]),
                len(chunk),
            )
        )
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            (copy_to / f"sheet{suffix}.html").write_bytes(page_html)
            (copy_to / f"sheet{suffix}.png").write_bytes(page_png)
    return pages
