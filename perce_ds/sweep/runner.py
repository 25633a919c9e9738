"""Driving a sweep: run its cells in order (sequentially, or one per SLURM array task), select, score, report.

Stages in order (spec.stage_names(); `--stage` is the index): 0 the grid; then, with `confirm_seeds`, the
confirmation cells (each grid method's selected lr with each confirm seed; a method's exist once it is selected,
all its grid cells done); then the recipe's `stages` entries, whose cells exist once their `lr_from` method is
selected. Confirmation runs before the recipe's stages so that the grid methods' results are complete first.
Nothing here queues jobs: cells are processes of launch/train.py and launch/evaluate.py; on a cluster SLURM runs
them (launch/slurm/sweep.sh).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from perce_ds.errors import UserError
from perce_ds.sweep import cost, plots, report, scoring
from perce_ds.sweep.cells import (
    DONE,
    FIRST_RUN,
    RETRAINED,
    Cell,
    SweepError,
    committed_dir,
    has_model,
    is_done,
    read_json,
    record_retrain,
    retrain_steps_left,
    run_cell,
    set_aside_for_retraining,
)
from perce_ds.sweep.select import MethodSelection, select_all, stage_lists
from perce_ds.sweep.spec import CONFIRM_STAGE, GRID_STAGE, LR_KEY, SweepSpec, dump_overrides


def child_env(root: Path) -> dict[str, str]:
    """The environment of cell processes: the repository importable first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def stage_cells(spec: SweepSpec, root: Path) -> list[list[Cell]]:
    return select_all(spec, root)[1]


def pending(spec: SweepSpec, root: Path) -> tuple[int, list[int]] | None:
    """(stage, indices of its cells not done) for the first stage with work that can start now; None when every
    known cell is done (then the next step is selection / test scoring, or a stage whose lr is not selected yet)."""
    for s, cells in enumerate(stage_cells(spec, root)):
        todo = [i for i, c in enumerate(cells) if not is_done(spec, c, root)]
        if todo:
            return s, todo
    return None


def run_one(spec: SweepSpec, root: Path, stage: int, index: int) -> bool:
    """Run cell `index` of `stage` (a SLURM array task); False when it was already done."""
    cells = stage_cells(spec, root)
    if stage >= len(cells) or index >= len(cells[stage]):
        raise SweepError(f"stage {stage} has no cell {index} (yet): its learning rate may not be selected")
    return run_cell(spec, cells[stage][index], root, child_env(root))


def run_all(spec: SweepSpec, root: Path, log=print, parallel: int = 1, retrain_missing: bool = False) -> None:
    """Every cell of every stage, skipping finished ones; then test scoring and the report. Stages run in order
    (a stage's lr is selected from the ones before it); within a stage up to `parallel` cells run at once, as
    processes on this machine sharing its devices (small models that leave a GPU mostly idle; one 2-core CPU
    gains nothing). A failed cell does not stop the others of its stage; the stage then fails. `retrain_missing`:
    see retrain_selected_without_model."""
    env = child_env(root)
    check_configs(spec, root)
    for stage in range(len(spec.stage_names())):
        cells = stage_cells(spec, root)[stage]
        if not cells:
            raise SweepError(f"stage {stage}: no cells (its grid method is not selected: a grid cell failed?)")
        run_cells(spec, root, cells, f"stage {stage}", env, log, parallel)
    record_retrains(spec, root, log)  # a retrain a killed sweep left for the stage loop to finish
    if retrain_missing:
        retrain_selected_without_model(spec, root, env, log, parallel)
    aggregate(spec, root, score=True, log=log)


def run_cells(
    spec: SweepSpec, root: Path, cells: list[Cell], what: str, env: dict[str, str], log, parallel: int
) -> None:
    """run_cell for each, one after another or up to `parallel` at once; a failure is raised after all ended."""

    def run(i: int, cell: Cell) -> None:
        log(f"[{what} cell {i + 1}/{len(cells)}] {cell.id}")
        ran = run_cell(spec, cell, root, env)
        log(f"[{what} cell {i + 1}/{len(cells)}] " + ("finished" if ran else "done, skipped"))

    if parallel <= 1:
        for i, cell in enumerate(cells):
            run(i, cell)
        return
    with ThreadPoolExecutor(max_workers=parallel) as pool:  # threads: each waits on its cell's process
        futures = [pool.submit(run, i, cell) for i, cell in enumerate(cells)]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise SweepError(f"{what}: {len(failed)} of {len(cells)} cells failed; the first: {failed[0]}")


def retrain_selected_without_model(spec: SweepSpec, root: Path, env: dict[str, str], log, parallel: int) -> None:
    """Before test scoring: train again (same definition and seed) every selected cell whose hf_best is not on this
    machine, its first run's files kept in first_run/ and both best validation values in retrained.json. The
    retrain's files replace the first run's, so the table's validation and test numbers come from the same runs;
    if that changes a selection, the newly selected cells are checked in turn. Nothing once test is scored."""
    for _ in range(sum(len(c) for c in stage_cells(spec, root)) + 1):
        missing = _retrains_before_scoring(spec, root, select_all(spec, root)[0])
        if not missing:
            return
        log(f"retraining {len(missing)} selected cell(s) whose model is not here: {[c.id for c in missing]}")
        for cell in missing:
            set_aside_for_retraining(spec, cell, root)
        run_cells(spec, root, missing, "retrain", env, log, parallel)
        record_retrains(spec, root, log)


def record_retrains(spec: SweepSpec, root: Path, log) -> None:
    """retrained.json for every finished cell with a first_run/ and no record yet."""
    for cell in (c for cells in stage_cells(spec, root) for c in cells):
        d = committed_dir(spec, cell, root)
        if (d / FIRST_RUN / DONE).is_file() and is_done(spec, cell, root) and not (d / RETRAINED).is_file():
            r = record_retrain(spec, cell, root)
            first, again = r["first_run"], r["retrain"]
            log(f"  {cell.id}: best validation {first['value']:.6g} @ {first['step']} (first run) -> "
                f"{again['value']:.6g} @ {again['step']} (retrain)")  # fmt: skip


def check_configs(spec: SweepSpec, root: Path) -> None:
    """Resolve every cell's config before training any (a typo in a later stage fails now, not hours later)."""
    methods, _ = select_all(spec, root)
    for cells in _placeholder_stages(spec, methods):
        for c in cells:
            try:
                cost.cell_config(spec, c, root)
            except UserError as e:
                raise SweepError(f"{spec.path}: cell {c.id} ({dump_overrides(c.as_dict)}): {e}") from None


def aggregate(spec: SweepSpec, root: Path, score: bool, log=print) -> dict[str, Any]:
    """Select on validation, score test once (when `score` and not yet scored), write the table and plots."""
    methods, _ = select_all(spec, root)
    table = None
    if all(m.complete for m in methods):
        scored = scoring.test_scored(spec, methods, root)
        if not scored and score:
            log("scoring the selected runs and the starting model on the test split (once)")
            scoring.score_test(spec, methods, root)
            scored = True
        if scored:
            table = report.test_table(spec, methods, root)
        else:
            log(f"every cell is done but the test split is not scored yet ({spec.commit_dir}/{scoring.MARKER} "
                "missing): the table shows validation only; run without --only-aggregate to score it (once)")  # fmt: skip
    else:
        log("not every method is selected (and confirmed) yet: the table shows validation only")
    md = report.write_report(spec, methods, table, root)
    out = root / spec.commit_dir
    for name, made in (("learning_curves.png", plots.learning_curves(spec, methods, root, out / "learning_curves.png")),
                       ("frontier.png", plots.frontier(spec, methods, root, out / "frontier.png"))):  # fmt: skip
        why = ("no method is selected yet (its cells are not all done)" if not any(m.selected for m in methods)
               else "no per-class validation NLL in the selected runs' eval_metrics.jsonl")  # fmt: skip
        log(f"wrote {out / name}" if made else f"{name}: skipped, {why}")
    log(md.read_text())
    log(f"wrote {md} and {out / 'sweep.json'}")
    return {"methods": methods, "table": table}


def dry_run(spec: SweepSpec, root: Path, retrain_missing: bool = False) -> str:
    """The cells with their overrides and estimated cost; stages whose lr is not selected yet are estimated at
    the first grid lr and marked pending. A retrain (first_run/ kept) is estimated to its first run's best step;
    with `retrain_missing`, the selected cells --retrain-missing would train again are listed too."""
    methods, stages = select_all(spec, root)
    measured = cost.measured_step_seconds(spec, [c for cs in stages for c in cs], root)
    confirm = f", confirm seeds {spec.confirm_seeds}" if spec.confirm_seeds else ""
    lines = [f"sweep {spec.name}: base {spec.base}, {spec.num_gpus} process(es), seeds {spec.seeds}{confirm}",
             f"common overrides: {dump_overrides(spec.overrides)}", ""]  # fmt: skip
    total = remaining = 0.0

    def listed(c: Cell, state: str, retrain_to: int | None) -> None:
        nonlocal total, remaining
        try:
            est = cost.estimate(spec, c, root, measured, retrain_to)
        except UserError as e:  # listed, not hidden: the cell would fail the same way when it runs
            lines.append(f"  {c.id}  {dump_overrides(c.as_dict)}  [{state}] cannot be resolved: {e}")
            return
        total += est["seconds"]
        remaining += est["seconds"] if state != "done" else 0.0
        steps = f"{est['steps']} steps" if est["steps"] is not None else "? steps (training files missing)"
        steps += "" if retrain_to is None else " (retrain to the first run's best step)"
        lines.append(f"  {c.id}  {dump_overrides(c.as_dict)}  [{state}] {steps} x {est['step_seconds']:.2f} s "
                     f"({est['source']}) + {est['evals']} evals x {spec.eval_seconds:g} s + "
                     f"{spec.startup_seconds:g} s start = {cost.human(est['seconds'])}")  # fmt: skip

    placeholder = _placeholder_stages(spec, methods)
    first = len(stages) - len(spec.stages)  # the index of the recipe's first stage
    for s, (name, cells) in enumerate(zip(spec.stage_names(), placeholder)):
        known = set(stages[s])  # the others wait for a selection: listed at the first grid lr, marked pending
        lr_note = ""
        if name == CONFIRM_STAGE and len(known) < len(cells):
            waiting = len(cells) - len(known)
            lr_note = f" ({waiting} waiting for their grid method's selected lr; estimated at the first grid lr)"
        elif s >= first and not known:
            source = dump_overrides(spec.stages[s - first].lr_from)
            lr_note = f" (lr pending: selected from {source}; estimated at the first grid lr)"
        title = name if name in (GRID_STAGE, CONFIRM_STAGE) else f"stage {name}"
        lines.append(f"{title}: {len(cells)} cells{lr_note}")
        for c in cells:
            state = ("done" if is_done(spec, c, root) else "todo") if c in known else "pending"
            listed(c, state, retrain_steps_left(spec, c, root) if state == "todo" else None)
    if retrain_missing:
        missing = _retrains_before_scoring(spec, root, methods)
        lines.append(f"retrain before test scoring (--retrain-missing): {len(missing)} selected cells whose model "
                     "is not on this machine" + (" (none until every method is selected and confirmed)"
                                                 if not all(m.complete for m in methods) else ""))  # fmt: skip
        for c in missing:
            listed(c, "retrain", int(read_json(committed_dir(spec, c, root) / "best.json")["step"]))
    lines.append(f"\ntotal (all cells, sequential): {cost.human(total)}, plus test scoring of the selected runs")
    lines.append(f"left (cells not done): {cost.human(remaining)}")
    return "\n".join(lines)


def _retrains_before_scoring(spec: SweepSpec, root: Path, methods: list[MethodSelection]) -> list[Cell]:
    """The selected cells retrain_selected_without_model would train again now: finished, model not here, test
    not scored yet."""
    if not all(m.complete for m in methods) or scoring.test_scored(spec, methods, root):
        return []
    return [c for m in methods for c in m.selected if not has_model(spec, c, root)]


def _placeholder_stages(spec: SweepSpec, methods: list[MethodSelection]) -> list[list[Cell]]:
    """The stages as they will be: select_all's lists, plus the cells of grid methods not selected yet at the
    first grid lr (for the estimate only)."""
    lr_of = {m.key: m.selected_lr for m in methods if m.stage == GRID_STAGE}
    return stage_lists(spec, lr_of, fill_lr=spec.grid.get(LR_KEY, [None])[0])
