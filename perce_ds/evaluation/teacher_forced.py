"""The one teacher-forced pass over a split: per response token, log P with and without the profile, and hits.

Every evaluation that scores ground-truth responses goes through `teacher_forced`: the trainer's periodic
eval (CE with/without the profile, PIR on persona vs other tokens), the demo's final evaluation, the per-token
tables of `token_eval` and the PIR views of `insight`. It calls the model exactly as training does
(PerceLM.forward, both passes in one call, the same collate), so a score here is the number training acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from perce_ds.data.collate import collate
from perce_ds.data.order import shard_batches
from perce_ds.data.prompts import TokenizedExample
from perce_ds.model import PerceLM


@dataclass
class ScoredExample:
    """One example's response tokens (end-of-turn included), in order."""

    index: int  # position in the scored list of examples
    logp: np.ndarray  # log P(y_i | profile, x, y_<i), float64
    logp_ablated: np.ndarray  # log P(y_i | x, y_<i), float64
    hits: np.ndarray | None  # the conditioned argmax is y_i (None unless asked for)

    @property
    def pir(self) -> np.ndarray:
        return self.logp - self.logp_ablated


def split_rows(flat: torch.Tensor, response_mask: torch.Tensor) -> list[np.ndarray]:
    """Cut PerceLM's flat per-token output back into one array per row."""
    lengths = response_mask.sum(1).tolist()
    return [t.numpy() for t in torch.split(flat, lengths)]


@torch.no_grad()
def teacher_forced(
    model: Any,
    examples: list[TokenizedExample],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    with_hits: bool = False,
) -> list[ScoredExample]:
    """Score this rank's strided shard of `examples`; the caller sets eval mode and pauses checkpointing.

    `model` is a PerceLM or the DeepSpeed engine around one. Shards are padded to the same number of
    micro-batches (padding rows run but are not scored), so every rank makes the same calls: under ZeRO-3
    each forward is a collective.
    """
    out: list[ScoredExample] = []
    for idx, keep in shard_batches(len(examples), rank, world, batch_size):
        batch = collate([examples[i] for i in idx], pad_id, scored=keep).to(device)
        passes = model(response_ids=batch.response_ids, response_mask=batch.response_mask, with_hits=with_hits,
                       ablated=batch.ablated.as_kwargs(), **batch.conditioned.as_kwargs())  # fmt: skip
        mask = batch.response_mask.cpu()
        cond = split_rows(passes["logp"].double().cpu(), mask)
        abl = split_rows(passes["logp_ablated"].double().cpu(), mask)
        hits = split_rows(passes["hits"].cpu(), mask) if with_hits else [None] * len(idx)
        out += [ScoredExample(i, c, a, h) for i, k, c, a, h in zip(idx, keep, cond, abl, hits) if k]
    return out


def score_plain_model(
    lm: Any, examples: list[TokenizedExample], pad_id: int, batch_size: int = 8, with_hits: bool = False
) -> list[ScoredExample]:
    """`teacher_forced` for a plain (unsharded) HF causal LM in one process: wrapped in PerceLM, in eval mode."""
    module = PerceLM(lm).eval()
    return teacher_forced(module, examples, pad_id, batch_size, next(lm.parameters()).device, with_hits=with_hits)


def pir_sums(scored: list[ScoredExample], examples: list[TokenizedExample]) -> torch.Tensor:
    """[NLL, NLL without the profile, tokens, PIR on persona tokens, persona tokens, PIR on other tokens]
    summed over `scored`: additive, so ranks all-reduce them before `pir_metrics`."""
    sums = torch.zeros(6, dtype=torch.float64)
    for s in scored:
        persona = np.zeros(len(s.logp), dtype=bool)
        mask = examples[s.index].persona_token_mask
        persona[: len(mask)] = mask
        pir = s.pir
        sums += torch.tensor([
            -s.logp.sum(), -s.logp_ablated.sum(), float(len(s.logp)),
            pir[persona].sum(), float(persona.sum()), pir[~persona].sum(),
        ], dtype=torch.float64)  # fmt: skip
    return sums


def pir_metrics(sums: list[float]) -> dict[str, float | None]:
    """Teacher-forced CE with and without the profile, and mean PIR on persona vs other tokens."""
    n, n_persona = sums[2], sums[4]
    return {
        "eval_ce": sums[0] / n if n else None,
        "eval_ce_ablated": sums[1] / n if n else None,
        "eval_pir_mean": (sums[1] - sums[0]) / n if n else None,
        "eval_pir_persona_tokens": sums[3] / n_persona if n_persona else None,
        "eval_pir_other_tokens": sums[5] / (n - n_persona) if n > n_persona else None,
    }
