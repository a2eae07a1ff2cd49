"""Manifest parsing and validation: every error names the line, the field and the value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.errors import InputError
from jobs.manifest import RowChecker, check_manifest, parse_sets, read_rows, validate_manifest
from jobs.models import rendered_size


def rows_of(path: Path, model: str = "i1-fast", defaults=None):
    return [r for r in check_manifest(path, RowChecker(model, defaults))]


def test_csv_with_bom_crlf_and_quoted_newlines_keeps_line_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes('\ufeffid,prompt,sku\r\na,"one, two",S1\r\nb,"multi\r\nline",S2\r\nc,three,S3\r\n'.encode("utf-8"))
    rows = rows_of(path)
    assert [(r.item_id, r.line) for r in rows] == [("a", 2), ("b", 3), ("c", 5)]
    assert rows[0].params["prompt"] == "one, two"
    assert rows[1].params["prompt"] == "multi\r\nline"
    assert rows[2].metadata == {"sku": "S3"}


def test_jsonl_rows_and_blank_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b", "seed": null, "brand": {"x": 1}}\n')
    rows = rows_of(path)
    assert [(r.item_id, r.line) for r in rows] == [("1", 1), ("3", 3)]
    assert rows[1].params["seed"] == -1 and rows[1].metadata == {"brand": {"x": 1}}


def test_model_preset_then_defaults_then_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 9}\n')
    full = rows_of(path, "i1-full")
    assert full[0].params["steps"] == 50 and full[0].params["guidance_scale"] == 5.0
    assert full[0].params["scheduler"] == "flow_unipc"
    dev = rows_of(path, "i1-dev", {"steps": "20", "output_format": "jpg"})
    assert dev[0].params["steps"] == 20 and dev[0].params["output_format"] == "jpeg"
    assert dev[0].params["shift"] == 6.0 and dev[0].params["guidance_scale"] == 0.0
    assert dev[1].params["steps"] == 9


def test_every_bad_row_is_reported_with_line_field_and_value(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "ok"}),
                json.dumps({"prompt": "x", "width": 10}),
                "{not json",
                json.dumps(["a list"]),
                json.dumps({"id": "../../etc", "prompt": "x"}),
                json.dumps({"id": "dup", "prompt": "x"}),
                json.dumps({"id": "dup", "prompt": "x", "num_images": 99}),
            ]
        )
        + "\n"
    )
    report = validate_manifest(path, "i1-fast")
    messages = [str(i) for i in report.issues]
    assert report.rows == 7 and report.valid == 2
    assert "line 2: width: input should be greater than or equal to 64 (got 10)" in messages
    assert any(m.startswith("line 3: row: invalid JSON") for m in messages)
    assert 'line 4: row: each line must be a JSON object (got ["a list"])' in messages
    assert any(m.startswith("line 5: id: string should match pattern") and "'../../etc'" in m for m in messages)
    assert "line 7: num_images: input should be less than or equal to 8 (got 99)" in messages
    assert "line 7: id: duplicate id; ids must be unique in a manifest (got 'dup')" in messages


def test_bad_defaults_are_reported_once(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a"}\n')
    report = validate_manifest(path, "i1-fast", {"steps": "zero", "colour": "red"})
    assert [str(i) for i in report.issues] == ["defaults: colour: not a field of this model (got 'red')"]
    report = validate_manifest(path, "i1-fast", {"steps": "zero"})
    assert [str(i) for i in report.issues] == [
        "defaults: steps: input should be a valid integer, unable to parse string as an integer (got 'zero')"
    ]


def test_sizes_are_rounded_to_what_hidream_renders_and_reported(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"prompt": "a", "width": 1000, "height": 700}\n{"prompt": "b"}\n')
    report = validate_manifest(path, "i1-fast")
    assert report.notes == [
        "line 1: width/height: 1000x700 renders as 1216x848 (HiDream renders ~1024² px, sides multiple of 16)"
    ]
    rows = rows_of(path)
    assert (rows[0].params["width"], rows[0].params["height"]) == (1216, 848)
    assert rows[0].params["requested_size"] == [1000, 700]
    assert rendered_size(1024, 1024) == (1024, 1024)
    w, h = rendered_size(768, 1344)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024


def test_unknown_model_type_and_sets_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="unknown model 'i9'"):
        RowChecker("i9")
    with pytest.raises(InputError, match="unknown manifest type '.txt'"):
        list(read_rows(tmp_path / "m.txt"))
    with pytest.raises(InputError, match="expected key=value"):
        parse_sets(["steps"])


def test_non_utf8_and_ragged_csv(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"prompt,sku\nfine,1\ntoo,many,fields\n\xff\xfe,2\n")
    report = validate_manifest(path, "i1-fast")
    messages = [str(i) for i in report.issues]
    assert "line 3: row: has 3 fields, the header has 2" in messages
    assert "line 4: row: line 4 is not UTF-8 text" in messages
    assert report.valid == 1
