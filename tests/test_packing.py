"""Padding-free (packed) batches and fused passes give the padded, separate-pass numbers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from perce_ds.data.collate import collate, fuse_passes
from perce_ds.data.prompts import PromptSettings, tokenize_record
from perce_ds.data.synthetic import generate_records
from perce_ds.model import PerceLM


def _model(tok, model_type: str, attn: str) -> PerceLM:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        tie_word_embeddings=model_type == "qwen3", initializer_range=0.2,
    )  # fmt: skip
    return PerceLM(AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32), 64)


@pytest.fixture(scope="module")
def examples(sp_tokenizer):
    settings = PromptSettings("You write like the user.", 512, 200)
    return [tokenize_record(r, sp_tokenizer, settings, "synthetic") for r in generate_records(6, 1, 3)]


def _logp(model: PerceLM, inputs, batch, response=None):
    ids, mask = response or (batch.response_ids, batch.response_mask)
    return model(inputs.input_ids, inputs.attention_mask, ids, mask, False, inputs.position_ids, inputs.predict_index)[
        "logp"
    ]


@pytest.mark.parametrize("model_type,attn", [("qwen3", "sdpa"), ("qwen3", "eager"), ("llama", "sdpa")])
def test_packed_equals_padded(sp_tokenizer, examples, model_type, attn):
    model = _model(sp_tokenizer, model_type, attn)
    padded, packed = (
        collate(examples, sp_tokenizer.pad_token_id),
        collate(examples, sp_tokenizer.pad_token_id, packed=True),
    )
    assert packed.conditioned.input_ids.shape[0] == 1 and packed.conditioned.attention_mask is None
    assert packed.conditioned.n_positions == padded.conditioned.n_tokens < padded.conditioned.n_positions  # no padding
    for name in ("conditioned", "ablated"):
        a, b = _logp(model, getattr(padded, name), padded), _logp(model, getattr(packed, name), packed)
        assert a.shape == (padded.n_response_tokens,)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    # Sequences really are isolated: changing the first sequence leaves the others' log-probs alone.
    changed = [examples[0].__class__(**{**examples[0].__dict__, "cond_prompt_ids": examples[0].cond_prompt_ids[:-3]})]
    other = collate(changed + examples[1:], sp_tokenizer.pad_token_id, packed=True)
    n0 = len(examples[0].response_ids)
    torch.testing.assert_close(_logp(model, other.conditioned, other)[n0:], _logp(model, packed.conditioned, packed)[n0:],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("packed", [False, True])
def test_fused_passes_equal_separate_passes_in_loss_and_gradients(sp_tokenizer, examples, packed):
    model = _model(sp_tokenizer, "qwen3", "sdpa")
    batch = collate(examples, sp_tokenizer.pad_token_id, packed=packed)

    def loss_and_grads(logp_cond, logp_abl):
        w = (logp_cond.detach() - logp_abl).clamp(0.8, 5.0)
        loss = -(w * logp_cond).sum() / logp_cond.numel()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss.detach(), grads

    with torch.no_grad():
        abl = _logp(model, batch.ablated, batch)
    loss_a, grads_a = loss_and_grads(_logp(model, batch.conditioned, batch), abl)
    fused, ids2, mask2 = fuse_passes(batch, sp_tokenizer.pad_token_id)
    both = _logp(model, fused, batch, (ids2, mask2))
    n = batch.n_response_tokens
    torch.testing.assert_close(both[n:], abl, atol=1e-5, rtol=1e-5)
    loss_b, grads_b = loss_and_grads(both[:n], both[n:].detach())
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)
