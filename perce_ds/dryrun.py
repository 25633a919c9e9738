"""Size a job before submitting it: batch arithmetic, token counts and ZeRO-3 memory per GPU.

Runs on a login node (no GPU, no process group): resolves the recipe and the DeepSpeed config for a
given world size, tokenises the data, counts parameters on the meta device, and asks DeepSpeed's
own estimator for model-state memory with and without offload.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from perce_ds.config import LoraConfig, RunConfig
from perce_ds.data.pipeline import prepare_data
from perce_ds.ds_config import load_ds_config, resolve_ds_config
from perce_ds.model import resolve_dtype

log = logging.getLogger("perce_ds")
GiB = 1024**3


def _architecture(cfg: RunConfig, tokenizer: Any) -> Any | None:
    from transformers import AutoConfig

    if cfg.model.config is not None:
        arch = dict(cfg.model.config)
        arch.setdefault("vocab_size", len(tokenizer))
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    try:
        return AutoConfig.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError) as e:
        log.warning("model config of %s not available here (%s): memory estimate skipped", cfg.model.name_or_path, e)
        return None


def count_parameters(arch: Any, lora_cfg: LoraConfig | None = None) -> tuple[int, int, int]:
    """(total parameters, parameters of the largest single module, trainable parameters) without allocating
    weights; with `lora_cfg` the adapters are added (on the meta device too) and only they are trainable."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
        if lora_cfg is not None:
            from perce_ds.lora import add_adapters

            add_adapters(model, lora_cfg)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_model_states_mem(
    frozen: int, trainable: int, largest: int, gpus_per_node: int, nodes: int, offload_opt: bool, offload_params: bool
) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes) of ZeRO-3 model states when only `trainable` parameters train: DeepSpeed's
    estimate_zero3_model_states_mem_needs (zero_init, buffer factor 1.5) with its 18 bytes per parameter (16-bit
    weight and gradient, fp32 master weight, Adam's two moments) kept for the trainable ones and 2 bytes (the
    16-bit weight alone: no gradient, no optimizer state) for the frozen ones."""
    gpus, buffer = gpus_per_node * nodes, 1.5
    gathered = 4 * largest
    if offload_opt and offload_params:
        return int((2 * frozen + 18 * trainable) / nodes * buffer), gathered
    if offload_opt:
        return int(16 * trainable / nodes * buffer), gathered + int(2 * (frozen + trainable) / gpus)
    return int(largest * 4 * gpus_per_node * buffer), gathered + int((2 * frozen + 18 * trainable) / gpus)


def dry_run(cfg: RunConfig, ds_config_path: str | Path, world_size: int, gpus_per_node: int) -> dict[str, Any]:
    """Everything a user needs to size a job, as a dict (also printed by launch/train.py --dry-run)."""
    data = prepare_data(cfg, is_rank0=True, barrier=lambda: None)
    train = data.train
    arch = _architecture(cfg, data.tokenizer)
    hidden = int(getattr(arch, "hidden_size", 1024)) if arch is not None else 1024
    dtype = torch.bfloat16 if cfg.model.dtype in ("auto", "bf16") else resolve_dtype(cfg.model.dtype)
    ds = resolve_ds_config(load_ds_config(ds_config_path), cfg, world_size, hidden, dtype)
    global_batch = ds["train_batch_size"]
    steps_per_epoch = len(train) // global_batch
    cond = sum(len(e.cond_prompt_ids) + len(e.response_ids) for e in train) / max(1, len(train))
    abl = sum(len(e.abl_prompt_ids) + len(e.response_ids) for e in train) / max(1, len(train))
    resp = sum(len(e.response_ids) for e in train) / max(1, len(train))
    report: dict[str, Any] = {
        "world_size": world_size,
        "global_batch": global_batch,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "train_records": len(train),
        "eval_records": len(data.eval),
        "records_skipped": {k: len(v.skipped) for k, v in data.reports.items()},
        "steps_per_epoch": steps_per_epoch,
        "total_steps": cfg.train.max_steps or steps_per_epoch * cfg.train.epochs,
        "tokens_per_step": {
            "conditioned": round(cond * global_batch),
            "ablated": round(abl * global_batch) if cfg.loss.weights_from is None else 0,
            "response": round(resp * global_batch),
        },
        "zero_stage": ds.get("zero_optimization", {}).get("stage", 0),
    }
    if arch is not None:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        total, largest, trainable = count_parameters(arch, cfg.model.lora)
        nodes = max(1, world_size // gpus_per_node)
        per_gpu = {}
        for name, off_opt, off_par in (("no_offload", False, False), ("offload_opt", True, False),
                                       ("offload_opt_params", True, True)):  # fmt: skip
            if cfg.model.lora is not None:
                cpu, gpu = lora_model_states_mem(total - trainable, trainable, largest,
                                                 min(gpus_per_node, world_size), nodes, off_opt, off_par)  # fmt: skip
            else:
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total, largest, num_gpus_per_node=min(gpus_per_node, world_size), num_nodes=nodes,
                    cpu_offload=off_opt, cpu_offload_params=off_par, zero_init=True,
                )  # fmt: skip
            per_gpu[name] = {"gpu_GiB": round(gpu / GiB, 2), "cpu_per_node_GiB": round(cpu / GiB, 2)}
        report["parameters"] = total
        report["trainable_parameters"] = trainable
        report["largest_module_parameters"] = largest
        report["zero3_model_states_memory"] = per_gpu
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'world size':<44}{report['world_size']}",
             f"{'global batch':<44}{report['global_batch']} (micro {report['micro_batch_size']} x accum {report['grad_accum']} x ranks)",
             f"{'train / eval records':<44}{report['train_records']} / {report['eval_records']} (skipped {report['records_skipped']})",
             f"{'steps per epoch / total':<44}{report['steps_per_epoch']} / {report['total_steps']}"]  # fmt: skip
    for kind, n in report["tokens_per_step"].items():
        lines.append(f"{'tokens per step, ' + kind:<44}{n:,}")
    if "parameters" in report:
        lines.append(f"{'parameters':<44}{report['parameters'] / 1e9:.3f} B")
        if report["trainable_parameters"] != report["parameters"]:
            lines.append(f"{'trainable parameters (LoRA)':<44}{report['trainable_parameters'] / 1e6:.2f} M")
        for name, mem in report["zero3_model_states_memory"].items():
            lines.append(
                f"{'model states/GPU, ' + name:<44}{mem['gpu_GiB']} GiB GPU, {mem['cpu_per_node_GiB']} GiB CPU per node"
            )
        lines.append("(model states only: add activations, the logits chunk and framework overhead)")
    return "\n".join(lines)
