"""Process-group facts from whichever launcher started us (deepspeed, torchrun, or plain srun)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, NoReturn

import torch


def apply_slurm_env() -> None:
    """Under `srun` with one task per GPU there is no launcher: derive the torch.distributed
    variables from SLURM's (MASTER_ADDR/MASTER_PORT come from the sbatch script)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "MASTER_ADDR" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    os.environ.setdefault("MASTER_PORT", "29500")


# Set by launchers that start several tasks without torch's variables (DeepSpeed discovers those through MPI).
MULTI_TASK_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apply_single_process_env() -> bool:
    """No launcher at all (`python launch/train.py` on a laptop, in a debugger or a notebook): make this process
    rank 0 of a world of 1 on a free loopback port. Without it DeepSpeed falls back to MPI discovery and dies
    on a missing mpi4py. Returns whether it did; a partial set of launcher variables is left to the launcher."""
    if any(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return False
    if any(int(os.environ.get(k) or "1") > 1 for k in MULTI_TASK_VARS):  # mpirun / srun tasks: not alone
        return False
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    return True


def init_process_group(timeout_s: int) -> None:
    """Join the launcher's process group through DeepSpeed (nccl on GPU, gloo on CPU), after deriving the
    launcher variables under a bare `srun` (or, with no launcher at all, for one process) and pinning this
    rank's GPU (LOCAL_RANK).

    On CPU, DeepSpeed also JIT-builds a shared-memory all-reduce op and maps a ~67 MB segment per rank in
    /dev/shm that it never unlinks. The op serves only tensor-parallel inference (`inference_all_reduce`),
    which this recipe never calls, while the segments outlive every run: a few hundred launches fill a
    RAM-backed tmpfs and later launches hang. So the op is turned off here and gloo does all the work.
    """
    import deepspeed
    import deepspeed.ops

    apply_slurm_env()
    apply_single_process_env()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group together: a rank exiting while gloo/shm threads still serve the group can
    abort in C++ teardown ("terminate called without an active exception") and turn a success into an error."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a distributed entry point (after shutdown()) without interpreter teardown.

    A gloo worker thread releases a finished collective's tensors after the waiting rank has already moved on; a
    tensor Python dropped first needs the GIL to be freed, and a thread asking for the GIL during Py_Finalize is
    ended by pthread_exit, which std::terminate()s inside gloo's noexcept frames: SIGABRT, "terminate called without
    an active exception", after all the work succeeded (a core dump showed exactly that; the 2-rank recipe_vs_plain
    smoke aborted so in 4 of 46 runs, and still after barrier + destroy_process_group: DeepSpeed keeps its groups
    alive). os._exit skips the teardown; everything a run writes is closed before, and stdio is flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to lose
            stream.flush()
    os._exit(code)


def local_device() -> torch.device:
    """This rank's device: its GPU (pinned by init_process_group), else the CPU. Collectives go through it: nccl
    has no CPU tensors."""
    return torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")


def device_label() -> str:
    """What this process computes on, in words ("NVIDIA H200", "cpu (2 cores)"): recorded with a run's timings, so
    that a step time measured on one kind of machine is not taken for another's (the sweep's --dry-run)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu ({os.cpu_count()} cores)"


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum `values` over all ranks (through `device`: nccl needs CUDA tensors); the result on the CPU."""
    import torch.distributed as dist

    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (so all ranks leave a loop together)."""
    return bool(all_reduce_sum(torch.tensor([float(flag)]), device).item() > 0)


def skip_micro_step(engine: Any) -> None:
    """Count a micro-step that ran no backward; at the accumulation boundary, drop the window's gradients.

    DeepSpeed has no public "discard accumulated gradients" for bf16/fp32 (its skip path exists only for fp16
    overflow), so this calls the same cleanup that path uses and advances the engine's counters as a skipped
    step would: the one place that touches DeepSpeed's private state.
    """
    if not engine.is_gradient_accumulation_boundary():
        engine.step()
        return
    opt = engine.optimizer
    if hasattr(opt, "_overflow_clean_up"):
        opt._overflow_clean_up(getattr(opt, "loss_scale", 1.0))
    else:
        opt.zero_grad(set_to_none=True)
    engine.micro_steps += 1
    engine.skipped_steps += 1
