"""Stop cleanly when the cluster asks: SIGUSR1/SIGTERM or a wall-time budget.

SLURM sends SIGUSR1 (``#SBATCH --signal=USR1@T``) some seconds before the time limit and SIGTERM
on preemption. The handler only records the request; the training loop finishes the step it is
in, all ranks agree (any rank's request stops all of them), a checkpoint is written, and the
process exits with REQUEUE_EXIT_CODE, which the sbatch script turns into ``scontrol requeue``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("perce_ds")

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"


class StopRequest:
    """Records a stop request from a signal or from the wall-time budget."""

    def __init__(self, max_wall_time_s: float = 0.0, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.started = time.monotonic()
        self.max_wall_time_s = max_wall_time_s
        self.reason: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only set a flag: collectives and file writes are not safe inside a signal handler.
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        """True once a signal arrived or the wall-time budget is spent (local to this rank)."""
        if self.reason is None and self.max_wall_time_s and time.monotonic() - self.started > self.max_wall_time_s:
            self.reason = f"train.max_wall_time={self.max_wall_time_s:g}s reached"
        return self.reason is not None
