"""Run real multi-process DeepSpeed jobs from tests, and a plain-PyTorch reference of the PerCE step."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_deepspeed(script: Path, args: list[str], nproc: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N script args` exactly as a user runs it (gloo on CPU)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), str(script), *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    return proc


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(
    tmp: Path, recipe: dict[str, Any], nproc: int, ds_config: Path, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    recipe_path = write_recipe(tmp / f"recipe-{recipe['train']['run_name']}.yaml", recipe)
    return run_deepspeed(TRAIN, ["--deepspeed", str(ds_config), "--recipe", str(recipe_path), *extra], nproc)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def reference_logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log P(response_t | prompt, response_<t) with full logits and log_softmax: the textbook way."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def reference_perce_loss(model: torch.nn.Module, examples: list[Any], clip_min: float, clip_max: float) -> torch.Tensor:
    """METHOD.md's PerCE loss over `examples`, one unpadded sequence at a time."""
    total, n = torch.zeros(()), 0
    for ex in examples:
        logp_cond = reference_logprobs(model, ex.cond_prompt_ids, ex.response_ids)
        with torch.no_grad():
            logp_abl = reference_logprobs(model, ex.abl_prompt_ids, ex.response_ids)
        w = (logp_cond.detach() - logp_abl).clamp(clip_min, clip_max)
        total = total - (w * logp_cond).sum()
        n += len(ex.response_ids)
    return total / n
