"""GPU-only paths: bf16 ZeRO-3 PerCE steps, fp32 logits from bf16 inputs, packing only with a varlen kernel.

Skipped on CPU (CI has no GPU); benchmarks/gpu_check.sh runs them on a lent GPU machine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from perce_ds.config import ConfigError
from perce_ds.loss import chunked_token_logprobs, logits_kernel
from perce_ds.model import check_packing_kernel, flash_attn_available
from tests.launch_utils import TINY_QWEN3, check, free_port, read_jsonl, run_job, write_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 kernels, torch.mm out_dtype)"),
]


def _pir(hidden_cond, hidden_abl, weight, targets) -> torch.Tensor:
    cond, _ = chunked_token_logprobs(hidden_cond, weight, targets, chunk_size=64)
    abl, _ = chunked_token_logprobs(hidden_abl, weight, targets, chunk_size=64)
    return cond - abl


def _exact_pir(hidden_cond, hidden_abl, weight, targets) -> torch.Tensor:
    """The same bf16 inputs, upcast before the matmul and computed in float64."""
    w = weight.double()

    def logp(h):
        return torch.log_softmax(h.double() @ w.t(), -1).gather(1, targets[:, None]).squeeze(1)

    return logp(hidden_cond) - logp(hidden_abl)


def test_pir_from_bf16_inputs_matches_an_fp32_reference():
    """bf16 hidden states and head, logits of magnitude ~30: PIR within 1e-3 of the exact value. Rounding the
    logits to bf16 first (what the head did before) misses that bound, so the inputs do exercise it."""
    torch.manual_seed(0)
    n, h, v = 512, 256, 32768
    device = torch.device("cuda")
    assert logits_kernel(device, torch.bfloat16) == "mm_out_fp32"
    weight = (torch.randn(v, h, device=device) * 0.3).bfloat16()
    hidden_cond = torch.randn(n, h, device=device).bfloat16()
    hidden_abl = (hidden_cond.float() + 0.3 * torch.randn(n, h, device=device)).bfloat16()
    targets = torch.randint(0, v, (n,), device=device)
    assert float((hidden_cond.float() @ weight.float().t()).abs().amax()) > 20  # logits of the feared size
    exact = _exact_pir(hidden_cond, hidden_abl, weight, targets)
    got = _pir(hidden_cond, hidden_abl, weight, targets)
    assert float((got.double() - exact).abs().max()) <= 1e-3
    rounded = [
        torch.log_softmax((hc @ weight.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)
        for hc in (hidden_cond, hidden_abl)
    ]
    assert float(((rounded[0] - rounded[1]).double() - exact).abs().max()) > 1e-3


def test_packing_refused_on_cuda_without_a_varlen_kernel():
    device = torch.device("cuda", torch.cuda.current_device())
    with pytest.raises(ConfigError, match="varlen"):
        check_packing_kernel(True, device, "sdpa")
    if flash_attn_available():
        check_packing_kernel(True, device, "flash_attention_2")


def test_bf16_zero3_perce_steps_on_one_gpu(tmp_path):
    """launch/train.py on one GPU: bf16 ZeRO-3 with activation checkpointing, online PerCE with weights spread over
    the clip range (not clip_min x CE), finite losses, a bf16 export that reloads."""
    recipe = {
        # initializer_range 0.3: the random model reads profiles strongly enough that PIR spreads over the clip range
        # (fp32 on CPU, same recipe: 40-45% of tokens above clip_min, mean weight 1.36-1.47 in each of 3 steps)
        "model": {"config": {**TINY_QWEN3, "initializer_range": 0.3}, "tokenizer_vocab_size": 400, "dtype": "bf16"},
        "data": {"synthetic": {"enabled": True, "users": 4, "train_per_user": 4, "eval_per_user": 1},
                 "max_length": 512, "max_profile_tokens": 384},
        "loss": {"scheme": "perce", "clip_min": 0.8, "clip_max": 3.0},
        "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, "output_dir": str(tmp_path), "run_name": "gpu",
                  "tensorboard": False, "dist_timeout_s": 120},
    }  # fmt: skip
    path = write_recipe(tmp_path / "gpu.yaml", recipe)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
           str(root / "launch" / "train.py"), "--deepspeed", str(root / "ds_configs" / "zero3.json"),
           "--recipe", str(path)]  # fmt: skip
    check(run_job(cmd, timeout=600, env=env))
    rows = read_jsonl(tmp_path / "gpu" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for r in rows:  # clip_min x CE would give personal_ratio 0 and weight_mean 0.8; all at clip_max 1 and 3.0
        assert 0.1 <= r["personal_ratio"] <= 0.9, r
        assert 0.9 <= r["weight_mean"] <= 2.9, r
    assert json.loads((tmp_path / "gpu" / "ds_config.json").read_text())["bf16"]["enabled"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpu" / "hf")
    assert next(model.parameters()).dtype == torch.bfloat16
