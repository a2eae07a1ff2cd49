// The review page: jobs with live progress, a job's before/after grid, failures with their reason, and cancel /
// retry of a job or one item. Plain JS over the native API (docs/api.md); the API key stays in this tab's
// sessionStorage and goes out only as the Authorization header, images included (fetched, then shown as blobs).
"use strict";

const KEY = "dreambatch.key";
const POLL_MS = 1000;
const PAGE = 100;
const ENDED = ["completed", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);
const blobs = new Map(); // image path → object URL, so a poll never fetches an image twice
let poll = null;
let offset = 0;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function notice(text, bad = false) {
  $("notice").textContent = text || "";
  $("notice").className = bad ? "bad" : "";
}

async function api(path, method = "GET") {
  const res = await fetch(path, { method, headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` } });
  if (res.status === 401) {
    sessionStorage.removeItem(KEY);
    route();
    throw new Error("the API key was refused (missing, unknown or revoked): enter another");
  }
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error((body.error && body.error.message) || `${method} ${path}: ${res.status}`);
  }
  return res;
}

const json = async (path, method) => (await api(path, method)).json();
const ended = (counts) => ENDED.reduce((n, s) => n + (counts[s] || 0), 0);
const number = (v, unit) => (typeof v === "number" ? `${v}${unit}` : "—");

// A row's own name: its SKU, else its source object or path, else the row id; never an etag.
function rowName(item) {
  const m = item.metadata || {};
  return String(m.sku || m.source_key || m.source_path || m.path || item.id);
}

function metaText(item) {
  return Object.entries(item.metadata || {})
    .filter(([k]) => !/etag$/i.test(k) && k !== "sku")
    .map(([k, v]) => `${k}: ${v}`)
    .join(" · ");
}

function progressBar(counts, total) {
  const done = ended(counts);
  const pct = total ? Math.round((100 * done) / total) : 0;
  const fill = el("span");
  fill.style.width = `${pct}%`; // (a style property, not an attribute: the page's CSP allows no inline style)
  return el("div", { class: "bar", title: `${done} of ${total} ended` }, fill);
}

function countsText(status) {
  const c = status.counts;
  const parts = [`${ended(c)}/${c.total} ended`];
  for (const s of ["running", "queued", "completed", "failed", "cancelled"]) if (c[s]) parts.push(`${c[s]} ${s}`);
  return parts.join(" · ");
}

// Figures a newer API adds (a job's GPU-seconds `gpu_s`, its running items' denoising steps `running`:
// [{id, step, steps}]): shown when the server sends them, left out when it does not.
function extras(obj) {
  const out = [];
  if (typeof obj.gpu_s === "number") out.push(`GPU ${obj.gpu_s.toFixed(1)} s`);
  if (typeof obj.step === "number" && typeof obj.steps === "number") out.push(`step ${obj.step}/${obj.steps}`);
  return out;
}

function steps(status) {
  const running = Array.isArray(status.running) ? status.running : [];
  return new Map(running.filter((r) => r && r.id !== undefined).map((r) => [String(r.id), r]));
}

// --- the jobs list --------------------------------------------------------------------------------
async function showJobs() {
  const list = await json("/v1/jobs?limit=50");
  $("job-rows").replaceChildren(
    ...list.data.map((s) =>
      el(
        "tr",
        { "data-id": s.id, "data-status": s.status },
        el(
          "td",
          {},
          el("a", { href: `#job/${encodeURIComponent(s.id)}` }, s.id),
          s.schedule ? el("div", {}, el("small", {}, `schedule ${s.schedule}`)) : null,
        ),
        el("td", {}, s.model),
        el("td", { class: `status ${s.status}` }, s.status, s.warning ? el("div", { class: "bad" }, s.warning) : null),
        el("td", {}, progressBar(s.counts, s.counts.total), el("small", {}, [countsText(s), ...extras(s)].join(" · "))),
        el("td", {}, number(s.rate_per_s, "/s")),
        el("td", {}, number(s.eta_s, " s")),
        el("td", {}, (s.created_at || "").replace("T", " ").slice(0, 19)),
      ),
    ),
  );
  if (!list.data.length) $("job-rows").append(el("tr", {}, el("td", { colspan: 7 }, "no jobs yet")));
}

// --- one job ----------------------------------------------------------------------------------------
async function image(img, path) {
  try {
    if (!blobs.has(path)) blobs.set(path, URL.createObjectURL(await (await api(path)).blob()));
    img.src = blobs.get(path);
  } catch (err) {
    img.replaceWith(el("div", { class: "missing" }, `image not available: ${err.message}`));
  }
}

function card(job, item, step) {
  const base = `/v1/jobs/${encodeURIComponent(job.id)}/items/${encodeURIComponent(item.id)}`;
  const round = `${item.attempts}.${(item.output && item.output.images.length) || 0}`;
  const before = job.model.startsWith("i1")
    ? el("div", { class: "missing" }, "generated from its prompt")
    : el("img", { class: "before", alt: `before ${rowName(item)}`, "data-src": `${base}/input?v=${item.attempts}` });
  const outputs = (item.output && item.output.images) || [];
  const after = outputs.length
    ? outputs.map((_, n) =>
        el("img", { class: "after", alt: `after ${rowName(item)}`, "data-src": `${base}/output/${n}?v=${round}` }),
      )
    : [el("div", { class: "missing" }, item.status === "completed" ? "no output" : item.status)];
  const expired = item.reason === "expired";
  const cancelled = item.status === "cancelled" ? (expired ? "expired before it ran" : "cancelled") : null;
  const why = item.error || cancelled;
  const act = async (what) => {
    try {
      await api(`${base}/${what}`, "POST");
      notice(`${what} ${rowName(item)}: ${item.status === "running" ? "it stops at its next step" : "done"}`);
      refresh();
    } catch (err) {
      notice(err.message, true);
    }
  };
  const node = el(
    "section",
    { class: `card ${item.status}`, "data-id": item.id, "data-status": item.status, "data-attempts": item.attempts },
    el("h2", { class: "name" }, rowName(item)),
    el(
      "div",
      { class: "meta" },
      [`line ${item.line}`, item.status, `attempt ${item.attempts}`, metaText(item), ...extras(step || {})]
        .filter(Boolean)
        .join(" · "),
    ),
    el(
      "div",
      { class: "pair" },
      el("figure", {}, before, el("figcaption", {}, "before")),
      el("figure", {}, ...after, el("figcaption", {}, "after")),
    ),
    why ? el("p", { class: "reason" }, why) : null,
    el(
      "div",
      { class: "actions" },
      ["queued", "running"].includes(item.status)
        ? el("button", { class: "cancel", onclick: () => act("cancel") }, "cancel")
        : null,
      item.status === "failed" ? el("button", { class: "retry", onclick: () => act("retry") }, "retry") : null,
    ),
  );
  const shown = [item.status, item.attempts, item.error, item.reason, outputs.length, extras(step || {})];
  node.dataset.sig = JSON.stringify(shown);
  return node;
}

async function showJob(jobId) {
  const filter = $("filter").value;
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const [job, items] = await Promise.all([
    json(path),
    json(`${path}/items?limit=${PAGE}&offset=${offset}${filter ? `&status=${filter}` : ""}`),
  ]);
  $("job-title").textContent = `${job.id} · ${job.model}`;
  $("job-summary").textContent = [
    job.status,
    countsText(job),
    `rate ${number(job.rate_per_s, "/s")}`,
    `ETA ${number(job.eta_s, " s")}`,
    job.round ? `retry round ${job.round}` : "",
    ...extras(job),
    job.warning || "",
  ]
    .filter(Boolean)
    .join(" · ");
  $("job-summary").dataset.status = job.status;
  $("job-bar").style.width = `${job.counts.total ? Math.round((100 * ended(job.counts)) / job.counts.total) : 0}%`;
  $("cancel-job").disabled = Boolean(job.finished_at) || job.cancel_requested;
  $("retry-job").disabled = !job.counts.failed;
  $("cancel-job").onclick = () => jobAction(jobId, "cancel");
  $("retry-job").onclick = () => jobAction(jobId, "retry");
  const pages = $("pages");
  pages.replaceChildren(
    ...[
      offset ? el("button", { onclick: () => page(-PAGE) }, "previous") : null,
      el("span", {}, ` items ${items.data.length ? offset + 1 : 0}–${offset + items.data.length} of ${items.total} `),
      items.next_offset !== null ? el("button", { onclick: () => page(PAGE) }, "next") : null,
    ].filter(Boolean),
  );
  // keyed update: a card is redrawn only when its item changed, so images do not flicker
  const grid = $("grid");
  const old = new Map([...grid.children].map((c) => [c.dataset.id, c]));
  const running = steps(job);
  const cards = items.data.map((item) => {
    const fresh = card(job, item, item.status === "running" ? running.get(String(item.id)) : null);
    const kept = old.get(item.id);
    if (kept && kept.dataset.sig === fresh.dataset.sig) return kept;
    for (const img of fresh.querySelectorAll("img[data-src]")) image(img, img.dataset.src);
    return fresh;
  });
  grid.replaceChildren(...cards);
}

async function jobAction(jobId, what) {
  try {
    const out = await json(`/v1/jobs/${encodeURIComponent(jobId)}/${what}`, "POST");
    notice(what === "retry" ? `re-queued ${out.requeued.length} item(s)` : `cancel asked: ${out.status}`);
    refresh();
  } catch (err) {
    notice(err.message, true);
  }
}

function page(delta) {
  offset = Math.max(0, offset + delta);
  refresh();
}

// --- routing and polling ------------------------------------------------------------------------
function view() {
  const match = location.hash.match(/^#job\/(.+)$/);
  return match ? { job: decodeURIComponent(match[1]) } : {};
}

async function refresh() {
  clearTimeout(poll);
  const v = view();
  try {
    if (v.job) await showJob(v.job);
    else await showJobs();
    document.body.dataset.loaded = String(Date.now());
  } catch (err) {
    notice(err.message, true);
  }
  if (sessionStorage.getItem(KEY)) poll = setTimeout(refresh, POLL_MS);
}

function route() {
  const signedIn = Boolean(sessionStorage.getItem(KEY));
  const v = view();
  $("login").hidden = signedIn;
  $("forget").hidden = !signedIn;
  $("jobs").hidden = !signedIn || Boolean(v.job);
  $("job").hidden = !signedIn || !v.job;
  if (!signedIn) {
    clearTimeout(poll);
    return;
  }
  offset = 0;
  $("grid").replaceChildren();
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    notice("");
    route();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    route();
  });
  $("filter").addEventListener("change", () => {
    offset = 0;
    refresh();
  });
  window.addEventListener("hashchange", route);
  route();
});
