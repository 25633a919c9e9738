"""Token insight: PIR marking scores vs ground truth, the random-marking baseline, token strings, the page."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from perce_ds import insight
from perce_ds.evaluation.metrics import best_threshold, marking_scores


def test_marking_scores_by_hand():
    pir = [np.array([2.0, -1.0, 0.5]), np.array([0.1, -0.2])]
    truth = [[True, False, True], [False, True]]
    s = marking_scores(pir, truth, 0.0)
    # predicted: T F T | T F ; tp = 2, fp = 1, fn = 1
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    base, q = 3 / 5, 3 / 5
    assert s["random_f1"] == pytest.approx(2 * base * q / (base + q))
    assert marking_scores(pir, truth, 10.0)["f1"] == 0.0


def test_random_marking_f1_matches_simulation():
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.2
    pir = [np.where(rng.random(20000) < 0.35, 1.0, -1.0)]  # marks 35% of tokens at random
    s = marking_scores(pir, [y.tolist()], 0.0)
    assert s["f1"] == pytest.approx(s["random_f1"], abs=0.01)


def test_best_threshold_finds_a_separating_cut():
    pir = [np.array([3.0, 2.5, 0.3, 0.2, 0.1])]
    truth = [[True, True, False, False, False]]
    best = best_threshold(pir, truth)
    assert best["f1"] == 1.0 and 0.3 <= best["threshold"] < 2.5
    assert best["f1"] > best["random_f1"]


def test_token_strings_rebuild_the_text(sp_tokenizer):
    text = "Cheers, Biscuit the dog went to Lisbon"
    ids = sp_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(insight.token_strings(sp_tokenizer, ids)) == sp_tokenizer.decode(ids)


def test_token_pir_matches_the_two_passes(sp_tokenizer):
    """PIR from insight equals log P(y|cond) - log P(y|abl) computed the textbook way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perce_ds.data.prompts import PromptSettings, tokenize_record
    from perce_ds.data.synthetic import generate_records
    from tests.launch_utils import TINY_QWEN3, reference_logprobs

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_QWEN3.items() if k != "model_type"}
    config = AutoConfig.for_model("qwen3", vocab_size=len(sp_tokenizer), **arch)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    settings = PromptSettings("sys", 512, 256)
    examples = [tokenize_record(r, sp_tokenizer, settings, "t") for r in generate_records(2, 2, 0)[:3]]
    pir = insight.token_pir(lm, examples, sp_tokenizer.pad_token_id, batch_size=2)
    with torch.no_grad():
        for ex, p in zip(examples, pir):
            ref = reference_logprobs(lm, ex.cond_prompt_ids, ex.response_ids)
            ref -= reference_logprobs(lm, ex.abl_prompt_ids, ex.response_ids)
            assert np.allclose(p, ref.double().numpy(), atol=1e-4)
            assert len(ex.persona_token_mask) == len(p)


def test_top_tokens_and_html():
    tokens = [[" the", " Lisbon", "!"], [" Lisbon", " <b>x</b>"]]
    pir = [np.array([-0.1, 2.0, 0.5]), np.array([1.0, 3.0])]
    top = insight.top_personal_tokens(tokens, pir, ["t", "t"], 0.0, min_count=1)
    assert top["t"][0] == ("<b>x</b>", 1, 3.0) and top["t"][1] == ("Lisbon", 2, 1.5)
    assert [t for t, *_ in insight.top_personal_tokens(tokens, pir, ["t", "t"], 0.0)["t"]] == ["Lisbon"]
    sample = {"record_id": "r1", "task": "t", "query": "q?", "profile": ["p <i>1</i>"], "tokens": tokens[1],
              "pir": pir[1].tolist(), "truth": [True, False], "pir_before": [0.0, math.nan]}  # fmt: skip
    page = insight.render_html([sample], "title", {"x": 1})
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "p &lt;i&gt;1&lt;/i&gt;" in page
    assert page.count("class='t gt'") == 2 and "before training" in page
    json.dumps({"top": top})  # serialisable
