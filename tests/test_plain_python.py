"""`python launch/train.py ...` without any launcher (a laptop, a debugger, a notebook): one process, rank 0 of 1.
A user's error (config key or type, missing file, bad record) prints its one-line message, no traceback, on the
console and exits 2; the traceback goes to train.log when the run got that far."""

from __future__ import annotations

import json
import os
import sys

import pytest

from perce_ds.distributed import MULTI_TASK_VARS, apply_single_process_env
from tests.launch_utils import ROOT, launch_env, read_jsonl, run_job

TRAIN = ROOT / "launch" / "train.py"
TINY = ["--train.max_steps", "2", "--train.final_generation_eval", "false", "--train.export_hf", "false"]


def plain_env() -> dict[str, str]:
    """The user's shell: no launcher variables at all."""
    env = launch_env()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        env.pop(key, None)
    return env


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher variables, and whatever the test sets in os.environ is undone afterwards."""
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", *MULTI_TASK_VARS):
        os.environ.pop(key, None)


def test_single_process_env_only_without_a_launcher(no_launcher):
    assert apply_single_process_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and 1024 <= int(os.environ["MASTER_PORT"]) < 65536
    os.environ.update(RANK="3", WORLD_SIZE="4")
    assert not apply_single_process_env() and os.environ["RANK"] == "3"  # a launcher's variables are left alone


@pytest.mark.slow
def test_plain_python_trains_as_one_process(tmp_path):
    proc = run_job([sys.executable, TRAIN, *TINY, "--train.output_dir", tmp_path], timeout=300, env=plain_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(tmp_path / "demo" / "metrics.jsonl")] == [1, 2]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["world_size"] == 1


def _bad_record_file(path):
    path.write_text(json.dumps({"user_id": "u", "task": "t", "query": "q", "profile": []}) + "\n")
    return path


# (overrides, words of the one-line message, whether the run got as far as train.log)
USER_ERRORS = {
    "config_key": (lambda tmp, tok: ["--train.learning_rate", "1e-4"], "unknown config key train.learning_rate", False),
    "config_type": (lambda tmp, tok: ["--train.max_steps", "two"], "train.max_steps: expected an integer", False),
    "missing_file": (
        lambda tmp, tok: ["--data.synthetic.enabled", "false", "--data.train_files", str(tmp / "nope.jsonl")],
        "nope.jsonl: no such file or directory",
        True,
    ),
    "bad_record": (
        lambda tmp, tok: [
            "--data.synthetic.enabled",
            "false",
            "--model.tokenizer",
            tok,
            "--data.train_files",
            str(_bad_record_file(tmp / "bad.jsonl")),
        ],
        "bad.jsonl, line 1, field 'response': missing",
        True,
    ),  # fmt: skip
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(USER_ERRORS))
def test_user_error_is_one_line_without_traceback(kind, tmp_path, sp_tokenizer):
    overrides, words, logged = USER_ERRORS[kind]
    args = overrides(tmp_path, sp_tokenizer.name_or_path)
    cmd = [sys.executable, TRAIN, *TINY, "--train.output_dir", tmp_path / "runs", *args]
    proc = run_job(cmd, timeout=300, env=plain_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-3000:]
    log = tmp_path / "runs" / "demo" / "train.log"
    if logged:
        text = log.read_text()
        assert "Traceback" in text and words in text


@pytest.mark.parametrize("var", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_several_tasks_of_another_launcher_are_not_made_single(var, no_launcher):
    os.environ[var] = "4"
    assert not apply_single_process_env() and "RANK" not in os.environ


def test_exit_process_keeps_buffered_output_and_the_exit_code(tmp_path):
    """launch/*.py end with exit_process (os._exit, no interpreter teardown while gloo threads live): what the
    process printed into a pipe's buffer and logged must still arrive, and the code must be the one given."""
    script = tmp_path / "job.py"
    script.write_text(
        "import logging, sys, torch, torch.distributed as dist\n"
        "from perce_ds.distributed import exit_process, shutdown\n"
        f"logging.basicConfig(filename={str(tmp_path / 'job.log')!r}, level=logging.INFO)\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "t = torch.ones(3)\n"
        "dist.all_reduce(t)\n"
        "print('summary', t.tolist())\n"  # a pipe: block-buffered, lost by a bare os._exit
        "sys.stderr.write('last words')\n"
        "logging.getLogger('perce_ds').info('logged')\n"
        "shutdown()\n"
        "exit_process(3)\n"
    )
    env = plain_env()
    env.pop("PYTHONUNBUFFERED", None)  # as under sbatch: stdout a block-buffered file
    proc = run_job([sys.executable, str(script)], 60, env=env)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == "summary [1.0, 1.0, 1.0]" and proc.stderr.endswith("last words")
    assert "logged" in (tmp_path / "job.log").read_text()
