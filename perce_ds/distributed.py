"""Process-group facts from whichever launcher started us (deepspeed, torchrun, or plain srun)."""

from __future__ import annotations

import os
from datetime import timedelta

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


def init_process_group(timeout_s: int) -> None:
    """Join the launcher's process group through DeepSpeed (nccl on GPU, gloo on CPU), after deriving the
    launcher variables under a bare `srun` and pinning this rank's GPU (LOCAL_RANK).

    On CPU, DeepSpeed also JIT-builds a shared-memory all-reduce op and maps a ~67 MB segment per rank in
    /dev/shm that it never unlinks. The op serves only tensor-parallel inference (`inference_all_reduce`),
    which this recipe never calls, while the segments outlive every run: a few hundred launches fill a
    RAM-backed tmpfs and later launches hang. So the op is turned off here and gloo does all the work.
    """
    import deepspeed
    import deepspeed.ops

    apply_slurm_env()
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
