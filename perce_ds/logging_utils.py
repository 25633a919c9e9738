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


class MetricsLogger:
    """Appends one JSON object per logged step to <run>/metrics.jsonl and mirrors it to tensorboard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any], every: int = 1) -> None:
        if not self.enabled or step % every:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step" and isinstance(v, float))
        log.info("step %d: %s", step, shown)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (a resumed run logs those steps again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [
            line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(row + "\n" for row in rows))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl (for tests, reports and plots)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
