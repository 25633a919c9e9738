"""A real pretrained chat model (SmolLM2-135M-Instruct, built offline by launch/setup_smollm2.py) through the recipe.

The folder is built once per test session into .models/ (ignored by git; reused when complete), so CI on a
fresh machine builds it once (~1 minute) and later sessions on the same checkout reuse it.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from perce_ds.config import RunConfig
from perce_ds.data import pipeline, synthetic
from perce_ds.data.prompts import tokenize_record
from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.evaluation import token_eval
from tests.launch_utils import ROOT, TRAIN, check, read_jsonl, run_deepspeed, run_job, write_recipe
from tests.test_chat_templates import check_prompts_follow_the_template

RECIPE = ROOT / "recipes" / "persona_smollm2.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir():
    out = ROOT / ".models" / "SmolLM2-135M-Instruct"
    check(run_job([sys.executable, ROOT / "launch" / "setup_smollm2.py", "--out", out], timeout=1200))
    assert (out / ".complete").is_file() and (out / "model.safetensors").is_file()
    return out


def _cfg(model_dir, *overrides: str) -> RunConfig:
    return RunConfig.load(RECIPE, [f"model.name_or_path={model_dir}", *overrides])


def test_prompts_with_smollm2s_own_template(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    records = synthetic.split_records(_cfg(smollm2_dir).data.synthetic, "eval")[:6]
    check_prompts_follow_the_template(tok, {}, "<|im_end|>", records)


def test_the_pretrained_model_reads_the_profile_at_step_0(smollm2_dir):
    """Mean PIR on the eval split's (unseen users') persona tokens is far above that on other tokens."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    records = synthetic.split_records(cfg.data.synthetic, "eval")[:12]  # 6 unseen users: ~40 s on 1 core
    examples = [tokenize_record(r, tok, pipeline.prompt_settings(cfg), "eval") for r in records]
    lm = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    s = token_eval.summarise(token_eval.score_tokens(lm, tok, records, examples), cfg.loss.clip_min)
    # A model that ignored the profile would give ~0 on both; 1 nat = the profile makes persona tokens e times
    # likelier on average than it makes other tokens.
    assert s["pir_mean"]["persona"] > s["pir_mean"]["other"] + 1.0, s["pir_mean"]
    assert s["share_pir_above_clip_min"]["persona"] > s["share_pir_above_clip_min"]["other"]
    assert s["pir_detector"]["f1_at_selected"] > 2 * s["pir_detector"]["random_f1_at_selected"]


def test_trains_under_zero3_on_two_ranks_and_its_export_generates(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    overrides = [f"--model.name_or_path={smollm2_dir}", f"--train.output_dir={tmp_path}", "--train.run_name=smol",
                 "--train.max_steps=2", "--data.synthetic.users=4", "--data.synthetic.train_per_user=1",
                 "--data.synthetic.eval_users=2", "--data.synthetic.eval_per_user=1",
                 "--train.final_generation_eval=true", "--train.eval_max_new_tokens=8"]  # the recipe's final generation eval, on 2 unseen users  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", RunConfig.load(RECIPE).to_dict())
    check(run_deepspeed(TRAIN, ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json"), "--recipe", str(recipe),
                                *overrides], nproc=2, timeout=1200))  # fmt: skip
    run = tmp_path / "smol"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # PerCE differs from CE from the first step: the pretrained model already reads the profile
    assert rows[0]["personal_ratio"] > 0 and rows[0]["weight_mean"] > 0.8
    assert rows[0]["pir_persona_tokens"] > rows[0]["pir_other_tokens"]
    demo = json.loads((run / "summary.json").read_text())["eval"]
    assert demo["demo_n_records"] == 2 and demo["demo_n_empty"] == 0  # ZeRO-3 synced generation answered both
    assert demo["demo_persona_token_acc"] is not None and demo["demo_pir_best_f1"] is not None
    tok = load_tokenizer(run / "hf")
    assert tok.chat_template == load_tokenizer(smollm2_dir).chat_template
    lm = AutoModelForCausalLM.from_pretrained(str(run / "hf"), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    assert not torch.equal(lm.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    from perce_ds.evaluation.generation import GenerationSettings, generate_batch

    cfg = RunConfig.load(run / "config.yaml")
    record = synthetic.split_records(cfg.data.synthetic, "eval")[0]
    ex = tokenize_record(record, tok, pipeline.prompt_settings(cfg), "eval")
    text = generate_batch(lm, tok, [ex.cond_prompt_ids], 24, GenerationSettings(max_new_tokens=24))[0]
    assert len(text.split()) >= 3, text  # words, from a model that reloaded and decodes
