"""Evaluate a run: generate on a split (resumable, data-parallel, optionally ZeRO-3), score, report.

Output directory: <run>/eval/ for the default (test split, conditioned prompts, all tasks), else
<run>/eval/<name>/ (name: "--name", or derived from split, --ablated and --tasks). It holds
meta.json (what the generations were made from, with a fingerprint), generations.jsonl (streamed),
per_record.jsonl, scores.json, report.md and training_curves.png. With `predict_only` (a split without
references, e.g. LaMP's test questions) nothing is scored: the generations are written in the benchmark's
submission format instead (perce_ds/evaluation/predictions.py).

`backend` picks what generates (generation.GenerationBackend): "hf" (default; in-process `generate`, under a
launcher sharded or ZeRO-3), "vllm" (offline vLLM on the exported folder, one process, CUDA only) or "openai"
(an OpenAI-compatible server, `server`). The prompts, stops, decoding, files and resume are the same for all.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from perce_ds.data.pipeline import prompt_settings, resolve_tokenizer
from perce_ds.data.tokenizer import load_tokenizer
from perce_ds.distributed import apply_slurm_env, init_process_group, local_device
from perce_ds.evaluation import report, runs
from perce_ds.evaluation.generation import (
    GenerationBackend,
    GenerationSettings,
    HFBackend,
    read_generations,
    run_generation,
    texts_by_id,
)
from perce_ds.evaluation.generation_openai import ServerSpec
from perce_ds.evaluation.metrics import DEFAULT_PRESET, ensure_wordnet
from perce_ds.evaluation.predictions import write_predictions
from perce_ds.model import resolve_dtype

log = logging.getLogger("perce_ds")
OUTPUT_FILES = ("meta.json", "generations.jsonl", "per_record.jsonl", "scores.json", "report.md")


@dataclass
class EvalOptions:
    run: Path
    split: str = "test"
    tasks: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)
    ablated: bool = False
    model: str | None = None
    checkpoint: str | None = None
    zero3: bool = False
    name: str | None = None
    overwrite: bool = False
    limit: int = 0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    seed: int = 0
    dist_timeout_s: int = 1800
    predict_only: bool = False  # generate and write submission files; no references needed, no scores
    metrics_preset: str | None = None  # None: the run's eval.metrics_preset
    backend: str = "hf"  # hf | vllm | openai
    server: ServerSpec | None = None  # backend "openai"
    tensor_parallel_size: int = 1  # backend "vllm"

    def output_name(self) -> str:
        if self.name is not None:
            return self.name
        parts = [] if self.split == "test" else [self.split]
        parts += ["predictions"] if self.predict_only else []
        parts += [self.metrics_preset] if self.metrics_preset not in (None, DEFAULT_PRESET) else []
        parts += ["ablated"] if self.ablated else []
        parts += ["+".join(sorted(self.tasks))] if self.tasks else []
        return "-".join(parts)


def init_dist(timeout_s: int, needed: bool) -> tuple[int, int]:
    """Join the launcher's process group (deepspeed/torchrun set WORLD_SIZE); else run as one process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    apply_slurm_env()  # a bare `srun` sets SLURM_* only
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or needed:
        init_process_group(timeout_s)  # one process when no launcher set the variables
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _agree(error: str | None) -> None:
    """Raise on every rank when rank 0 found a problem (so no rank is left waiting in a collective)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise runs.EvalInputError(error)


def check_output_dir(out_dir: Path, meta: dict[str, Any], record_ids: set[str], overwrite: bool) -> str | None:
    """None when out_dir may be (re)used for meta; an error message otherwise. Clears it on --overwrite."""
    if overwrite and out_dir.exists():
        for name in (*OUTPUT_FILES, "training_curves.png"):
            (out_dir / name).unlink(missing_ok=True)
        return None
    gen = out_dir / "generations.jsonl"
    old_meta = json.loads((out_dir / "meta.json").read_text()) if (out_dir / "meta.json").is_file() else None
    if old_meta is None:
        return f"{gen} exists without meta.json (unknown origin); pass --overwrite or --name" if gen.exists() else None
    if old_meta.get("fingerprint") != meta["fingerprint"]:
        changed = sorted(
            k for k in ("split", "ablated", "model_id", "generation", "n_records") if old_meta.get(k) != meta.get(k)
        )
        return (
            f"{out_dir} holds generations made from different inputs (fingerprint {old_meta.get('fingerprint')} vs "
            f"{meta['fingerprint']}; differing: {changed or 'the records themselves'}). Nothing was overwritten: "
            "pass --overwrite to start over, or --name NEW to keep both"
        )
    stray = sorted(set(read_generations(gen)) - record_ids)
    if stray:
        return f"{gen} has record_ids not in this split (e.g. {stray[:3]}): it comes from another dataset; pass --overwrite"
    return None


def evaluate_run(opts: EvalOptions) -> dict[str, Any] | None:
    """Generate (resuming), score and report; returns scores.json's content on rank 0, None elsewhere
    (with `predict_only`: the submission files written, {"files", "records", "missing"}).

    Call on every rank of the launcher's job (or in one plain process). Raises EvalInputError with a
    message saying what to do for a missing run/model/split or a generations file that does not match.
    """
    check_backend_options(opts)
    rank, world = init_dist(opts.dist_timeout_s, opts.zero3)
    if opts.backend == "vllm":
        from perce_ds.evaluation.generation_vllm import check_vllm_usable

        check_vllm_usable(world)
    run_dir = Path(opts.run)
    cfg = runs.load_run_config(run_dir)
    if not opts.predict_only:
        ensure_wordnet()  # fail before generating for an hour, not after
    if opts.checkpoint:
        model_dir, model_id = None, f"checkpoint:{Path(opts.checkpoint).resolve()}"
    elif opts.backend == "openai":  # the weights are the server's; the tokenizer (prompts) is the run's
        model_dir, model_id = runs.tokenizer_dir(run_dir, opts.model), f"openai:{opts.server.model}"
    else:
        model_dir = runs.resolve_model_dir(run_dir, opts.model)
        model_id = runs.model_identity(model_dir)
    tokenizer = load_tokenizer(model_dir) if model_dir and (model_dir / "tokenizer_config.json").is_file() else None
    tokenizer = tokenizer or resolve_tokenizer(cfg)
    records = runs.split_records(cfg, opts.split, opts.data, opts.tasks, require_response=not opts.predict_only)
    if opts.limit:
        records = records[: opts.limit]
    examples, relaxed = runs.tokenize_for_eval(records, tokenizer, prompt_settings(cfg))
    items = runs.gen_items(records, examples, opts.ablated)
    out_dir = run_dir / "eval" / opts.output_name()
    meta = {
        "run": run_dir.name, "split": opts.split, "tasks": sorted({r.task for r in records}), "ablated": opts.ablated,
        "model": str(model_dir or opts.checkpoint), "model_id": model_id, "generation": opts.generation.to_dict(),
        "n_records": len(records), "prompts_with_lifted_length_budget": relaxed, "seed": opts.seed,
        "data": list(opts.data), "world_size": world, "zero3": opts.zero3, "predict_only": opts.predict_only,
        "metrics_preset": opts.metrics_preset or cfg.eval.metrics_preset, "backend": backend_identity(opts),
    }  # fmt: skip
    fp_extra = {k: meta[k] for k in ("model_id", "generation")}
    if opts.backend != "hf":  # hf keeps its earlier fingerprint, so evaluations made before backends still resume
        fp_extra["backend"] = meta["backend"]
    meta["fingerprint"] = runs.data_fingerprint(records, opts.ablated, fp_extra)
    error = None
    if rank == 0:
        error = check_output_dir(out_dir, meta, {r.record_id for r in records}, opts.overwrite)
        if not error:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    _agree(error)

    backend, keepalive = make_backend(opts, cfg, model_dir, tokenizer)
    rows = run_generation(None, tokenizer, items, opts.generation, out_dir / "generations.jsonl", backend=backend)
    del keepalive
    if rank != 0:
        return None
    if opts.predict_only:
        return write_predictions(out_dir, records, texts_by_id(rows.values()))
    references = {r.record_id: (r.task, r.response) for r in records}
    per_record = report.score_generations(references, texts_by_id(rows.values()), meta["metrics_preset"], rows)
    scores = report.write_eval_outputs(out_dir, per_record, meta)
    report.plot_training_curves([run_dir], [run_dir.name], out_dir / "training_curves.png")
    return scores


def check_backend_options(opts: EvalOptions) -> None:
    """Refuse option combinations a backend cannot honour (one line each, before anything is loaded)."""
    if opts.backend not in ("hf", "vllm", "openai"):
        raise runs.EvalInputError(f"--backend {opts.backend!r}: expected hf, vllm or openai")
    if opts.backend != "hf" and (opts.zero3 or opts.checkpoint):
        raise runs.EvalInputError(
            f"--backend {opts.backend} generates from an exported Hugging Face folder: --zero3 and --checkpoint are "
            "hf-backend options (export the checkpoint with launch/convert_checkpoint.py first)"
        )
    if opts.backend == "openai" and (opts.server is None or not opts.server.base_url or not opts.server.model):
        raise runs.EvalInputError("--backend openai needs --base-url URL and --served-model NAME")


def backend_identity(opts: EvalOptions) -> dict[str, Any]:
    """What meta.json records of the backend (never the API key)."""
    if opts.backend == "openai":
        return {**opts.server.identity(), "base_url": opts.server.base_url, "api_key_env": opts.server.api_key_env}
    if opts.backend == "vllm":
        return {"name": "vllm", "tensor_parallel_size": opts.tensor_parallel_size}
    return {"name": "hf", "zero3": opts.zero3}


def make_backend(opts: EvalOptions, cfg: Any, model_dir: Path | None, tokenizer: Any) -> tuple[GenerationBackend, Any]:
    """(the backend that generates, anything that must stay referenced while it does)."""
    if opts.backend == "openai":
        from perce_ds.evaluation.generation_openai import OpenAIBackend

        return OpenAIBackend(opts.server, tokenizer), None
    if opts.backend == "vllm":
        from perce_ds.evaluation.generation_vllm import VLLMBackend

        dtype = str(resolve_dtype(cfg.model.dtype)).removeprefix("torch.")  # "bfloat16": vLLM's spelling
        return VLLMBackend(model_dir, tokenizer, dtype, opts.tensor_parallel_size), None
    dtype = resolve_dtype(cfg.model.dtype)
    device = local_device()
    keepalive: Any = None
    if opts.checkpoint:
        lm = runs.load_checkpoint_weights(cfg, Path(opts.checkpoint), tokenizer, dtype).to(device)
    elif opts.zero3:
        lm, keepalive = runs.load_zero3_model(model_dir, dtype)
    else:
        lm = runs.load_plain_model(model_dir, dtype, device)
    return HFBackend(lm, tokenizer, synced_gpus=opts.zero3), keepalive
