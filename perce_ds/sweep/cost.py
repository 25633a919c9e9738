"""`--dry-run` cost of a cell: optimizer steps x seconds per step, plus its evaluations.

Steps come from the resolved config without touching data or model: train.max_steps, else epochs x
(training records // global batch), training records counted from the synthetic settings or the JSONL files.
A retrain (`--retrain-missing`) trains to its first run's best step only. Seconds per step: the median `step_time_s`
of the sweep's finished cells that ran on this kind of device (their summary.json's `device`; cells from before
that record are used when no cell matches, named as such), else the recipe's `cost.step_seconds`, else
DEFAULT_STEP_S_PER_100M x parameters / 100 M (stated default: SmolLM2-135M at ~25 s per step of global batch 4 on 2
CPU ranks, README), from the model's config. A step time of a GPU is no estimate for a CPU: cells measured on other
devices only are named beside the fallback, not used.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perce_ds.cli import parse_overrides
from perce_ds.config import RunConfig
from perce_ds.sweep.cells import Cell, cell_overrides, committed_dir, read_json, read_jsonl
from perce_ds.sweep.spec import SweepSpec

DEFAULT_STEP_S_PER_100M = 18.5  # 25 s / 1.35 (x 100 M parameters): 2 CPU ranks, fp32, global batch 4


def cell_config(spec: SweepSpec, cell: Cell, root: Path) -> RunConfig:
    """The cell's resolved config, as its run will have it (nothing loaded but YAML)."""
    args = [f"--{k}={v}" for k, v in cell_overrides(spec, cell, root).items()]
    return RunConfig.load(root / spec.base, parse_overrides(args))


def train_records(cfg: RunConfig, root: Path) -> int | None:
    """Training records from the synthetic settings or the JSONL lines; None when a file is missing or not JSONL."""
    syn = cfg.data.synthetic
    if syn.enabled:
        return syn.users * syn.train_per_user
    total = 0
    for name in cfg.data.train_files:
        path = root / name
        if path.suffix != ".jsonl" or not path.is_file():
            return None
        total += sum(1 for line in path.open() if line.strip())
    return total


def parameters(cfg: RunConfig, root: Path) -> float | None:
    """Approximate parameter count from the model's config (12 L H^2 + V H)."""
    conf: dict[str, Any] | None = cfg.model.config
    if conf is None and cfg.model.name_or_path and (root / cfg.model.name_or_path / "config.json").is_file():
        conf = json.loads((root / cfg.model.name_or_path / "config.json").read_text())
    if not conf or "hidden_size" not in conf:
        return None
    h, layers = conf["hidden_size"], conf.get("num_hidden_layers", 1)
    return 12 * layers * h * h + conf.get("vocab_size", cfg.model.tokenizer_vocab_size) * h


@dataclass(frozen=True)
class Measured:
    """A median step time of finished cells, and what it was measured on."""

    seconds: float | None  # None: no finished cell ran on this device (the estimate falls back)
    source: str


def measured_step_seconds(spec: SweepSpec, cells: list[Cell], root: Path, device: str | None = None) -> Measured:
    """The median step time of the finished cells that ran on `device` (default: this machine's)."""
    from perce_ds.distributed import device_label  # torch: only here, not for the rest of a dry run

    device = device or device_label()
    times: dict[str | None, list[float]] = {}
    for c in cells:
        d = committed_dir(spec, c, root)
        ran_on = read_json(d / "summary.json").get("device") if (d / "summary.json").is_file() else None
        times.setdefault(ran_on, []).extend(
            r["step_time_s"] for r in read_jsonl(d / "metrics.jsonl") if r.get("step_time_s")
        )
    times = {k: v for k, v in times.items() if v}
    if device in times:
        return Measured(statistics.median(times[device]), f"measured on {device}")
    if None in times:
        return Measured(statistics.median(times[None]), "measured, device not recorded")
    others = ", ".join(f"{statistics.median(v):.2f} s on {k}" for k, v in sorted(times.items()))
    return Measured(None, f"finished cells: {others}; none on {device}" if others else "")


def estimate(
    spec: SweepSpec, cell: Cell, root: Path, measured: Measured, retrain_to: int | None = None
) -> dict[str, Any]:
    """{steps, evals, step_seconds, source, seconds} of one cell (seconds include the process start-up and
    model load, `cost.startup_seconds`); `retrain_to`: a retrain's stop step (its first run's best)."""
    cfg = cell_config(spec, cell, root)
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * spec.num_gpus
    records = train_records(cfg, root)
    steps = t.max_steps or (t.epochs * (records // global_batch) if records is not None else None)
    if retrain_to is not None:
        steps = retrain_to if steps is None else min(steps, retrain_to)
        evals = 1  # a retrain evaluates at its stop step only (run_cell)
    else:
        evals = (max((steps or 0) - 1, 0) // t.eval_every if t.eval_every else 0) + 1  # + the final one
    if measured.seconds is not None:
        step_s, source = measured.seconds, measured.source
    elif spec.step_seconds is not None:
        step_s, source = float(spec.step_seconds), "recipe cost.step_seconds"
    else:
        n = parameters(cfg, root)
        step_s = DEFAULT_STEP_S_PER_100M * (n or 1.35e8) / 1e8
        source = "default per model size" if n else "default (model size unknown: SmolLM2-135M's)"
    if measured.seconds is None and measured.source:
        source += f"; {measured.source}"
    return {"steps": steps, "evals": evals, "step_seconds": step_s, "source": source,
            "seconds": spec.startup_seconds + (steps or 0) * step_s + evals * spec.eval_seconds}  # fmt: skip


def human(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"
