"""Which tokens does PIR mark as personal? Per-token views of a run, before and after training.

PIR_i = log P(y_i | profile, x, y_<i) - log P(y_i | x, y_<i), computed exactly as in training
(PerceLM + collate: shared response ids, left-padded prompts). Outputs in <run>/insight/:
index.html (response tokens coloured by PIR, the profile beside them), insight.json (top personal
tokens per task; on tasks with ground truth — the synthetic one — precision/recall/F1 of
"PIR > threshold" vs the persona-token mask, at the threshold selected on the validation split (the
best F1 there; a test split is scored at validation's), and the F1 of a random marking with the same
positive rate), pir_hist.png.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perce_ds.data.pipeline import prompt_settings
from perce_ds.data.prompts import TokenizedExample, render_profile_item
from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.evaluation import runs
from perce_ds.evaluation.metrics import best_threshold, marking_scores
from perce_ds.evaluation.report import plot_pir_histograms
from perce_ds.evaluation.teacher_forced import score_plain_model
from perce_ds.model import build_causal_lm


def token_pir(lm: Any, examples: list[TokenizedExample], pad_id: int, batch_size: int = 8) -> list[np.ndarray]:
    """PIR of every response token (EOS included) of each example, with a plain (unsharded) model."""
    return [s.pir for s in score_plain_model(lm, examples, pad_id, batch_size)]


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded response (leading spaces kept)."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False)
        out.append(text[len(prev) :] if text.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = text
    return out


def top_personal_tokens(
    tokens: list[list[str]], pir: list[np.ndarray], tasks: list[str], threshold: float, k: int = 20, min_count: int = 2
) -> dict[str, list[tuple[str, int, float]]]:
    """Per task, the k tokens with the highest mean PIR among those marked personal (PIR > threshold)
    at least `min_count` times: (token, times marked, mean PIR over all its occurrences)."""
    out: dict[str, list[tuple[str, int, float]]] = {}
    for task in sorted(set(tasks)):
        marked: Counter = Counter()
        values: dict[str, list[float]] = {}
        for toks, p, t in zip(tokens, pir, tasks):
            if t != task:
                continue
            for tok, v in zip(toks, p):
                if tok.strip():
                    values.setdefault(tok.strip(), []).append(float(v))
                    marked[tok.strip()] += int(v > threshold)
        ranked = sorted(
            ((tok, marked[tok], float(np.mean(v))) for tok, v in values.items() if marked[tok] >= min_count),
            key=lambda x: -x[2],
        )
        out[task] = ranked[:k]
    return out


def _colour(v: float, scale: float = 3.0) -> str:
    a = min(1.0, abs(v) / scale) if math.isfinite(v) else 0.0
    return f"rgba(220,40,40,{a:.2f})" if v > 0 else f"rgba(40,90,220,{a:.2f})"


def render_html(samples: list[dict[str, Any]], title: str, summary: dict[str, Any]) -> str:
    """A self-contained page: per sample, the profile beside the response coloured by PIR (red > 0 > blue).

    Each sample dict: record_id, task, profile (list of str), query, tokens, pir (list of float),
    truth (list of bool or []), and optionally pir_before.
    """
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}.rec{display:flex;gap:2em;border-top:1px solid #ccc;"
        "padding:1em 0}.prof{flex:1;font-size:0.85em;color:#444}.resp{flex:2;line-height:1.9}"
        "span.t{padding:1px 0;border-radius:3px;white-space:pre-wrap}span.gt{border-bottom:2px solid #000}"
    )
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Token colour: red = PIR &gt; 0 (the profile makes the token more likely), blue = PIR &lt; 0; "
             "hover for the value. Underlined: ground-truth persona tokens (synthetic task).</p>",
             f"<pre>{html.escape(json.dumps(summary, indent=1))}</pre>"]  # fmt: skip
    for s in samples:
        prof = "".join(f"<li>{html.escape(p)}</li>" for p in s["profile"])
        for key, label in (("pir_before", "before training"), ("pir", "after training")):
            if key not in s:
                continue
            toks = []
            for i, (tok, v) in enumerate(zip(s["tokens"], s[key])):
                gt = " gt" if s["truth"] and s["truth"][i] else ""
                toks.append(
                    f"<span class='t{gt}' style='background:{_colour(v)}' title='PIR {v:.3f}'>{html.escape(tok)}</span>"
                )
            parts.append(
                f"<div class='rec'><div class='prof'><b>{html.escape(s['record_id'])}</b> ({html.escape(s['task'])})"
                f"<br><i>{html.escape(s['query'])}</i><ul>{prof}</ul></div>"
                f"<div class='resp'><b>{label}</b><br>{''.join(toks)}</div></div>"
            )
    parts.append("</body></html>")
    return "".join(parts)


def validation_threshold(lm: Any, cfg: Any, tokenizer: Any, limit: int = 0) -> float | None:
    """The PIR-detector threshold of `lm` selected (best F1) on the run's validation split (data.eval); None
    when that split has no persona spans. Test scores are reported at it: no threshold is chosen on test."""
    records = runs.split_records(cfg, "eval")
    examples, _ = runs.tokenize_for_eval(records[:limit] if limit else records, tokenizer, prompt_settings(cfg))
    truth = [e.persona_token_mask for e in examples]
    if not any(truth):
        return None
    return best_threshold(token_pir(lm, examples, tokenizer.pad_token_id), truth)["threshold"]


def _stage_summary(
    pir: list[np.ndarray], truth: list[list[bool]], threshold: float, selected: float | None = None
) -> dict[str, Any]:
    """PIR means and, with ground truth, the detector at `threshold` and at the selected threshold: `selected`
    (chosen on validation) when given, else the best one on these tokens (which must then be validation)."""
    x = np.concatenate(pir)
    out: dict[str, Any] = {"pir_mean": float(x.mean()), "n_tokens": int(x.size)}
    if any(truth):
        y = np.concatenate([np.asarray(t, dtype=bool) for t in truth])
        out["pir_mean_persona_tokens"] = float(x[y].mean()) if y.any() else None
        out["pir_mean_other_tokens"] = float(x[~y].mean()) if (~y).any() else None
        out["marking"] = marking_scores(pir, truth, threshold)
        chosen = best_threshold(pir, truth) if selected is None else marking_scores(pir, truth, selected)
        out["selected"] = chosen | {"threshold_from": "this split" if selected is None else "validation"}
    return out


def initial_model(cfg: Any, tokenizer: Any, before: str | None) -> tuple[Any, str]:
    """The "before training" model and how it was obtained: --before, the pretrained start, or a re-init.

    A from-scratch run (model.config) is rebuilt with train.seed outside ZeRO-3; its weights follow
    the same distribution as the run's start but are not guaranteed identical (pass --before to be exact).
    """
    if before:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(before, dtype=torch.float32).eval(), f"--before {before}"
    if cfg.model.name_or_path:
        from transformers import AutoModelForCausalLM

        path = cfg.model.name_or_path
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), f"pretrained start {path}"
    torch.manual_seed(cfg.train.seed)
    lm = build_causal_lm(cfg.model, tokenizer, torch.float32, "sdpa")
    return lm.eval(), f"re-initialised from model.config with seed {cfg.train.seed} (approximate start)"


def run_insight(
    run_dir: Path, model: str | None = None, before: str | None = None, split: str = "eval",
    n_samples: int = 8, threshold: float = 0.0, limit: int = 0, with_before: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Compute per-token PIR for a run's split (after, and before, training); write <run>/insight/; return the summary."""
    cfg = runs.load_run_config(run_dir)
    model_dir = runs.resolve_model_dir(run_dir, model)
    tokenizer = load_tokenizer(model_dir)
    records = runs.split_records(cfg, split)
    records = records[:limit] if limit else records
    examples, _ = runs.tokenize_for_eval(records, tokenizer, prompt_settings(cfg))
    truth = [e.persona_token_mask for e in examples]
    lm = runs.load_plain_model(model_dir, torch.float32, torch.device("cpu"))
    pir_after = token_pir(lm, examples, tokenizer.pad_token_id)
    summary: dict[str, Any] = {"run": run_dir.name, "split": split, "threshold": threshold, "model": str(model_dir)}
    # The detector threshold is selected on validation only: on another split, each model's comes from "eval".
    on_other = split != "eval" and any(truth)
    selected = validation_threshold(lm, cfg, tokenizer, limit) if on_other else None
    summary["after"] = _stage_summary(pir_after, truth, threshold, selected)
    pir_before = None
    if with_before:
        lm0, how = initial_model(cfg, tokenizer, before)
        pir_before = token_pir(lm0, examples, tokenizer.pad_token_id)
        selected0 = validation_threshold(lm0, cfg, tokenizer, limit) if on_other else None
        summary["before"] = {"model": how, **_stage_summary(pir_before, truth, threshold, selected0)}
    tokens = [token_strings(tokenizer, e.response_ids) for e in examples]
    summary["top_personal_tokens"] = top_personal_tokens(tokens, pir_after, [r.task for r in records], threshold)

    out = run_dir / "insight"
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, (r, e) in enumerate(zip(records[:n_samples], examples[:n_samples])):
        s = {"record_id": r.record_id, "task": r.task, "query": r.query, "tokens": tokens[i],
             "profile": [render_profile_item(it) for it in r.profile[: e.profile_items_kept]],
             "pir": pir_after[i].tolist(), "truth": truth[i]}  # fmt: skip
        if pir_before is not None:
            s["pir_before"] = pir_before[i].tolist()
        samples.append(s)
    (out / "index.html").write_text(render_html(samples, f"PIR per token: {run_dir.name}", summary), encoding="utf-8")
    (out / "insight.json").write_text(json.dumps(summary, indent=2))
    groups: dict[str, np.ndarray] = {}
    for stage, pir in (("after", pir_after), ("before", pir_before)):
        if pir is None:
            continue
        x = np.concatenate(pir)
        if any(truth):
            y = np.concatenate([np.asarray(t, dtype=bool) for t in truth])
            groups[f"{stage}: persona tokens"], groups[f"{stage}: other tokens"] = x[y], x[~y]
        else:
            groups[stage] = x
    plot_pir_histograms(groups, out / "pir_hist.png", f"PIR per response token: {run_dir.name}")
    return summary
