"""DeepSpeed checkpoints that survive a kill mid-save, resume discovery, and Hugging Face export.

A checkpoint is written under `checkpoints/.tmp-step_N/` and renamed to `checkpoints/step_N/` by
rank 0 only after every rank finished writing, so a directory named `step_N` is always complete;
`resume: auto` picks the highest such N. All functions that touch the engine are collectives:
call them on every rank.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from perce_ds.distributed import any_rank, local_device
from perce_ds.export_check import ExportCheckError, check_export, expected_state

log = logging.getLogger("perce_ds")
STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "perce_state.json"  # our state beside DeepSpeed's files; written last, so it marks a complete checkpoint
LM_PREFIX = "lm."  # DeepSpeed saves PerceLM's state dict: the HF model's keys under its `lm` attribute


def is_checkpoint(path: Path) -> bool:
    """True for a complete perce_ds checkpoint directory (checkpoints/step_N or a universal copy)."""
    return (path / STATE_FILE).is_file()


def write_state(path: Path, state: dict[str, Any]) -> None:
    (path / STATE_FILE).write_text(json.dumps(state, indent=2))


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def find_resume_checkpoint(ckpt_root: Path, resume: str) -> Path | None:
    """The checkpoint directory to resume from, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_root)
        return found[-1][1] if found else None
    path = Path(resume)
    if not is_checkpoint(path):
        raise FileNotFoundError(
            f"train.resume={resume}: not a complete perce_ds checkpoint (no {STATE_FILE}); "
            "point at a checkpoints/step_N directory or use auto"
        )
    return path


def resume_point(ckpt_root: Path, resume: str, world: int) -> Path | None:
    """find_resume_checkpoint, refusing one written by another world size unless it is universal."""
    path = find_resume_checkpoint(ckpt_root, resume)
    if path is None:
        return None
    state = read_state(path)
    if state.get("world_size", world) != world and not state.get("universal"):
        raise RuntimeError(
            f"{path} was written by {state['world_size']} ranks and this run has {world}. Convert it once "
            f"with `python launch/convert_checkpoint.py {path}` and resume from the universal copy "
            "(--train.resume <run>/checkpoints_universal/step_N)"
        )
    return path


def params_are_finite(module: torch.nn.Module) -> bool:
    """True when every rank's shard of every parameter is finite (ZeRO-3 shards live in ds_tensor)."""
    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p.data)).all()) for p in module.parameters())
    return not any_rank(not ok, local_device()) if dist.is_initialized() else ok


def has_frozen_parameters(module: torch.nn.Module) -> bool:
    """True for a model that trains only part of its weights (LoRA): its checkpoints leave the frozen ones out,
    which come back from the base model (model.name_or_path) when a run resumes."""
    return any(not p.requires_grad for p in module.parameters())


def save_checkpoint(engine: Any, ckpt_root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write step_N atomically (tmp dir + rename), then prune to the newest `keep_last`; frozen parameters are
    left out (has_frozen_parameters)."""
    if not params_are_finite(engine.module):
        raise RuntimeError(f"refusing to write a checkpoint at step {step}: the model has non-finite parameters")
    rank0 = engine.global_rank == 0
    final = ckpt_root / f"step_{step}"
    tmp_tag = f".tmp-step_{step}"
    if rank0 and (ckpt_root / tmp_tag).exists():
        shutil.rmtree(ckpt_root / tmp_tag)  # debris of an earlier kill
    dist.barrier()
    engine.save_checkpoint(  # our state: STATE_FILE
        str(ckpt_root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=has_frozen_parameters(engine.module)
    )
    dist.barrier()
    if rank0:
        write_state(ckpt_root / tmp_tag, state)
        if final.exists():
            shutil.rmtree(final)
        (ckpt_root / tmp_tag).rename(final)
        for _, old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_state(path: Path) -> dict[str, Any]:
    """The STATE_FILE of a checkpoint directory (step, world size, universal flag)."""
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(engine: Any, path: Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler; return the perce state saved with it. A model with frozen parameters
    (LoRA) finds only its trainable ones in the checkpoint: the frozen ones are the base model's."""
    strict = not has_frozen_parameters(engine.module)
    load_path, _client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=strict)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    return read_state(path)


def zero_partitioned(path: Path) -> bool:
    """True when DeepSpeed wrote ZeRO optimizer shards into checkpoint `path` (what the universal conversion
    reads). Without ZeRO partitioning (stage 0, ds_configs/zero0.json) everything is in one model-states file."""
    return any(path.glob("*optim_states.pt"))


def convert_to_universal(path: Path, out: Path) -> Path:
    """DeepSpeed's universal checkpoint of `path` (loadable on any number of ranks), written atomically."""
    import subprocess
    import sys

    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    subprocess.run(cmd, check=True)
    state = read_state(path) | {"universal": True, "converted_from": str(path)}
    write_state(tmp, state)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def consolidated_lm_weights(path: Path) -> dict[str, torch.Tensor]:
    """The HF model's full fp32 weights from a checkpoint written on any number of ranks (keys as the HF
    model names them)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    return {k.removeprefix(LM_PREFIX): v for k, v in state.items()}


def load_lm_weights(lm: torch.nn.Module, path: Path) -> None:
    """Copy a checkpoint's consolidated fp32 weights into `lm`'s (ZeRO-3 partitioned) parameters, written on any
    number of ranks (a collective); frozen parameters may be absent (has_frozen_parameters). DeepSpeed's
    load_module_only would look for a `latest` file, which our atomic checkpoints do not write."""
    import deepspeed

    state = consolidated_lm_weights(path)
    params = dict(lm.named_parameters(remove_duplicate=False))  # tied weights: under both names, as DeepSpeed saves
    unexpected = sorted(set(state) - set(params))
    missing = sorted(n for n, p in params.items() if n not in state and p.requires_grad)
    if unexpected or missing:
        raise RuntimeError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for name, p in params.items():
        if name in state:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank0:
                    p.copy_(state[name].to(p.dtype))


def gather_module_state(
    module: torch.nn.Module, prefix: str, rank0: bool, state: dict[str, torch.Tensor], seen: set[int]
) -> None:
    """Add `module`'s own parameters (gathered under ZeRO-3; a collective) and persistent buffers to `state` on
    rank 0's CPU, named `<prefix>.<name>`; a weight already in `seen` (tied) is stored once."""
    import deepspeed

    params = list(module.named_parameters(recurse=False))
    with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
        if rank0:
            for name, p in params:
                if id(p) not in seen:  # a tied weight: stored once, re-tied by from_pretrained
                    seen.add(id(p))
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    if rank0:
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().clone()


def _gathered_state_dict(lm: torch.nn.Module, rank0: bool) -> dict[str, torch.Tensor]:
    """Full parameters and buffers on rank 0's CPU, gathered one module at a time."""
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in lm.named_modules():
        gather_module_state(module, name, rank0, state, seen)
    return state


def export_hf(
    lm: torch.nn.Module, tokenizer: Any, out_dir: Path, rank0: bool, card: str,
    state: dict[str, torch.Tensor] | None = None, expected: tuple[dict[str, tuple[int, ...]], str] | None = None,
) -> None:  # fmt: skip
    """Write a from_pretrained-loadable folder: model.safetensors, config, tokenizer, README.md. `state` and
    `expected`: the weights to write when they are not lm's own parameters (a LoRA model's merged weights, on
    rank 0) and the tensors the folder must then hold (export_check.expected_state's form)."""
    from safetensors.torch import save_file

    state = _gathered_state_dict(lm, rank0) if state is None else state
    error = None
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"), metadata={"format": "pt"}
        )
        if not getattr(
            lm.config, "architectures", None
        ):  # set by save_pretrained, which this bypasses; loaders need it
            lm.config.architectures = [type(lm).__name__]
        lm.config.save_pretrained(str(out_dir))
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "README.md").write_text(card)
        try:  # a bad export fails here, not in the evaluation job; raised after the barrier, so no rank hangs
            check_export(out_dir, *(expected or expected_state(lm)), tokenizer_len=len(tokenizer))
        except ExportCheckError as e:
            error = e
    if dist.is_initialized():
        dist.barrier()
    if error is not None:
        raise error


def model_card(run_name: str, settings: dict[str, Any], total_steps: int, world: int) -> str:
    """README.md of an exported model: how it was trained and the whole run config (`settings`, the run config as
    a plain dict, RunConfig.to_dict(): checkpointing sits below the config layer and reads no config object)."""
    import yaml

    loss = settings["loss"]
    return (
        f"# {run_name}\n\nFine-tuned with perce_ds (PerCE, loss scheme `{loss['scheme']}`, "
        f"clip [{loss['clip_min']}, {loss['clip_max']}]) for {total_steps} steps on "
        f"{world} rank(s).\n\n## Training config\n\n```yaml\n{yaml.safe_dump(settings, sort_keys=False)}```\n"
    )
