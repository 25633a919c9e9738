"""Tests for the PerCE objective: chunked token log-probs, PIR, weight schemes and the loss numerator."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from perce_ds.config import LossConfig
from perce_ds.loss import (
    REGISTRY,
    TokenStats,
    chunked_argmax_hits,
    chunked_token_logprobs,
    get_scheme,
    token_weights,
    weighted_nll_sum,
)

N, H, V = 7, 5, 11


def _inputs(n=N, h=H, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def _naive(hidden, weight, targets):
    logits = hidden @ weight.T
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def _cfg(scheme="perce", clip_min=0.8, clip_max=5.0):
    return LossConfig(scheme=scheme, clip_min=clip_min, clip_max=clip_max)


# --------------------------------------------------------------------------- chunked_token_logprobs


@pytest.mark.parametrize("n", [0, 1, N])
@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_chunked_logprobs_match_log_softmax(n, chunk):
    hidden, weight, targets = _inputs(n=n)
    logp, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk)
    assert entropy is None
    assert logp.dtype == torch.float32
    assert logp.shape == (n,)
    torch.testing.assert_close(logp, _naive(hidden, weight, targets), atol=1e-6, rtol=1e-6)
    if n:
        assert (logp <= 0).all()


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_chunked_entropy_matches_full_logits(chunk):
    hidden, weight, targets = _inputs()
    logp, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
    logits = hidden @ weight.T
    p = torch.softmax(logits, -1)
    expected = -(p * torch.log(p)).sum(-1)
    assert entropy is not None and entropy.shape == (N,)
    assert not entropy.requires_grad
    torch.testing.assert_close(entropy, expected, atol=1e-5, rtol=1e-5)
    # Asking for the entropy does not change the log-probs.
    torch.testing.assert_close(logp, _naive(hidden, weight, targets), atol=1e-6, rtol=1e-6)
    # Bounds of an entropy over V classes.
    assert (entropy >= 0).all() and (entropy <= torch.log(torch.tensor(float(V))) + 1e-5).all()


@pytest.mark.parametrize("chunk", [1, 3, N + 5])
def test_chunked_argmax_hits_match_full_logits(chunk):
    hidden, weight, _ = _inputs(n=40)
    logits = hidden @ weight.T
    # Targets: the argmax on even rows, another token on odd rows, so both outcomes are exercised.
    targets = logits.argmax(-1)
    targets[1::2] = (targets[1::2] + 1) % V
    hits = chunked_argmax_hits(hidden, weight, targets, chunk_size=chunk)
    assert hits.dtype == torch.bool and hits.tolist() == [i % 2 == 0 for i in range(40)]


def test_chunked_entropy_hand_case():
    # hidden @ weight.T = [[0, 0]] -> uniform over 2 tokens: entropy log 2, logp log 0.5.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [0.0]])
    logp, entropy = chunked_token_logprobs(hidden, weight, torch.tensor([1]), chunk_size=4, with_entropy=True)
    torch.testing.assert_close(logp, torch.tensor([-torch.log(torch.tensor(2.0)).item()]))
    torch.testing.assert_close(entropy, torch.tensor([torch.log(torch.tensor(2.0)).item()]))


def test_chunk_size_must_be_positive():
    hidden, weight, targets = _inputs()
    for bad in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            chunked_token_logprobs(hidden, weight, targets, chunk_size=bad)


@pytest.mark.parametrize("chunk", [1, 3, N, N + 5])
def test_chunked_gradients_match_autograd(chunk):
    hidden, weight, targets = _inputs(seed=1)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2))

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = chunked_token_logprobs(h1, w1, targets, chunk_size=chunk)
    gh, gw = torch.autograd.grad(logp, (h1, w1), grad_outputs=upstream)

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    eh, ew = torch.autograd.grad(_naive(h2, w2, targets), (h2, w2), grad_outputs=upstream)

    assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
    torch.testing.assert_close(gh, eh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, ew, atol=1e-5, rtol=1e-5)


def test_chunked_gradient_only_for_one_input():
    hidden, weight, targets = _inputs(seed=3)
    w = weight.clone().requires_grad_()
    logp, _ = chunked_token_logprobs(hidden, w, targets, chunk_size=2)
    logp.sum().backward()
    w2 = weight.clone().requires_grad_()
    _naive(hidden, w2, targets).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)

    h = hidden.clone().requires_grad_()
    logp, _ = chunked_token_logprobs(h, weight, targets, chunk_size=2)
    logp.sum().backward()
    h2 = hidden.clone().requires_grad_()
    _naive(h2, weight, targets).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [2, 16])  # 47 and 6 vocabulary blocks in backward
def test_chunked_bf16_gradients_as_accurate_as_full_logits(chunk):
    """bf16 weights: the vocabulary-walking backward (bf16 matmul inputs, fp32 accumulation, no fp32 [V, H]
    buffer) is as close to a float64 reference as the usual full-logits path in bf16."""
    n, h, v = 96, 32, 3000
    hidden, weight, targets = _inputs(n, h, v, seed=4)
    weight = weight * h**-0.5 * 2  # logits of std ~2, like a trained LM
    loss_w = 0.8 + 4.2 * torch.rand(n, generator=torch.Generator().manual_seed(5))

    def grads(dtype, fn):
        hh, ww = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        (-(loss_w.to(dtype) * fn(hh, ww)).sum()).backward()
        assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
        return hh.grad.double(), ww.grad.double()

    def full(hh, ww):
        return torch.log_softmax((hh @ ww.T).float(), -1).gather(1, targets[:, None]).squeeze(1)

    def chunked(hh, ww):
        return chunked_token_logprobs(hh, ww, targets, chunk_size=chunk)[0]

    reference, got_bf16, full_bf16 = (
        grads(torch.float64, lambda hh, ww: _naive(hh, ww, targets)),
        grads(torch.bfloat16, chunked),
        grads(torch.bfloat16, full),
    )
    for ref, got, base in zip(reference, got_bf16, full_bf16, strict=True):
        error, baseline = float((got - ref).abs().max()), float((base - ref).abs().max())
        assert error <= 1.5 * baseline, (error, baseline)


def test_chunked_no_tokens_gives_zero_gradients():
    weight = torch.randn(V, H, requires_grad=True)
    hidden = torch.randn(0, H, requires_grad=True)
    logp, _ = chunked_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), chunk_size=4)
    (logp.sum() + 0 * weight.sum()).backward()
    assert weight.grad.shape == weight.shape and not weight.grad.any()


def test_chunked_gradcheck_float64():
    # The forward deliberately does its post-matmul arithmetic in fp32 (and returns fp32), so the
    # finite-difference step must be well above fp32 resolution; the analytic gradient is still checked.
    torch.manual_seed(0)
    hidden = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 1])

    def f(h, w):
        return chunked_token_logprobs(h, w, targets, chunk_size=2)[0]

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_chunked_bf16_inputs_return_fp32_close_to_fp32():
    hidden, weight, targets = _inputs(n=9, h=16, v=32, seed=4)
    ref = _naive(hidden, weight, targets)
    hb = hidden.to(torch.bfloat16).requires_grad_()
    wb = weight.to(torch.bfloat16).requires_grad_()
    logp, entropy = chunked_token_logprobs(hb, wb, targets, chunk_size=4, with_entropy=True)
    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp, ref, atol=0.15, rtol=0.05)
    logp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    _naive(h32, w32, targets).sum().backward()
    torch.testing.assert_close(hb.grad.float(), h32.grad, atol=0.2, rtol=0.1)
    torch.testing.assert_close(wb.grad.float(), w32.grad, atol=0.2, rtol=0.1)


# --------------------------------------------------------------------------- PIR and schemes


def test_pir_sign():
    cond = torch.log(torch.tensor([0.6, 0.1]))
    abl = torch.log(torch.tensor([0.2, 0.4]))
    stats = TokenStats(logp_cond=cond, seq_ids=torch.zeros(2, dtype=torch.long), logp_abl=abl)
    pir = stats.pir
    assert pir[0] > 0  # persona makes token 0 more likely
    assert pir[1] < 0  # ... and token 1 less likely
    torch.testing.assert_close(pir, torch.log(torch.tensor([3.0, 0.25])))


def test_pir_without_ablated_pass_raises():
    stats = TokenStats(logp_cond=torch.zeros(3), seq_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="ablated"):
        _ = stats.pir


def test_perce_weights_are_clipped_pir():
    pir = torch.tensor([-3.0, 0.0, 0.5, 0.8, 1.0, 2.5, 5.0, 7.0, 100.0])
    cond = torch.full_like(pir, -1.0)
    abl = cond - pir
    stats = TokenStats(cond, torch.zeros(len(pir), dtype=torch.long), logp_abl=abl)
    w = token_weights(stats, _cfg("perce", 0.8, 5.0))
    expected = torch.tensor([0.8, 0.8, 0.8, 0.8, 1.0, 2.5, 5.0, 5.0, 5.0])
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    assert torch.equal(w, torch.clamp(stats.pir, 0.8, 5.0))
    assert w.min() >= 0.8 and w.max() <= 5.0
    assert w.dtype == torch.float32


def test_perce_clip_bounds_random():
    torch.manual_seed(0)
    cond = torch.randn(200) * 3 - 2
    abl = torch.randn(200) * 3 - 2
    stats = TokenStats(cond, torch.zeros(200, dtype=torch.long), logp_abl=abl)
    for lo, hi in [(0.2, 2.0), (0.5, 5.0), (0.8, 8.0)]:
        w = token_weights(stats, _cfg("perce", lo, hi))
        assert torch.equal(w, torch.clamp(cond - abl, lo, hi))
        assert w.min() >= lo and w.max() <= hi
        inside = ((cond - abl) > lo) & ((cond - abl) < hi)
        assert inside.any() and torch.equal(w[inside], (cond - abl)[inside])


def test_no_gradient_through_weights():
    torch.manual_seed(0)
    logp_cond = (-torch.rand(6) * 4).requires_grad_()
    abl = logp_cond.detach() - torch.tensor([-1.0, 0.3, 0.9, 2.0, 6.0, 4.2])
    stats = TokenStats(logp_cond.detach(), torch.tensor([0, 0, 0, 1, 1, 1]), logp_abl=abl)
    w = token_weights(stats, _cfg("perce"))
    assert w.requires_grad is False
    loss = weighted_nll_sum(logp_cond, w)
    (grad,) = torch.autograd.grad(loss, logp_cond)
    assert torch.equal(grad, -w)


def test_token_weights_detached_even_if_stats_carry_grad():
    # A caller that forgets to detach must still get constant weights.
    logp_cond = (-torch.rand(5) * 3).requires_grad_()
    stats = TokenStats(logp_cond, torch.zeros(5, dtype=torch.long), window_mean=1.5)
    w = token_weights(stats, _cfg("loss_weighted", 1e-6, 1e6))
    assert w.requires_grad is False
    (grad,) = torch.autograd.grad(weighted_nll_sum(logp_cond, w), logp_cond)
    assert torch.equal(grad, -w)


def test_weighted_nll_sum_hand_case():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    w = torch.tensor([1.0, 0.5, 4.0])
    assert weighted_nll_sum(logp, w).item() == pytest.approx(1.0 + 1.0 + 2.0)


def test_ce_scheme_matches_hf_cross_entropy():
    torch.manual_seed(0)
    B, T, Hd, Vv = 3, 6, 4, 9
    hidden = torch.randn(B, T, Hd)
    weight = torch.randn(Vv, Hd)
    labels = torch.randint(0, Vv, (B, T))
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    labels[2, 5:] = -100
    logits = hidden @ weight.T  # [B, T, V]
    # HF causal LM: position t predicts label t+1.
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, Vv), labels[:, 1:].reshape(-1)
    expected = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

    sel = shift_labels != -100
    flat_hidden = hidden[:, :-1].reshape(-1, Hd)[sel]
    targets = shift_labels[sel]
    seq_ids = torch.arange(B)[:, None].expand(B, T - 1).reshape(-1)[sel]
    logp, _ = chunked_token_logprobs(flat_hidden, weight, targets, chunk_size=4)
    w = token_weights(TokenStats(logp.detach(), seq_ids), _cfg("ce"))
    assert torch.equal(w, torch.ones_like(logp))
    loss = weighted_nll_sum(logp, w) / logp.numel()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["loss_weighted", "entropy_weighted"])
def test_mean_one_schemes(scheme):
    torch.manual_seed(0)
    n = 40
    logp = -torch.rand(n) * 5 - 0.01
    entropy = torch.rand(n) * 3 + 0.01
    raw = -logp if scheme == "loss_weighted" else entropy
    # This micro-batch as the whole accumulation window: its own mean is the window mean.
    stats = TokenStats(
        logp, torch.repeat_interleave(torch.arange(4), 10), entropy=entropy, window_mean=float(raw.mean())
    )

    # Wide clip range: the weights are the raw statistic rescaled to mean 1.
    w = token_weights(stats, LossConfig(scheme=scheme, clip_min=1e-6, clip_max=1e6))
    torch.testing.assert_close(w.mean(), torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(w, raw / raw.mean(), atol=1e-6, rtol=1e-6)
    # The ordering of tokens by the statistic is preserved.
    assert torch.equal(torch.argsort(w), torch.argsort(raw))

    # Narrow clip range: clipping happens after the normalisation.
    lo, hi = 0.8, 1.5
    wc = token_weights(stats, LossConfig(scheme=scheme, clip_min=lo, clip_max=hi))
    torch.testing.assert_close(wc, torch.clamp(raw / raw.mean(), lo, hi), atol=1e-6, rtol=1e-6)
    assert wc.min() >= lo and wc.max() <= hi
    assert (wc == lo).any() and (wc == hi).any()


def test_loss_weighted_hand_case():
    logp = torch.tensor([-1.0, -3.0])  # loss 1, 3; mean 2 -> 0.5, 1.5
    stats = TokenStats(logp, torch.zeros(2, dtype=torch.long), window_mean=2.0)
    w = token_weights(stats, LossConfig(scheme="loss_weighted", clip_min=0.8, clip_max=5.0))
    torch.testing.assert_close(w, torch.tensor([0.8, 1.5]))


def test_entropy_weighted_hand_case():
    stats = TokenStats(
        torch.zeros(3), torch.zeros(3, dtype=torch.long), entropy=torch.tensor([1.0, 2.0, 9.0]), window_mean=4.0
    )
    w = token_weights(stats, LossConfig(scheme="entropy_weighted", clip_min=0.5, clip_max=2.0))
    # mean 4 -> 0.25, 0.5, 2.25 -> clipped 0.5, 0.5, 2.0
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 2.0]))


@pytest.mark.parametrize("scheme", ["loss_weighted", "entropy_weighted"])
def test_baselines_normalise_by_the_window_mean_not_the_micro_batch(scheme):
    """The mean-1 normaliser is the accumulation window's (all ranks), given in TokenStats.window_mean."""
    values = torch.tensor([1.0, 2.0, 3.0])  # micro-batch mean 2; the window's mean is 4
    logp, entropy = -values, values
    stats = TokenStats(logp, torch.zeros(3, dtype=torch.long), entropy=entropy, window_mean=4.0)
    w = token_weights(stats, LossConfig(scheme=scheme, clip_min=1e-6, clip_max=1e6))
    torch.testing.assert_close(w, values / 4.0)
    assert get_scheme(scheme).window_statistic(stats).tolist() == values.tolist()
    with pytest.raises(ValueError, match="window"):
        token_weights(TokenStats(logp, torch.zeros(3, dtype=torch.long), entropy=entropy), LossConfig(scheme=scheme))


def _shuffle_stats(seed, lengths=(30, 1, 45, 24)):
    g = torch.Generator().manual_seed(1000)
    n = sum(lengths)
    cond = -torch.rand(n, generator=g) * 4
    pir = torch.rand(n, generator=g) * 6 - 0.5  # many distinct values inside [0.8, 5]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    gen = torch.Generator().manual_seed(seed)
    return TokenStats(cond, seq_ids, logp_abl=cond - pir, generator=gen)


def test_shuffled_perce_permutes_within_sequences():
    cfg_p, cfg_s = _cfg("perce"), _cfg("shuffled_perce")
    stats = _shuffle_stats(seed=7)
    w_perce = token_weights(stats, cfg_p)
    w_shuf = token_weights(stats, cfg_s)
    assert w_shuf.shape == w_perce.shape
    for s in stats.seq_ids.unique():
        m = stats.seq_ids == s
        assert Counter(w_shuf[m].tolist()) == Counter(w_perce[m].tolist())
        assert torch.equal(torch.sort(w_shuf[m]).values, torch.sort(w_perce[m]).values)
    # It actually shuffles.
    assert not torch.equal(w_shuf, w_perce)


def test_shuffled_perce_is_seeded():
    cfg = _cfg("shuffled_perce")
    a = token_weights(_shuffle_stats(seed=7), cfg)
    b = token_weights(_shuffle_stats(seed=7), cfg)
    c = token_weights(_shuffle_stats(seed=8), cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shuffled_perce_empty():
    stats = TokenStats(torch.zeros(0), torch.zeros(0, dtype=torch.long), logp_abl=torch.zeros(0))
    w = token_weights(stats, _cfg("shuffled_perce"))
    assert w.shape == (0,)


@pytest.mark.parametrize("scheme", sorted(REGISTRY))
def test_empty_micro_batch_gives_zero_loss_and_zero_grads(scheme):
    torch.manual_seed(0)
    hidden_all = torch.nn.Parameter(torch.randn(4, H))
    weight = torch.nn.Parameter(torch.randn(V, H))
    hidden = hidden_all[:0]
    targets = torch.zeros(0, dtype=torch.long)
    logp, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_size=3, with_entropy=True)
    assert logp.shape == (0,) and logp.requires_grad
    stats = TokenStats(
        logp.detach(),
        torch.zeros(0, dtype=torch.long),
        logp_abl=torch.zeros(0),
        entropy=entropy,
        generator=torch.Generator().manual_seed(0),
        window_mean=1.0,  # what the trainer sets when the whole window has no response token
    )
    w = token_weights(stats, _cfg(scheme))
    assert w.shape == (0,)
    loss = weighted_nll_sum(logp, w)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert hidden_all.grad is not None and weight.grad is not None
    assert torch.equal(hidden_all.grad, torch.zeros_like(hidden_all))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_get_scheme_known_and_unknown():
    for name in ("perce", "ce", "loss_weighted", "entropy_weighted", "shuffled_perce"):
        assert get_scheme(name).name == name
    assert get_scheme("perce").needs_ablated and get_scheme("shuffled_perce").needs_ablated
    assert get_scheme("entropy_weighted").needs_entropy
    assert not get_scheme("ce").needs_ablated
    with pytest.raises(ValueError) as exc:
        get_scheme("percee")
    msg = str(exc.value)
    assert "percee" in msg
    for name in REGISTRY:
        assert name in msg


def test_logits_kernel_keeps_fp32_logits_for_low_precision_on_cuda():
    """bf16/fp16 on CUDA: one matmul writing fp32 (no bf16 rounding of ~30-magnitude logits, which moves PIR
    by ~0.02); fp32 inputs need nothing; CPU has no such kernel and upcasts the inputs instead."""
    from perce_ds.loss import _mm_has_out_dtype, logits_kernel

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _mm_has_out_dtype()  # torch >= 2.8 (the pinned 2.13 has it)
    assert logits_kernel(cuda, torch.bfloat16) == "mm_out_fp32"
    assert logits_kernel(cuda, torch.float16) == "mm_out_fp32"
    assert logits_kernel(cuda, torch.float32) == "fp32"
    assert logits_kernel(cpu, torch.bfloat16) == "upcast"
    assert logits_kernel(cpu, torch.float32) == "fp32"
    # The meta device shows the op's contract without a GPU: bf16 in, fp32 out.
    a = torch.empty(3, 8, dtype=torch.bfloat16, device="meta")
    b = torch.empty(5, 8, dtype=torch.bfloat16, device="meta")
    assert torch.mm(a, b.t(), out_dtype=torch.float32).dtype == torch.float32


# --------------------------------------------------------------------------- loss.ce_mix


def _spread_stats(n=400, seed=3, clip_min=0.8, clip_max=5.0):
    """A batch whose PIR spreads over (clip_min, clip_max), with some tokens at each bound (asserted)."""
    g = torch.Generator().manual_seed(seed)
    cond = -torch.rand(n, generator=g) * 6
    pir = torch.rand(n, generator=g) * (clip_max + 2.0 - (clip_min - 1.0)) + (clip_min - 1.0)
    stats = TokenStats(cond, torch.arange(n) // 20, logp_abl=cond - pir)
    inside = ((pir > clip_min) & (pir < clip_max)).float().mean().item()
    assert inside >= 0.2, inside
    assert (pir <= clip_min).any() and (pir >= clip_max).any()
    return stats


def _mean_loss(stats, cfg):
    w = token_weights(stats, cfg)
    return (weighted_nll_sum(stats.logp_cond.double(), w.double()) / stats.logp_cond.numel()).item()


def test_ce_mix_ends_are_the_ce_and_perce_losses_and_the_middle_interpolates():
    stats = _spread_stats()
    perce, ce = _mean_loss(stats, _cfg("perce")), _mean_loss(stats, _cfg("ce"))
    assert abs(perce - ce) > 0.1  # the two ends differ, so matching each end means something
    mixed = {lam: _mean_loss(stats, LossConfig(scheme="perce", ce_mix=lam)) for lam in (0.0, 0.25, 0.5, 1.0)}
    assert abs(mixed[1.0] - ce) <= 1e-6 and abs(mixed[0.0] - perce) <= 1e-6
    for lam in (0.25, 0.5):
        assert abs(mixed[lam] - (lam * ce + (1 - lam) * perce)) <= 1e-6
    w = token_weights(stats, LossConfig(scheme="perce", ce_mix=0.5))
    torch.testing.assert_close(w, 0.5 + 0.5 * torch.clamp(stats.pir, 0.8, 5.0), atol=1e-6, rtol=0)


def test_ce_mix_zero_leaves_every_scheme_bit_identical():
    stats = _spread_stats()
    stats.entropy = torch.rand(stats.logp_cond.shape, generator=torch.Generator().manual_seed(1))
    for name, scheme in REGISTRY.items():
        if scheme.window_statistic is not None:
            stats.window_mean = scheme.window_statistic(stats).mean().item()
        stats.generator = torch.Generator().manual_seed(0)
        a = token_weights(stats, LossConfig(scheme=name))
        stats.generator = torch.Generator().manual_seed(0)
        b = REGISTRY[name].weights(stats, LossConfig(scheme=name)).float()
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_ce_mix_outside_the_unit_interval_is_refused(bad):
    from perce_ds.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="loss.ce_mix"):
        RunConfig.load(None, ["model.name_or_path=x", "data.synthetic.enabled=true", f"loss.ce_mix={bad}"])


def test_offline_weights_record_a_nonzero_ce_mix():
    """Weights estimated with one ce_mix are refused by a run with another (the E-step fingerprint), while runs
    without the knob keep the fingerprint their stored estimates were made with."""
    from perce_ds.config import RunConfig
    from perce_ds.estep import settings_fingerprint
    from perce_ds.fingerprints import json_digest

    base = ["model.name_or_path=x", "data.synthetic.enabled=true"]
    plain = RunConfig.load(None, base)
    legacy = json_digest({"scheme": "perce", "clip_min": 0.8, "clip_max": 5.0})[:16]
    assert settings_fingerprint(plain) == legacy
    mixed = {lam: settings_fingerprint(RunConfig.load(None, [*base, f"loss.ce_mix={lam}"])) for lam in (0.25, 0.5)}
    assert len({legacy, *mixed.values()}) == 3


def test_step_stats_report_the_persona_share_of_the_weight_as_the_readme_says():
    """weight_share_persona = (lambda n_c + (1 - lambda) W_c) / (lambda N + (1 - lambda) W) (README, loss.ce_mix);
    token_share_persona = n_c / N, the share under CE."""
    from perce_ds.data.collate import collate
    from perce_ds.data.prompts import TokenizedExample
    from perce_ds.step_stats import StepStats

    g = torch.Generator().manual_seed(0)
    masks = [[bool(b) for b in torch.rand(n, generator=g) < 0.3] for n in (9, 14)]
    examples = [TokenizedExample(f"r{i}", [1, 2, 3], [1], list(range(5, 5 + len(m))), persona_token_mask=m)
                for i, m in enumerate(masks)]  # fmt: skip
    batch = collate(examples, 0)
    n = batch.n_response_tokens
    cond = -torch.rand(n, generator=g) * 4
    stats = TokenStats(cond, batch.seq_ids(), logp_abl=cond - (torch.rand(n, generator=g) * 7 - 1))
    persona = batch.persona_mask[batch.response_mask]
    assert 0 < persona.sum() < n
    w0 = token_weights(stats, _cfg("perce"))
    share = {}
    for lam in (0.0, 0.5, 1.0):
        st = StepStats()
        w = token_weights(stats, LossConfig(ce_mix=lam))
        st.add_micro_batch(batch, stats, w, weighted_nll_sum(stats.logp_cond, w), stats.pir, 0.8)
        m = st.metrics(1.0, 1e-5, 0.0)
        expected = (lam * persona.sum() + (1 - lam) * w0[persona].sum()) / (lam * n + (1 - lam) * w0.sum())
        assert m["weight_share_persona"] == pytest.approx(float(expected), rel=1e-6)
        assert m["token_share_persona"] == pytest.approx(float(persona.sum()) / n)
        share[lam] = m["weight_share_persona"]
    assert share[1.0] == pytest.approx(float(persona.sum()) / n) and share[0.0] != share[1.0]
    assert min(share[0.0], share[1.0]) < share[0.5] < max(share[0.0], share[1.0])


def test_bf16_inputs_give_fp32_logprobs_not_bf16_rounded_ones():
    """bf16 hidden states and output embedding on CPU: the head's log-probs match a float64 reference on the same
    (bf16-valued) inputs to fp32 accuracy, which a head that rounds its logits to bf16 cannot meet.

    The tolerance from the arithmetic: logits here reach ~30 (a trained LM's scale); bf16 keeps 8 significant bits,
    so rounding a logit near 30 moves it by up to 2^-9 * 32 = 0.0625 (0.03 typical), and a log-prob by that much.
    fp32 accumulation over H = 64 products of that size errs by < H * 2^-24 * 64 ~ 2.5e-4 at worst. 1e-3 lies
    between: it holds for fp32 logits and fails for bf16-rounded ones (both checked below).
    """
    n, h, v = 64, 64, 512
    g = torch.Generator().manual_seed(7)
    hidden = (torch.randn(n, h, generator=g) * 2).to(torch.bfloat16)
    weight = (torch.randn(v, h, generator=g) * 0.6).to(torch.bfloat16)
    targets = (hidden.float() @ weight.float().T).argmax(-1)  # high-logit targets: log-probs near 0, logits ~30
    reference = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None]).squeeze(1)
    logits = hidden.double() @ weight.double().T
    assert 20 < float(logits.abs().max()) < 64  # the scale the tolerance was derived for
    tolerance = 1e-3

    bf16_rounded = torch.log_softmax((hidden @ weight.T).double(), -1).gather(1, targets[:, None]).squeeze(1)
    assert float((bf16_rounded - reference).abs().max()) > 10 * tolerance  # the flaw the test must catch

    for chunk in (8, 64):
        logp, entropy = chunked_token_logprobs(hidden, weight, targets, chunk_size=chunk, with_entropy=True)
        assert logp.dtype == torch.float32
        assert float((logp.double() - reference).abs().max()) < tolerance
        probs = torch.softmax(logits, -1)
        exact_entropy = -(probs * torch.log_softmax(logits, -1)).sum(-1)
        assert float((entropy.double() - exact_entropy).abs().max()) < tolerance
    hits = chunked_argmax_hits(hidden, weight, targets, chunk_size=8)
    assert bool(hits.all())  # the targets are the argmax of the exact logits, and the head sees them so


def test_the_cuda_head_without_fp32_output_matmul_upcasts_and_warns_once(monkeypatch, caplog):
    """A torch without mm out_dtype on CUDA (older than 2.8): the head keeps fp32 logits by upcasting, and says
    so once, naming the torch version."""
    import logging

    from perce_ds import loss

    monkeypatch.setattr(loss, "_mm_has_out_dtype", lambda: False)
    loss._warn_upcast_on_cuda.cache_clear()
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="perce_ds"):
        kernels = [loss.logits_kernel(cuda, torch.bfloat16) for _ in range(3)]
    assert kernels == ["upcast"] * 3
    warnings = [r.getMessage() for r in caplog.records if "fp32-output matmul" in r.getMessage()]
    assert len(warnings) == 1 and torch.__version__ in warnings[0] and "torch >= 2.8" in warnings[0]
    loss._warn_upcast_on_cuda.cache_clear()
