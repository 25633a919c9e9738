"""Keep the model of the best evaluation: `train.keep_best: <metric>` (perce_ds/engine.py calls it).

Whenever the metric improves (strictly: lower for `keep_best_mode: min`, higher for `max`), the model is exported
to `<run>/hf_best/` (a Hugging Face folder in the run's dtype, the same export as `hf/`) and `<run>/best.json`
records `{step, metric, mode, value}`. The export goes to `hf_best.tmp/` first (a LoRA run's adapter to
`hf_best_adapter.tmp/` beside it) and both are renamed after both are complete, each over its predecessor without
deleting it first, so a kill leaves whole folders (the previous best or the new one), never half of one; best.json
is written last. A resumed run continues from the
recorded best (the evaluations it replays give the same values, so they do not count as improvements); a fresh
start forgets a stale one.

Every rank keeps the same record (`update`, called by all of them with the same all-reduced evaluation): whether to
export is a collective decision, so a rank that only heard of its own improvements would enter the export's
all-gather alone at the first evaluation that does not improve, and the job would hang. Only rank 0 moves folders
and writes best.json (`commit`).

`train.keep_best_patience` N > 0 is early stopping: `patience_spent(step)` is true once N x eval_every steps have
passed since the best, i.e. at the N-th evaluation in a row that did not improve. It reads only the recorded best
step, so a resumed run stops where the uninterrupted one would have.
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

    def __init__(self, run_dir: Path, metric: str, mode: str, resuming: bool, patience: int = 0, eval_every: int = 0):
        self.run_dir, self.metric, self.mode = run_dir, metric, mode
        self.patience_steps = patience * eval_every  # 0: no early stopping
        self.value: float | None = None
        self.step: int | None = None
        recorded = run_dir / BEST_FILE
        if metric and resuming and recorded.is_file() and (run_dir / BEST_DIR / "config.json").is_file():
            state = json.loads(recorded.read_text())
            if state.get("metric") == metric and state.get("mode") == mode:
                self.value, self.step = float(state["value"]), int(state["step"])

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

    def update(self, step: int, evaluation: dict[str, Any]) -> bool:
        """Every rank, with the same evaluation: record it as the best and return True when it `improves`."""
        if not self.improves(evaluation):
            return False
        self.value, self.step = float(evaluation[self.metric]), step
        return True

    def patience_spent(self, step: int) -> bool:
        """Early stopping: the metric has not improved for train.keep_best_patience evaluations (never when off)."""
        return bool(self.patience_steps) and self.step is not None and step - self.step >= self.patience_steps

    def commit(self, exported: Path) -> None:
        """Rank 0, after `update` and once `exported` (the hf_best.tmp folder) is complete: make it hf_best/ and
        record best.json."""
        final = self.run_dir / BEST_DIR
        staged_adapter = adapter_dir(exported)
        if staged_adapter.is_dir():  # the adapter first: the model folder's rename is the last before best.json
            _replace_dir(staged_adapter, adapter_dir(final))
        _replace_dir(exported, final)
        state = {"step": self.step, "metric": self.metric, "mode": self.mode, "value": self.value}
        tmp = self.run_dir / (BEST_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run_dir / BEST_FILE)
        log.info("best %s so far (%.4g) at step %d: exported %s", self.metric, self.value, self.step, final)


def adapter_dir(model_dir: Path) -> Path:
    """Where an adapted run's adapter goes beside its merged model: hf/ -> hf_adapter/, hf_best/ ->
    hf_best_adapter/, and a staged hf_best.tmp/ -> hf_best_adapter.tmp/ (renamed with it by KeepBest.commit)."""
    stem, dot, suffix = model_dir.name.partition(".")
    return model_dir.with_name(f"{stem}_adapter{dot}{suffix}")


def _replace_dir(src: Path, dest: Path) -> None:
    """Put the complete folder `src` at `dest`: the old one is renamed aside (not deleted) first, so there is no
    moment without a whole `dest` longer than one rename."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():  # left by a kill during an earlier replace
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    src.rename(dest)
    if old.exists():
        shutil.rmtree(old)
