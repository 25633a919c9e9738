"""Keep the model of the best evaluation: `train.keep_best: <metric>` (perce_ds/engine.py calls it).

Whenever the metric improves (strictly: lower for `keep_best_mode: min`, higher for `max`), the model is exported
to `<run>/hf_best/` (a Hugging Face folder in the run's dtype, the same export as `hf/`) and `<run>/best.json`
records `{step, metric, mode, value}`. The export goes to `hf_best.tmp/` first and is renamed after it is complete,
so a kill leaves either the previous best or the new one, never half a folder. A resumed run continues from the
recorded best (the evaluations it replays give the same values, so they do not count as improvements); a fresh
start forgets a stale one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from perce_ds.errors import UserError

log = logging.getLogger("perce_ds")
BEST_DIR, BEST_FILE = "hf_best", "best.json"


class KeepBest:
    """Tracks the best value of one evaluation metric of a run; `improves` says when to export."""

    def __init__(self, run_dir: Path, metric: str, mode: str, resuming: bool):
        self.run_dir, self.metric, self.mode = run_dir, metric, mode
        self.value: float | None = None
        recorded = run_dir / BEST_FILE
        if metric and resuming and recorded.is_file() and (run_dir / BEST_DIR / "config.json").is_file():
            state = json.loads(recorded.read_text())
            if state.get("metric") == metric and state.get("mode") == mode:
                self.value = float(state["value"])

    def improves(self, evaluation: dict[str, Any]) -> bool:
        """True when `evaluation` (the same dict on every rank) beats the best so far; False when off or empty."""
        if not self.metric or not evaluation:
            return False
        if self.metric not in evaluation:
            raise UserError(
                f"train.keep_best={self.metric!r}: the evaluation has no such metric; it has "
                f"{sorted(k for k, v in evaluation.items() if isinstance(v, (int, float)))}"
            )
        value = evaluation[self.metric]
        if value is None:
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def commit(self, step: int, evaluation: dict[str, Any], exported: Path) -> None:
        """Rank 0, after `exported` (the hf_best.tmp folder) is complete: make it hf_best/ and record best.json."""
        self.value = float(evaluation[self.metric])
        final = self.run_dir / BEST_DIR
        if final.exists():
            shutil.rmtree(final)
        exported.rename(final)
        state = {"step": step, "metric": self.metric, "mode": self.mode, "value": self.value}
        tmp = self.run_dir / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run_dir / BEST_FILE)
        log.info("best %s so far (%.4g) at step %d: exported %s", self.metric, self.value, step, final)
