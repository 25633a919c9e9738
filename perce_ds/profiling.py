"""Named phases of a training step, for profilers and benchmarks.

`phase(name)` marks a region of the step: always a `torch.profiler.record_function` range ("perce/<name>",
free unless a profiler records), and, while a PhaseTimer is installed with `timing(timer)`, wall time charged
to that timer. The package marks the ablated and conditioned passes, the log-prob head and its backward,
backward, the optimizer step and the offline-weight lookup, so benchmarks/step_cost.py reads a breakdown
without replacing anything inside perce_ds.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch


class PhaseTimer:
    """Accumulates wall time per phase; a phase inside another is charged to '<outer phase>/<inner>'."""

    def __init__(self, sync: Callable[[], None] = lambda: None):
        self.sync = sync  # e.g. torch.cuda.synchronize: GPU work must finish inside the phase that queued it
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        key = f"{self.stack[0]}/{name}" if self.stack else name
        self.stack.append(name)
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[key] += time.perf_counter() - t0
            self.stack.pop()


# One process-wide timer, not a context variable: autograd runs CUDA backward functions on its own threads.
_timer: PhaseTimer | None = None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark one phase of the step (see the module docstring)."""
    with torch.profiler.record_function(f"perce/{name}"):
        if _timer is None:
            yield
        else:
            with _timer.phase(name):
                yield


@contextlib.contextmanager
def timing(timer: PhaseTimer) -> Iterator[PhaseTimer]:
    """Charge every phase to `timer` inside this block."""
    global _timer
    previous, _timer = _timer, timer
    try:
        yield timer
    finally:
        _timer = previous
