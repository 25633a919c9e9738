"""train.report_to: tensorboard and/or Weights & Biases. wandb runs for real in WANDB_MODE=offline; what it
recorded is read back from its own transaction log (<run>/wandb/offline-run-*/run-<id>.wandb)."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from perce_ds.config import ConfigError, RunConfig
from perce_ds.logging_utils import WANDB_ID_FILE, metrics_logger
from tests.launch_utils import ROOT, read_jsonl, run_job
from tests.test_plain_python import TRAIN, plain_env

BASE = ["model.name_or_path=x", "data.synthetic.enabled=true"]


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte file header, then LevelDB-log framing (32 KiB blocks of
    [crc32 u32, length u16, type u8] chunks; type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts, out = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def finished_records(path: Path, timeout_s: float = 60.0) -> list:
    """The records of a run's log once its "exit" record is there: run.finish() returns before wandb's service
    process has written the log out (seen: a 7-byte file right after finish, the whole log a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(run_dir: Path) -> list[dict]:
    """Per offline wandb run of run_dir (oldest first): id, name, config, and history as {step: {key: value}}."""
    runs = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = d.glob("run-*.wandb")
        info = {"history": {}}
        for r in finished_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info["id"], info["name"] = r.run.run_id, r.run.display_name
                info["config"] = {i.key: json.loads(i.value_json) for i in r.run.config.update}
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                info["history"][row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append(info)
    return runs


def test_report_to_and_the_legacy_tensorboard_flag():
    assert RunConfig.load(None, BASE).train.report_to == ["tensorboard"]
    cfg = RunConfig.load(None, [*BASE, "train.tensorboard=false"])
    assert cfg.train.report_to == [] and cfg.train.tensorboard is None  # one place after loading
    assert RunConfig.load(None, [*BASE, "train.report_to=[wandb]", "train.tensorboard=true"]).train.report_to == [
        "wandb",
        "tensorboard",
    ]
    with pytest.raises(ConfigError, match=r"train.report_to: unknown \['mlflow'\]; known: \['tensorboard', 'wandb'\]"):
        RunConfig.load(None, [*BASE, "train.report_to=[tensorboard, mlflow]"])


def test_missing_wandb_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"wandb package is not installed: pip install -e '\.\[wandb\]'"):
        RunConfig.load(None, [*BASE, "train.report_to=[wandb]"])


def test_offline_wandb_run_logs_config_steps_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = RunConfig.load(None, [*BASE, f"train.output_dir={tmp_path}", "train.run_name=r1", "train.report_to=[wandb]"])
    cfg.run_dir.mkdir(parents=True)
    sink = metrics_logger(cfg, enabled=True, resuming=False)
    sink.log(1, {"loss": 2.5, "ce": 3.0})
    sink.log(2, {"loss": 2.0, "ce": 2.75})
    sink.log(2, {"eval_ce": 2.9}, split="eval")
    sink.close()
    first_id = (cfg.run_dir / WANDB_ID_FILE).read_text().strip()
    # wandb names an offline run's folder offline-run-<second>-<id>: the same id within the same second would
    # reuse the folder (a real resume is never that quick)
    time.sleep(1.1)
    resumed = metrics_logger(cfg, enabled=True, resuming=True)
    resumed.log(3, {"loss": 1.5, "ce": 2.5})
    resumed.close()
    assert (cfg.run_dir / WANDB_ID_FILE).read_text().strip() == first_id
    (a, b) = offline_runs(cfg.run_dir)
    assert a["id"] == b["id"] == first_id and a["name"] == b["name"] == "r1"
    assert a["config"]["train"]["report_to"] == ["wandb"] and a["config"]["loss"]["scheme"] == "perce"
    assert a["history"] == {
        1: {"train/loss": 2.5, "train/ce": 3.0},
        2: {"train/loss": 2.0, "train/ce": 2.75, "eval/eval_ce": 2.9},
    }
    assert b["history"] == {3: {"train/loss": 1.5, "train/ce": 2.5}}
    assert read_jsonl(cfg.run_dir / "metrics.jsonl")[-1] == {"step": 3, "loss": 1.5, "ce": 2.5}
    assert not (cfg.run_dir / "tensorboard").exists()
    fresh = metrics_logger(cfg, enabled=True, resuming=False)  # a fresh start is a new wandb run
    fresh.close()
    assert (cfg.run_dir / WANDB_ID_FILE).read_text().strip() != first_id


def test_a_failed_run_closes_its_wandb_run_with_its_exit_code(tmp_path, monkeypatch):
    """launch/train.py ends without interpreter teardown (perce_ds.distributed.exit_process), so wandb's atexit hook
    never runs: a run that raises closes its sinks with exit code 1 itself, and wandb records it failed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    codes = []
    for name, code in (("ok", 0), ("failed", 1)):
        cfg = RunConfig.load(None, [*BASE, f"train.output_dir={tmp_path}", f"train.run_name={name}",
                                    "train.report_to=[wandb]"])  # fmt: skip
        cfg.run_dir.mkdir(parents=True)
        sink = metrics_logger(cfg, enabled=True, resuming=False)
        sink.log(1, {"loss": 1.0})
        sink.close(exit_code=code)
        sink.close()  # idempotent: a second close (the normal path after a handled error) does nothing
        (log,) = (cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        codes.append([r.exit.exit_code for r in finished_records(log) if r.WhichOneof("record_type") == "exit"])
    assert codes == [[0], [1]]


def test_other_ranks_open_no_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = RunConfig.load(None, [*BASE, f"train.output_dir={tmp_path}", "train.report_to=[tensorboard, wandb]"])
    cfg.run_dir.mkdir(parents=True)
    sink = metrics_logger(cfg, enabled=False, resuming=False)
    sink.log(1, {"loss": 1.0})
    sink.close()
    assert sink.wandb is None and list(cfg.run_dir.iterdir()) == []


@pytest.mark.slow
def test_training_reports_to_wandb_offline_and_resume_continues_it(tmp_path):
    env = {**plain_env(), "WANDB_MODE": "offline"}
    args = [sys.executable, TRAIN, "--train.output_dir", tmp_path, "--train.max_steps", "3", "--train.report_to",
            "[tensorboard, wandb]", "--train.final_generation_eval", "false", "--train.export_hf", "false"]  # fmt: skip
    first = run_job([*args, "--train.stop_after", "2"], timeout=300, env=env, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_job(args, timeout=300, env=env, cwd=ROOT)
    assert second.returncode == 0, second.stderr[-3000:]
    run_dir = tmp_path / "demo"
    a, b = offline_runs(run_dir)
    assert a["id"] == b["id"] and a["name"] == "demo" and a["config"]["train"]["max_steps"] == 3
    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    assert sorted(a["history"]) == [1, 2] and sorted(b["history"]) == [3]
    for step, logged in (*a["history"].items(), *b["history"].items()):
        assert logged["train/loss"] == pytest.approx(rows[step]["loss"], rel=1e-12)
    assert "eval/eval_ce" in b["history"][3] and any((run_dir / "tensorboard").iterdir())
