"""PIR and weights as the trainer and the offline E-step compute them, on CPU without DeepSpeed.

`bare_trainer` is a real perce_ds.engine.Trainer whose engine is the PerceLM itself (what DeepSpeed's engine calls),
so Trainer.token_stats, Trainer._forward and estep.estimate run their own code; only DeepSpeed's set-up is skipped.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from perce_ds import estep
from perce_ds.config import RunConfig
from perce_ds.data.collate import collate
from perce_ds.data.pipeline import PreparedData
from perce_ds.data.prompts import PromptSettings, TokenizedExample, tokenize_record
from perce_ds.data.synthetic import generate_records
from perce_ds.engine import Trainer
from perce_ds.loss import get_scheme, token_weights
from perce_ds.model import PerceLM


@pytest.fixture(scope="module")
def examples(sp_tokenizer) -> list[TokenizedExample]:
    settings = PromptSettings("You write like the user.", 512, 200)
    return [tokenize_record(r, sp_tokenizer, settings, "synthetic") for r in generate_records(2, 2, 3)]


@pytest.fixture
def process_group():
    """A one-process gloo group: estimate() ends with barriers."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def gpt2_with_dropout(tokenizer, p: float) -> PerceLM:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "gpt2", vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
        resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return PerceLM(AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32), 64)


def bare_trainer(module: PerceLM, tokenizer, examples, *overrides: str, inference_only: bool = False) -> Trainer:
    """A Trainer for `module` on `examples` with the engine set-up left out (world size 1, CPU)."""
    cfg = RunConfig.load(None, ["model.config={model_type: gpt2}", "data.train_files=unused.jsonl", *overrides])
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.tokenizer, trainer.scheme = cfg, tokenizer, get_scheme(cfg.loss.scheme)
    trainer.data = PreparedData(tokenizer, list(examples), [], {})
    trainer.rank, trainer.world, trainer.is_rank0, trainer.device = 0, 1, True, torch.device("cpu")
    trainer.run_ablated = True
    trainer.engine = trainer.module = module
    # As Trainer._build_engine leaves it: an E-step engine in eval mode, a training one in train mode.
    module.train(not inference_only)
    return trainer


def without_profile(examples: list[TokenizedExample]) -> list[TokenizedExample]:
    """The same records with the ablated prompt equal to the conditioned one: PIR must be exactly 0."""
    return [dataclasses.replace(e, abl_prompt_ids=list(e.cond_prompt_ids)) for e in examples]


@pytest.mark.parametrize("layout", [[], ["data.packing=true"], ["loss.fused_passes=true"]],
                         ids=["padded", "packed", "fused"])  # fmt: skip
def test_dropout_leaves_no_noise_in_pir_online_or_offline(sp_tokenizer, examples, layout, tmp_path, process_group):
    """A model with dropout 0.1 and identical conditioned and ablated prompts: PIR is exactly 0 in a training step
    (Trainer.token_stats with grad, train mode) and in the offline E-step, so online and offline weights agree;
    the gradient pass still trains with dropout."""
    same = without_profile(examples)
    module = gpt2_with_dropout(sp_tokenizer, 0.1)
    packed = "data.packing=true" in layout
    batch = collate(same, sp_tokenizer.pad_token_id, packed=packed)
    # The inputs exercise dropout: two train-mode passes over the very same prompt differ.
    module.train()
    with torch.no_grad():
        a, b = (module(**batch.conditioned.as_kwargs(), response_ids=batch.response_ids,
                       response_mask=batch.response_mask)["logp"] for _ in range(2))  # fmt: skip
    assert (a - b).abs().max() > 1e-3

    online = bare_trainer(module, sp_tokenizer, same, *layout)
    logp_grad, stats = online.token_stats(batch, step=3, micro=1)
    assert logp_grad.requires_grad and stats.pir.numel() == batch.n_response_tokens
    assert torch.equal(stats.pir, torch.zeros_like(stats.pir))
    assert (logp_grad.detach() - stats.logp_cond).abs().max() > 1e-3  # the loss pass keeps its dropout
    assert module.training and all(m.training for m in module.lm.modules())  # train mode restored
    assert "transformer.drop (p=0.1)" in module.dropout_sources and "config.attn_pdrop=0.1" in module.dropout_sources

    offline = bare_trainer(module, sp_tokenizer, same, *layout, "train.micro_batch_size=2", inference_only=True)
    estep.estimate(offline, tmp_path / "weights")
    stored = estep.OfflineWeights(tmp_path / "weights", estep.fingerprint(offline.cfg, same, sp_tokenizer))
    weights, pir = stored.for_batch(collate(same, sp_tokenizer.pad_token_id))
    assert pir.numel() == batch.n_response_tokens and torch.equal(pir, torch.zeros_like(pir))
    torch.testing.assert_close(weights, token_weights(stats, online.cfg.loss, online.scheme), rtol=0, atol=0)


def test_offline_estep_draws_different_shuffles_for_different_batches(sp_tokenizer, examples, tmp_path, process_group):
    """shuffled_perce offline: two micro-batches with the same tokens and the same PerCE weights are permuted
    differently (each batch has its own seed, as each training micro-batch has)."""
    twice = list(examples[:2]) + [dataclasses.replace(e, record_id=e.record_id + "-again") for e in examples[:2]]
    module = gpt2_with_dropout(sp_tokenizer, 0.0)
    clip = ["loss.clip_min=-20", "loss.clip_max=20", "loss.allow_nonpositive_clip_min=true"]
    common = ["train.micro_batch_size=2", *clip]

    def stored(scheme: str) -> list[list[float]]:
        trainer = bare_trainer(module, sp_tokenizer, twice, f"loss.scheme={scheme}", *common, inference_only=True)
        out = tmp_path / scheme
        estep.estimate(trainer, out)
        weights = estep.OfflineWeights(out, estep.fingerprint(trainer.cfg, twice, sp_tokenizer))
        return [weights.by_record[e.record_id][2] for e in twice]

    perce, shuffled = stored("perce"), stored("shuffled_perce")
    # The inputs exercise the shuffle: both batches carry the same weights, spread over many distinct values.
    assert perce[:2] == perce[2:] and len({round(w, 6) for row in perce for w in row}) > 20
    for p, s in zip(perce, shuffled, strict=True):
        assert sorted(p) == sorted(s)  # a permutation within each sequence
    assert shuffled[0] != perce[0] or shuffled[1] != perce[1]
    assert shuffled[:2] != shuffled[2:]


def test_window_prepass_on_a_dropout_model_sees_the_statistics_the_weights_use(sp_tokenizer, examples, process_group):
    """loss_weighted with accumulation on a dropout model (ablated pass on, as by default): the no-grad pre-pass
    normalises by the mean of the very per-token losses the weights are made of (both eval mode), exactly."""
    module = gpt2_with_dropout(sp_tokenizer, 0.1)
    trainer = bare_trainer(module, sp_tokenizer, examples, "loss.scheme=loss_weighted")
    batches = [collate(examples[:2], sp_tokenizer.pad_token_id), collate(examples[2:], sp_tokenizer.pad_token_id)]
    prepass = trainer._window_mean_prepass(batches)
    stats = [trainer.token_stats(batch, step=0, micro=m)[1] for m, batch in enumerate(batches)]
    assert prepass == trainer._global_mean(stats)
    with torch.no_grad():  # the check can fail: with dropout on, the same pass gives another mean
        noisy = [module(**b.conditioned.as_kwargs(), response_ids=b.response_ids, response_mask=b.response_mask)
                 for b in batches]  # fmt: skip
    assert abs(float(torch.cat([-o["logp"] for o in noisy]).mean()) - prepass) > 1e-4
