"""The learning-rate schedule: linear warm-up, then cosine, linear or constant down to min_lr_ratio."""

from __future__ import annotations

import math
from collections.abc import Callable

from perce_ds.config import RunConfig


def lr_lambda(cfg: RunConfig, total_steps: int) -> Callable[[int], float]:
    """Warm-up then cosine/linear/constant, as a multiplier of train.lr."""
    t = cfg.train
    warmup = int(round(t.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.lr_scheduler == "constant":
            decay = 1.0
        elif t.lr_scheduler == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * decay

    return factor
