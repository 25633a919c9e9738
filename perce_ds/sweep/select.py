"""Selection on validation, per method: the learning rate by the mean over seeds of each run's best validation
value, the checkpoint by each run's best validation step (early stopping: `<run>/hf_best`, `best.json`).

A method is a cell's overrides without train.lr and train.seed. The value of a run is its best validation value
of `select.metric` over its evaluations (`best.json`, written by `train.keep_best`); for a generation score
(rougeL, meteor) it is that score of hf_best's greedy validation generations. Ties go to the smaller lr.
The lr is chosen from the grid's cells only (`seeds`): a sweep with `confirm_seeds` then trains the selected lr
with those (the "confirm" stage), which join the method's selected runs without taking part in the choice.
Later stages' methods take the lr selected for their `lr_from` method: nothing of theirs is chosen on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perce_ds.sweep.cells import (
    Cell,
    cells_of_confirmation,
    cells_of_grid,
    cells_of_stage,
    committed_dir,
    is_done,
    method_key,
    method_label,
    read_json,
)
from perce_ds.sweep.spec import GRID_STAGE, SweepSpec


@dataclass
class MethodSelection:
    key: str
    label: str
    method: dict[str, Any]
    stage: str
    by_lr: dict[float, dict[str, Any]] = field(default_factory=dict)  # lr -> {mean, runs: {cell id: {value, step}}}
    selected_lr: float | None = None
    selected: list[Cell] = field(default_factory=list)  # the selected lr's cells (all seeds, confirmation's last)
    confirm: list[Cell] = field(default_factory=list)  # of them, the confirmation cells (not in by_lr)
    confirm_runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # done ones: id -> {seed, value, step}
    complete: bool = False  # selected and every confirmation cell done: ready for test scoring
    # seeds of this method's runs that chose its lr (grid: `seeds`; a stage's method: none, its lr_from method's did)
    lr_chosen_by_seeds: list[int] = field(default_factory=list)
    fixed_lr_seeds: list[int] = field(default_factory=list)  # seeds trained at an lr chosen without them

    def selected_runs(self) -> dict[str, dict[str, Any]]:
        """The selected lr's runs of every seed (grid and done confirmation runs): cell id -> {seed, value, step}."""
        if self.selected_lr is None:
            return {}
        return {**self.by_lr[self.selected_lr]["runs"], **self.confirm_runs}

    def selected_mean(self) -> float | None:
        """Mean of the best validation values of the selected lr's runs (all seeds done so far)."""
        runs = self.selected_runs()
        return sum(r["value"] for r in runs.values()) / len(runs) if runs else None

    def to_dict(self, seeds: bool = False) -> dict[str, Any]:
        """The method's record in sweep.json; `seeds` (a sweep with confirm_seeds) adds which seeds chose the lr,
        which were trained at it afterwards, their validation values, and whether all are done."""
        out = {"label": self.label, "method": self.method, "stage": self.stage, "selected_lr": self.selected_lr,
               "selected_cells": [c.id for c in self.selected],
               "by_lr": {f"{lr:g}": v for lr, v in self.by_lr.items()}}  # fmt: skip
        if seeds:
            out.update(lr_chosen_by_seeds=self.lr_chosen_by_seeds, fixed_lr_seeds=self.fixed_lr_seeds,
                       confirm_runs=self.confirm_runs, complete=self.complete)  # fmt: skip
        return out


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
    """Selection of one method over `cells` (the runs that choose its lr); selected_lr stays None while one is not
    done. A grid method's confirmation cells at the selected lr join `selected`, never the choice; the method is
    complete once they are done (at once without confirm_seeds). A stage's method: one lr, chosen by its lr_from
    method's grid runs, every seed trained at it."""
    grid = stage == GRID_STAGE
    sel = MethodSelection(method_key(label_of), method_label(label_of), label_of, stage,
                          lr_chosen_by_seeds=list(spec.seeds) if grid else [],
                          fixed_lr_seeds=list(spec.confirm_seeds) if grid else spec.all_seeds)  # fmt: skip
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
    sel.confirm = cells_of_confirmation(spec, label_of, sel.selected_lr) if grid else []
    sel.selected = [c for c in cells if float(c.lr) == sel.selected_lr] + sel.confirm
    done = [c for c in sel.confirm if is_done(spec, c, root)]
    sel.confirm_runs = {c.id: {"seed": c.seed, **run_value(spec, c, root)} for c in done}
    sel.complete = len(done) == len(sel.confirm)
    return sel


def stage_lists(spec: SweepSpec, lr_of: dict[str, float | None], fill_lr: float | None = None) -> list[list[Cell]]:
    """The cells of each stage of spec.stage_names() (grid, confirm when confirm_seeds, each `stages` entry), with
    each grid method at lr_of[its key]. A method without one (None: not selected yet) has no confirmation or stage
    cells yet, or, given fill_lr, has them at fill_lr (the dry run's estimate)."""

    def lr(method: dict[str, Any]) -> float | None:
        chosen = lr_of.get(method_key(method))
        return chosen if chosen is not None else fill_lr

    out = [cells_of_grid(spec)]
    if spec.confirm_seeds:
        out.append([c for m in spec.grid_methods() if lr(m) is not None for c in cells_of_confirmation(spec, m, lr(m))])
    for i, st in enumerate(spec.stages):
        at = lr(st.lr_from)
        out.append(cells_of_stage(spec, i, {method_key(st.lr_from): at}) if at is not None else [])
    return out


def select_all(spec: SweepSpec, root: Path) -> tuple[list[MethodSelection], list[list[Cell]]]:
    """Every method's selection (grid methods, then each stage's variants) and the cells of each stage
    (spec.stage_names()). Confirmation and stage cells exist only once their grid method is selected (else that
    method has none in the list: a stage's list is empty)."""
    grid = cells_of_grid(spec)
    methods = [
        select_method(spec, m, GRID_STAGE, [c for c in grid if c.method == m], root) for m in spec.grid_methods()
    ]
    stages = stage_lists(spec, {m.key: m.selected_lr for m in methods})
    first = len(stages) - len(spec.stages)  # the index of the recipe's first stage
    for i, st in enumerate(spec.stages):
        cells = stages[first + i]
        for variant in st.variants:
            m = {**st.lr_from, **variant}
            methods.append(select_method(spec, m, st.name, [c for c in cells if c.method == m], root))
    return methods, stages
