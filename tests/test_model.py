"""Tests for perce_ds.model in one process (no DeepSpeed): the response-only log-prob head and helpers."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from perce_ds.config import ModelConfig
from perce_ds.data.collate import collate
from perce_ds.data.prompts import PromptSettings, tokenize_record
from perce_ds.data.synthetic import generate_records
from perce_ds.model import (
    PerceLM,
    build_causal_lm,
    position_ids_from_mask,
    resolve_attn_implementation,
    resolve_dtype,
)

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    # Larger than the usual 0.02 so the random model's predictions are far from uniform: a
    # misaligned position or a padding leak then changes log-probs by much more than the tolerance.
    initializer_range=0.2,
)
FLASH_POSSIBLE = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def make_lm(kind: str, tok) -> torch.nn.Module:
    tied = kind == "qwen3"
    cfg = AutoConfig.for_model(kind, vocab_size=len(tok), tie_word_embeddings=tied, **SMALL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    return model.eval()


@pytest.fixture(scope="module")
def models(sp_tokenizer):
    return {kind: make_lm(kind, sp_tokenizer) for kind in ("qwen3", "llama")}


@pytest.fixture(scope="module")
def batch_examples(sp_tokenizer):
    """Four synthetic records with different prompt and response lengths, profiles cut to 120 tokens."""
    records = generate_records(6, 2, seed=0)
    settings = PromptSettings("You are a helpful assistant.", 512, 120)
    by_len: dict[int, object] = {}
    for r in records:
        ex = tokenize_record(r, sp_tokenizer, settings, "synthetic")
        by_len.setdefault(len(ex.response_ids), ex)
    examples = list(by_len.values())[:4]
    assert len(examples) == 4
    assert len({len(e.cond_prompt_ids) for e in examples}) > 1
    assert len({len(e.abl_prompt_ids) for e in examples}) > 1
    assert all(e.profile_items_kept > 0 for e in examples)
    return examples


def naive_row(model, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of `response` after `prompt`, one unpadded sequence through the plain HF model."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        # use_cache=False only skips building a KV cache (slow on CPU); the computation is the same
        logp_all = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
    P, R = len(prompt), len(response)
    predicting = logp_all[P - 1 : P + R - 1]
    logp = predicting.gather(1, torch.tensor(response)[:, None]).squeeze(1)
    entropy = -(predicting.exp() * predicting).sum(-1)
    return logp, entropy


def run(lm: PerceLM, pass_inputs, batch, with_entropy: bool):
    return lm(pass_inputs.input_ids, pass_inputs.attention_mask, batch.response_ids, batch.response_mask, with_entropy)


# ---------------------------------------------------------------------------------------------
# forward == per-row unpadded reference


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_forward_matches_each_row_alone(kind, with_entropy, models, batch_examples, sp_tokenizer):
    model = models[kind]
    lm = PerceLM(model).eval()
    batch = collate(batch_examples, sp_tokenizer.pad_token_id)
    seq = batch.seq_ids()
    for name, pass_inputs, prompts in (
        ("conditioned", batch.conditioned, [e.cond_prompt_ids for e in batch_examples]),
        ("ablated", batch.ablated, [e.abl_prompt_ids for e in batch_examples]),
    ):
        with torch.no_grad():
            out = run(lm, pass_inputs, batch, with_entropy)
        assert out["logp"].dtype == torch.float32
        assert out["logp"].shape == (batch.n_response_tokens,)
        if with_entropy:
            assert out["entropy"].shape == out["logp"].shape
        else:
            assert out["entropy"] is None
        for row, (ex, prompt) in enumerate(zip(batch_examples, prompts)):
            ref_logp, ref_entropy = naive_row(model, prompt, ex.response_ids)
            # the reference is far from uniform, so a shifted or leaked position could not pass
            assert ref_logp.std() > 0.1
            got = out["logp"][seq == row]
            torch.testing.assert_close(got, ref_logp, atol=1e-5, rtol=0, msg=f"{kind} {name} row {row}")
            if with_entropy:
                torch.testing.assert_close(out["entropy"][seq == row], ref_entropy, atol=1e-5, rtol=0)
            # sanity: the reference shifted by one token would not match
            assert (got[1:] - ref_logp[:-1]).abs().max() > 1e-2


def test_forward_of_conditioned_and_ablated_differ(models, batch_examples, sp_tokenizer):
    lm = PerceLM(models["qwen3"]).eval()
    batch = collate(batch_examples, sp_tokenizer.pad_token_id)
    with torch.no_grad():
        cond = run(lm, batch.conditioned, batch, False)["logp"]
        abl = run(lm, batch.ablated, batch, False)["logp"]
    assert cond.shape == abl.shape
    assert (cond - abl).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# chunk size and gradients


def _grads(lm: PerceLM, batch, scalar_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    lm.zero_grad(set_to_none=True)
    out = run(lm, batch.conditioned, batch, True)
    # a weighted mean (like the loss), so gradients are O(1) and an absolute tolerance is meaningful
    (out["logp"] * scalar_weights).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_chunk_size_changes_nothing(kind, models, batch_examples, sp_tokenizer):
    model = models[kind]
    batch = collate(batch_examples, sp_tokenizer.pad_token_id)
    torch.manual_seed(1)
    weights = torch.rand(batch.n_response_tokens) + 0.5
    out_1, grads_1 = _grads(PerceLM(model, logprob_chunk_size=1), batch, weights)
    out_big, grads_big = _grads(PerceLM(model, logprob_chunk_size=1024), batch, weights)
    out_7, grads_7 = _grads(PerceLM(model, logprob_chunk_size=7), batch, weights)
    # a 1-row chunk uses a different matmul kernel than a 1024-row one: allow fp32 rounding (~1 ulp of |logp|)
    torch.testing.assert_close(out_1["logp"], out_big["logp"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_1["entropy"], out_big["entropy"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_7["logp"], out_big["logp"], atol=1e-6, rtol=1e-6)
    assert set(grads_1) == set(grads_big) == set(grads_7)
    names = {n for n, _ in PerceLM(model).named_parameters()}
    assert set(grads_big) == names  # every parameter (incl. the output embedding) gets a gradient
    for name in grads_big:
        torch.testing.assert_close(grads_1[name], grads_big[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(grads_7[name], grads_big[name], atol=1e-6, rtol=0, msg=name)
    assert any(g.abs().max() > 1e-3 for g in grads_big.values())


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_gradients_match_full_logits_autograd(kind, models, batch_examples, sp_tokenizer):
    """The chunked custom backward equals autograd through a plain [B, T, V] log_softmax."""
    model = models[kind]
    batch = collate(batch_examples, sp_tokenizer.pad_token_id)
    torch.manual_seed(2)
    weights = torch.rand(batch.n_response_tokens) + 0.5
    lm = PerceLM(model, logprob_chunk_size=5)
    out, grads = _grads(lm, batch, weights)

    ids, mask = batch.conditioned.input_ids, batch.conditioned.attention_mask
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    R = batch.response_ids.shape[1]
    logp_all = torch.log_softmax(logits[:, -(R + 1) : -1].float(), -1)
    ref = logp_all.gather(2, batch.response_ids[..., None]).squeeze(-1)[batch.response_mask]
    torch.testing.assert_close(out["logp"], ref.detach(), atol=1e-5, rtol=0)
    (ref * weights).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads["lm." + name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# positions


def test_position_ids_from_mask_left_padded():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 0],  # left-padded prompt, right-padded response
            [1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 1, 1, 1],
        ]
    )
    pos = position_ids_from_mask(mask)
    assert pos.dtype == torch.long and pos.shape == mask.shape
    assert pos.tolist() == [
        [0, 0, 0, 1, 2, 3, 3],
        [0, 1, 2, 3, 4, 5, 6],
        [0, 0, 0, 0, 0, 1, 2],
    ]
    # real tokens always count 0, 1, 2, ... whatever the padding
    for row in range(mask.shape[0]):
        real = pos[row][mask[row].bool()]
        assert real.tolist() == list(range(int(mask[row].sum())))
    assert position_ids_from_mask(mask.bool()).tolist() == pos.tolist()


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def test_activation_checkpointing_toggle_with_the_pre_rename_transformers_api(sp_tokenizer, monkeypatch):
    """transformers 5.17 (the lent GPU image's) has only gradient_checkpointing_*: the toggle must work there too
    (it failed on that GPU with AttributeError: no is_activation_checkpointing)."""
    from transformers import PreTrainedModel

    # This install's implementation under the old names only, as transformers 5.17 has them.
    p = PreTrainedModel
    impl_enable, impl_disable = p._activation_checkpointing_enable, p._activation_checkpointing_disable
    monkeypatch.setattr(p, "is_gradient_checkpointing", p.__dict__["is_activation_checkpointing"])
    monkeypatch.setattr(p, "gradient_checkpointing_enable", lambda self, gradient_checkpointing_kwargs=None: impl_enable(self, gradient_checkpointing_kwargs))  # fmt: skip
    monkeypatch.setattr(p, "gradient_checkpointing_disable", lambda self: impl_disable(self))
    for name in ("is_activation_checkpointing", "activation_checkpointing_enable", "activation_checkpointing_disable"):
        monkeypatch.delattr(p, name)
    lm = PerceLM(make_lm("qwen3", sp_tokenizer)).train()
    layers = lm.lm.model.layers
    assert not lm.lm.is_gradient_checkpointing and not any(layer.gradient_checkpointing for layer in layers)
    lm.set_activation_checkpointing(True)
    assert lm.lm.is_gradient_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    lm.set_activation_checkpointing(False)
    assert not lm.lm.is_gradient_checkpointing and not any(layer.gradient_checkpointing for layer in layers)


def test_activation_checkpointing_toggle_and_gradients(sp_tokenizer, batch_examples):
    model = make_lm("qwen3", sp_tokenizer)  # own model: toggling must not leak into other tests
    lm = PerceLM(model).train()
    batch = collate(batch_examples, sp_tokenizer.pad_token_id)
    weights = torch.linspace(0.5, 1.5, batch.n_response_tokens)
    # Count real executions of one layer's MLP. (A forward hook would not do: with torch 2.13 module hooks
    # do not fire again when the checkpoint recomputes the layer in backward.)
    mlp = model.model.layers[0].mlp
    mlp_forward = mlp.forward
    mlp_calls = []

    def counting_forward(*args, **kwargs):
        mlp_calls.append(1)
        return mlp_forward(*args, **kwargs)

    mlp.forward = counting_forward

    assert lm.lm.is_activation_checkpointing is False
    mlp_calls.clear()
    out_off, grads_off = _grads(lm, batch, weights)
    calls_off = len(mlp_calls)

    lm.set_activation_checkpointing(True)
    assert lm.lm.is_activation_checkpointing is True
    lm.set_activation_checkpointing(True)  # idempotent
    assert lm.lm.is_activation_checkpointing is True
    mlp_calls.clear()
    out_on, grads_on = _grads(lm, batch, weights)
    calls_on = len(mlp_calls)

    lm.set_activation_checkpointing(False)
    assert lm.lm.is_activation_checkpointing is False
    mlp_calls.clear()
    out_off2, grads_off2 = _grads(lm, batch, weights)

    # checkpointing really recomputes the layer in backward, and turning it off really stops that
    assert calls_off == 1 and calls_on == 2 and len(mlp_calls) == 1
    torch.testing.assert_close(out_on["logp"], out_off["logp"], atol=1e-6, rtol=0)
    assert set(grads_on) == set(grads_off)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(grads_off2[name], grads_off[name], atol=1e-6, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------
# resolution helpers


def test_resolve_attn_implementation():
    assert resolve_attn_implementation("eager") == "eager"
    assert resolve_attn_implementation("sdpa") == "sdpa"
    if FLASH_POSSIBLE:
        pytest.skip("a CUDA machine with flash_attn installed: auto may legitimately pick flash_attention_2")
    assert resolve_attn_implementation("auto") == "sdpa"
    with pytest.raises(RuntimeError) as info:
        resolve_attn_implementation("flash_attention_2")
    msg = str(info.value)
    assert "flash-attn" in msg
    assert "attn_implementation=auto" in msg  # how to fix: fall back ...
    assert "'flash' extra" in msg  # ... or install it


def test_resolve_dtype():
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32


# ---------------------------------------------------------------------------------------------
# build_causal_lm


def test_build_causal_lm_from_config(sp_tokenizer):
    tok = sp_tokenizer
    arch = {"model_type": "qwen3", "tie_word_embeddings": True, **SMALL}
    cfg = ModelConfig(config=arch)
    model = build_causal_lm(cfg, tok, torch.float32, "sdpa")
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), SMALL["hidden_size"])
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.num_hidden_layers == 2
    assert model.config._attn_implementation == "sdpa"
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert cfg.config["model_type"] == "qwen3"  # the run config is not mutated
    assert "vocab_size" not in cfg.config
    # explicit values in the config win over the tokenizer's
    model = build_causal_lm(ModelConfig(config={**arch, "vocab_size": 640}), tok, torch.float32, "eager")
    assert model.config.vocab_size == 640
    assert model.config._attn_implementation == "eager"
    # and the built model works with PerceLM
    ids = torch.tensor([[5, 6, 7, 8]])
    out = PerceLM(model)(ids, torch.ones_like(ids), ids[:, 2:], torch.ones_like(ids[:, 2:], dtype=torch.bool))
    assert out["logp"].shape == (2,) and bool((out["logp"] < 0).all())


def test_build_causal_lm_untied_llama_and_pretrained_folder(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    model = build_causal_lm(
        ModelConfig(config={"model_type": "llama", "tie_word_embeddings": False, **SMALL}), tok, torch.float32, "sdpa"
    )
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tok)
    model.save_pretrained(str(tmp_path))
    again = build_causal_lm(ModelConfig(name_or_path=str(tmp_path)), tok, torch.float32, "sdpa")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_build_causal_lm_rejects_logit_softcapping(sp_tokenizer):
    arch = {"model_type": "gemma2", "final_logit_softcapping": 30.0, **SMALL}
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        build_causal_lm(ModelConfig(config=arch), sp_tokenizer, torch.float32, "eager")


# ---------------------------------------------------------------------------------------------
# both passes in one call, and no hook leak when they toggle checkpointing


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_one_call_with_ablated_equals_two_independent_plain_forwards(packing, sp_tokenizer, batch_examples):
    """PerceLM.forward(..., ablated=...) as the engine calls it (train mode, checkpointing on, grad enabled)
    == the plain HF model run separately on each conditioned and each ablated sequence."""
    model = make_lm("qwen3", sp_tokenizer)
    lm = PerceLM(model).train()
    lm.set_activation_checkpointing(True)
    batch = collate(batch_examples, sp_tokenizer.pad_token_id, packing)
    out = lm(
        response_ids=batch.response_ids, response_mask=batch.response_mask, with_entropy=False,
        ablated=batch.ablated.as_kwargs(), **batch.conditioned.as_kwargs(),
    )  # fmt: skip
    assert out["logp"].requires_grad and not out["logp_ablated"].requires_grad
    seq = batch.seq_ids()
    model.eval()
    pir_rows = []
    for row, ex in enumerate(batch_examples):
        cond, _ = naive_row(model, ex.cond_prompt_ids, ex.response_ids)
        abl, _ = naive_row(model, ex.abl_prompt_ids, ex.response_ids)
        # the inputs exercise what is compared: the profile moves these log-probs well beyond the tolerance
        assert (cond - abl).abs().max() > 1e-2
        torch.testing.assert_close(out["logp"][seq == row].detach(), cond, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["logp_ablated"][seq == row], abl, atol=1e-5, rtol=0)
        pir_rows.append(cond - abl)
    # swapping the two passes (a sign flip of PIR) would fail the comparisons above
    assert float(torch.cat(pir_rows).abs().mean()) > 1e-2
    assert lm.lm.is_activation_checkpointing  # restored after the ablated pass


def test_checkpointing_pauses_add_no_hooks_over_many_steps(sp_tokenizer, batch_examples):
    """transformers' activation_checkpointing_enable registers an input-embedding hook per call; the per
    micro-batch pause around the ablated pass (and evaluation) must not: hook count and hook calls per
    forward stay flat over many training steps."""
    model = make_lm("qwen3", sp_tokenizer)
    lm = PerceLM(model).train()
    lm.set_activation_checkpointing(True)
    embed = model.get_input_embeddings()
    hooks_at_start = len(embed._forward_hooks)
    calls: list[int] = []
    probe = embed.register_forward_hook(lambda *_: calls.append(1))  # counts embedding forwards, not hooks
    batch = collate(batch_examples[:2], sp_tokenizer.pad_token_id)
    hook_counts = []
    for _ in range(30):
        out = lm(
            response_ids=batch.response_ids, response_mask=batch.response_mask,
            ablated=batch.ablated.as_kwargs(), **batch.conditioned.as_kwargs(),
        )  # fmt: skip
        out["logp"].sum().backward()
        with lm.activation_checkpointing_paused():  # what evaluation does between steps
            assert not lm.lm.is_activation_checkpointing
        hook_counts.append(len(embed._forward_hooks))
    probe.remove()
    assert hook_counts == [hooks_at_start + 1] * 30  # + the probe, nothing else
    assert len(calls) == 30 * 2  # two embedding forwards per step (checkpointing recomputes layers, not the embedding)
    assert lm.lm.is_activation_checkpointing


def test_checkpointing_pause_restores_state_after_an_error(sp_tokenizer):
    model = make_lm("qwen3", sp_tokenizer)
    lm = PerceLM(model).train()
    lm.set_activation_checkpointing(True)
    with pytest.raises(RuntimeError, match="boom"), lm.activation_checkpointing_paused():
        assert not lm.lm.is_activation_checkpointing
        raise RuntimeError("boom")
    assert lm.lm.is_activation_checkpointing
    lm.set_activation_checkpointing(False)
    with lm.activation_checkpointing_paused():  # pausing an off model leaves it off
        pass
    assert not lm.lm.is_activation_checkpointing


def test_packing_on_cuda_needs_the_varlen_kernel():
    """Packed batches on a GPU run only through flash-attn's varlen kernel; sdpa/eager are refused there
    (dense block mask), while CPU keeps the masked path the packing tests compare with padding."""
    from perce_ds.config import ConfigError
    from perce_ds.model import check_packing_kernel

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for attn in ("sdpa", "eager"):
        with pytest.raises(ConfigError, match="data.packing=true on CUDA needs flash-attn's varlen kernel"):
            check_packing_kernel(True, cuda, attn)
        check_packing_kernel(True, cpu, attn)
        check_packing_kernel(False, cuda, attn)
    check_packing_kernel(True, cuda, "flash_attention_2")
