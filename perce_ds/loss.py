"""The PerCE objective: token log-probs, the Personal Influence Ratio, weight schemes, one normaliser.

Everything here works on the *flat* list of response tokens of a micro-batch (padding already
removed), so a scheme never sees a padded position and the normaliser is a plain token count.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from perce_ds.profiling import phase

log = logging.getLogger("perce_ds")


def logits_kernel(device: torch.device, dtype: torch.dtype) -> str:
    """How a chunk's fp32 logits are formed from `dtype` hidden states and output embedding on `device`.

    Every kernel gives fp32 (or better) logits: rounding ~30-magnitude logits to bf16 moves each by up to ~0.06
    and PIR by ~0.02 on average, the size of the differences PerCE acts on. "fp32": fp32 (or fp64) inputs,
    a plain matmul. "mm_out_fp32": bf16/fp16 inputs on CUDA, one matmul that accumulates and writes fp32
    (torch.mm's out_dtype, torch >= 2.8): no extra copy of the weight. "upcast": bf16/fp16 inputs where torch
    has no such kernel (CPU; CUDA with a torch older than 2.8, warned once): the hidden states and the output
    embedding, a vocabulary block at a time, are cast to fp32 first: the same logits, slower.
    """
    if dtype in (torch.float32, torch.float64):
        return "fp32"
    if device.type == "cuda":
        if _mm_has_out_dtype():
            return "mm_out_fp32"
        _warn_upcast_on_cuda()
    return "upcast"


@functools.cache
def _mm_has_out_dtype() -> bool:
    """Whether this torch has torch.mm(..., out_dtype=) (checked on meta tensors: no device, no kernel run)."""
    a = torch.empty(1, 1, dtype=torch.bfloat16, device="meta")
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


@functools.cache
def _warn_upcast_on_cuda() -> None:
    """Once per process: the CUDA head runs without its fp32-output matmul."""
    log.warning(
        "torch %s has no fp32-output matmul for bf16/fp16 inputs on CUDA (torch.mm out_dtype needs torch >= 2.8, "
        "the version pyproject.toml asks for): the log-prob head upcasts the output embedding to fp32 a "
        "vocabulary block at a time. The logits keep fp32 precision (bf16 logits would move PIR by ~0.02), but "
        "the head is slower; install torch >= 2.8",
        torch.__version__,
    )


UPCAST_BLOCK_ELEMENTS = 1 << 24  # fp32 elements of one upcast weight block (64 MiB)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T as fp32 ([rows, V]); see `logits_kernel` for how."""
    kernel = logits_kernel(hidden.device, hidden.dtype)
    if kernel == "mm_out_fp32":
        return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    if kernel == "fp32":
        return (hidden @ weight.t()).float()
    hidden32 = hidden.float()
    logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    block = max(1, UPCAST_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], block):
        logits[:, start : start + block] = hidden32 @ weight[start : start + block].float().t()
    return logits


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[target] for N rows, `chunk` rows at a time.

    The [N, vocab] logits never exist whole: forward keeps only the log-sum-exp per row and
    backward recomputes each chunk's logits. The chunk arithmetic runs in place on the logits
    buffer (one fp32 [chunk, vocab] block live at a time; entropy needs a second). Logits are fp32 (`fp32_logits`).
    Backward walks vocabulary blocks of the same size, so the output embedding's gradient needs no
    accumulator beyond itself.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, with_entropy: bool):
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else torch.empty(0, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = fp32_logits(hidden[start:end], weight)
            top = logits.amax(-1, keepdim=True)
            target_logit = logits.gather(1, targets[start:end, None]).squeeze(1)
            shifted = logits.sub_(top)  # z = logits - max, in place
            if with_entropy:
                exp = shifted.exp()
                total = exp.sum(-1)
                # H = log S - sum(e^z * z) / S, with S = sum(e^z)
                entropy[start:end] = total.log() - exp.mul_(shifted).sum(-1) / total
                del exp
                log_total = total.log()
            else:
                log_total = shifted.exp_().sum(-1).log_()
            lse[start:end] = log_total + top.squeeze(1)
            logp[start:end] = target_logit - lse[start:end]
            del logits, shifted
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        with phase("logprob_head_bwd"):
            return _ChunkedTokenLogprob._backward(ctx, grad_logp)

    @staticmethod
    def _backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        # Walk the vocabulary, not the tokens: each row block of grad_weight is then one matmul over all N
        # tokens (fp32 accumulation inside it), written once in the weight's dtype. Walking the tokens needs a
        # [V, H] fp32 accumulator (a bf16 one would lose the small partial sums): 1.5 GiB at Qwen3-4B size.
        # The logits block keeps the forward's size: [N, V * chunk / N] = [chunk, V] elements.
        vocab_chunk = max(1, -(-vocab * ctx.chunk // max(n, 1)))
        g_out = grad_logp.float()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.empty_like(weight) if need_weight else None
        for start in range(0, vocab, vocab_chunk):
            end = min(start + vocab_chunk, vocab)
            w = weight[start:end]
            # d logp / d logits = onehot(target) - softmax(logits), built in the logits buffer
            g_logits = fp32_logits(hidden, w).sub_(lse[:, None]).exp_().mul_(-g_out[:, None])
            rows = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
            g_logits[rows, targets[rows] - start] += g_out[rows]
            g_logits = g_logits.to(weight.dtype)  # no copy in fp32; bf16 matmul inputs, fp32 accumulation
            if need_hidden:
                grad_hidden += (g_logits @ w).float()
            if need_weight:
                torch.mm(g_logits.t(), hidden, out=grad_weight[start:end])
            del g_logits
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row log-prob of `targets` under logits `hidden @ weight.T`, and optionally the entropy.

    hidden: [N, H] final hidden states at the positions that predict the targets; weight: [V, H]
    output embedding; targets: [N] token ids. Returns (logp [N] fp32 with grad, entropy [N] fp32
    detached or None). Peak extra memory is one [chunk_size, V] fp32 block.
    """
    if chunk_size <= 0:
        raise ValueError(f"loss.logprob_chunk_size must be positive, got {chunk_size}")
    with phase("logprob_head"):
        logp, entropy = _ChunkedTokenLogprob.apply(hidden, weight, targets, chunk_size, with_entropy)
    return logp, (entropy if with_entropy else None)


@torch.no_grad()
def chunked_argmax_hits(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Whether each target is the argmax of the same fp32 logits `chunked_token_logprobs` forms ([N] bool),
    `chunk_size` rows at a time: teacher-forced accuracy without a [batch, seq, vocab] tensor."""
    hits = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        hits[start:end] = fp32_logits(hidden[start:end], weight).argmax(-1) == targets[start:end]
    return hits


class WeightSettings(Protocol):
    """The run settings the weights read (perce_ds.config.LossConfig is one); loss.py imports no config."""

    scheme: str
    clip_min: float
    clip_max: float
    ce_mix: float  # lambda in [0, 1]: w' = lambda + (1 - lambda) * w (0: the scheme's weights, 1: CE)


@dataclass
class TokenStats:
    """Detached per-token quantities of one micro-batch's response tokens (flat, no padding)."""

    logp_cond: torch.Tensor  # log P(y_i | persona, x, y_<i), fp32
    seq_ids: torch.Tensor  # index of each token's sequence within the micro-batch
    logp_abl: torch.Tensor | None = None  # log P(y_i | x, y_<i), present when the ablated pass ran
    entropy: torch.Tensor | None = None  # predictive entropy of the conditioned pass
    generator: torch.Generator | None = None  # for schemes that draw random numbers
    # Mean of the scheme's window statistic over every response token of the gradient-accumulation window
    # on all ranks (set by the trainer for schemes that have one): the same at any split of a global batch.
    window_mean: float | None = None

    @property
    def pir(self) -> torch.Tensor:
        if self.logp_abl is None:
            raise ValueError("PIR needs the persona-ablated pass, which did not run for this batch")
        return self.logp_cond - self.logp_abl


@dataclass(frozen=True)
class WeightScheme:
    """One entry of the registry: how to turn detached token statistics into loss weights."""

    name: str
    weights: Callable[[TokenStats, WeightSettings], torch.Tensor]
    needs_ablated: bool = False
    needs_entropy: bool = False
    doc: str = ""
    # Per-token detached values whose mean over the accumulation window (all ranks) normalises the weights
    # (TokenStats.window_mean); None for schemes that need no window statistic.
    window_statistic: Callable[[TokenStats], torch.Tensor] | None = None


def _clip(x: torch.Tensor, cfg: WeightSettings) -> torch.Tensor:
    return x.clamp(min=cfg.clip_min, max=cfg.clip_max)


def _window_normalised(x: torch.Tensor, stats: TokenStats) -> torch.Tensor:
    # docs/method.md, "Baselines and controls": mean 1 over the response tokens of the optimizer step's global
    # batch, so a window statistic, never a micro-batch one.
    if stats.window_mean is None:
        raise ValueError("this weight scheme is normalised over the accumulation window: TokenStats.window_mean unset")
    return x / max(stats.window_mean, 1e-12)


def _token_loss(stats: TokenStats) -> torch.Tensor:
    return -stats.logp_cond


def _entropy(stats: TokenStats) -> torch.Tensor:
    return stats.entropy


def _perce(stats: TokenStats, cfg: WeightSettings) -> torch.Tensor:
    return _clip(stats.pir, cfg)


def _shuffled_perce(stats: TokenStats, cfg: WeightSettings) -> torch.Tensor:
    w = _perce(stats, cfg)
    if w.numel() == 0:
        return w
    # Tokens of one sequence are contiguous and seq_ids ascend, so sorting by (seq id + U[0,1))
    # permutes tokens only within their own sequence.
    noise = torch.rand(w.shape, generator=stats.generator, device="cpu").to(w.device)
    perm = torch.argsort(stats.seq_ids.to(torch.float64) + noise.to(torch.float64))
    return w[perm]


REGISTRY: dict[str, WeightScheme] = {
    s.name: s
    for s in (
        WeightScheme("perce", _perce, needs_ablated=True, doc="clip(PIR, m, M): the paper's PerCE"),
        WeightScheme("ce", lambda stats, cfg: torch.ones_like(stats.logp_cond), doc="plain cross-entropy, w = 1"),
        WeightScheme(
            "loss_weighted",
            lambda stats, cfg: _clip(_window_normalised(_token_loss(stats), stats), cfg),
            doc="Rho-1 style: detached token loss, mean 1 over the global batch, clipped to [m, M]",
            window_statistic=_token_loss,
        ),
        WeightScheme(
            "entropy_weighted",
            lambda stats, cfg: _clip(_window_normalised(_entropy(stats), stats), cfg),
            needs_entropy=True,
            doc="detached predictive entropy, mean 1 over the global batch, clipped to [m, M]",
            window_statistic=_entropy,
        ),
        WeightScheme(
            "shuffled_perce",
            _shuffled_perce,
            needs_ablated=True,
            doc="control: PerCE weights permuted among each sequence's response tokens",
        ),
    )
}


def get_scheme(name: str) -> WeightScheme:
    """The registered weight scheme called `name`; a clear error lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"loss.scheme: unknown scheme {name!r}; known: {sorted(REGISTRY)}") from None


def token_weights(stats: TokenStats, cfg: WeightSettings, scheme: WeightScheme | None = None) -> torch.Tensor:
    """Loss weights for each response token (no gradient flows through them): `scheme`'s, resolved once by the
    caller that holds it (the trainer), else the one `cfg.scheme` names, mixed with CE's w = 1 by `cfg.ce_mix`."""
    scheme = scheme or get_scheme(cfg.scheme)
    with torch.no_grad():
        weights = scheme.weights(stats, cfg).float().detach()
        if cfg.ce_mix:  # skipped at 0 (the default), so the paper's weights stay bit-identical
            weights = cfg.ce_mix + (1.0 - cfg.ce_mix) * weights
        return weights


def weighted_nll_sum(logp_cond: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * -log P(y_i | ...): the numerator of the PerCE loss for one micro-batch.

    With no response tokens this is an exact zero that is still connected to the graph (the sum of
    an empty tensor that came out of the model), so backward runs the same collectives on every rank.
    """
    return -(weights * logp_cond).sum()
