"""The one logger ("perce_ds", rank 0 only) and the per-step metrics sink (JSONL + tensorboard / wandb)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("perce_ds")


def setup_logging(is_rank0: bool, log_file: Path | None = None) -> None:
    """Console (and file) logging on rank 0; other ranks log warnings and errors only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_rank0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s [perce_ds] %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_rank0 and log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        log.addHandler(file_handler)


def log_to_files_only(message: str, exc: BaseException) -> None:
    """`message` with `exc`'s traceback into the log files (train.log), not onto the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), (type(exc), exc, exc.__traceback__))
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


METRICS_FILES = {"train": "metrics.jsonl", "eval": "eval_metrics.jsonl"}
REPORTERS = ("tensorboard", "wandb")  # train.report_to
WANDB_ID_FILE = "wandb_run_id"


class WandbRun:
    """A Weights & Biases run for one run directory (rank 0 only).

    Named after the run directory, with the resolved config; its id is kept in <run>/wandb_run_id so a resumed
    run continues the same wandb run, while a fresh start gets a new one. Files go to <run>/wandb/; set
    WANDB_MODE=offline on nodes without network (`wandb sync` later), WANDB_PROJECT to pick the project
    (default perce-ds). Steps a resumed run replays (logged after its checkpoint) are dropped by wandb, which
    keeps the first value of each step."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], resuming: bool):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "perce-ds"), name=run_name, id=run_id, dir=str(run_dir),
            config=config, resume="allow",
        )  # fmt: skip
        self.id = run_id

    def log(self, split: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


class MetricsLogger:
    """Appends one JSON object per logged step to <run>/metrics.jsonl (training steps) or
    <run>/eval_metrics.jsonl (evaluations), and mirrors it to tensorboard and/or wandb under train/ or eval/."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, wandb_run: WandbRun | None = None):
        self.enabled = enabled
        self.paths = {split: run_dir / name for split, name in METRICS_FILES.items()}
        self.writer = None
        self.wandb = wandb_run if enabled else None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], every: int = 1, split: str = "train") -> None:
        if not self.enabled or step % every:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.paths[split].open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"{split}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(split, step, scalars)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
        log.info("%s %d: %s", "step" if split == "train" else "eval at step", step, shown)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` in every file (a resumed run logs those steps again)."""
        if not self.enabled:
            return
        for path in self.paths.values():
            if path.exists():
                lines = path.read_text().splitlines()
                kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))

    def close(self, exit_code: int = 0) -> None:
        """Flush and close every sink (idempotent); a non-zero exit_code marks the wandb run failed."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.close(exit_code)
            self.wandb = None


def metrics_logger(cfg: Any, enabled: bool, resuming: bool, wandb: bool = True) -> MetricsLogger:
    """The run's MetricsLogger with the sinks train.report_to names (enabled on rank 0 only; `wandb=False` for
    jobs that only read the run, such as the offline E-step, so they neither open a wandb run nor touch its id)."""
    report_to = cfg.train.report_to
    wandb_run = None
    if enabled and wandb and "wandb" in report_to:
        wandb_run = WandbRun(cfg.run_dir, cfg.run_dir.name, cfg.to_dict(), resuming)
    return MetricsLogger(cfg.run_dir, enabled, "tensorboard" in report_to, wandb_run)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl, or eval_metrics.jsonl with split="eval" (none when the file is missing)."""
    path = Path(run_dir) / METRICS_FILES[split]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
