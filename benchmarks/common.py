"""Helpers shared by the benchmark scripts: process memory from /proc, tables, machine facts, launching."""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 peak of known accelerators (FLOP/s), for model FLOPs utilisation.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


# ---------------------------------------------------------------- process memory (Linux /proc)
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (VmRSS), or None off Linux."""
    return _status_kb("VmRSS")


def peak_rss_bytes() -> int | None:
    """High-water mark of the resident set size (VmHWM) since start or the last `reset_peak_rss()`."""
    return _status_kb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- facts about the run
def git_commit() -> str:
    """Short HEAD commit, with '+dirty' when the working tree has changes (never changes git state)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return head + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """CPU count, load, accelerator, library versions: what a reader needs to judge a number."""
    import torch

    info: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host_cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
    }
    try:
        import deepspeed
        import transformers

        info["deepspeed"] = deepspeed.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s for a device name, or `override_tflops` (TFLOP/s) when given."""
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


# ---------------------------------------------------------------- output
def fmt_value(x: Any, spec: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if spec == "bytes":
        return f"{x / 2**20:,.1f} MiB"
    if spec == "pct":
        return f"{100 * x:.1f}%"
    if isinstance(x, float):
        return f"{x:{spec or '.4g'}}"
    return str(x)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; columns are (key, header, format spec: '' | 'bytes' | 'pct' | a float spec)."""
    cells = [[header for _, header, _ in columns]]
    cells += [[fmt_value(row.get(key), spec) for key, _, spec in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# ---------------------------------------------------------------- launching workers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(nproc: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for benchmark workers: unbuffered, CPU threads split over ranks (they run as `python -m`
    from the repository root, which puts the root on their import path)."""
    import torch

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(extra or {})
    return env


def launch(
    module: str, args: list[str], nproc: int, timeout: float, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` (from the repository root) as a distributed job of `nproc` ranks and fail
    loudly with its output.

    One rank runs directly with RANK/WORLD_SIZE/MASTER_* set (no launcher start-up cost); more go through
    `deepspeed --num_gpus N`, exactly as a user launches training.
    """
    port = free_port()
    if nproc == 1:
        extra = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        cmd = [sys.executable, "-m", module, *args]
        env = worker_env(1, {**extra, **(env_extra or {})})
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(port), "--module", module, *args]  # fmt: skip
        env = worker_env(nproc, env_extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-6000:]}"
        )
    return proc
