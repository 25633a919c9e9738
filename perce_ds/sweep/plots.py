"""The sweep's plots from committed files: validation learning curves per method and the persona-vs-other frontier."""

from __future__ import annotations

from pathlib import Path

from perce_ds.sweep.cells import FIRST_RUN, Cell, committed_dir, read_jsonl
from perce_ds.sweep.select import MethodSelection
from perce_ds.sweep.spec import SweepSpec

CURVE_CLASSES = (("eval_ce", "all response tokens"), ("eval_nll_persona", "persona tokens"),
                 ("eval_nll_infer", "inferable tokens"), ("eval_nll_other", "other tokens"))  # fmt: skip


def _rows(spec: SweepSpec, cell: Cell, root: Path) -> list[dict]:
    return read_jsonl(committed_dir(spec, cell, root) / "eval_metrics.jsonl")


def curve_rows(spec: SweepSpec, cell: Cell, root: Path) -> list[dict]:
    """A cell's validation trajectory: its evaluations, or for a retrained cell its first run's, which went on to
    its early stop (the retrain repeats that run up to the selected step and stops; retrained.json compares them)."""
    first = committed_dir(spec, cell, root) / FIRST_RUN / "eval_metrics.jsonl"
    return read_jsonl(first) if first.is_file() else _rows(spec, cell, root)


def present_classes(spec: SweepSpec, methods: list[MethodSelection], root: Path) -> list[tuple[str, str]]:
    """The CURVE_CLASSES keys the selected runs' evaluations logged (a class without spans is not logged)."""
    rows = [r for m in methods for c in m.selected for r in _rows(spec, c, root)]
    return [(k, t) for k, t in CURVE_CLASSES if any(r.get(k) is not None for r in rows)]


Curve = tuple[list[int], list[float]]


def method_curves(spec: SweepSpec, m: MethodSelection, key: str, root: Path) -> tuple[Curve, list[Curve]]:
    """(mean curve, one curve per seed) of `key` for a method at its selected lr. The mean covers only the steps
    every seed reached: with early stopping a seed that ran longer would otherwise make the tail a one-seed curve
    drawn as a mean."""
    seeds = []
    for cell in m.selected:
        rows = [r for r in curve_rows(spec, cell, root) if r.get(key) is not None]
        seeds.append(([int(r["step"]) for r in rows], [float(r[key]) for r in rows]))
    common = sorted(set.intersection(*(set(steps) for steps, _ in seeds))) if seeds else []
    by_seed = [dict(zip(steps, values)) for steps, values in seeds]
    return (common, [sum(d[s] for d in by_seed) / len(by_seed) for s in common]), seeds


def learning_curves(spec: SweepSpec, methods: list[MethodSelection], root: Path, out_png: Path) -> Path | None:
    """Validation NLL per class over steps, each method at its selected lr: the mean over seeds (solid, over the
    steps all seeds reached) and each seed (faint); absent classes skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [m for m in methods if m.selected]
    keys = present_classes(spec, methods, root)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for m in chosen:
            (steps, mean), seeds = method_curves(spec, m, key, root)
            line = ax.plot(steps, mean, marker=".", label=f"{m.label} (lr {m.selected_lr:g})")[0]
            for seed_steps, values in seeds:
                ax.plot(seed_steps, values, color=line.get_color(), alpha=0.3, linewidth=0.8)
        ax.set(title=f"validation NLL, {title}", xlabel="step", ylabel="nats / token")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def frontier_points(
    spec: SweepSpec, methods: list[MethodSelection], root: Path
) -> dict[str, list[tuple[float, float, str]]]:
    """method label -> [(other-token NLL, persona-token NLL, lr)] at each finished cell's best-validation step
    (confirmation cells included)."""
    points: dict[str, list[tuple[float, float, str]]] = {}
    for m in methods:  # the runs that chose the lr, then the confirmation runs at the selected one
        runs = [(lr, entry["runs"]) for lr, entry in m.by_lr.items()] + [(m.selected_lr, m.confirm_runs)]
        for lr, by_id in runs:
            for cell_id, run in by_id.items():  # run["step"]: its best validation step, read by select.run_value
                d = root / spec.commit_dir / "cells" / cell_id
                row = next((r for r in read_jsonl(d / "eval_metrics.jsonl") if r["step"] == run["step"]), {})
                if row.get("eval_nll_other") is not None and row.get("eval_nll_persona") is not None:
                    points.setdefault(m.label, []).append((row["eval_nll_other"], row["eval_nll_persona"], f"{lr:g}"))
    return points


def frontier(spec: SweepSpec, methods: list[MethodSelection], root: Path, out_png: Path) -> Path | None:
    """Each finished cell's best-validation point: other-token NLL (x) against persona-token NLL (y), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier_points(spec, methods, root)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for label, pts in points.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label)
        for x, y, text in pts:
            ax.annotate(text, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="validation NLL, other tokens", ylabel="validation NLL, persona tokens",
           title="best-validation checkpoint of every cell (label: lr)")  # fmt: skip
    for set_scale, i in ((ax.set_xscale, 0), (ax.set_yscale, 1)):
        values = [p[i] for pts in points.values() for p in pts]
        if min(values) > 0 and max(values) > 20 * min(values):  # converged runs crowd one corner of a linear axis
            set_scale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
