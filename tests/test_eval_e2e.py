"""End to end on CPU: a tiny 2-process ZeRO-3 run that ends with demo_evaluation, then
launch/evaluate.py -> launch/compare.py -> launch/insight.py, every report file present, every number finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.evaluation.runs import load_checkpoint_weights, load_run_config
from tests.launch_utils import (
    EVALUATE,
    ROOT,
    TINY_QWEN3,
    check,
    load_safetensors,
    make_eval_run,
    read_jsonl,
    run_deepspeed,
    run_python,
    write_recipe,
)

pytestmark = pytest.mark.slow
WORKER = ROOT / "tests" / "workers" / "demo_eval.py"


def numbers(obj):
    """Every int/float inside a JSON-like object."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from numbers(v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    recipe = {
        "model": {"config": dict(TINY_QWEN3), "tokenizer_vocab_size": 400, "attn_implementation": "sdpa"},
        "data": {"synthetic": {"enabled": True, "users": 4, "train_per_user": 4, "eval_per_user": 2, "seed": 0},
                 "max_length": 384, "max_profile_tokens": 256},
        "train": {"output_dir": str(root), "run_name": "perce", "micro_batch_size": 2, "max_steps": 3, "lr": 1e-3,
                  "tensorboard": False, "dist_timeout_s": 120},
    }  # fmt: skip
    proc = run_deepspeed(WORKER, ["--recipe", str(write_recipe(root / "perce.yaml", recipe)),
                                  "--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--out", str(root / "out")],
                         nproc=2, timeout=300)  # fmt: skip
    check(proc)
    assert "PIR>0 as persona-token detector: F1" in proc.stdout
    return root / "perce"


def test_demo_evaluation_under_zero3(trained):
    outs = [json.loads((trained.parent / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert outs[0] == outs[1]  # every rank gets the same answer
    demo = outs[0]
    assert demo["_train_after"] and demo["_checkpointing_restored"]
    assert len(demo["summary_lines"].splitlines()) == 3
    for key in ("demo_persona_token_acc", "demo_other_token_acc", "demo_rouge1", "demo_rougeL", "demo_meteor",
                "demo_pir_f1", "demo_pir_random_f1", "demo_pir_best_f1", "demo_pir_best_threshold"):  # fmt: skip
        assert isinstance(demo[key], float) and math.isfinite(demo[key]), key
    assert demo["demo_n_records"] == 8
    for name in ("generations.jsonl", "per_record.jsonl", "scores.json", "report.md"):
        assert (trained / "eval" / "demo" / name).is_file(), name
    assert len(read_jsonl(trained / "eval" / "demo" / "generations.jsonl")) == 8


def test_evaluate_compare_insight(trained, tmp_path):
    baseline = make_eval_run(trained.parent / "random_baseline")  # an untrained model on the same task
    args = ["--max-new-tokens", "8", "--batch-size", "4"]
    for run in (baseline, trained):
        check(run_python(EVALUATE, ["--run", str(run), *args]))
        check(run_python(EVALUATE, ["--run", str(run), "--ablated", *args]))
        for name in ("meta.json", "generations.jsonl", "per_record.jsonl", "scores.json", "report.md",
                     "training_curves.png"):  # fmt: skip
            assert (run / "eval" / name).is_file(), name
            assert (run / "eval" / "ablated" / name).is_file(), name
        scores = json.loads((run / "eval" / "scores.json").read_text())
        assert scores["overall"]["n_records"] == 8 and scores["meta"]["rouge_stemming"] is True
        assert all(math.isfinite(x) for x in numbers(scores))
    # rerunning is a no-op resume: same scores, nothing regenerated
    before = (trained / "eval" / "scores.json").read_text()
    check(run_python(EVALUATE, ["--run", str(trained), *args]))
    assert (trained / "eval" / "scores.json").read_text() == before

    out = tmp_path / "cmp"
    proc = check(run_python(ROOT / "launch" / "compare.py", [str(baseline), str(trained), "--out", str(out)]))
    assert "gain perce vs random_baseline" in proc.stdout
    for name in ("compare.md", "compare.json", "training_curves.png"):
        assert (out / name).is_file(), name
    comparison = json.loads((out / "compare.json").read_text())
    assert comparison["cross_task_meteor"].keys() == {"random_baseline", "perce"}
    assert all(math.isfinite(x) for row in comparison["rows"] for x in numbers(row))

    proc = check(run_python(ROOT / "launch" / "insight.py", ["--run", str(trained), "--samples", "3"]))
    assert "after: PIR>0 F1" in proc.stdout and "random marking at the same rate" in proc.stdout
    for name in ("index.html", "insight.json", "pir_hist.png"):
        assert (trained / "insight" / name).is_file(), name
    summary = json.loads((trained / "insight" / "insight.json").read_text())
    for stage in ("before", "after"):
        for key in ("f1", "precision", "recall", "random_f1"):
            assert math.isfinite(summary[stage]["marking"][key])
        assert math.isfinite(summary[stage]["selected"]["f1"])
    assert summary["top_personal_tokens"]["synthetic_persona"]


def test_checkpoint_evaluates_like_the_exported_model(trained):
    """--checkpoint (DeepSpeed's consolidated fp32 weights of checkpoints/step_N) == the hf/ export of that step."""
    args = ["--max-new-tokens", "8", "--batch-size", "4"]
    checkpoint = trained / "checkpoints" / "step_3"
    check(run_python(EVALUATE, ["--run", str(trained), "--name", "from_hf", *args]))
    check(run_python(EVALUATE, ["--run", str(trained), "--checkpoint", str(checkpoint), "--name", "from_ckpt", *args]))
    hf, ckpt = (read_jsonl(trained / "eval" / name / "generations.jsonl") for name in ("from_hf", "from_ckpt"))
    by_id = [{r["record_id"]: r["generation"] for r in rows} for rows in (hf, ckpt)]
    assert len(by_id[0]) == 8 and by_id[0] == by_id[1]
    scores = [json.loads((trained / "eval" / name / "scores.json").read_text()) for name in ("from_hf", "from_ckpt")]
    assert scores[0]["overall"] == scores[1]["overall"]
    assert json.loads((trained / "eval" / "from_ckpt" / "meta.json").read_text())["model_id"].startswith("checkpoint:")
    # Greedy text from a 3-step model is too uniform to tell models apart: compare the weights themselves.
    loaded = load_checkpoint_weights(
        load_run_config(trained), checkpoint, load_tokenizer(trained / "hf"), torch.float32
    )
    exported = load_safetensors(trained / "hf" / "model.safetensors")
    state = loaded.state_dict()
    for name, tensor in exported.items():
        assert torch.equal(state[name], tensor), name
