"""Real 2-process DeepSpeed ZeRO-3 runs on CPU (gloo), checked against plain PyTorch.

Each test launches `deepspeed launch/train.py` (or a worker) as a user would. The model starts
from a saved random tiny Qwen3, so the reference implementation can load identical weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from perce_ds.config import RunConfig
from perce_ds.data.order import DataOrder
from perce_ds.data.pipeline import tokenize_split
from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.distributed import device_label
from tests.launch_utils import (
    ROOT,
    assert_weights_exercise_perce,
    build_tiny_setup,
    check,
    leftover_shm_segments,
    load_safetensors,
    read_jsonl,
    recipe,
    reference_logprobs,
    reference_perce_loss,
    run_deepspeed,
    train,
    write_recipe,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_setup(tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize(
    "layout", [{}, {"packing": True}, {"packing": True, "fused_passes": True}], ids=["padded", "packed", "packed-fused"]
)
def test_one_zero3_step_equals_plain_pytorch(setup, layout):
    """One PerCE step on 2 ZeRO-3 ranks == docs/method.md's formula in plain PyTorch (SGD, lr 1, fp32),
    with padded or packed micro-batches and with separate or fused passes."""
    from transformers import AutoModelForCausalLM

    name = "equiv-" + "-".join(sorted(layout))
    spec = recipe(setup, name)
    spec["data"]["packing"] = layout.get("packing", False)
    spec["loss"]["fused_passes"] = layout.get("fused_passes", False)
    proc = check(train(setup["root"], spec, 2, setup["sgd"]))
    # No RAM-backed /dev/shm segment outlives the run (they piled up to 20 GB over a test suite).
    assert leftover_shm_segments(proc) == []
    cfg = RunConfig.load(write_recipe(setup["root"] / f"{name}.yaml", spec))
    examples, _ = tokenize_split([str(setup["train"])], load_tokenizer(setup["model"]), cfg)
    order = DataOrder(len(examples), 2, 2, 1, cfg.train.seed)
    batch = [examples[i] for rank in (0, 1) for micro in order.window(0, rank) for i in micro]

    assert all(e.cond_prompt_ids != e.abl_prompt_ids for e in batch)  # every record keeps some profile
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32, attn_implementation="eager")
    lo, hi = spec["loss"]["clip_min"], spec["loss"]["clip_max"]
    loss, weights = reference_perce_loss(model, batch, lo, hi)
    assert_weights_exercise_perce(weights, lo, hi)
    loss.backward()
    with torch.no_grad():
        expected = {n: p - 1.0 * p.grad for n, p in model.named_parameters()}
    got = load_safetensors(setup["root"] / "runs" / name / "hf" / "model.safetensors")
    assert set(got) <= set(expected)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    # The update is real (not a no-op that trivially matches).
    initial = load_safetensors(setup["model"] / "model.safetensors")
    assert max(float((got[n] - initial[n]).abs().max()) for n in got) > 1e-3


@pytest.mark.parametrize("scheme", ["perce", "loss_weighted", "entropy_weighted"])
def test_normaliser_same_update_for_any_split_of_the_global_batch(setup, scheme):
    """micro 4 x accum 1 x 1 rank == micro 1 x accum 2 x 2 ranks (one global token mean). For the baselines
    the mean-1 normaliser of their weights is the global batch's too (docs/method.md), not each micro-batch's."""
    runs = setup["root"] / "runs"
    for name, micro, accum, ranks in (("a", 4, 1, 1), ("b", 1, 2, 2)):
        spec = recipe(setup, f"split_{scheme}_{name}", micro_batch_size=micro, grad_accum=accum)
        spec["loss"]["scheme"] = scheme
        check(train(setup["root"], spec, ranks, setup["sgd"]))
    a = load_safetensors(runs / f"split_{scheme}_a" / "hf" / "model.safetensors")
    b = load_safetensors(runs / f"split_{scheme}_b" / "hf" / "model.safetensors")
    if scheme == "perce":  # not clip_min x CE: the PerCE weights vary
        assert read_jsonl(runs / "split_perce_a" / "metrics.jsonl")[0]["weight_mean"] > 0.9
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_resume_reproduces_straight_run_and_export_reproduces_engine_loss(setup):
    """6 steps straight == 3 steps + resume auto + 3 steps; hf/ export reloads with the same loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runs = setup["root"] / "runs"
    common = {"max_steps": 6, "lr": 3e-3, "lr_scheduler": "cosine", "max_grad_norm": 1.0, "weight_decay": 0.01}
    check(train(setup["root"], recipe(setup, "straight", **common), 2, setup["adam"]))
    proc = check(train(setup["root"], recipe(setup, "resumed", stop_after=3, **common), 2, setup["adam"]))
    assert (runs / "resumed" / "checkpoints" / "step_3").is_dir() and not (runs / "resumed" / "hf").exists(), (
        proc.stderr[-3000:]
    )
    stopped = json.loads((runs / "resumed" / "summary.json").read_text())  # a stopped run says so, and where
    assert (stopped["stopped"], stopped["stopped_at"], stopped["device"]) == ("train.stop_after", 3, device_label())
    proc = check(train(setup["root"], recipe(setup, "resumed", **common), 2, setup["adam"]))
    assert "resumed from" in proc.stderr
    assert "stopped" not in json.loads((runs / "resumed" / "summary.json").read_text())  # finished: replaced

    straight, resumed = read_jsonl(runs / "straight" / "metrics.jsonl"), read_jsonl(runs / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for s, r in zip(straight, resumed, strict=True):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=1e-7)
        assert r["lr"] == pytest.approx(s["lr"], rel=1e-9)
    a = load_safetensors(runs / "straight" / "hf" / "model.safetensors")
    b = load_safetensors(runs / "resumed" / "hf" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

    # Export: from_pretrained on hf/ reproduces the engine's final eval loss (conditioned CE).
    hf = runs / "straight" / "hf"
    summary = json.loads((runs / "straight" / "summary.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf)
    cfg = RunConfig.load(setup["root"] / "recipe-straight.yaml")
    examples, _ = tokenize_split([str(setup["eval"])], tok, cfg)
    with torch.no_grad():
        nll = torch.cat([-reference_logprobs(model, e.cond_prompt_ids, e.response_ids) for e in examples])
    assert float(nll.mean()) == pytest.approx(summary["eval"]["eval_ce"], rel=1e-5)
    # The per-class keys of the 2-rank evaluation (sharded, all-reduced sums) are token_eval's numbers.
    from perce_ds.data.sources import load_many
    from perce_ds.evaluation import token_eval

    ev = summary["eval"]
    rows = token_eval.score_tokens(model, tok, load_many([str(setup["eval"])])[0], examples)
    table = token_eval.summarise(rows, cfg.loss.clip_min)
    assert table["persona"]["tokens"] > 0 and table["other"]["tokens"] > 0 and table["copy"]["tokens"] == 0
    for cls in (*token_eval.PERSONA_CLASSES, token_eval.OTHER):
        assert ev[f"eval_tokens_{cls}"] == table[cls]["tokens"], cls
        if table[cls]["tokens"]:
            assert ev[f"eval_nll_{cls}"] == pytest.approx(table[cls]["nll"], rel=1e-5), cls
            # argmax hits of two fp32 implementations: a near-tie may flip one token, never more here
            assert abs(ev[f"eval_acc_{cls}"] - table[cls]["acc"]) * table[cls]["tokens"] <= 1 + 1e-9, cls
        else:
            assert ev[f"eval_nll_{cls}"] is None and ev[f"eval_acc_{cls}"] is None
    n = sum(table[c]["tokens"] for c in ("persona", "other"))
    assert ev["eval_acc"] == pytest.approx(sum(sum(r.correct) for r in rows) / n, abs=1.0 / n + 1e-9)
    evals = read_jsonl(runs / "straight" / "eval_metrics.jsonl")
    assert evals and all("eval_nll_persona" in row and "eval_acc" in row for row in evals)
    assert (hf / "README.md").read_text().count("perce") >= 1


def test_keep_best_on_two_ranks_and_early_stopping(setup):
    """keep_best on 2 ranks past an evaluation that does not improve (before the fix, rank 1 entered the export's
    all-gather alone there and the job hung), with train.keep_best_patience 2: the run ends as finished at the
    second evaluation in a row without improvement, and a re-run trains no further. Mode max on eval_ce: training
    lowers eval_ce, so evaluations stop improving early."""
    runs = setup["root"] / "runs"
    common = {"max_steps": 12, "lr": 3e-3, "lr_scheduler": "cosine", "max_grad_norm": 1.0, "eval_every": 1,
              "keep_best": "eval_ce", "keep_best_mode": "max", "keep_best_patience": 2}  # fmt: skip
    check(train(setup["root"], recipe(setup, "early", **common), 2, setup["adam"]))
    run = runs / "early"
    evals = read_jsonl(run / "eval_metrics.jsonl")
    best_step, best, stop = None, float("-inf"), None
    for row in evals:  # the rule, replayed on the logged values
        if row["eval_ce"] > best:
            best_step, best = row["step"], row["eval_ce"]
        elif row["step"] - best_step >= 2:
            stop = row["step"]
            break
    assert stop is not None and stop < common["max_steps"], [(r["step"], r["eval_ce"]) for r in evals]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["early_stopped_at"], summary["best_step"]) == (stop, best_step)
    assert json.loads((run / "best.json").read_text())["step"] == best_step
    assert [r["step"] for r in evals] == list(range(1, stop + 1))  # the stopping evaluation is the final one
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == stop
    assert (run / "hf" / "config.json").is_file() and (run / "hf_best" / "config.json").is_file()
    assert (run / "checkpoints" / f"step_{stop}").is_dir()
    # A re-run (resume auto) finds the patience spent at its checkpoint: no step is trained
    proc = check(train(setup["root"], recipe(setup, "early", **common), 2, setup["adam"]))
    assert "resumed from" in proc.stderr and "early stop" in proc.stderr
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == stop
    assert {r["step"] for r in read_jsonl(run / "eval_metrics.jsonl")} == set(range(1, stop + 1))


def test_edge_cases_uneven_tokens_and_nonfinite_steps(setup):
    spec = recipe(setup, "edge", lr=1e-2)
    recipe_path = write_recipe(setup["root"] / "edge.yaml", spec)
    out = setup["root"] / "edge_out"
    worker = ROOT / "tests" / "workers" / "edge_cases.py"
    check(run_deepspeed(worker, ["--recipe", str(recipe_path), "--deepspeed", str(setup["sgd"]), "--out", str(out)], 2))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in ranks:
        assert res["uneven"]["applied"] and res["uneven"]["finite"]
        assert res["uneven"]["change"] > 0  # rank 0's tokens still trained the shared model
        assert res["nonfinite"]["refused_applied"] is False
        assert res["nonfinite"]["change_after_refused"] == 0.0
        assert res["nonfinite"]["next_applied"] and res["nonfinite"]["change_after_next"] > 0
        assert res["save_refused"] and not res["step_99_exists"]
        assert res["stopped_at"] == 4  # max_nonfinite_steps=2: steps 3 and 4 refused, then stop
    assert ranks[0]["uneven"]["loss"] == ranks[1]["uneven"]["loss"]


def test_bad_records_error_or_are_counted(setup):
    bad = setup["root"] / "bad_train.jsonl"
    lines = setup["train"].read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["response"]
    lines[1] = json.dumps(broken)
    bad.write_text("\n".join(lines) + "\n")
    spec = recipe(setup, "bad")
    spec["data"]["train_files"] = [str(bad)]
    proc = train(setup["root"], spec, 1, setup["sgd"])
    assert proc.returncode != 0
    assert f"{bad}, line 2, field 'response': missing" in proc.stdout + proc.stderr

    skip = copy.deepcopy(spec)
    skip["data"]["on_bad_record"] = "skip"
    skip["train"]["run_name"] = "bad_skip"
    check(train(setup["root"], skip, 1, setup["sgd"]))
    summary = json.loads((setup["root"] / "runs" / "bad_skip" / "summary.json").read_text())
    assert summary["records_skipped"] == {"train": 1, "eval": 0}


def test_perce_refused_without_profiles_and_warned_when_it_is_ce(setup):
    """No training record keeps a profile: PerCE refuses to start, naming the budget keys. No PIR above
    clip_min for loss.warn_no_personal_steps steps: one warning (the update is CE's)."""
    spec = recipe(setup, "no_profiles")
    spec["data"]["max_profile_tokens"] = 0
    proc = train(setup["root"], spec, 1, setup["sgd"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "loss.scheme=perce needs profiles" in out and "data.max_length or data.max_profile_tokens" in out

    spec = recipe(setup, "ce_in_disguise", max_steps=4, lr=1e-3)
    spec["loss"].update(clip_min=50.0, clip_max=60.0, warn_no_personal_steps=2)  # no PIR reaches 50
    proc = check(train(setup["root"], spec, 1, setup["sgd"]))
    assert (proc.stdout + proc.stderr).count("no response token had PIR above loss.clip_min") == 1
    rows = read_jsonl(setup["root"] / "runs" / "ce_in_disguise" / "metrics.jsonl")
    assert [r["personal_ratio"] for r in rows] == [0.0] * 4
