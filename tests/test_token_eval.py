"""Token-level evaluation: token classes from spans, scores equal to the training pass, paired intervals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from perce_ds.data.prompts import PromptSettings, tokenize_record
from perce_ds.data.synthetic_natural import generate_records
from perce_ds.evaluation import token_eval
from perce_ds.evaluation.token_eval import RecordTokens
from perce_ds.insight import token_pir
from tests.test_chat_templates import SYSTEM, family_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = family_tokenizer("qwen3", tmp_path_factory.mktemp("tok"))
    records = generate_records(4, 4, 1, 0, "eval")
    settings = PromptSettings(SYSTEM, 1024, 512, chat_template_kwargs={"enable_thinking": False})
    return tok, records, [tokenize_record(r, tok, settings, "t") for r in records]


def test_token_kinds_follow_the_spans(setup):
    tok, records, examples = setup
    for record, ex in zip(records, examples):
        kinds = token_eval.token_kinds(ex)
        assert len(kinds) == len(ex.response_ids) and kinds[-1] == "other"  # the end-of-turn token
        assert [k != "other" for k in kinds] == ex.persona_token_mask  # the classes split the training mask
        offsets = tok(record.response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for (start, end), kind in zip(offsets, kinds):
            covering = [
                k for (a, b), k in zip(record.persona_spans, record.persona_span_kinds) if a < end and start < b
            ]
            inferable = [k for k in covering if k.startswith("infer")]
            assert kind == ("other" if not covering else max(inferable) if inferable else covering[0])
    assert {"copy", "infer", "infer_heldout"} <= {k for ex in examples for k in ex.persona_token_kinds}


def test_scores_match_the_training_pass(setup):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, records, examples = setup
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))  # fmt: skip
    # A random model's argmax is never the token, so "correct" would only ever compare False with False: fit the
    # conditioned sequences a little, so that some response tokens are predicted and some are not.
    opt = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(15):
        for ex in examples:
            ids = torch.tensor([ex.cond_prompt_ids + ex.response_ids])
            lm(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    lm.eval()
    rows = token_eval.score_tokens(lm, tok, records, examples, batch_size=2)  # 2 batches, padded differently
    pir = token_pir(lm, examples, tok.pad_token_id)  # PerceLM, as training computes it
    hits = [c for row in rows for c in row.correct]
    assert 0.1 * len(hits) < sum(hits) < 0.9 * len(hits), (sum(hits), len(hits))  # both outcomes are compared
    for row, ex, p in zip(rows, examples, pir):
        assert np.allclose(np.asarray(row.logp) - np.asarray(row.logp_ablated), p, atol=1e-4)
        with torch.no_grad():
            ids = torch.tensor([ex.cond_prompt_ids + ex.response_ids])
            logits = lm(input_ids=ids).logits[0, len(ex.cond_prompt_ids) - 1 : -1]
            abl_ids = torch.tensor([ex.abl_prompt_ids + ex.response_ids])
            abl_logits = lm(input_ids=abl_ids).logits[0, len(ex.abl_prompt_ids) - 1 : -1]
        targets = torch.tensor(ex.response_ids)[:, None]
        ref = torch.log_softmax(logits, -1).gather(-1, targets)[:, 0]
        ref_abl = torch.log_softmax(abl_logits, -1).gather(-1, targets)[:, 0]
        assert (ref - ref_abl).abs().max() > 0.1  # the profile changes the log-probs: the ablated pass is compared
        assert np.allclose(row.logp, ref.numpy(), atol=1e-4)
        assert np.allclose(row.logp_ablated, ref_abl.numpy(), atol=1e-4)
        # The argmax comparison is not at float rounding: the best two logits differ by far more than 1e-4.
        top2 = logits.topk(2, -1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
        assert row.correct == (logits.argmax(-1) == torch.tensor(ex.response_ids)).tolist()


def test_training_eval_and_token_eval_share_the_class_scores(setup):
    """Trainer.evaluate's per-class keys (eval_sums -> eval_metrics) equal token_eval.summarise's numbers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from perce_ds.evaluation.teacher_forced import TOKEN_CLASSES, eval_metrics, eval_sums, score_plain_model

    tok, records, examples = setup
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024))  # fmt: skip
    scored = score_plain_model(lm.eval(), examples, tok.pad_token_id, 3, with_hits=True)
    halves = [scored[::2], scored[1::2]]  # two "ranks": sums add up as all_reduce_sum adds them
    metrics = eval_metrics((eval_sums(halves[0], examples) + eval_sums(halves[1], examples)).tolist())
    summary = token_eval.summarise(token_eval.score_tokens(lm, tok, records, examples, batch_size=3), clip_min=0.8)
    for cls in TOKEN_CLASSES:
        assert summary[cls]["tokens"] > 0, cls  # every class is exercised
        assert metrics[f"eval_tokens_{cls}"] == summary[cls]["tokens"]
        assert metrics[f"eval_nll_{cls}"] == pytest.approx(summary[cls]["nll"], rel=1e-12)
        assert metrics[f"eval_acc_{cls}"] == pytest.approx(summary[cls]["acc"], rel=1e-12)
    n = sum(len(s.logp) for s in scored)
    assert metrics["eval_ce"] == pytest.approx(-sum(s.logp.sum() for s in scored) / n)
    assert metrics["eval_acc"] == pytest.approx(sum(s.hits.sum() for s in scored) / n)
    bare = [dataclasses.replace(e, persona_token_mask=[], persona_token_kinds=[]) for e in examples]
    plain = eval_metrics(eval_sums(scored, bare).tolist())  # a split without spans: no class keys at all
    assert "eval_acc" in plain and not [k for k in plain if k.startswith(("eval_nll_", "eval_tokens_", "eval_acc_"))]


def _rows(nll_by_record: list[list[float]], kinds: list[list[str]]) -> list[RecordTokens]:
    return [RecordTokens(f"r{i}", k, [-x for x in n], [0.0] * len(n), [x < 1 for x in n])
            for i, (n, k) in enumerate(zip(nll_by_record, kinds))]  # fmt: skip


def test_paired_difference_is_the_pooled_token_difference():
    kinds = [["copy", "other", "infer"], ["other", "other", "copy", "other"], ["infer", "other"]]
    base_nll = [[2.0, 1.0, 3.0], [0.5, 0.5, 1.0, 2.0], [4.0, 1.0]]
    base = _rows(base_nll, kinds)
    shifted = _rows([[x - 0.5 if k != "other" else x for x, k in zip(n, ks)] for n, ks in zip(base_nll, kinds)], kinds)
    d = token_eval.paired_difference(base, shifted, "persona")
    assert d["tokens"] == 4 and d["nll"]["diff"] == pytest.approx(-0.5)
    assert d["nll"]["ci_low"] == pytest.approx(-0.5) and d["nll"]["ci_high"] == pytest.approx(-0.5)  # constant shift
    assert token_eval.paired_difference(base, shifted, "other")["nll"]["diff"] == 0.0
    s = token_eval.summarise(base, clip_min=0.8)
    assert s["infer"]["nll"] == pytest.approx(3.5) and s["copy"]["nll"] == pytest.approx(1.5)
    assert s["persona"]["tokens"] == 4 and s["other"]["nll"] == pytest.approx(5.0 / 5)
    with pytest.raises(ValueError, match="different tokens"):
        token_eval.paired_difference(base, _rows(base_nll, [kinds[0], kinds[2], kinds[1]]), "persona")
    # the PIR detector: threshold selected here (validation) or given (a test split scored at validation's)
    assert s["pir_detector"]["threshold_from"] == "this split"
    given = token_eval.summarise(base, clip_min=0.8, threshold=0.25)["pir_detector"]
    assert given["threshold_from"] == "validation" and given["selected_threshold"] == 0.25


def test_compare_token_table_of_two_runs(tmp_path):
    import importlib.util
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from tests.launch_utils import ROOT, make_eval_run

    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "launch" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    a, b = make_eval_run(tmp_path / "a"), make_eval_run(tmp_path / "b")
    shutil.copytree(a / "hf", a / "hf_init")  # a from-scratch run's starting model: step 0 == run a here
    lm = AutoModelForCausalLM.from_pretrained(str(b / "hf"))
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lm.save_pretrained(str(b / "hf"))
    md = compare.token_compare([a, b], "", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "tokens.json").read_text())
    s, d = result["summaries"], result["differences"]["b"]
    assert s["step0"] == s["a"]  # the same weights scored twice give the same numbers
    for cls in ("persona", "other"):
        assert d[cls]["nll"]["diff"] == pytest.approx(s["b"][cls]["nll"] - s["a"][cls]["nll"], abs=1e-9)
        assert d[cls]["nll"]["ci_low"] <= d[cls]["nll"]["diff"] <= d[cls]["nll"]["ci_high"]
    assert "NLL, persona tokens" in md and "PIR detector F1" in md and "copy tokens" not in md  # no kinds here
    # On the test split the detector threshold of each model is the one selected on validation (eval) above
    md_test = compare.token_compare([a, b], "", tmp_path / "out_test", split="test")
    test = json.loads((tmp_path / "out_test" / "tokens.json").read_text())
    assert test["split"] == "test" and "threshold chosen on validation" in md_test
    for k in ("step0", "a", "b"):
        val, tst = s[k]["pir_detector"], test["summaries"][k]["pir_detector"]
        assert val["threshold_from"] == "this split" and tst["threshold_from"] == "validation"
        assert tst["selected_threshold"] == val["selected_threshold"]
    assert test["summaries"]["a"]["n_records"] != s["a"]["n_records"] or test["summaries"]["a"] != s["a"]
    with pytest.raises(SystemExit, match="other data"):
        compare.token_compare([a, make_eval_run(tmp_path / "c", seed=1)], "", tmp_path / "out2")


def test_insight_on_test_reports_f1_at_the_threshold_chosen_on_validation(tmp_path):
    from perce_ds.insight import run_insight
    from tests.launch_utils import make_eval_run

    run = make_eval_run(tmp_path / "r")
    val = run_insight(run, split="eval", n_samples=1, limit=6, with_before=False)["after"]["selected"]
    test = run_insight(run, split="test", n_samples=1, limit=6, with_before=False)["after"]["selected"]
    assert val["threshold_from"] == "this split" and test["threshold_from"] == "validation"
    assert test["threshold"] == val["threshold"] and test["n_tokens"] != val["n_tokens"]  # other tokens, same cut
