"""LoRA adapters (peft) on the model the engine trains under ZeRO-3.

The HF model is built as for full fine-tuning (inside zero.Init); `add_adapters` then freezes it and
injects peft's LoRA layers in place, so `PerceLM` wraps the same HF model object and both PerCE passes
run through the adapted weights (self-contrast: no adapter toggling, no second copy). The new adapter
tensors are ordinary ones until deepspeed.initialize partitions them (broadcast from rank 0), and only
they (requires_grad) reach the optimizer. Exports: `merged_state_dict` (W + (alpha / r) B A, an HF
folder anything can load) and `save_adapter` (peft's own adapter folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from perce_ds.best import adapter_dir
from perce_ds.checkpoint import export_hf, gather_module_state
from perce_ds.config import ConfigError, LoraConfig
from perce_ds.export_check import expected_state

log = logging.getLogger("perce_ds")
ADAPTER = "default"  # peft's adapter name; one adapter per run
ADAPTER_CONFIG = "adapter_config.json"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs peft, which is not installed: pip install -e '.[lora]'") from None
    return peft


def peft_config(cfg: LoraConfig) -> Any:
    """peft's LoraConfig for `model.lora` (no bias training: checkpoints then hold the adapters only)."""
    return _peft().LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
        modules_to_save=list(cfg.modules_to_save) or None, bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip


def _check_adapter_folder(cfg: LoraConfig) -> Path:
    """model.lora.adapter must be a peft folder whose adapter matches model.lora (shapes and scaling)."""
    folder = Path(cfg.adapter)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise ConfigError(f"model.lora.adapter={folder}: no {ADAPTER_CONFIG} there (point at a run's hf_adapter/)")
    saved = json.loads(path.read_text())
    wanted = {"r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": sorted(cfg.target_modules), "modules_to_save": sorted(cfg.modules_to_save)}  # fmt: skip
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "lora_dropout": saved.get("lora_dropout"),
             "target_modules": sorted(saved.get("target_modules") or []),
             "modules_to_save": sorted(saved.get("modules_to_save") or [])}  # fmt: skip
    differ = [k for k in wanted if wanted[k] != found[k]]
    if differ:
        raise ConfigError(
            f"model.lora.adapter={folder}: its {ADAPTER_CONFIG} has "
            + ", ".join(f"{k}={found[k]!r}" for k in differ)
            + " but model.lora has "
            + ", ".join(f"{k}={wanted[k]!r}" for k in differ)
            + ": set model.lora to the adapter's settings (adapter_settings() reads them)"
        )
    return folder


def adapter_settings(folder: Path) -> list[str]:
    """Config overrides that reproduce a saved adapter: its base model and its `model.lora` (for launch/ scripts)."""
    path = Path(folder) / ADAPTER_CONFIG
    saved = json.loads(path.read_text())
    base = saved.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{path}: base_model_name_or_path is empty; cannot tell which model the adapter belongs to")
    targets = saved.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return [f"model.name_or_path={base}", "model.config=null", f"model.lora.r={saved['r']}",
            f"model.lora.alpha={saved['lora_alpha']}", f"model.lora.dropout={saved.get('lora_dropout', 0.0)}",
            f"model.lora.target_modules={json.dumps(targets)}",
            f"model.lora.modules_to_save={json.dumps(sorted(saved.get('modules_to_save') or []))}",
            f"model.lora.adapter={folder}"]  # fmt: skip


def add_adapters(lm: nn.Module, cfg: LoraConfig) -> Any:
    """Freeze `lm` and inject LoRA layers into it in place (before deepspeed.initialize); returns the PeftModel
    around it (keep it for `save_adapter`). `lm` itself, now adapted, is what PerceLM wraps."""
    peft = _peft()
    tied = getattr(lm.config, "tie_word_embeddings", False)
    if tied and any(m in ("lm_head", "embed_tokens") for m in cfg.modules_to_save):
        raise ConfigError(
            "model.lora.modules_to_save trains the output or input embedding of a model whose embeddings are tied "
            "(tie_word_embeddings): the two would part. Remove it from modules_to_save"
        )
    try:
        # Adapters in the base model's dtype (peft would make them fp32): DeepSpeed keeps its own fp32 master copy.
        model = peft.get_peft_model(lm, peft_config(cfg), adapter_name=ADAPTER, autocast_adapter_dtype=False)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules={cfg.target_modules}: {e}") from None
    if _is_lora_layer(lm.get_output_embeddings()):
        raise ConfigError(
            f"model.lora.target_modules={cfg.target_modules} adapts the output embedding: the chunked log-prob head "
            "reads its weight directly and would miss the adapter. Drop it from target_modules (or, for a model "
            "without tied embeddings, train it in full with model.lora.modules_to_save)"
        )
    not_linear = sorted({type(m).__name__ for m in lm.modules() if _is_lora_layer(m) and not _is_lora_linear(m)})
    if not_linear:
        raise ConfigError(
            f"model.lora.target_modules={cfg.target_modules} adapts {not_linear} layers; only linear layers are "
            "supported (train other modules in full with model.lora.modules_to_save)"
        )
    if cfg.adapter is not None:
        folder = _check_adapter_folder(cfg)
        weights = peft.utils.load_peft_weights(str(folder), device="cpu")
        result = peft.set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"model.lora.adapter={folder}: tensors that fit no module: {result.unexpected_keys[:5]}")
        log.info("LoRA adapter loaded from %s", folder)
    trainable, total = count_parameters(lm)
    log.info("LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.3f%%)", cfg.r, cfg.alpha,
             cfg.target_modules, trainable, total, 100.0 * trainable / max(1, total))  # fmt: skip
    return model


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def _is_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora import Linear

    return isinstance(module, Linear)


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full size in ds_numel


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, full sizes also under ZeRO-3."""
    params = list(module.parameters())
    return sum(_numel(p) for p in params if p.requires_grad), sum(_numel(p) for p in params)


def merged_state_dict(lm: nn.Module, rank0: bool) -> dict[str, torch.Tensor]:
    """The adapted model's weights under the base model's names, W + peft's delta for every LoRA layer and the
    trained copy of every modules_to_save module, on rank 0's CPU (gathered one module at a time; a collective).
    """
    import deepspeed
    from peft.utils import ModulesToSaveWrapper

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    done: list[str] = []  # prefixes of modules already exported whole
    for name, module in lm.named_modules():
        if any(name.startswith(p) for p in done):
            continue
        if _is_lora_linear(module):
            base = module.get_base_layer()
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                if rank0:
                    merged = base.weight.detach() + module.get_delta_weight(ADAPTER).to(base.weight.dtype)
                    state[f"{name}.weight"] = merged.cpu().clone()
                    if base.bias is not None:
                        state[f"{name}.bias"] = base.bias.detach().cpu().clone()
            done.append(name + ".")
        elif isinstance(module, ModulesToSaveWrapper):  # the trained copy, under the original's names
            for sub, part in module.modules_to_save[ADAPTER].named_modules():
                gather_module_state(part, f"{name}.{sub}" if sub else name, rank0, state, seen)
            done.append(name + ".")
        else:
            gather_module_state(module, name, rank0, state, seen)
    return state


def save_adapter(peft_model: Any, out_dir: Path, rank0: bool) -> None:
    """peft's adapter folder (adapter_config.json + adapter_model.safetensors) from the trainable tensors only,
    gathered under ZeRO-3 (a collective: every rank calls it). Loads with PeftModel.from_pretrained(base, out_dir).
    """
    import deepspeed

    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        state = {n: p.detach().cpu().clone() for n, p in trainable} if rank0 else {}
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out_dir), state_dict=state, save_embedding_layers=False)
    if dist.is_initialized():
        dist.barrier()


def base_model_state(lm: nn.Module) -> tuple[dict[str, tuple[int, ...]], str]:
    """export_check.expected_state of the model an adapted `lm` merges into: peft's names mapped back (a LoRA
    layer's base_layer and a modules_to_save module's trained copy under the original's name), adapters left out."""

    def base(name: str) -> str:
        return name.replace(".base_layer.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")

    shapes, embedding = expected_state(lm)
    kept = {base(n): s for n, s in shapes.items() if ".lora_" not in n and ".original_module." not in n}
    return kept, base(embedding)


def export_model(peft_model: Any, lm: nn.Module, tokenizer: Any, out_dir: Path, rank0: bool, card: str) -> None:
    """The trained model as a Hugging Face folder (a collective): plain (`peft_model` None) as checkpoint.export_hf;
    adapted: the merged model in `out_dir` and the adapter alone beside it (best.adapter_dir: hf/ -> hf_adapter/;
    the keep-best export's staged hf_best.tmp/ -> hf_best_adapter.tmp/)."""
    if peft_model is None:
        export_hf(lm, tokenizer, out_dir, rank0, card)
        return
    export_hf(lm, tokenizer, out_dir, rank0, card, merged_state_dict(lm, rank0), base_model_state(lm))
    save_adapter(peft_model, adapter_dir(out_dir), rank0)
