"""What an evaluation needs from a run directory: its config, a split's records, prompts, the model.

Prompts are built with perce_ds.data.prompts.tokenize_record and the run's own PromptSettings, so
they are byte-for-byte the prompts the model was trained on (conditioned, or persona-ablated).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from perce_ds import checkpoint
from perce_ds.config import RunConfig
from perce_ds.data import pipeline, synthetic
from perce_ds.data.pipeline import data_files
from perce_ds.data.prompts import PromptSettings, TokenizedExample, tokenize_record
from perce_ds.data.records import PersonaRecord, RecordError
from perce_ds.data.sources import load_many
from perce_ds.errors import UserError
from perce_ds.evaluation.generation import GenItem
from perce_ds.fingerprints import digest, weight_files_fingerprint
from perce_ds.model import build_causal_lm

log = logging.getLogger("perce_ds")


class EvalInputError(UserError, ValueError):
    """A run directory, split, model or generations file that cannot be evaluated; says what to do."""


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's resolved config.yaml, with its run directory pointed at `run_dir` (wherever it now lives)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise EvalInputError(f"{run_dir} is not a perce_ds run directory (no config.yaml); pass --run runs/NAME")
    cfg = RunConfig.load(path)
    cfg.train.output_dir, cfg.train.run_name = str(run_dir.parent), run_dir.name
    return cfg


def split_records(
    cfg: RunConfig,
    split: str,
    files: list[str] | None = None,
    tasks: list[str] | None = None,
    require_response: bool = True,
) -> list[PersonaRecord]:
    """Records of `split` ("test" or "eval"), or of `files` when given, restricted to `tasks`.

    The synthetic task's test split is generated on the fly (persona: same users, unseen requests;
    persona_natural: unseen users); a file-based run has no test files in its config, so `files` must name
    them. `require_response=False` also reads a prediction-only split (LaMP's test questions): its records
    have the response "".
    """
    source = getattr(cfg.data, "source", "files")
    if files:
        records, _ = load_many(list(files), require_response=require_response)
    elif source != "files" and not cfg.data.synthetic.enabled:
        records = _task_split_records(cfg, split, require_response)
    elif cfg.data.synthetic.enabled:
        records = synthetic.split_records(cfg.data.synthetic, split)
    elif split == "eval":
        if not cfg.data.eval_files:
            raise EvalInputError("the run's config has no data.eval_files: pass --data FILE ... or --split test")
        records, _ = load_many(data_files(cfg)[1])
    else:
        raise EvalInputError(
            f"split {split!r}: the run's config names no test files (only data.eval_files); "
            "pass the test split with --data FILE ... (JSONL / Parquet / save_to_disk folder)"
        )
    if tasks:
        have = sorted({r.task for r in records})
        missing = sorted(set(tasks) - set(have))
        if missing:
            raise EvalInputError(f"--tasks {missing} not in the {split} split; its tasks are {have}")
        records = [r for r in records if r.task in tasks]
    if not records:
        raise EvalInputError(f"split {split!r} has no records")
    ids = [r.record_id for r in records]
    if len(set(ids)) != len(ids):
        raise EvalInputError(f"split {split!r} has duplicate record_ids; generations are keyed by record_id")
    return records


def _task_split_records(cfg: RunConfig, split: str, require_response: bool = True) -> list[PersonaRecord]:
    """A LongLaMP / LaMP source's split through the data pipeline's own loader ("test" replaces eval_split)."""
    cfg = copy.deepcopy(cfg)
    section = cfg.data.longlamp if cfg.data.source == "longlamp" else cfg.data.lamp
    if split == "test":
        section.eval_split = "test"
    records, _ = pipeline.load_task_split(cfg, "eval", require_response)
    if not records:
        raise EvalInputError(f"data.source={cfg.data.source}: split {split!r} is empty or unset")
    return records


def tokenize_for_eval(
    records: list[PersonaRecord], tokenizer: Any, settings: PromptSettings
) -> tuple[list[TokenizedExample], int]:
    """TokenizedExamples in record order, and how many needed the length budget lifted.

    A test reference may be longer than the training budget allows; its prompt is then built with
    data.max_length lifted (the profile budget still applies) rather than dropping the record.
    """
    examples, relaxed = [], 0
    for record in records:
        try:
            examples.append(tokenize_record(record, tokenizer, settings, "eval"))
        except RecordError:
            lifted = dataclasses.replace(settings, max_length=10**9)
            examples.append(tokenize_record(record, tokenizer, lifted, "eval"))
            relaxed += 1
    return examples, relaxed


def gen_items(records: list[PersonaRecord], examples: list[TokenizedExample], ablated: bool) -> list[GenItem]:
    """One GenItem per record: the conditioned prompt, or the persona-ablated one."""
    return [
        GenItem(r.record_id, r.task, e.abl_prompt_ids if ablated else e.cond_prompt_ids)
        for r, e in zip(records, examples, strict=True)
    ]


def data_fingerprint(records: list[PersonaRecord], ablated: bool, extra: dict[str, Any]) -> str:
    """What makes generations comparable: records, prompt variant, model, decoding."""
    rows = [json.dumps([r.record_id, r.query, r.response, r.profile], sort_keys=True, default=str) for r in records]
    return digest([*rows, json.dumps({"ablated": ablated, **extra}, sort_keys=True, default=str)])[:16]


def model_identity(model_dir: Path) -> str:
    """Cheap identity of an exported model's weights (fingerprints.weight_files_fingerprint)."""
    return weight_files_fingerprint(model_dir)[:16]


def resolve_model_dir(run_dir: Path, model: str | None) -> Path:
    """The HF folder to evaluate: --model, else <run>/hf; a clear error when there is none."""
    path = Path(model) if model else run_dir / "hf"
    if not (path / "config.json").is_file() or not (list(path.glob("*.safetensors")) or list(path.glob("*.bin"))):
        raise EvalInputError(
            f"no exported model in {path} (config.json + weights): the run may not have finished or had "
            "train.export_hf=false. Pass --model HF_FOLDER, or --checkpoint runs/NAME/checkpoints/step_N"
        )
    return path


def tokenizer_dir(run_dir: Path, model: str | None) -> Path | None:
    """Where a model served elsewhere takes its tokenizer from: --model, else <run>/hf; None when neither has one
    (the run's own tokenizer then). A --model without a tokenizer is an error, not silently replaced."""
    if model:
        if not (Path(model) / "tokenizer_config.json").is_file():
            raise EvalInputError(f"--model {model}: no tokenizer_config.json there (the prompts need its tokenizer)")
        return Path(model)
    path = run_dir / "hf"
    return path if (path / "tokenizer_config.json").is_file() else None


def load_plain_model(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The full model on one device (plain data-parallel evaluation)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def zero3_inference_config(dtype: torch.dtype) -> dict[str, Any]:
    """A minimal ZeRO-3 inference config (no optimizer), nothing left as "auto"."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "steps_per_print": 10**9,
    }


def load_zero3_model(model_dir: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """(HF model sharded by ZeRO-3 across ranks, the HfDeepSpeedConfig that must stay referenced).

    The live HfDeepSpeedConfig makes from_pretrained load inside zero.Init and makes generate()
    behave as ZeRO-3; generate must then be called with synced_gpus=True on every rank.
    """
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    ds = zero3_inference_config(dtype)
    keepalive = HfDeepSpeedConfig(ds)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    engine, *_ = deepspeed.initialize(model=lm, config=ds)
    engine.module.eval()
    return engine.module, (keepalive, engine)


def load_checkpoint_weights(cfg: RunConfig, ckpt: Path, tokenizer: Any, dtype: torch.dtype) -> Any:
    """Rebuild the run's model and load a DeepSpeed checkpoint's consolidated fp32 weights (any world size)."""
    if not checkpoint.is_checkpoint(ckpt):
        raise EvalInputError(f"--checkpoint {ckpt}: not a complete perce_ds checkpoint (no {checkpoint.STATE_FILE})")
    state = checkpoint.consolidated_lm_weights(ckpt)
    lm = build_causal_lm(cfg.model, tokenizer, dtype, "sdpa")
    missing, unexpected = lm.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(lm.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise EvalInputError(f"{ckpt}: weights do not fit the run's model (missing {missing}, unexpected {unexpected})")
    lm.tie_weights()
    return lm.eval()
