"""The metrics sink: one JSON row per logged step, finite-or-null values, replay-safe truncation."""

from __future__ import annotations

import math

from perce_ds.logging_utils import MetricsLogger, read_metrics


def test_metrics_rows_log_every_and_truncate(tmp_path):
    sink = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 7):
        sink.log(step, {"loss": 1.0 / step, "pir_mean": math.nan if step == 3 else 0.1}, every=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all(r["pir_mean"] is not None for r in rows)  # step 3 (NaN) was not a logged step
    sink.log(7, {"loss": math.inf})
    assert read_metrics(tmp_path)[-1]["loss"] is None  # non-finite values are written as null, not NaN
    sink.truncate_after(4)  # a resume from step 4 replays steps 5+
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]
    sink.truncate_after(0)  # a fresh start
    assert read_metrics(tmp_path) == []


def test_eval_rows_go_to_their_own_file_and_truncate_with_the_rest(tmp_path):
    sink = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 5):
        sink.log(step, {"loss": 1.0})
        if step % 2 == 0:
            sink.log(step, {"eval_ce": 2.0 / step}, split="eval")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert read_metrics(tmp_path, "eval") == [{"step": 2, "eval_ce": 1.0}, {"step": 4, "eval_ce": 0.5}]
    sink.truncate_after(3)  # a resume from step 3 replays step 4, its evaluation included
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [2]


def test_disabled_sink_writes_nothing(tmp_path):
    sink = MetricsLogger(tmp_path, enabled=False, tensorboard=False)
    sink.log(1, {"loss": 1.0})
    sink.truncate_after(0)
    assert not (tmp_path / "metrics.jsonl").exists()
