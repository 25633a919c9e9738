"""Selection on validation, per method: the learning rate by the mean over seeds of each run's best validation
value, the checkpoint by each run's best validation step (early stopping: `<run>/hf_best`, `best.json`).

A method is a cell's overrides without train.lr and train.seed. The value of a run is its best validation value
of `select.metric` over its evaluations (`best.json`, written by `train.keep_best`); for a generation score
(rougeL, meteor) it is that score of hf_best's greedy validation generations. Ties go to the smaller lr.
Later stages' methods take the lr selected for their `lr_from` method: nothing of theirs is chosen on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.sweep.cells import (
    Cell,
    cells_of_grid,
    cells_of_stage,
    committed_dir,
    is_done,
    method_key,
    method_label,
    read_json,
)
from perce_ds.sweep.spec import SweepSpec


@dataclass
class MethodSelection:
    key: str
    label: str
    method: dict[str, Any]
    stage: str
    by_lr: dict[float, dict[str, Any]] = field(default_factory=dict)  # lr -> {mean, runs: {cell id: {value, step}}}
    selected_lr: float | None = None
    selected: list[Cell] = field(default_factory=list)  # the selected lr's cells (all seeds)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "stage": self.stage, "selected_lr": self.selected_lr,
                "selected_cells": [c.id for c in self.selected],
                "by_lr": {f"{lr:g}": v for lr, v in self.by_lr.items()}}  # fmt: skip


def run_value(spec: SweepSpec, cell: Cell, root: Path) -> dict[str, Any]:
    """{value, step} of a finished cell for the selection metric (validation only)."""
    d = committed_dir(spec, cell, root)
    best = read_json(d / "best.json")
    if spec.select_metric.startswith("eval_"):
        return {"value": best["value"], "step": best["step"]}
    scores = read_json(d / "validation_generation_scores.json")
    return {"value": scores["overall"][spec.select_metric]["mean"], "step": best["step"]}


def select_method(
    spec: SweepSpec, label_of: dict[str, Any], stage: str, cells: list[Cell], root: Path
) -> MethodSelection:
    """Selection of one method over its cells; selected_lr stays None while a cell is not done."""
    sel = MethodSelection(method_key(label_of), method_label(label_of), label_of, stage)
    if not cells or not all(is_done(spec, c, root) for c in cells):
        return sel
    for c in cells:
        entry = sel.by_lr.setdefault(float(c.lr), {"runs": {}})
        entry["runs"][c.id] = {"seed": c.seed, **run_value(spec, c, root)}
    for entry in sel.by_lr.values():
        values = [r["value"] for r in entry["runs"].values()]
        entry["mean"] = sum(values) / len(values)
    sign = 1.0 if spec.select_mode == "min" else -1.0
    sel.selected_lr = min(sel.by_lr, key=lambda lr: (sign * sel.by_lr[lr]["mean"], lr))
    sel.selected = [c for c in cells if float(c.lr) == sel.selected_lr]
    return sel


def select_all(spec: SweepSpec, root: Path) -> tuple[list[MethodSelection], list[list[Cell]]]:
    """Every method's selection (grid methods, then each stage's variants) and the cells of each stage.

    A stage's cells exist only once its lr_from method is selected (else that stage's list is empty).
    """
    grid = cells_of_grid(spec)
    methods = [select_method(spec, m, "grid", [c for c in grid if c.method == m], root) for m in spec.grid_methods()]
    by_key = {m.key: m for m in methods}
    stages: list[list[Cell]] = [grid]
    for i, st in enumerate(spec.stages):
        source = by_key[method_key(st.lr_from)]
        cells = cells_of_stage(spec, i, {source.key: source.selected_lr}) if source.selected_lr is not None else []
        stages.append(cells)
        for variant in st.variants:
            m = {**st.lr_from, **variant}
            methods.append(select_method(spec, m, st.name, [c for c in cells if c.method == m], root))
    return methods, stages
