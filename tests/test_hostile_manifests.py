"""Hostile manifests, generated here: each answers `validate` with a `line N: field: …` (or `file: …`) message and
the right verdict, never a traceback, and finishes (subprocess timeouts, not timings). The E1 prompt split is
linear on a 1 MB prompt; the API stays answering while it splits one; `--skip-invalid` with an unreadable row and
a valid row whose id is that row's line number makes a job whose every item is its own, and it ends."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import uuid

import httpx
import pytest
from PIL import Image
from services import ApiServer, cli, s3_client, service_env, wait_until

from jobs.settings import Settings
from jobs.store import RedisStore

pytestmark = pytest.mark.timeout(240)
PATHOLOGICAL = "Editing Instruction:" + " " * 900_000 + "x"  # the old pattern backtracked for ever on this


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buf, "PNG")
    return buf.getvalue()


def jsonl(*rows: dict | str) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


EDIT = {"image": "good.png", "instruction": "make it blue"}
# name → (file name, content, model, exit status, rows, valid, the message every error list must hold)
CORPUS = {
    "json nested 1,000 deep": (
        "deep.jsonl",
        b'{"prompt": "a", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}\n",
        "i1-fast",
        2,
        1,
        0,
        "line 1: row: invalid JSON: nested deeper than 32 levels",
    ),
    "json nested 40 deep in a value": (
        "deep40.jsonl",
        jsonl({"prompt": "a"}, '{"prompt": "b", "tags": ' + "[" * 40 + "]" * 40 + "}"),
        "i1-fast",
        2,
        2,
        1,
        "line 2: tags: nested deeper than 32 levels",
    ),
    "an integer of 5,000 digits": (
        "bigint.jsonl",
        b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}\n",
        "i1-fast",
        2,
        1,
        0,
        "line 1: row: invalid JSON: Exceeds the limit (4300 digits)",
    ),
    "an integer of 5,000 digits in a CSV": (
        "bigint.csv",
        b"prompt,seed\na," + b"9" * 5000 + b"\n",
        "i1-fast",
        2,
        1,
        0,
        "line 2: seed: unable to parse input string as an integer",
    ),
    "a quote never closed in the header": (
        "header-quote.csv",
        b'"prompt,seed\na,1\n',
        "i1-fast",
        2,
        0,
        0,
        "file: header: line 1: malformed CSV: the quoted field opened on line 1 is never closed",
    ),
    "a NUL in the header": (
        "header-nul.csv",
        b"pro\x00mpt,seed\na,1\n",
        "i1-fast",
        2,
        0,
        0,
        "file: header: line 1: a column name holds a control character",
    ),
    "a NUL in an image path": (
        "image-nul.csv",
        b"image,instruction\ngood\x00.png,make it blue\ngood.png,make it blue\n",
        "e1-1",
        2,
        2,
        1,
        "line 2: image: holds a control character ('\\x00')",
    ),
    "a NUL in an image path (JSONL)": (
        "image-nul.jsonl",
        jsonl({**EDIT, "image": "good\x00.png"}),
        "e1-1",
        2,
        1,
        0,
        "line 1: image: holds a control character",
    ),
    "an empty CSV": ("empty.csv", b"", "i1-fast", 2, 0, 0, "file: rows: the manifest has no rows"),
    "an empty JSONL": ("empty.jsonl", b"", "i1-fast", 2, 0, 0, "file: rows: the manifest has no rows"),
    "a header and no rows": ("header-only.csv", b"prompt,seed\n", "i1-fast", 2, 0, 0, "file: rows: the manifest"),
    "NULs only (CSV)": ("nul.csv", b"\x00\x00\x00\n", "i1-fast", 2, 0, 0, "file: header: line 1: a column name"),
    "NULs only (JSONL)": ("nul.jsonl", b"\x00\x00\x00\n", "i1-fast", 2, 1, 0, "line 1: row: invalid JSON"),
    "a quote never closed swallows no row silently": (
        "unterminated.csv",
        b'prompt,seed\n"a,1\nb,2\nc,3\n',
        "i1-fast",
        2,
        0,
        0,
        "file: row: line 2: malformed CSV: the quoted field opened on line 2 is never closed",
    ),
    "a stray quote fails its own row only": (
        "stray.csv",
        b'prompt,seed\n"a"b,1\nc,2\n',
        "i1-fast",
        2,
        2,
        1,
        "line 2: row: malformed CSV: ',' expected after '\"'",
    ),
    "ids that differ only by whitespace": (
        "ids.csv",
        b'id,prompt\nr1,a\n" r1\n",b\n',
        "i1-fast",
        2,
        2,
        1,
        "line 3: id: duplicate id; ids must be unique in a manifest (got 'r1')",
    ),
    "an id with a control character": (
        "ctl-id.jsonl",
        jsonl({"id": "r\x011", "prompt": "a"}, {"id": "r2", "prompt": "b"}),
        "i1-fast",
        2,
        2,
        1,
        "line 1: id: string should match pattern",
    ),
    "the E1 prompt that backtracked, 900 KB": (
        "e1-prompt.jsonl",
        jsonl({"image": "good.png", "prompt": PATHOLOGICAL}),
        "e1-1",
        2,
        1,
        0,
        "line 1: instruction: string should have at most 4000 characters",
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_a_hostile_manifest_gets_a_line_named_verdict_never_a_traceback(name, tmp_path):
    file_name, content, model, status, rows, valid, message = CORPUS[name]
    (tmp_path / "good.png").write_bytes(png())
    manifest = tmp_path / file_name
    manifest.write_bytes(content)
    env = service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:1", tmp_path)
    res = cli("validate", str(manifest), "--model", model, "--json", env=env, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == status, res.stderr[-2000:]
    report = json.loads(res.stdout)
    assert (report["rows"], report["valid"]) == (rows, valid), report["errors"]
    assert any(e.startswith(message) for e in report["errors"]), report["errors"]
    assert all(e.startswith(("line ", "file: ", "defaults: ")) for e in report["errors"]), report["errors"]


def test_the_e1_prompt_split_is_linear_on_a_megabyte(tmp_path):
    """Each shape that made the old pattern backtrack, 1 MB long, split in one subprocess within a bound the old
    pattern missed by hours."""
    script = (
        "from jobs.dialects import split_e1_prompt as split\n"
        "n = 1_000_000\n"
        "for text in ['Editing Instruction:' + ' ' * n + 'x', 'Editing Instruction:' + ' .' * (n // 2),\n"
        "             'editing instruction: a' + ' ' * n + '. target image description:' + ' ' * n + 'b',\n"
        "             'Editing Instruction: ' + 'target image description' * (n // 25)]:\n"
        "    split(text)\n"
        "print(split('Editing Instruction: add a hat. Target Image Description: a cat in a hat'))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "('add a hat', 'a cat in a hat')"


def test_an_api_edit_with_the_pathological_prompt_leaves_healthz_answering(redis_server, s3_endpoint):
    bucket = f"t-hostile-{uuid.uuid4().hex[:8]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    settings = Settings(
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/3",  # its own database: no worker takes the job
        output=f"s3://{bucket}/api",
        s3={"endpoint_url": s3_endpoint},
        api={"wait_timeout": 0.05},
    )
    api = ApiServer(settings)
    try:
        answers: dict[str, httpx.Response] = {}
        headers = {"Authorization": f"Bearer {api.key('images')}"}
        prompt = "Editing Instruction:" + " " * 200_000 + "x"

        def post() -> None:
            answers["edit"] = httpx.post(
                f"{api.url}/v1/images/edits",
                data={"prompt": prompt, "model": "e1-1"},
                files={"image": ("a.png", png(), "image/png")},
                headers=headers,
                timeout=120,
            )

        thread = threading.Thread(target=post)
        thread.start()
        health = httpx.get(f"{api.url}/healthz", timeout=30)
        assert health.status_code in (200, 503), health.text
        thread.join(120)
        assert not thread.is_alive(), "the edit request never answered"
        assert answers["edit"].status_code < 500, answers["edit"].text
        assert httpx.get(f"{api.url}/healthz", timeout=30).status_code in (200, 503)
    finally:
        api.stop()


def test_skip_invalid_with_an_unreadable_line_2_and_a_row_with_id_2_ends(
    redis_server, s3_endpoint, bucket, tiny_dir, start_worker, tmp_path
):
    io_worker = start_worker("worker", "--io")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(jsonl({"id": "a", "prompt": "x"}, "not json", {"id": "2", "prompt": "y"}, {"prompt": "z"}))
    env = service_env(redis_server.url, s3_endpoint, tiny_dir)
    res = cli("submit", str(manifest), "--output", f"s3://{bucket}/o", "--skip-invalid", "--json", env=env)
    assert res.returncode == 0, res.stderr
    sub = json.loads(res.stdout)
    assert (sub["total"], sub["queued"], sub["rejected"]) == (4, 3, 1)
    store = RedisStore.from_url(redis_server.url)
    items = {i.item_id: i for i in store.items(sub["job_id"])}
    assert sorted(items) == ["2", "4", "_line2", "a"]  # every row its own item: the unreadable one never takes "2"
    assert items["_line2"].status == "failed" and "invalid JSON" in items["_line2"].error
    assert items["2"].status == "queued" and items["2"].line == 3
    # no GPU worker here: cancelling ends the queued items, and the job ends with every item counted
    io_worker.wait_ready()
    assert cli("cancel", sub["job_id"], env=env).returncode == 0
    job = wait_until(lambda: (j := store.get_job(sub["job_id"])) and j.finished_at and j, 90, 0.25, what="job end")
    assert sum(job.counts.values()) == 4 and job.counts.get("failed") == 1
