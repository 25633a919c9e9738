"""Paired intervals that resample users, not records, and include the seeds (a two-level bootstrap).

Records of one user share a profile (and a style): they are not independent, and an interval that resamples
records is too narrow by up to sqrt(records per user). Each replicate here
  1. draws the users with replacement (the same draw for both methods: the comparison is paired by user), and
  2. draws, for each method on its own, as many seeds as it has with replacement, and averages the statistic
     over the drawn seeds (seed-to-seed variation of a training run enters the interval; with 2 seeds a
     replicate holds seed a, seed b or both).
A statistic is a ratio of sums over the drawn users' records: NLL = summed NLL / tokens (pooled per token, as the
token table does), a generation score = summed per-record score / records. The point estimate is the mean over
all seeds on all users; the interval is the 2.5-97.5 % quantiles of the replicates' differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def user_index(users: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct users (first-seen order) and each record's user number."""
    order: dict[str, int] = {}
    idx = np.asarray([order.setdefault(u, len(order)) for u in users], dtype=np.int64)
    return list(order), idx


def per_user(values: np.ndarray, idx: np.ndarray, n_users: int) -> np.ndarray:
    """[seeds, records] -> [seeds, users]: sums over each user's records."""
    out = np.zeros((values.shape[0], n_users))
    for s in range(values.shape[0]):
        out[s] = np.bincount(idx, weights=values[s], minlength=n_users)
    return out


def user_weights(n_users: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, users]: how often each user is drawn in each replicate (users drawn with replacement)."""
    draws = rng.integers(0, n_users, (n_resamples, n_users))
    return np.stack([np.bincount(d, minlength=n_users) for d in draws]).astype(np.float64)


def _replicates(num: np.ndarray, den: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[resamples]: per replicate, the statistic averaged over a with-replacement draw of the seeds."""
    per_seed = (w @ num.T) / np.maximum(w @ den.T, 1e-12)  # [resamples, seeds]
    seeds = rng.integers(0, num.shape[0], (w.shape[0], num.shape[0]))
    return np.take_along_axis(per_seed, seeds, axis=1).mean(1)


def point(num: np.ndarray, den: np.ndarray) -> float | None:
    """The statistic on all users, averaged over seeds ([seeds, users] sums)."""
    totals = den.sum(1)
    if not (totals > 0).all():
        return None
    return float((num.sum(1) / totals).mean())


def paired_user_bootstrap(
    base: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray],
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """other - base with a paired 95 % interval; each argument is ([seeds, users] numerator, denominator) sums
    over the same users in the same order."""
    (bn, bd), (on, od) = base, other
    if bn.shape[1] != on.shape[1]:
        raise ValueError(f"the methods were scored on different users ({bn.shape[1]} vs {on.shape[1]})")
    pb, po = point(bn, bd), point(on, od)
    if pb is None or po is None:
        return {"diff": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    w = user_weights(bn.shape[1], n_resamples, rng)
    diffs = _replicates(on, od, w, rng) - _replicates(bn, bd, w, rng)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"diff": po - pb, "ci_low": float(lo), "ci_high": float(hi), "rel": (po - pb) / pb if pb else None}
