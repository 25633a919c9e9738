"""The sweep's plots from committed files: validation learning curves per method and the persona-vs-other frontier."""

from __future__ import annotations

from pathlib import Path

from perce_ds.sweep.cells import Cell, committed_dir, read_jsonl
from perce_ds.sweep.select import MethodSelection
from perce_ds.sweep.spec import SweepSpec

CURVE_CLASSES = (("eval_ce", "all response tokens"), ("eval_nll_persona", "persona tokens"),
                 ("eval_nll_infer", "inferable tokens"), ("eval_nll_other", "other tokens"))  # fmt: skip


def _rows(spec: SweepSpec, cell: Cell, root: Path) -> list[dict]:
    return read_jsonl(committed_dir(spec, cell, root) / "eval_metrics.jsonl")


def present_classes(spec: SweepSpec, methods: list[MethodSelection], root: Path) -> list[tuple[str, str]]:
    """The CURVE_CLASSES keys the selected runs' evaluations logged (a class without spans is not logged)."""
    rows = [r for m in methods for c in m.selected for r in _rows(spec, c, root)]
    return [(k, t) for k, t in CURVE_CLASSES if any(r.get(k) is not None for r in rows)]


def learning_curves(spec: SweepSpec, methods: list[MethodSelection], root: Path, out_png: Path) -> Path | None:
    """Validation NLL per class over steps, each method at its selected lr (mean over seeds); absent classes skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [m for m in methods if m.selected]
    data = {m.label: [_rows(spec, c, root) for c in m.selected] for m in chosen}
    keys = present_classes(spec, methods, root)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys):
        for m in chosen:
            by_step: dict[int, list[float]] = {}
            for rows in data[m.label]:
                for r in rows:
                    if r.get(key) is not None:
                        by_step.setdefault(int(r["step"]), []).append(float(r[key]))
            steps = sorted(by_step)
            ax.plot(
                steps,
                [sum(by_step[s]) / len(by_step[s]) for s in steps],
                marker=".",
                label=f"{m.label} (lr {m.selected_lr:g})",
            )
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
