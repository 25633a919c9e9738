"""Cells of a sweep: one training run each, with a stable id, its state on disk, and how to run it.

A cell's id is a readable slug of its overrides plus a hash of them (stable across invocations and machines).
Its big artefacts live in `<output_dir>/<id>/` (a normal run directory: checkpoints, hf_best/); its small files
are copied to `<commit_dir>/cells/<id>/` when it finishes, last of all `done.json` with the cell's config hash
(base recipe text, common and own overrides, process count, DeepSpeed config). A cell with that marker is
skipped; a cell without one is (re)started with `--train.resume auto`, so a killed one continues from its last
checkpoint; a marker with another hash means the definition changed and is refused (never silently reused).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perce_ds.errors import UserError
from perce_ds.sweep.spec import (
    CONFIRM_STAGE,
    GRID_STAGE,
    LR_KEY,
    SEED_KEY,
    SweepSpec,
    base_recipe_text,
    dump_overrides,
    method_of,
)

DONE = "done.json"
FIRST_RUN = "first_run"  # <committed cell>/first_run/: a retrained cell's first small files, kept
RETRAINED = "retrained.json"  # <committed cell>/retrained.json: the first run's and the retrain's best validation
SMALL_FILES = ("config.yaml", "metrics.jsonl", "eval_metrics.jsonl", "best.json", "summary.json", "data_report.json")
VAL_EVAL_NAME = "val_best"  # <run>/eval/val_best/: validation generations of hf_best (generation-score selection)


class SweepError(UserError, RuntimeError):
    """A cell that failed or cannot be used; the message names the cell and its log."""


@dataclass(frozen=True)
class Cell:
    stage: str  # "grid", "confirm" or a stage's name
    overrides: tuple[tuple[str, Any], ...]  # the cell's own overrides, in order (after the sweep's common ones)

    @property
    def as_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def method(self) -> dict[str, Any]:
        return method_of(self.as_dict)

    @property
    def lr(self) -> float | None:
        return self.as_dict.get(LR_KEY)

    @property
    def seed(self) -> int:
        return int(self.as_dict[SEED_KEY])

    @property
    def id(self) -> str:
        return cell_id(self.as_dict)


def cell_id(overrides: dict[str, Any]) -> str:
    """`scheme-perce_lr-3e-05_seed-1-<8 hex>`: the last part of each key with its value, then a hash of all."""
    parts = [
        f"{k.split('.')[-1]}-{v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}-{v}" for k, v in overrides.items()
    ]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts))[:80]
    return f"{slug}-{hashlib.sha256(dump_overrides(overrides).encode()).hexdigest()[:8]}"


def method_label(method: dict[str, Any]) -> str:
    """A method's name in tables: its overrides as key=value (last key part), or "base" when it has none."""
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in method.items()) or "base"


def cells_of_grid(spec: SweepSpec) -> list[Cell]:
    """The grid's cells: every combination x seed (of `seeds`), in recipe order (seeds innermost)."""
    return [Cell(GRID_STAGE, tuple({**o, SEED_KEY: s}.items())) for o in spec.grid_overrides() for s in spec.seeds]


def cells_of_confirmation(spec: SweepSpec, method: dict[str, Any], lr: float) -> list[Cell]:
    """Grid method `method`'s confirmation cells at its selected `lr`: its grid combination at that lr with each of
    `confirm_seeds`, keys in the grid's order, so each is the cell (id, hash) the grid would have had with that seed."""
    return [Cell(CONFIRM_STAGE, tuple({**o, SEED_KEY: s}.items())) for o in spec.grid_overrides()
            if method_of(o) == method and float(o[LR_KEY]) == lr for s in spec.confirm_seeds]  # fmt: skip


def cells_of_stage(spec: SweepSpec, stage_index: int, selected_lr: dict[str, float]) -> list[Cell]:
    """A later stage's cells at the selected lr of its `lr_from` method (selected_lr: method key -> lr), every seed
    (`seeds` + `confirm_seeds`: the lr is fixed here, none is chosen)."""
    st = spec.stages[stage_index]
    lr = selected_lr[method_key(st.lr_from)]
    return [Cell(st.name, tuple({**st.lr_from, **v, LR_KEY: lr, SEED_KEY: s}.items()))
            for v in st.variants for s in spec.all_seeds]  # fmt: skip


def method_key(method: dict[str, Any]) -> str:
    return dump_overrides(method)


def config_hash(spec: SweepSpec, cell: Cell, root: Path) -> str:
    """What makes a finished cell reusable: the base recipe, every override, the process count, the DS config."""
    ds = (root / spec.deepspeed).read_text() if (root / spec.deepspeed).is_file() else str(spec.deepspeed)
    text = "\n".join([base_recipe_text(spec, root), dump_overrides(spec.overrides), dump_overrides(cell.as_dict),
                      f"num_gpus={spec.num_gpus}", ds])  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_dir(spec: SweepSpec, cell: Cell, root: Path) -> Path:
    return root / spec.output_dir / cell.id


def committed_dir(spec: SweepSpec, cell: Cell, root: Path) -> Path:
    return root / spec.commit_dir / "cells" / cell.id


def is_done(spec: SweepSpec, cell: Cell, root: Path) -> bool:
    """True when the cell finished with this definition; refuses a marker written for another definition."""
    marker = committed_dir(spec, cell, root) / DONE
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text()).get("config_hash")
    if recorded != config_hash(spec, cell, root):
        raise SweepError(
            f"cell {cell.id}: {marker} was written for another definition (base recipe, overrides, num_gpus or "
            f"DeepSpeed config changed since). Restore them, or delete {marker.parent} and "
            f"{run_dir(spec, cell, root)} to train the cell again"
        )
    return True


def keep_best_metric(spec: SweepSpec) -> str:
    """The validation metric hf_best follows: the selection metric when it is teacher-forced, else eval_ce."""
    return spec.select_metric if spec.select_metric.startswith("eval_") else "eval_ce"


def cell_overrides(spec: SweepSpec, cell: Cell, root: Path) -> dict[str, Any]:
    """Everything a cell's run sets over the base recipe: the sweep's common overrides, the cell's own, and the
    keys the sweep owns (where the run goes, resume, the keep_best metric hf_best follows)."""
    mode = spec.select_mode if spec.select_metric.startswith("eval_") else "min"
    fixed = {"train.output_dir": root / spec.output_dir, "train.run_name": cell.id, "train.resume": "auto",
             "train.keep_best": keep_best_metric(spec), "train.keep_best_mode": mode}  # fmt: skip
    return {**spec.overrides, **cell.as_dict, **fixed}


def train_command(spec: SweepSpec, cell: Cell, root: Path) -> list[str]:
    """The existing entry point as a user runs it: `python launch/train.py` (1 process) or the DeepSpeed launcher."""
    if spec.num_gpus > 1:  # a free port: array tasks of one sweep may share a node
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.num_gpus),
                    "--master_port", str(free_port())]  # fmt: skip
    else:
        launcher = [sys.executable]
    args = [f"--{k}={v}" for k, v in cell_overrides(spec, cell, root).items()]
    return [*launcher, str(root / "launch" / "train.py"), "--deepspeed", str(root / spec.deepspeed),
            "--recipe", str(root / spec.base), *args]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generation_scores(run: Path, model: Path, split: str, name: str, max_new_tokens: int, data: list[str] = ()) -> Path:
    """Greedy generations of `model` on `split`, scored: what `launch/evaluate.py --run R --model M --split S
    --name N --max-new-tokens T [--data ...]` does, called in this process (no interpreter start per model).
    Returns <run>/eval/<name>/ (scores.json, per_record.jsonl; resumes like the command)."""
    from perce_ds.evaluation.evaluate import EvalOptions, evaluate_run
    from perce_ds.evaluation.generation import GenerationSettings
    from perce_ds.evaluation.metrics import get_preset
    from perce_ds.evaluation.runs import load_run_config

    preset = get_preset(load_run_config(run).eval.metrics_preset)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=preset.do_sample)
    evaluate_run(EvalOptions(run=run, split=split, model=str(model), name=name, data=list(data), generation=settings,
                             metrics_preset=preset.name))  # fmt: skip
    return run / "eval" / name


def run_logged(cmd: list[str], log_path: Path, root: Path, what: str, env: dict[str, str]) -> None:
    """Run `cmd` with its output appended to `log_path`; a failure names the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        log.write(f"+ {' '.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SweepError(f"{what} failed (exit {rc}); its output is in {log_path}")


def run_cell(spec: SweepSpec, cell: Cell, root: Path, env: dict[str, str]) -> bool:
    """Train (or resume) one cell, copy its small files to the committed directory; False when already done."""
    if is_done(spec, cell, root):
        return False
    rd = run_dir(spec, cell, root)
    out = root / spec.output_dir
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.log").open("a") as f:  # one line per training invocation (resumes included)
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} train {cell.id}\n")
    target = retrain_target(spec, cell, root)
    left = None if target is None else retrain_steps_left(spec, cell, root, target)
    if left is None or left > 0:
        cmd = train_command(spec, cell, root)
        if left:  # a retrain evaluates at its stop step only: the first run's curve is in first_run/ already,
            # and the evaluations on the way cost a third of a CPU retrain (teacher-forced validation, both passes)
            cmd += [f"--train.stop_after={left}", f"--train.eval_every={target}"]
        run_logged(cmd, rd.parent / f"{cell.id}.log", root, f"cell {cell.id}", env)
    if not (rd / "best.json").is_file():
        raise SweepError(f"cell {cell.id}: training ended without {rd}/best.json (no validation split?)")
    if not spec.select_metric.startswith("eval_"):  # a generation score selects: score hf_best on validation
        generation_scores(rd, rd / "hf_best", "eval", VAL_EVAL_NAME, spec.max_new_tokens)
    commit_cell(spec, cell, root)
    return True


def retrain_target(spec: SweepSpec, cell: Cell, root: Path) -> int | None:
    """For a retrain (first_run/ kept): the step the first run's validation selected; None for a first run."""
    first = committed_dir(spec, cell, root) / FIRST_RUN / "best.json"
    return int(read_json(first)["step"]) if first.is_file() else None


def retrain_steps_left(spec: SweepSpec, cell: Cell, root: Path, target: int | None = None) -> int | None:
    """For a retrain: the optimizer steps left to retrain_target; None for a first run. A retrain reproduces the
    selected checkpoint and stops there (the schedule unchanged): training on through the early-stopping patience
    would only make checkpoints selection has already passed over. Counted from the run's last complete
    checkpoint, so a killed retrain resumes to the same step. `target`: retrain_target, when the caller has it."""
    target = retrain_target(spec, cell, root) if target is None else target
    if target is None:
        return None
    from perce_ds.checkpoint import complete_checkpoints  # torch: only when a cell trains

    reached = max((step for step, _ in complete_checkpoints(run_dir(spec, cell, root) / "checkpoints")), default=0)
    return max(target - reached, 0)


def commit_cell(spec: SweepSpec, cell: Cell, root: Path) -> None:
    """Copy the run's small files to <commit_dir>/cells/<id>/ and write done.json last."""
    rd, dst = run_dir(spec, cell, root), committed_dir(spec, cell, root)
    dst.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:  # a file this run did not write goes (a retrain: the first run's is in first_run/)
        if (rd / name).is_file():
            shutil.copy2(rd / name, dst / name)
        else:
            (dst / name).unlink(missing_ok=True)
    val = rd / "eval" / VAL_EVAL_NAME / "scores.json"
    if val.is_file():
        shutil.copy2(val, dst / "validation_generation_scores.json")
    marker = {"config_hash": config_hash(spec, cell, root), "stage": cell.stage, "overrides": cell.as_dict,
              "run_dir": str(rd.relative_to(root)) if rd.is_relative_to(root) else str(rd)}  # fmt: skip
    (dst / DONE).write_text(json.dumps(marker, indent=2))


def has_model(spec: SweepSpec, cell: Cell, root: Path) -> bool:
    """The committed cell's best-validation model (hf_best) is on this machine: test scoring needs it. The run's
    best.json must be the committed one: an hf_best left by another run under the same name (a retrain stopped
    before its target, an older run) is not the model the committed validation numbers describe."""
    rd, committed = run_dir(spec, cell, root), committed_dir(spec, cell, root) / "best.json"
    if not (rd / "hf_best" / "config.json").is_file() or not (rd / "best.json").is_file() or not committed.is_file():
        return False
    return read_json(rd / "best.json") == read_json(committed)


def set_aside_for_retraining(spec: SweepSpec, cell: Cell, root: Path) -> None:
    """A finished cell whose run directory is gone (trained on another machine, scratch purged): copy its committed
    files to first_run/ (once: a second retrain keeps the first run's), then drop its done marker, so run_cell
    trains it again (and resumes a killed retrain from its checkpoints)."""
    d = committed_dir(spec, cell, root)
    keep = d / FIRST_RUN
    if not (keep / DONE).is_file():
        keep.mkdir(exist_ok=True)
        for path in sorted(d.iterdir()):
            if path.is_file() and path.name != DONE:
                shutil.copy2(path, keep / path.name)
        shutil.copy2(d / DONE, keep / DONE)  # last: first_run/ is whole once it holds the marker
    (d / DONE).unlink(missing_ok=True)


def record_retrain(spec: SweepSpec, cell: Cell, root: Path) -> dict[str, Any]:
    """After a retrain: <committed cell>/retrained.json with both runs' best validation (step, value) and their
    relative difference (the same definition and seed: run-to-run and device-to-device noise only)."""
    d = committed_dir(spec, cell, root)
    first, again = read_json(d / FIRST_RUN / "best.json"), read_json(d / "best.json")
    record = {"first_run": {k: first[k] for k in ("step", "value")}, "retrain": {k: again[k] for k in ("step", "value")},
              "relative_difference": (again["value"] - first["value"]) / abs(first["value"]) if first["value"] else None}  # fmt: skip
    (d / RETRAINED).write_text(json.dumps(record, indent=2))
    return record


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
