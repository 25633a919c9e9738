"""The one teacher-forced pass over a split: per response token, log P with and without the profile, and hits.

Every evaluation that scores ground-truth responses goes through `teacher_forced`: the trainer's periodic
eval (CE with/without the profile, PIR on persona vs other tokens, and per token class the NLL and accuracy
that `token_eval` reports too: both sum `class_sums`), the demo's final evaluation, the per-token tables of
`token_eval` and the PIR views of `insight`. It calls the model exactly as training does
(PerceLM.forward, both passes in one call, the same collate), so a score here is the number training acts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from perce_ds.data.collate import collate
from perce_ds.data.order import shard_batches
from perce_ds.data.prompts import OTHER_TOKEN, TokenizedExample
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


# Token classes of the per-class scores (TokenizedExample.persona_token_kinds): "persona" is every ground-truth
# persona token whatever its kind; "copy" / "infer" / "infer_heldout" the kinds of the natural synthetic task
# (infer_heldout: inferable values whose profile evidence uses phrasings kept out of training); "other" the rest.
TOKEN_CLASSES = ("persona", "copy", "infer", "infer_heldout", OTHER_TOKEN)
_N_TOTALS = 8  # leading entries of eval_sums before the per-class ones


def class_mask(kinds: np.ndarray, cls: str) -> np.ndarray:
    """Which tokens of `kinds` (per-token classes) belong to class `cls` of TOKEN_CLASSES."""
    return kinds != OTHER_TOKEN if cls == "persona" else kinds == cls


def class_sums(kinds: list[str], logp: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """[len(TOKEN_CLASSES), 3]: summed NLL, correct argmaxes and token count per class of one sequence's tokens."""
    k, nll, hit = np.asarray(kinds), -np.asarray(logp, dtype=np.float64), np.asarray(hits, dtype=np.float64)
    out = np.zeros((len(TOKEN_CLASSES), 3))
    for i, cls in enumerate(TOKEN_CLASSES):
        m = class_mask(k, cls)
        out[i] = nll[m].sum(), hit[m].sum(), float(m.sum())
    return out


def class_scores(sums: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    """Per class: NLL (nats per token) and argmax accuracy from `class_sums` summed over sequences (and ranks)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for cls, (nll, hit, n) in zip(TOKEN_CLASSES, np.asarray(sums, dtype=np.float64).reshape(-1, 3)):
        out[cls] = {"nll": float(nll / n) if n else None, "acc": float(hit / n) if n else None, "tokens": int(n)}
    return out


def eval_sums(scored: list[ScoredExample], examples: list[TokenizedExample]) -> torch.Tensor:
    """[NLL, NLL without the profile, tokens, PIR on persona tokens, persona tokens, PIR on other tokens, correct
    argmaxes, sequences with token classes, then `class_sums` flattened] summed over `scored` (scored with hits):
    additive, so ranks all-reduce them before `eval_metrics`."""
    sums = torch.zeros(_N_TOTALS + 3 * len(TOKEN_CLASSES), dtype=torch.float64)
    for s in scored:
        persona = np.zeros(len(s.logp), dtype=bool)
        example = examples[s.index]
        mask = example.persona_token_mask
        persona[: len(mask)] = mask
        pir = s.pir
        sums[:_N_TOTALS] += torch.tensor([
            -s.logp.sum(), -s.logp_ablated.sum(), float(len(s.logp)),
            pir[persona].sum(), float(persona.sum()), pir[~persona].sum(),
            float(s.hits.sum()), float(bool(example.persona_token_kinds)),
        ], dtype=torch.float64)  # fmt: skip
        if example.persona_token_kinds:
            sums[_N_TOTALS:] += torch.from_numpy(class_sums(example.persona_token_kinds, s.logp, s.hits).ravel())
    return sums


def eval_metrics(sums: list[float]) -> dict[str, float | int | None]:
    """Teacher-forced CE with and without the profile, accuracy, mean PIR on persona vs other tokens and, when
    the split has persona spans, NLL / accuracy / tokens per token class (eval_nll_<class>, ...)."""
    n, n_persona = sums[2], sums[4]
    out: dict[str, float | int | None] = {
        "eval_ce": sums[0] / n if n else None,
        "eval_ce_ablated": sums[1] / n if n else None,
        "eval_acc": sums[6] / n if n else None,
        "eval_pir_mean": (sums[1] - sums[0]) / n if n else None,
        "eval_pir_persona_tokens": sums[3] / n_persona if n_persona else None,
        "eval_pir_other_tokens": sums[5] / (n - n_persona) if n > n_persona else None,
    }
    if sums[7]:  # some sequence has token classes: the split has persona spans
        for cls, score in class_scores(np.asarray(sums[_N_TOTALS:])).items():
            out |= {
                f"eval_nll_{cls}": score["nll"],
                f"eval_acc_{cls}": score["acc"],
                f"eval_tokens_{cls}": score["tokens"],
            }
    return out
