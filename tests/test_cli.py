"""The README's main command, run as written (shortened by overrides), with 2 processes."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys

import pytest

from tests.launch_utils import ROOT, check, free_port, read_jsonl, run_job


def readme_main_command() -> list[str]:
    """The deepspeed part of the README's first command line."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    first = block.strip().splitlines()[0]
    launch = first.split("&&")[-1].strip()
    argv = shlex.split(launch)
    assert argv[0].endswith("deepspeed") and "launch/train.py" in argv, first
    return argv


def test_readme_starts_with_the_two_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    lines = block.strip().splitlines()
    assert len(lines) == 2
    assert "--deepspeed ds_configs/zero3.json" in lines[0]
    assert "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "setup_env.sh" in ci and "pytest" in ci


@pytest.mark.slow
def test_readme_main_command_runs_demo(tmp_path):
    argv = readme_main_command()
    # The launcher inside .venv is this interpreter's deepspeed runner.
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), *argv[1:],
           "--train.max_steps", "4", "--train.output_dir", str(tmp_path), "--train.save_every", "2",
           "--train.eval_every", "2"]  # fmt: skip
    proc = check(run_job(cmd, timeout=600))
    run = tmp_path / "demo"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "ce", "pir_mean", "personal_ratio", "weight_mean", "tokens_per_s", "step_time_s"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in rows), key
    assert all(r["weight_mean"] >= 0.8 - 1e-6 for r in rows)  # PerCE weights never fall below clip_min
    assert (run / "hf" / "model.safetensors").is_file() and (run / "hf" / "tokenizer.json").is_file()
    entries = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert entries == ["step_2", "step_4"]  # keep_last=2, no .tmp- debris
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["device"] == f"cpu ({os.cpu_count()} cores)"  # what step_time_s was measured on (no GPU in CI)
    evals = read_jsonl(run / "eval_metrics.jsonl")  # train.eval_every 2, then the final evaluation
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_ce"] == summary["eval"]["eval_ce"]  # the final row is the evaluation in summary.json
    assert all(math.isfinite(r["eval_ce"]) and r["eval_ce_ablated"] > 0 for r in evals)
    assert evals[0]["eval_ce"] != evals[1]["eval_ce"]  # the model changed between the two evaluations
    assert f"run directory: {run}" in proc.stdout
    assert "mean PIR on persona tokens" in proc.stdout


@pytest.mark.slow
def test_readme_main_command_trains_on_named_files(tmp_path):
    """The obvious first command with one's own data: the named files are read, not the recipe's synthetic set."""
    from perce_ds.data.synthetic import generate_records, write_jsonl

    mine, mine_eval = tmp_path / "my.jsonl", tmp_path / "my_eval.jsonl"
    train_records, eval_records = generate_records(3, 3, seed=7, split="train"), generate_records(3, 1, 7, "eval")
    write_jsonl(train_records, mine)
    write_jsonl(eval_records, mine_eval)
    argv = readme_main_command()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(free_port()), *argv[1:],
           "--data.train_files", str(mine), "--data.eval_files", str(mine_eval), "--train.max_steps", "1",
           "--train.micro_batch_size", "2", "--train.output_dir", str(tmp_path / "runs"),
           "--train.final_generation_eval", "false", "--train.save_init_model", "false"]  # fmt: skip
    proc = check(run_job(cmd, timeout=600))
    run = tmp_path / "runs" / "demo"
    report = json.loads((run / "data_report.json").read_text())
    assert report["train"]["files"] == [str(mine)] and report["eval"]["files"] == [str(mine_eval)]
    assert report["train"]["records_read"] == len(train_records) == 9
    assert report["eval"]["records_read"] == len(eval_records) == 3
    assert report["train"]["users"] == 3  # the synthetic set has 24
    assert not (run / "data").exists()  # no synthetic files were written
    assert f"data: train {mine} (9 examples), eval {mine_eval} (3 examples)" in proc.stdout + proc.stderr


def test_convert_checkpoint_refuses_a_checkpoint_without_zero_shards(tmp_path, capsys):
    """A ZeRO stage-0 checkpoint (ds_configs/zero0.json: one model-states file, no optimizer shards) cannot become
    universal: one error line that says so, exit 2, instead of ds_to_universal's traceback."""
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import convert_checkpoint
    finally:
        sys.path.remove(str(ROOT / "launch"))
    from perce_ds import checkpoint

    ckpt = tmp_path / "checkpoints" / "step_4"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
    checkpoint.write_state(ckpt, {"step": 4, "world_size": 1})
    assert checkpoint.is_checkpoint(ckpt) and not checkpoint.zero_partitioned(ckpt)
    with pytest.raises(SystemExit) as exit_info:
        convert_checkpoint.main([str(ckpt)])
    assert exit_info.value.code == 2
    assert "without ZeRO partitioning" in capsys.readouterr().err
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert checkpoint.zero_partitioned(ckpt)  # what ZeRO 1-3 write: the conversion goes ahead
