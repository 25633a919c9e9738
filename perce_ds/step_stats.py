"""Per-step training statistics: sums over a window's micro-batches, all-reduced once, read out as metrics.

Everything logged per step is a ratio of two sums (a loss over tokens, persona-token PIR over persona tokens,
...), so a global batch logs the same numbers however it is split into ranks and micro-batches.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from perce_ds.data.collate import MicroBatch
from perce_ds.loss import TokenStats

log = logging.getLogger("perce_ds")

# The sums; their ratios are the logged metrics.
STAT_KEYS = (
    "wnll", "nll", "tokens", "input_tokens", "pir", "pir_tokens", "personal", "weight",
    "pir_persona", "n_persona", "pir_other", "n_other", "persona_tokens", "weight_persona",
)  # fmt: skip


@dataclass
class StepStats:
    """Running sums of one optimizer step (this rank's until `sums` is all-reduced)."""

    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(len(STAT_KEYS), dtype=torch.float64))

    def add_micro_batch(
        self,
        batch: MicroBatch,
        stats: TokenStats,
        weights: torch.Tensor,
        numerator: torch.Tensor,
        pir: torch.Tensor | None,
        clip_min: float,
    ) -> None:
        """Add one micro-batch: its weighted and plain NLL, token counts, weights, PIR (persona vs other tokens)."""
        s = dict.fromkeys(STAT_KEYS, 0.0)
        s["wnll"] = float(numerator.detach())
        s["nll"] = float(-stats.logp_cond.sum())
        s["tokens"] = float(batch.n_response_tokens)
        s["input_tokens"] = float(batch.conditioned.n_tokens)
        s["weight"] = float(weights.sum())
        on_persona = batch.persona_mask[batch.response_mask]
        s["persona_tokens"], s["weight_persona"] = float(on_persona.sum()), float(weights[on_persona].sum())
        if pir is not None:
            persona = batch.persona_mask[batch.response_mask]
            s["pir"], s["pir_tokens"] = float(pir.sum()), float(pir.numel())
            s["personal"] = float((pir > clip_min).sum())
            s["pir_persona"], s["n_persona"] = float(pir[persona].sum()), float(persona.sum())
            s["pir_other"], s["n_other"] = float(pir[~persona].sum()), float((~persona).sum())
        self.sums += torch.tensor([s[k] for k in STAT_KEYS], dtype=torch.float64)

    def metrics(self, step_time_s: float, lr: float, grad_norm: Any) -> dict[str, float | None]:
        """The logged row (None where a ratio has no denominator, e.g. no PIR without the ablated pass)."""
        s = dict(zip(STAT_KEYS, self.sums.tolist(), strict=True))

        def ratio(a: str, b: str) -> float | None:
            return s[a] / s[b] if s[b] > 0 else None

        return {
            "loss": ratio("wnll", "tokens"),
            "ce": ratio("nll", "tokens"),
            "pir_mean": ratio("pir", "pir_tokens"),
            "personal_ratio": ratio("personal", "pir_tokens"),
            "weight_mean": ratio("weight", "tokens"),
            # the persona tokens' share of the step's loss weight (under AdamW, of the update) and of its tokens
            # (CE's share); None without ground-truth persona tokens (README "loss.ce_mix")
            "weight_share_persona": ratio("weight_persona", "weight") if s["persona_tokens"] else None,
            "token_share_persona": ratio("persona_tokens", "tokens") if s["persona_tokens"] else None,
            "pir_persona_tokens": ratio("pir_persona", "n_persona"),
            "pir_other_tokens": ratio("pir_other", "n_other"),
            "response_tokens": s["tokens"],
            "tokens_per_s": s["input_tokens"] / step_time_s if step_time_s > 0 else None,
            "step_time_s": step_time_s,
            "lr": lr,
            "grad_norm": finite_or_none(grad_norm),
        }


def finite_or_none(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass
class CEWatch:
    """Warns once when PerCE has been plain CE for `limit` steps in a row (no PIR above clip_min: every
    weight was clip_min), the sign of a model that does not read the profiles. limit 0: never."""

    limit: int
    clip_min: float
    steps_in_a_row: int = 0

    def update(self, step: int, personal_ratio: float | None) -> None:
        if personal_ratio is None:
            return
        self.steps_in_a_row = self.steps_in_a_row + 1 if personal_ratio == 0 else 0
        if self.steps_in_a_row == self.limit:
            log.warning(
                "step %d: for %d steps in a row no response token had PIR above loss.clip_min=%g, so every weight "
                "was clip_min and the update was plain CE's. The model does not (yet) read the profiles: check "
                "data_report.json (profiles_cut_to_nothing), a pretrained model, or lower loss.clip_min",
                step, self.steps_in_a_row, self.clip_min,
            )  # fmt: skip
