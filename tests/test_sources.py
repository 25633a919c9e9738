"""Tests for perce_ds.data.sources: JSONL, Parquet and save_to_disk readers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from perce_ds.data.records import RecordError
from perce_ds.data.sources import LoadReport, load_many, load_records


def good(i: int, **overrides):
    rec = {
        "record_id": f"r{i}",
        "user_id": f"u{i % 2}",
        "task": "review",
        "query": f"Write review {i}",
        "response": f"I loved it, number {i}.",
        "profile": [{"text": f"likes thing {i}", "score": 4}, {"text": "hates rain"}],
        "persona_spans": [[2, 7]],
    }
    rec.update(overrides)
    return rec


def write_jsonl(path, items):
    lines = [x if isinstance(x, str) else json.dumps(x) for x in items]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [good(i) for i in range(3)]


def expected_dicts():
    # The profile item without "score" must come back without a "score" key from every format.
    return [{**r, "profile": [dict(p) for p in r["profile"]]} for r in GOOD]


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", GOOD[:1] + [""] + GOOD[1:])  # blank line is ignored
    records, report = load_records(path)
    assert [r.to_dict() for r in records] == expected_dicts()
    assert (report.source, report.read, report.kept, report.n_skipped) == (str(path), 3, 3, 0)


def test_json_extension_is_json_lines(tmp_path):
    records, _ = load_records(write_jsonl(tmp_path / "d.json", GOOD))
    assert [r.to_dict() for r in records] == expected_dicts()


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), path)
    records, report = load_records(path)
    assert [r.to_dict() for r in records] == expected_dicts()
    assert report.kept == 3


def test_save_to_disk_round_trip(tmp_path):
    path = tmp_path / "ds"
    Dataset.from_list(GOOD).save_to_disk(str(path))
    records, report = load_records(path)
    assert [r.to_dict() for r in records] == expected_dicts()
    assert report.kept == 3


def test_dataset_dict_one_split_and_many(tmp_path):
    one = tmp_path / "one"
    DatasetDict({"train": Dataset.from_list(GOOD)}).save_to_disk(str(one))
    records, _ = load_records(one)
    assert [r.to_dict() for r in records] == expected_dicts()
    two = tmp_path / "two"
    DatasetDict({"train": Dataset.from_list(GOOD), "test": Dataset.from_list(GOOD)}).save_to_disk(str(two))
    with pytest.raises(ValueError, match="split") as e:
        load_records(two)
    assert "train" in str(e.value) and "test" in str(e.value)


def test_parquet_bad_row_named_by_row(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([good(0), good(1, response="  ")]), path)
    with pytest.raises(RecordError, match="row 1") as e:
        load_records(path)
    assert e.value.field_name == "response"


def test_missing_field_names_file_line_field(tmp_path):
    bad = good(1)
    del bad["query"]
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), bad])
    with pytest.raises(RecordError) as e:
        load_records(path)
    msg = str(e.value)
    assert str(path) in msg and "line 2" in msg and "query" in msg


@pytest.mark.parametrize(
    ("line", "field_name"),
    [
        (good(1, response=""), "response"),
        (good(1, profile="likes cats"), "profile"),
        (good(1, profile=[{"text": "ok"}, "not an object"]), "profile[1]"),
        ('{"record_id": "r1", "user_id": ', "<json>"),
        (good(0), "record_id"),  # duplicate of line 1
    ],
    ids=["empty-response", "profile-not-list", "profile-item-not-object", "invalid-json", "duplicate-id"],
)
def test_bad_records_name_field(tmp_path, line, field_name):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), line])
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert e.value.field_name == field_name
    assert f"'{field_name}'" in str(e.value) and "line 2" in str(e.value) and str(path) in str(e.value)


def test_duplicate_names_earlier_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0), good(1), good(0)])
    with pytest.raises(RecordError, match="line 1") as e:
        load_records(path)
    assert e.value.where == "line 3"


def test_skip_keeps_good_and_counts_bad(tmp_path):
    items = [good(0), good(1, response=""), "{not json", good(2), good(0), good(3, profile=5)]
    path = write_jsonl(tmp_path / "d.jsonl", items)
    records, report = load_records(path, on_bad_record="skip")
    assert [r.record_id for r in records] == ["r0", "r2"]
    assert (report.read, report.kept, report.n_skipped) == (6, 2, 4)
    assert all(str(path) in m for m in report.skipped)
    assert "line 5" in report.skipped[2] and "record_id" in report.skipped[2]


def test_all_bad_is_value_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [good(0, response=""), "nope"])
    with pytest.raises(ValueError, match="no usable records") as e:
        load_records(path, on_bad_record="skip")
    assert str(path) in str(e.value) and "2 skipped" in str(e.value)


def test_empty_file_is_value_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable records"):
        load_records(path)


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="supported formats") as e:
        load_records(path)
    assert str(path) in str(e.value)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(missing)


def test_plain_directory_is_error(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="supported formats"):
        load_records(tmp_path)


def test_bad_on_bad_record_value(tmp_path):
    with pytest.raises(ValueError, match="on_bad_record"):
        load_records(write_jsonl(tmp_path / "d.jsonl", GOOD), on_bad_record="ignore")


def test_load_many_concatenates_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [good(0), good(1, response="")])
    b = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([good(5), good(6)]), b)
    c = tmp_path / "c"
    Dataset.from_list([good(9)]).save_to_disk(str(c))
    records, reports = load_many([str(a), str(b), str(c)], on_bad_record="skip")
    assert [r.record_id for r in records] == ["r0", "r5", "r6", "r9"]
    assert all(isinstance(r, LoadReport) for r in reports)
    assert [(r.source, r.kept, r.n_skipped) for r in reports] == [(str(a), 1, 1), (str(b), 2, 0), (str(c), 1, 0)]
