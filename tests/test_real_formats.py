"""The readers against the real downloads' quirks: values that are not plain JSON (Arrow's datetimes for LaMP-4's
item dates, numpy scalars and arrays from Parquet/pandas), sharded Parquet, and LaMP's questions-only test split
(prediction-only: generated for and written in the benchmark's submission format, refused for training)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from perce_ds.config import RunConfig
from perce_ds.data.cache import build_or_load
from perce_ds.data.lamp import load_lamp
from perce_ds.data.longlamp import DataSourceError, load_longlamp
from perce_ds.data.pipeline import prepare_data
from perce_ds.data.prompts import render_profile_item
from perce_ds.data.records import PersonaRecord, RecordError, record_from_dict
from perce_ds.data.sources import load_records
from tests.test_longlamp import FIX, HUB, offline  # noqa: F401  (fixture)

LAMP = FIX / "lamp"

# value as a reader hands it over -> what the record holds (JSON data; dates as ISO text)
VALUES = {
    "date_at_midnight": (dt.datetime(2019, 7, 2), "2019-07-02"),
    "datetime": (dt.datetime(2019, 7, 3, 10, 11, 12), "2019-07-03T10:11:12"),
    "date": (dt.date(2020, 1, 31), "2020-01-31"),
    "numpy_int": (np.int64(5), 5),
    "numpy_float": (np.float32(0.5), 0.5),
    "numpy_bool": (np.bool_(True), True),
    "nested_arrays": (np.array([np.array([1, 2]), np.array([3, 4])]), [[1, 2], [3, 4]]),
    "nested_list_of_objects": ([{"when": dt.date(2021, 5, 6), "n": np.int32(2)}, ["a", ["b"]]],
                               [{"when": "2021-05-06", "n": 2}, ["a", ["b"]]]),
}  # fmt: skip


def _raw(value) -> dict:
    return {"user_id": "u", "task": "t", "query": "q", "response": "r", "profile": [{"title": "T", "v": value}]}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_survives_reading_caching_and_prompt(name, tmp_path):
    value, expected = VALUES[name]
    record = record_from_dict(_raw(value), "f.jsonl", "line 1")
    got = record.profile[0]["v"]
    assert got == expected and type(got) is type(expected)
    # the tokenised cache serialises records as JSON: the record comes back equal
    rows, built = build_or_load(
        [record],
        lambda recs: {"profile": [json.dumps(r.profile) for r in recs]},
        tmp_path / "c-0123.arrow",
        True,
        lambda: None,
    )
    assert built and json.loads(rows[0]["profile"]) == record.profile
    assert json.loads(json.dumps(record.to_dict())) == record.to_dict()
    line = render_profile_item(record.profile[0])
    assert f"v: {expected}" in line
    if isinstance(value, (dt.date, dt.datetime)):
        assert "datetime" not in line and expected in line


def test_unsupported_value_is_named_with_its_field():
    with pytest.raises(RecordError, match=r"f\.jsonl, line 1, field 'profile\[0\]\.v': unsupported value type object"):
        record_from_dict(_raw(object()), "f.jsonl", "line 1")


def test_parquet_with_timestamps_and_nested_lists(tmp_path):
    when = dt.datetime(2018, 3, 4)
    table = pa.Table.from_pylist(
        [
            {**_raw(None), "profile": [{"title": "T", "date": when, "tags": [["x", "y"], ["z"]], "n": 3}]},
        ]
    )
    assert pa.types.is_timestamp(table.schema.field("profile").type.value_type.field("date").type)
    path = tmp_path / "r.parquet"
    pq.write_table(table, path)
    records, _ = load_records(path)
    assert records[0].profile == [{"title": "T", "date": "2018-03-04", "tags": [["x", "y"], ["z"]], "n": 3}]


# ----------------------------------------------------------------------------------------- LaMP's dated items


def test_lamp4_dates_come_back_as_the_files_text(tmp_path):
    questions = json.loads((LAMP / "LaMP_4" / "dev" / "dev_questions.json").read_text())
    records, _ = load_lamp(str(LAMP / "LaMP_4"), "LaMP_4", "dev", cache_dir=str(tmp_path))
    dated = [
        (it["date"], r_it["date"]) for q, r in zip(questions, records) for it, r_it in zip(q["profile"], r.profile)
    ]
    assert dated and all(file_text == read for file_text, read in dated)
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", read) for _, read in dated)
    assert [r.record_id for r in records] == [f"LaMP_4/dev/{q['id']}" for q in questions]


@pytest.mark.parametrize("task", ["LaMP_4", "LaMP_5", "LaMP_7"])
def test_lamp_tasks_through_prepare_data(task, sp_tokenizer, tmp_path):
    cfg = RunConfig.load(
        None,
        [
            "model.name_or_path=unused",
            f"model.tokenizer={sp_tokenizer.name_or_path}",
            "data.source=lamp",
            f"data.lamp.path={LAMP / task}",
            f"data.lamp.task={task}",
            "data.retrieval.method=recency" if task == "LaMP_4" else "data.retrieval.method=bm25",
            f"data.cache_dir={tmp_path}",
        ],
    )
    data = prepare_data(cfg, True, lambda: None)
    assert len(data.train) == 24 and len(data.eval) == 6


# ----------------------------------------------------------------------------------------- sharded Parquet


@pytest.mark.parametrize("with_card", [True, False])
def test_sharded_parquet_reads_like_one_file(with_card, tmp_path):
    config = "product_review_user"
    whole = pq.read_table(HUB / config / "train-00000-of-00001.parquet")
    (tmp_path / config).mkdir()
    half = whole.num_rows // 2
    for k, part in enumerate((whole.slice(0, half), whole.slice(half))):
        pq.write_table(part, tmp_path / config / f"train-{k:05d}-of-00002.parquet")
    if with_card:
        card = f"---\nconfigs:\n- config_name: {config}\n  data_files:\n  - split: train\n    path: {config}/train-*\n---\n"
        (tmp_path / "README.md").write_text(card)
    sharded, _ = load_longlamp(str(tmp_path), config, "train", cache_dir=str(tmp_path / "hf"))
    single, _ = load_longlamp(str(HUB), config, "train", cache_dir=str(tmp_path / "hf"))
    assert len(sharded) == whole.num_rows and sharded == single


# ----------------------------------------------------------------------------------------- prediction-only splits


def test_lamp_test_split_is_prediction_only(tmp_path):
    questions = json.loads((LAMP / "LaMP_4" / "test" / "test_questions.json").read_text())
    with pytest.raises(DataSourceError, match="prediction-only.*--predict-only"):
        load_lamp(str(LAMP / "LaMP_4"), "LaMP_4", "test", cache_dir=str(tmp_path))
    records, report = load_lamp(str(LAMP / "LaMP_4"), "LaMP_4", "test", cache_dir=str(tmp_path), require_response=False)
    assert report.kept == len(questions) == len(records) and all(r.response == "" for r in records)
    assert [r.query for r in records] == [q["input"] for q in questions]


def test_training_refuses_a_split_without_responses(sp_tokenizer, tmp_path):
    cfg = RunConfig.load(
        None,
        [
            "model.name_or_path=unused",
            f"model.tokenizer={sp_tokenizer.name_or_path}",
            "data.source=lamp",
            f"data.lamp.path={LAMP / 'LaMP_7'}",
            "data.lamp.task=LaMP_7",
            "data.lamp.train_split=test",
            f"data.cache_dir={tmp_path}",
        ],
    )
    with pytest.raises(DataSourceError, match="test_outputs.json.*prediction-only"):
        prepare_data(cfg, True, lambda: None)


def test_longlamp_split_without_output_column(tmp_path):
    config = "abstract_generation_user"
    table = pq.read_table(HUB / config / "test-00000-of-00001.parquet").drop_columns(["output"])
    (tmp_path / config).mkdir()
    pq.write_table(table, tmp_path / config / "test.parquet")
    with pytest.raises(DataSourceError, match="'output' is missing.*--predict-only"):
        load_longlamp(str(tmp_path), config, "test", cache_dir=str(tmp_path / "hf"))
    records, _ = load_longlamp(str(tmp_path), config, "test", cache_dir=str(tmp_path / "hf"), require_response=False)
    assert len(records) == table.num_rows and all(r.response == "" for r in records)


def test_record_files_without_responses(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({k: v for k, v in _raw("x").items() if k != "response"}) + "\n")
    with pytest.raises(RecordError, match="field 'response': missing"):
        load_records(path)
    records, _ = load_records(path, require_response=False)
    assert records == [PersonaRecord("u", "t", "q", "", [{"title": "T", "v": "x"}], "line 1")]


def test_predict_only_writes_lamp_submission(tmp_path):
    import yaml

    from perce_ds.evaluation.evaluate import EvalOptions, evaluate_run
    from perce_ds.evaluation.generation import GenerationSettings, read_generations
    from tests.launch_utils import make_eval_run

    run = make_eval_run(tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["synthetic"]["enabled"] = False
    cfg["data"].update(source="lamp", lamp={"path": str(LAMP / "LaMP_4"), "task": "LaMP_4"})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    settings = GenerationSettings(max_new_tokens=3, batch_size=4)
    with pytest.raises(DataSourceError, match="--predict-only"):
        evaluate_run(EvalOptions(run=run, split="test", generation=settings))
    out = evaluate_run(EvalOptions(run=run, split="test", generation=settings, predict_only=True))
    path = run / "eval" / "predictions" / "predictions_LaMP_4.json"
    assert out["files"] == [str(path)] and out["missing"] == 0
    submission = json.loads(path.read_text())
    questions = json.loads((LAMP / "LaMP_4" / "test" / "test_questions.json").read_text())
    assert submission["task"] == "LaMP_4"
    assert [g["id"] for g in submission["golds"]] == [q["id"] for q in questions]
    generated = read_generations(run / "eval" / "predictions" / "generations.jsonl")
    assert [g["output"] for g in submission["golds"]] == [
        generated[f"LaMP_4/test/{q['id']}"]["generation"] for q in questions
    ]
    assert not (run / "eval" / "predictions" / "scores.json").exists()


# ----------------------------------------------------------------------------------------- datasets feature types


class _Rows(list):
    """Rows as datasets 3.x hands them over: `features` describes a list of structs as a plain list."""

    def __init__(self, rows, features):
        super().__init__(rows)
        self.features = features
        self.column_names = list(rows[0])


def _topic_rows(item_keys):
    return [
        {"author": f"a{i}", "input": "Write a post.", "output": "A post.", "profile": [dict.fromkeys(item_keys, "x")]}
        for i in range(2)
    ]


def test_item_fields_checked_whatever_the_feature_types():
    from datasets import Value

    from perce_ds.data.longlamp import LONGLAMP_TASKS
    from perce_ds.data.tasks import rows_to_records

    spec = LONGLAMP_TASKS["topic_writing"]
    old_style = {"profile": [{"input": Value("string"), "output": Value("string")}]}
    records, _ = rows_to_records(_Rows(_topic_rows(["input", "output"]), old_style), spec, "src", "t")
    assert all(r.profile == [{"summary": "x", "content": "x"}] for r in records)  # the variant is mapped
    bad = {"profile": [{"title": Value("string")}]}
    with pytest.raises(DataSourceError, match=r"src: profile items have fields \['title'\]"):
        rows_to_records(_Rows(_topic_rows(["title"]), bad), spec, "src", "t")


# ----------------------------------------------------------------------------------------- item fields in the report


def test_data_report_names_prompt_fields_and_counts_missing_ones(sp_tokenizer, tmp_path, capsys):
    import importlib.util

    config = "product_review_user"
    rows = []
    for i in range(4):
        items = [
            {"overall": 5.0, "summary": "s", "description": "d", "reviewText": "t", "asin": "B0"} for _ in range(3)
        ]
        if i == 1:
            del items[0]["description"]  # absent: Arrow fills None
            items[1]["description"] = None
        rows.append({"reviewerId": f"R{i}", "input": "Write.", "output": "A review.", "profile": items})
    (tmp_path / config).mkdir()
    (tmp_path / config / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "model.name_or_path=unused", f"model.tokenizer={sp_tokenizer.name_or_path}", "data.source=longlamp",
        f"data.longlamp.dataset={tmp_path}", f"data.longlamp.config={config}", "data.longlamp.eval_split=",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'runs'}",
    ]  # fmt: skip
    report = prepare_data(RunConfig.load(None, overrides), True, lambda: None).reports["train"].summary()
    assert report["profile_item_fields"] == {
        "prompt_fields": ["overall", "description", "summary", "reviewText"],
        "profile_items": 12,
        "items_missing_field": {"overall": 0, "description": 2, "summary": 0, "reviewText": 0},
        "unused_item_fields": ["asin"],
    }
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", Path(__file__).parents[1] / "launch" / "prepare_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = [arg for o in overrides for arg in ("--" + o.split("=", 1)[0], o.split("=", 1)[1])]
    assert cli.main([*args, "--model.config", "null"]) == 0  # the default recipe (demo) builds its model from a config
    out = capsys.readouterr().out
    assert "the prompt shows ['overall', 'description', 'summary', 'reviewText']" in out
    assert "items lacking one (rendered empty): {'description': 2}; not shown: ['asin']" in out
