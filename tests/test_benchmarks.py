"""The benchmark scripts in their --smoke size, so they cannot rot; plus the log-prob equality they rely on.

Timing numbers are never asserted (CI machines are noisy); keys, finiteness and correctness are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.launch_utils import launch_env, run_job

STEP_COST_KEYS = ("scheme", "median_step_s", "ratio_to_ce", "floor_ratio", "peak_mem_bytes", "mem_ratio_to_ce")
LOGPROB_KEYS = ("vocab", "method", "time_s", "peak_extra_bytes", "mem_reduction_vs_naive")


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = launch_env()
    env.pop("OMP_NUM_THREADS", None)  # the scripts split the cores themselves
    proc = run_job([sys.executable, *args], timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_step_cost_smoke(tmp_path: Path) -> None:
    out = tmp_path / "step_cost.json"
    proc = _run(
        ["-m", "benchmarks.step_cost", "--smoke", "--variants", "perce_packed", "--json", str(out)], timeout=300
    )
    rows = json.loads(out.read_text())
    schemes = [r["scheme"] for r in rows]
    assert schemes[:2] == ["ce", "perce"], schemes
    for row in rows:
        for key in STEP_COST_KEYS[1:]:
            assert _finite(row[key]), (row["scheme"], key, row[key])
        assert row["median_step_s"] > 0 and row["peak_mem_bytes"] > 0
    ce, perce = rows[0], rows[1]
    assert ce["ratio_to_ce"] == 1.0 and ce["floor_ratio"] == 1.0 and ce["mem_ratio_to_ce"] == 1.0
    assert 1.0 < perce["floor_ratio"] < 2.0  # one extra no-grad forward of a shorter sequence
    assert "ablated_fwd" in perce["breakdown_s"] and "ablated_fwd" not in ce["breakdown_s"]
    assert "time/CE" in proc.stdout and "where the time goes" in proc.stdout
    packed = next(r for r in rows if r["scheme"] == "perce_packed")
    assert packed["floor_ratio"] == perce["floor_ratio"]  # same FLOPs on real tokens, no padding


@pytest.mark.slow
def test_recipe_vs_plain_smoke(tmp_path: Path) -> None:
    """The recipe (ZeRO-3 and ZeRO stage 0, 1 and 2 ranks) against the plain loop: every row and phase present and
    finite, and all compute the same loss from the same weights and batches (fp32: rounding only, ~1e-7)."""
    out = tmp_path / "recipe_vs_plain.json"
    variants = ["--variant", "recipe=ds_configs/zero3.json", "--variant", "zero0=ds_configs/zero0.json"]
    proc = _run(["-m", "benchmarks.recipe_vs_plain", "--smoke", "--nproc", "1", "2", *variants, "--json", str(out)],
                timeout=480)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world_size"], r["variant"]) for r in rows] == [
        (n, v) for n in (1, 2) for v in ("recipe", "zero0", "plain")
    ]
    for row in rows:
        for key in ("median_step_s", "ratio_to_plain", "paired_ratio_to_plain", "loss_max_rel_diff", "peak_mem_bytes"):
            assert _finite(row[key]), (row["world_size"], row["variant"], key, row[key])
        assert row["median_step_s"] > 0 and row["peak_mem_bytes"] > 0
        assert row["loss_max_rel_diff"] < 1e-5, row  # the plain loop does the recipe's math
        phases = row["breakdown_s"]
        for key in ("ablated_fwd", "cond_fwd", "backward", "optimizer_step", "other"):
            assert _finite(phases[key]), (row["variant"], key)
        assert any(k.endswith("zero3_fetch") for k in phases) == (row["variant"] == "recipe")
    for plain in (r for r in rows if r["variant"] == "plain"):
        assert plain["ratio_to_plain"] == 1.0 and plain["processes"] == 1
    assert rows[3]["processes"] == 2 and "target recipe at 1 rank" in proc.stdout


@pytest.mark.slow
def test_padding_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "padding.json"
    _run(["-m", "benchmarks.padding", "--micro-batch-sizes", "1", "4", "--json", str(out)], timeout=300)
    rows = json.loads(out.read_text())
    assert {r["task"] for r in rows} == {"abstract_generation_user", "product_review_user", "topic_writing_user"}
    for row in rows:
        assert row["cond_real"] <= row["cond_padded"] and row["abl_real"] <= row["abl_padded"]
        if row["micro_batch_size"] == 1:
            assert row["padding_fraction_both"] == 0.0  # a single sequence needs no padding
        else:
            assert 0.0 < row["padding_fraction_both"] < 1.0


@pytest.mark.slow
def test_logprob_memory_smoke(tmp_path: Path) -> None:
    out = tmp_path / "logprob.json"
    _run(["-m", "benchmarks.logprob_memory", "--smoke", "--vocabs", "151936", "--json", str(out)], timeout=180)
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"naive", "chunked"}
    for row in rows:
        for key in LOGPROB_KEYS[2:]:
            assert _finite(row[key]), (row["method"], key, row[key])
    chunked = next(r for r in rows if r["method"] == "chunked")
    assert chunked["agrees"] is True
    assert chunked["mem_reduction_vs_naive"] > 3.0  # the [tokens, vocab] logits never exist whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_equals_naive_logprobs(dtype: torch.dtype) -> None:
    """perce_ds's chunked head == full logits + log_softmax + gather, values and both gradients (1e-5)."""
    from benchmarks.logprob_memory import chunked_logprobs, make_inputs, naive_logprobs

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, ...]:
        h, w, t, lw = make_inputs(96, 32, 5003, dtype, "cpu")
        logp = fn(h, w, t)
        (-(lw * logp).sum()).backward()
        return logp.detach().double(), h.grad.double(), w.grad.double()

    ref = run(naive_logprobs)
    for got, want in zip(run(lambda h, w, t: chunked_logprobs(h, w, t, 40)), ref, strict=True):
        assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_flop_model_floor() -> None:
    """The analytic floor from real token counts: 1 + F_abl / F_ce with F_ce = 4 forwards under checkpointing."""
    from benchmarks.step_cost import FlopModel
    from perce_ds.data.collate import collate
    from perce_ds.data.prompts import TokenizedExample

    fm = FlopModel(params_body=1000, n_layers=2, d_attn=8, hidden=4, vocab=10, checkpointing=True)
    assert fm.body([10]) == 2 * 1000 * 10 + 4 * 2 * 8 * 100
    assert fm.head(3) == 2 * 4 * 10 * 3
    ex = TokenizedExample("r", cond_prompt_ids=[5] * 7, abl_prompt_ids=[5] * 2, response_ids=[6, 7, 3])
    from benchmarks.step_cost import step_flops

    f = step_flops([collate([ex], pad_id=0)], fm)
    assert f.cond_tokens == 10 and f.abl_tokens == 5 and f.response_tokens == 3
    assert f.ce == 4 * fm.body([10]) + 4 * fm.head(3)
    assert f.ablated == fm.body([5]) + fm.head(3)
