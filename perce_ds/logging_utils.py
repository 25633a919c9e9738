"""The one logger ("perce_ds", rank 0 only) and the per-step metrics sink (JSONL + tensorboard)."""

from __future__ import annotations

import json
import logging
import math
import sys
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


class MetricsLogger:
    """Appends one JSON object per logged step to <run>/metrics.jsonl (training steps) or
    <run>/eval_metrics.jsonl (evaluations), and mirrors it to tensorboard under train/ or eval/."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.paths = {split: run_dir / name for split, name in METRICS_FILES.items()}
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], every: int = 1, split: str = "train") -> None:
        if not self.enabled or step % every:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.paths[split].open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
