"""The ledger check every fault scenario ends with: each manifest row accounted for exactly once in
`results.jsonl`, in manifest order, every output it lists present in S3 with an item record beside it,
and duplicate executions counted (they are allowed, and must have been harmless)."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Ledger:
    lines: list[dict]
    statuses: dict[str, str]  # row id → status
    extra_attempts: int  # executions beyond the first, summed over rows (redeliveries, retries)


def check_ledger(
    s3, bucket: str, prefix: str, job_id: str, ids: list[str], *, expect: dict[str, str] | str = "completed"
) -> Ledger:
    base = f"{prefix.strip('/')}/{job_id}/" if prefix.strip("/") else f"{job_id}/"
    body = s3.get_object(Bucket=bucket, Key=f"{base}results.jsonl")["Body"].read().decode()
    lines = [json.loads(x) for x in body.splitlines()]
    got = [x["id"] for x in lines]
    assert got == ids, f"results rows {got} != manifest rows {ids}"  # each row once, nothing lost, in order
    statuses = {x["id"]: x["status"] for x in lines}
    wanted = expect if isinstance(expect, dict) else dict.fromkeys(ids, expect)
    assert statuses == wanted, statuses
    listed = set()
    for line in lines:
        record = json.loads(s3.get_object(Bucket=bucket, Key=f"{base}items/{line['id']}.json")["Body"].read())
        assert record["status"] == line["status"], (record, line)
        for image in (line.get("output") or {}).get("images", []):
            key = image["s3_uri"].split(f"s3://{bucket}/", 1)[1]
            head = s3.head_object(Bucket=bucket, Key=key)  # the output exists
            assert head["ContentLength"] > 0, key
            assert key not in listed, f"output {key} listed twice"
            listed.add(key)
        if line["status"] == "completed":
            assert line["output"]["images"], line
    extra = sum(max(0, (x.get("attempts") or 1) - 1) for x in lines)
    return Ledger(lines, statuses, extra)
