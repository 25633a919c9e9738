"""Teacher-forced, per-token scores of a model on a split with ground-truth persona spans, and their comparison.

For every response token (end-of-turn id included) of every record: log P under the conditioned
prompt, log P under the persona-ablated prompt (PIR is their difference) and whether the conditioned
argmax is the token. Tokens are classed by the record's spans: "copy" / "infer" (persona_span_kinds),
"persona" (a span without a kind) or "other". Per class: NLL (summed over tokens / tokens) and argmax
accuracy. PIR as a persona-token detector: F1 of "PIR > 0" and at the best threshold, each with the F1
of a random marking at the same positive rate (perce_ds.evaluation.metrics). The share of tokens with PIR > clip_min
says how much PerCE's weights differ from CE's.

Runs are compared on the same records (so the same tokens): per class, the difference in NLL and
accuracy against the baseline with a paired bootstrap 95% interval over records (token sums resampled
by record, so the interval is of the pooled per-token difference).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perce_ds.data.prompts import OTHER_TOKEN, TokenizedExample
from perce_ds.data.records import PersonaRecord
from perce_ds.evaluation.metrics import best_threshold, marking_scores
from perce_ds.evaluation.teacher_forced import TOKEN_CLASSES, class_scores, class_sums, score_plain_model

OTHER = OTHER_TOKEN
PERSONA_CLASSES = TOKEN_CLASSES[:-1]  # "persona": every ground-truth persona token, whatever its kind


@dataclass
class RecordTokens:
    record_id: str
    kinds: list[str]  # per response token: "copy", "infer", "infer_heldout", "persona" or "other"
    logp: list[float]  # log P(token | profile, query, prefix)
    logp_ablated: list[float]  # log P(token | query, prefix)
    correct: list[bool]  # conditioned argmax == token


def token_kinds(example: TokenizedExample) -> list[str]:
    """The class of each response token of `example` (all "other" when its record has no persona spans)."""
    return list(example.persona_token_kinds) or [OTHER] * len(example.response_ids)


def score_tokens(
    lm: Any,
    tokenizer: Any,
    records: list[PersonaRecord],
    examples: list[TokenizedExample],
    batch_size: int = 8,
) -> list[RecordTokens]:
    """RecordTokens for each (record, example) pair, with a plain (unsharded) model in eval mode. The token
    classes come from the examples (TokenizedExample.persona_token_kinds, built from the records' spans)."""
    stray = [(r.record_id, e.record_id) for r, e in zip(records, examples) if r.record_id != e.record_id]
    if len(records) != len(examples) or stray:
        raise ValueError(f"records and examples do not pair up ({len(records)} vs {len(examples)}; e.g. {stray[:2]})")
    scored = score_plain_model(lm, examples, tokenizer.pad_token_id, batch_size, with_hits=True)
    return [
        RecordTokens(examples[s.index].record_id, token_kinds(examples[s.index]),
                     s.logp.tolist(), s.logp_ablated.tolist(), s.hits.tolist())
        for s in scored
    ]  # fmt: skip


def save(rows: list[RecordTokens], path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in rows]}))


def load(path: Path) -> list[RecordTokens]:
    return [RecordTokens(**r) for r in json.loads(path.read_text())["records"]]


def per_record_sums(rows: list[RecordTokens], cls: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per record: summed NLL, summed correct argmaxes and token count of class `cls` (teacher_forced.class_sums,
    which the trainer's periodic evaluation sums too)."""
    i = TOKEN_CLASSES.index(cls)
    sums = np.asarray([class_sums(r.kinds, r.logp, r.correct)[i] for r in rows]).reshape(-1, 3)
    return sums[:, 0], sums[:, 1], sums[:, 2]


def summarise(rows: list[RecordTokens], clip_min: float, threshold: float | None = None) -> dict[str, Any]:
    """Per class NLL / accuracy / token count, PIR detector scores and the share of PIR > clip_min.

    The detector's threshold is a selection: with `threshold` None it is chosen here (best F1), so `rows` must be
    the validation split; to score a test split pass the threshold chosen on validation (`selected_threshold` of
    the validation summary), and the test F1 is reported at it ("threshold_from": "validation").
    """
    out: dict[str, Any] = {"n_records": len(rows)}
    out |= class_scores(sum((class_sums(r.kinds, r.logp, r.correct) for r in rows), np.zeros((len(TOKEN_CLASSES), 3))))
    pir = [np.asarray(r.logp) - np.asarray(r.logp_ablated) for r in rows]
    truth = [[k != OTHER for k in r.kinds] for r in rows]
    all_pir = np.concatenate(pir) if pir else np.zeros(0)
    persona = np.concatenate([np.asarray(t, dtype=bool) for t in truth]) if truth else np.zeros(0, dtype=bool)
    if persona.any():
        at0 = marking_scores(pir, truth, 0.0)
        chosen = best_threshold(pir, truth) if threshold is None else marking_scores(pir, truth, threshold)
        out["pir_detector"] = {"f1_at_0": at0["f1"], "random_f1_at_0": at0["random_f1"],
                               "selected_threshold": chosen["threshold"], "f1_at_selected": chosen["f1"],
                               "random_f1_at_selected": chosen["random_f1"],
                               "threshold_from": "this split" if threshold is None else "validation"}  # fmt: skip
    out["pir_mean"] = {
        "persona": float(all_pir[persona].mean()) if persona.any() else None,
        "other": float(all_pir[~persona].mean()) if (~persona).any() else None,
    }
    above = all_pir > clip_min
    out["share_pir_above_clip_min"] = {
        "all": float(above.mean()) if above.size else None,
        "persona": float(above[persona].mean()) if persona.any() else None,
        "other": float(above[~persona].mean()) if (~persona).any() else None,
        "clip_min": clip_min,
    }
    return out


def paired_difference(
    base: list[RecordTokens], other: list[RecordTokens], cls: str, n_resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """other - base in pooled NLL and accuracy on class `cls`, with paired bootstrap 95% intervals over records.

    Both runs must hold the same records with the same tokens (same split, same tokenizer).
    """
    by_id = {r.record_id: r for r in other}
    missing = [r.record_id for r in base if r.record_id not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} records of the baseline have no scores in the other run, e.g. {missing[:3]}")
    paired = [by_id[r.record_id] for r in base]
    for a, b in zip(base, paired):
        if a.kinds != b.kinds:
            raise ValueError(f"record {a.record_id}: the runs scored different tokens (another tokenizer or split?)")
    nll_a, hit_a, count = per_record_sums(base, cls)
    nll_b, hit_b, _ = per_record_sums(paired, cls)
    if count.sum() == 0:
        return {"tokens": 0}
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"tokens": int(count.sum())}
    for name, a, b in (("nll", nll_a, nll_b), ("acc", hit_a, hit_b)):
        d = b - a
        idx = rng.integers(0, d.size, (n_resamples, d.size))
        boot = d[idx].sum(1) / np.maximum(count[idx].sum(1), 1.0)
        diff = d.sum() / count.sum()
        lo, hi = np.quantile(boot, [0.025, 0.975])
        rel = float(diff / (a.sum() / count.sum())) if a.sum() else None
        out[name] = {"diff": float(diff), "ci_low": float(lo), "ci_high": float(hi), "rel": rel}
    return out


def paired_mean_difference(a: list[float], b: list[float], n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """mean(b - a) over paired per-record scores with a paired bootstrap 95% interval."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if d.size == 0:
        return {"diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, (n_resamples, d.size))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"diff": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi)}
