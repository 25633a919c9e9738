"""Resolve a DeepSpeed JSON config against the run config: no "auto" ever reaches DeepSpeed.

Raw `deepspeed.initialize` mishandles "auto" (top-level values break, nested ones are silently
dropped), so every "auto" is replaced here with the value HF's integration would choose, and any
left over is an error naming its key.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from perce_ds.config import ConfigError, RunConfig

log = logging.getLogger("perce_ds")


@functools.cache
def fused_adam_needs_jit() -> bool:
    """True unless DeepSpeed was installed with its FusedAdam op prebuilt (DS_BUILD_FUSED_ADAM=1)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return True
    return not installed_ops.get("fused_adam", False)


@functools.cache
def jit_toolchain_available() -> bool:
    """A CUDA compiler DeepSpeed's JIT op builder can use: nvcc on PATH or under $CUDA_HOME."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(shutil.which("nvcc") or (cuda_home and Path(cuda_home, "bin", "nvcc").is_file()))


def load_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed {path}: no such file (see ds_configs/ for zero3.json, zero3_offload.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed {path}: not valid JSON ({e})") from None


def _fill(node: dict[str, Any], key: str, value: Any) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value


def resolve_ds_config(
    raw: dict[str, Any], cfg: RunConfig, world_size: int, hidden_size: int, dtype: torch.dtype
) -> dict[str, Any]:
    """A concrete DeepSpeed config for this run and world size."""
    ds = copy.deepcopy(raw)
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size)
    _fill(ds, "gradient_accumulation_steps", t.grad_accum)
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size)
    _fill(ds, "gradient_clipping", t.max_grad_norm)
    if ds["train_micro_batch_size_per_gpu"] != t.micro_batch_size or ds["gradient_accumulation_steps"] != t.grad_accum:
        raise ConfigError(
            "the DeepSpeed config fixes micro batch / accumulation values that differ from train.micro_batch_size="
            f'{t.micro_batch_size} / train.grad_accum={t.grad_accum}: set them to "auto" in the JSON'
        )
    for section, want in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        if section in ds or want:
            ds.setdefault(section, {})
            _fill(ds[section], "enabled", want)
            if ds[section]["enabled"] != want:
                raise ConfigError(
                    f"DeepSpeed config {section}.enabled={ds[section]['enabled']} but model dtype is {dtype}"
                )

    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    is_adam = opt.get("type", "").lower() in ("adam", "adamw")
    _fill(params, "lr", t.lr)
    _fill(params, "weight_decay", t.weight_decay)
    if is_adam:
        _fill(params, "betas", list(t.adam_betas))
        _fill(params, "eps", 1e-8)
    if is_adam and not torch.cuda.is_available():
        # FusedAdam/CPUAdam JIT-compile for a minute; on a CPU-only machine plain torch AdamW is the right tool.
        params.setdefault("torch_adam", True)
    elif is_adam and "offload_optimizer" not in ds.get("zero_optimization", {}):
        _choose_gpu_adam(params)

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    h2 = hidden_size * hidden_size
    _fill(zero, "reduce_bucket_size", h2)
    if zero.get("stage") == 3:
        _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * h2))
        _fill(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    if not torch.cuda.is_available():
        for key in ("offload_optimizer", "offload_param"):
            if key in zero:
                zero[key]["pin_memory"] = False  # pinning needs a CUDA driver
    leftover = _find_auto(ds, "")
    if leftover:
        raise ConfigError(f'DeepSpeed config still has "auto" at {leftover}: perce_ds does not know how to resolve it')
    return ds


def _choose_gpu_adam(params: dict[str, Any]) -> None:
    """On CUDA DeepSpeed's AdamW is FusedAdam, JIT-built with nvcc at start-up unless DeepSpeed was installed with
    it prebuilt. That build costs about a minute on every fresh node and can fail outright: on the lent H200
    image (nvcc 13.0, torch 2.11) DeepSpeed 0.19.8 could not parse the "9.0a" compute capability and died inside
    deepspeed.initialize. torch's AdamW (`torch_adam`, foreach kernels) needs no build and computes the same
    update, so it is the default there; a config that names torch_adam keeps its choice."""
    if not fused_adam_needs_jit() or "torch_adam" in params:
        if params.get("torch_adam") is False and fused_adam_needs_jit() and not jit_toolchain_available():
            raise ConfigError(
                "the DeepSpeed config sets optimizer.params.torch_adam=false, but DeepSpeed's FusedAdam is not "
                "prebuilt here and no nvcc is found (PATH, $CUDA_HOME) to JIT-build it: remove the key (torch's "
                "AdamW is then used), install the CUDA toolkit, or install deepspeed with DS_BUILD_FUSED_ADAM=1"
            )
        return
    params["torch_adam"] = True
    log.info("optimizer: torch.optim.AdamW (DeepSpeed's FusedAdam is not prebuilt here; its JIT build is skipped)")


def _find_auto(node: Any, prefix: str) -> str:
    if node == "auto":
        return prefix or "<root>"
    if isinstance(node, dict):
        items = [(f"{prefix}.{key}" if prefix else key, value) for key, value in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix}[{i}]", value) for i, value in enumerate(node)]
    else:
        return ""
    for where, value in items:
        hit = _find_auto(value, where)
        if hit:
            return hit
    return ""


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
