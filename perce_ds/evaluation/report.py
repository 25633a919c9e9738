"""Scores files, Markdown reports, run comparisons and plots.

Per evaluation directory (e.g. runs/NAME/eval/): per_record.jsonl (one row of scores per record),
scores.json (overall and per-task means with seeded bootstrap 95% intervals, counts of empty and
missing generations) and report.md. Comparisons: a table per task and metric with the relative
gain over the first run and a paired bootstrap p-value, a cross-task matrix, training curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from perce_ds.errors import UserError
from perce_ds.evaluation.metrics import (
    DEFAULT_PRESET,
    METRICS,
    get_preset,
    paired_bootstrap_pvalue,
    score_record,
    summarise,
)
from perce_ds.logging_utils import METRICS_FILES, read_metrics

METRIC_NAMES = {"rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "meteor": "METEOR"}
# (metrics split, key): training-step rows, then the eval split's teacher-forced CE (train.eval_every + the final one)
CURVE_KEYS = (
    ("train", "loss"),
    ("train", "ce"),
    ("train", "pir_mean"),
    ("train", "personal_ratio"),
    ("eval", "eval_ce"),
)


def score_generations(
    references: dict[str, tuple[str, str]],
    generations: dict[str, str],
    preset: str = DEFAULT_PRESET,
    generation_rows: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Per-record scores for every reference (record_id -> (task, text)); a missing generation scores 0.
    With `generation_rows` (generations.jsonl rows by record_id) each row also carries the generation's
    `n_generated_tokens` and `finish_reason` (None for a missing one, or one written before they were recorded)."""
    rows = []
    for rid, (task, reference) in references.items():
        missing = rid not in generations
        scores = score_record(None if missing else generations[rid], reference, preset)
        row = {"record_id": rid, "task": task, **scores, "missing": float(missing)}
        if generation_rows is not None:
            gen = generation_rows.get(rid, {})
            row.update({k: gen.get(k) for k in ("n_generated_tokens", "finish_reason")})
        rows.append(row)
    return rows


def generation_stats(per_record: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean generated length (tokens, stop token excluded) and end-of-turn rate (share of generations that
    stopped on EOS / the end-of-turn id rather than at max_new_tokens), over the records that record them."""
    known = [r for r in per_record if r.get("finish_reason") is not None]
    n = len(known)
    return {
        "n": n,
        "mean_generated_tokens": sum(r["n_generated_tokens"] for r in known) / n if n else None,
        "end_of_turn_rate": sum(r["finish_reason"] == "stop" for r in known) / n if n else None,
    }


def summarise_by_task(per_record: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """{"overall": summary, "by_task": {task: summary}} (see metrics.summarise), each with its "generation"
    statistics (generation_stats)."""
    tasks = sorted({r["task"] for r in per_record})

    def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {**summarise(rows, seed), "generation": generation_stats(rows)}

    return {
        "overall": summary(per_record),
        "by_task": {t: summary([r for r in per_record if r["task"] == t]) for t in tasks},
    }


def write_eval_outputs(out_dir: Path, per_record: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write per_record.jsonl, scores.json and report.md into out_dir; return the scores.json content.
    `meta["metrics_preset"]` names the preset the per-record scores were computed with (default strict)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_record.jsonl").open("w", encoding="utf-8") as f:
        for row in per_record:
            f.write(json.dumps(row) + "\n")
    scores = {**summarise_by_task(per_record, seed=int(meta.get("seed", 0))), "meta": meta}
    preset = get_preset(scores["meta"].setdefault("metrics_preset", DEFAULT_PRESET))
    scores["meta"]["rouge_stemming"] = preset.rouge_stemming
    scores["meta"]["meteor_tokens"] = preset.meteor_tokens
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    (out_dir / "report.md").write_text(render_report(scores))
    return scores


def _fmt(x: float) -> str:
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def render_report(scores: dict[str, Any]) -> str:
    """The Markdown report of one evaluation."""
    meta = scores["meta"]
    lines = [
        f"# Evaluation of {meta.get('run', '?')}",
        "",
        f"Split `{meta.get('split')}`, prompts {'without profiles (ablated)' if meta.get('ablated') else 'with profiles'}, "
        f"model `{meta.get('model')}`; decoding: {json.dumps(meta.get('generation', {}))}.",
        "",
        f"Metrics preset `{meta.get('metrics_preset', DEFAULT_PRESET)}` "
        f"({get_preset(meta.get('metrics_preset', DEFAULT_PRESET)).source}).",
        "",
        "Scores x100. ROUGE: `rouge-score` F-measure, Porter stemming "
        f"{'on' if meta.get('rouge_stemming', True) else 'off'}, mean over records (no bootstrap resampling of the "
        f"mean). METEOR: NLTK (WordNet 3.0) over `{meta.get('meteor_tokens', 'words_punct')}` tokens. Empty or "
        "missing generations score 0 and are counted. "
        f"Brackets: seeded (seed {meta.get('seed', 0)}) percentile bootstrap 95% interval of the mean. "
        "Tokens: mean generated length (stop token excluded); end of turn: % of generations that stopped on "
        "EOS / the end-of-turn id rather than at max_new_tokens.",
        "",
        f"Backend: `{json.dumps(meta.get('backend', {'name': 'hf'}))}`.",
        "",
        "| task | n | empty | missing | think stripped | tokens | end of turn | "
        + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(METRICS),
    ]  # fmt: skip
    for name, s in [("all", scores["overall"]), *scores["by_task"].items()]:
        cells = [f"{_fmt(s[m]['mean'])} [{_fmt(s[m]['ci_low'])}, {_fmt(s[m]['ci_high'])}]" for m in METRICS]
        gen = s.get("generation", {})
        tokens = f"{gen['mean_generated_tokens']:.1f}" if gen.get("n") else "n/a"
        lines.append(f"| {name} | {s['n_records']} | {s['n_empty']} | {s['n_missing']} | "
                     f"{s.get('n_think_stripped', 0)} | {tokens} | {_fmt(gen.get('end_of_turn_rate'))} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _per_record(eval_dir: Path) -> dict[str, dict[str, Any]]:
    path = eval_dir / "per_record.jsonl"
    return {r["record_id"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def compare_runs(eval_dirs: list[Path], labels: list[str], seed: int = 0) -> dict[str, Any]:
    """Per task and metric: each run's mean, relative gain over the first run, paired bootstrap p-value.

    Records are paired by record_id; only records present in both runs enter a p-value.
    """
    per = [_per_record(d) for d in eval_dirs]
    scores = [json.loads((d / "scores.json").read_text()) for d in eval_dirs]
    presets = {str(d): s.get("meta", {}).get("metrics_preset", DEFAULT_PRESET) for d, s in zip(eval_dirs, scores)}
    if len(set(presets.values())) > 1:
        raise UserError(
            f"cannot compare evaluations scored with different metrics presets ({presets}); re-evaluate with one "
            "--metrics-preset"
        )
    tasks = sorted(set().union(*(s["by_task"] for s in scores)))
    rows = []
    for task in ["all", *tasks]:
        for metric in METRICS:
            base = scores[0]["overall"] if task == "all" else scores[0]["by_task"].get(task)
            base_mean = base[metric]["mean"] if base else float("nan")
            for i, label in enumerate(labels):
                s = scores[i]["overall"] if task == "all" else scores[i]["by_task"].get(task)
                mean = s[metric]["mean"] if s else float("nan")
                row = {"task": task, "metric": metric, "run": label, "mean": mean}
                row["rel_gain"] = (mean - base_mean) / base_mean if i and base_mean and base_mean > 0 else None
                if i:
                    shared = [k for k in per[0] if k in per[i] and (task == "all" or per[0][k]["task"] == task)]
                    a = [per[0][k][metric] for k in shared]
                    b = [per[i][k][metric] for k in shared]
                    row["p_value"] = paired_bootstrap_pvalue(a, b, seed=seed) if shared else None
                    row["n_paired"] = len(shared)
                rows.append(row)
    return {"labels": labels, "eval_dirs": [str(d) for d in eval_dirs], "rows": rows}


def render_comparison(comparison: dict[str, Any]) -> str:
    """The comparison as a Markdown table (scores x100, gains in %)."""
    labels = comparison["labels"]
    head = ["task", "metric", *labels] + [f"gain {lab} vs {labels[0]} (p)" for lab in labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in comparison["rows"]:
        by_key.setdefault((row["task"], row["metric"]), []).append(row)
    for (task, metric), rows in by_key.items():
        cells = [task, METRIC_NAMES[metric], *(_fmt(r["mean"]) for r in rows)]
        for r in rows[1:]:
            gain = f"{100 * r['rel_gain']:+.1f}%" if r.get("rel_gain") is not None else "n/a"
            p = f"{r['p_value']:.3f}" if r.get("p_value") is not None else "n/a"
            cells.append(f"{gain} (p={p})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cross_task_matrix(runs: dict[str, list[Path]], metric: str = "meteor") -> dict[str, dict[str, float]]:
    """run label -> eval task -> mean `metric`, over every evaluation directory of each run."""
    matrix: dict[str, dict[str, float]] = {}
    for label, dirs in runs.items():
        for d in dirs:
            scores = json.loads((d / "scores.json").read_text())
            if scores.get("meta", {}).get("ablated"):
                continue
            for task, s in scores["by_task"].items():
                matrix.setdefault(label, {})[task] = s[metric]["mean"]
    return matrix


def render_matrix(matrix: dict[str, dict[str, float]], metric: str = "meteor") -> str:
    """The cross-task matrix as Markdown: rows = runs, columns = evaluated tasks."""
    tasks = sorted(set().union(*matrix.values())) if matrix else []
    lines = [
        f"| run \\ eval task ({METRIC_NAMES[metric]}) | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for label, row in matrix.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row.get(t, float("nan"))) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot_training_curves(run_dirs: list[Path], labels: list[str], out_png: Path) -> Path:
    """loss, CE, mean PIR, personal-token ratio and eval CE vs step, every run on the same axes (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4 * len(CURVE_KEYS), 3.2))
    for run_dir, label in zip(run_dirs, labels):
        rows = {split: read_metrics(run_dir, split) for split in METRICS_FILES}
        for ax, (split, key) in zip(axes, CURVE_KEYS):
            pts = [(r["step"], r[key]) for r in rows[split] if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if split == "eval" else None, markersize=3, label=label)
    for ax, (_, key) in zip(axes, CURVE_KEYS):
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_pir_histograms(groups: dict[str, np.ndarray], out_png: Path, title: str = "PIR per response token") -> Path:
    """Overlaid PIR histograms, one per labelled group (e.g. persona vs other tokens, before vs after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = [np.asarray(v)[np.isfinite(v)] for v in groups.values()]
    allv = np.concatenate(finite) if finite else np.zeros(1)
    bins = np.linspace(float(allv.min(initial=0.0)), float(allv.max(initial=1.0)) + 1e-6, 50)
    for (label, _), values in zip(groups.items(), finite):
        if values.size:
            ax.hist(values, bins=bins, alpha=0.5, density=True, label=f"{label} (n={values.size})")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("PIR = log P(y|profile, x) - log P(y|x)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
