"""What does a PerCE step cost next to a CE step? Measured, and against the analytic floor.

    python -m benchmarks.step_cost [--smoke | --preset cpu|gpu1b] [--nproc N] [--json out.json]

CE (`loss.scheme=ce`, `loss.track_pir=false`: no ablated pass), online PerCE (the paper: one extra no-grad
forward of the persona-ablated sequence per micro-batch) and, when the config has `loss.weights_from`,
offline-weights PerCE, all on the same model, data, DeepSpeed ZeRO-3 config and world size.

How it is measured
------------------
* **Time**: one distributed job (1 rank directly, N ranks through `deepspeed --num_gpus N`) builds one
  `perce_ds.engine.Trainer` per scheme (same seed, so the same initial weights) and calls
  `trainer.train_step(r)` for rounds r = 0, 1, ... interleaved as A B | B A | A B ... (alternating the order
  cancels slow drifts of the machine); every scheme sees the same batch at round r. The first `warmup` rounds
  (lazy optimizer state, ZeRO-3 tracing) are dropped; per scheme the median step time is reported, and
  `ratio_to_ce` = median(scheme) / median(CE). `paired_ratio_to_ce` is the median of the per-round ratios.
* **Memory**: peak memory is measured in a fresh process per scheme (one Trainer, a warm-up step, then the
  high-water mark over the measured steps). A per-process high-water mark is the only clean number: on CPU,
  VmHWM of one process holding several models is shared by all of them, and on GPU
  `max_memory_allocated` would include the other schemes' parameters and optimizer states. On CPU
  `peak_mem_bytes` is VmHWM (reset through /proc/self/clear_refs after the warm-up, so model building does
  not count) and `peak_mem_above_baseline_bytes` subtracts the RSS of the imported libraries measured
  before the Trainer is built (the ratio of the raw RSS is diluted by ~0.5 GB of libraries). On GPU it is
  `torch.cuda.max_memory_allocated()` (the baseline is 0). The memory workers run with
  MALLOC_MMAP_THRESHOLD_=65536 so freed buffers go back to the OS and RSS follows live memory.
  The timing job also records each step's transient (peak minus memory at the step's start).
* **Where the time goes** (`breakdown`): a few extra rounds after the timed ones under
  `perce_ds.profiling.timing`, which times the phases the package marks itself (the ablated and conditioned
  passes, the chunked log-prob head and its autograd backward, backward, optimizer step, offline-weight
  lookup), plus DeepSpeed's ZeRO-3 `fetch_sub_module`/`release_sub_module` (all-gather and its bookkeeping,
  attributed to the phase that triggered it; wrapped here, DeepSpeed has no instrumentation points);
  `other` = step time minus the phases (collate, metrics, all-reduces of counts/stats, Python).

The analytic floor
------------------
For one sequence of L tokens of which R are response tokens, one forward costs (dense counting, as
executed with an explicit padding mask; multiply-add = 2 FLOPs)

    F_body(L)  = 2 * P_body * L + 4 * n_layers * d_attn * L^2       P_body = parameters without the input
                                                                    and output embeddings; d_attn = heads * head_dim
    F_head(R)  = 2 * hidden * vocab * R                              the output embedding, response positions only

With non-reentrant activation checkpointing a grad pass is forward + recomputed forward + backward (2x forward)
= 4 forwards of the body; the chunked log-prob head recomputes its logits in backward, so it is 4 head matmuls
with or without checkpointing:

    F_ce      = sum_seq [ c * F_body(L_cond) + 4 * F_head(R) ]       c = 4 with checkpointing, else 3
    F_ablated = sum_seq [ F_body(L_abl) + F_head(R) ]                one no-grad forward, no recompute
    floor     = 1 + F_ablated / F_ce                                 (offline weights: floor = 1)

summed over the measured steps with the batches' real (unpadded) token counts; `floor_ratio_padded` uses
the padded shapes the engine actually runs (every row at the batch's width) and so shows the cost of
padding. Model FLOPs utilisation (GPU) follows the PaLM convention: useful FLOPs without recomputation,
3 * F_body(L_cond) + 3 * F_head(R) (+ F_ablated for PerCE), per second, over the device's dense bf16 peak;
`hfu` counts the executed FLOPs (with recomputation) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    format_table,
    launch,
    machine_info,
    peak_flops,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    write_json,
)
from benchmarks.longlamp_shape import Shape, make_records, tokenizer_texts
from perce_ds.profiling import PhaseTimer
from perce_ds.profiling import timing as phase_timing

MODULE = "benchmarks.step_cost"  # workers run as `python -m` from the repository root
TIME_TARGET = 1.05  # online PerCE / CE <= 1.05 x the floor
MEM_TARGET = 1.05  # peak memory PerCE / CE
OFFLINE_TARGET = 1.03  # offline-weights PerCE within 3% of CE


# ---------------------------------------------------------------- sizes
@dataclass
class Preset:
    """One benchmark size: model architecture, data shape, batch and how many steps to time."""

    model: dict[str, Any]
    shape: Shape
    micro_batch_size: int
    n_records: int
    tokenizer_vocab: int
    warmup: int
    rounds: int
    mem_steps: int
    breakdown_rounds: int
    dtype: str = "auto"
    timeout_s: int = 900


def _qwen3(hidden: int, layers: int, inter: int, heads: int, kv: int, head_dim: int, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": vocab,
        "max_position_embeddings": 8192, "tie_word_embeddings": True,
    }  # fmt: skip


PRESETS: dict[str, Preset] = {
    # ~1 minute on 2 CPU cores (CI): the same code path, tiny numbers.
    "smoke": Preset(_qwen3(64, 2, 192, 2, 1, 32, 1024), Shape(4, 24, 32, 32), 2, 16, 800, 1, 3, 1, 1, timeout_s=240),
    # The CPU measurement: ~4.5M-parameter Qwen3-like model, 4 x 80-token profile items, 128-token responses.
    "cpu": Preset(_qwen3(256, 4, 768, 4, 2, 64, 4096), Shape(4, 80, 100, 128), 4, 64, 2048, 2, 10, 3, 2),
    # A lent H200: ~1.1B parameters (Qwen3-1.7B's width, 16 layers, its 151,936 vocabulary), LongLaMP lengths.
    "gpu1b": Preset(
        _qwen3(2048, 16, 6144, 16, 8, 128, 151936), Shape(4, 300, 400, 300), 8, 128, 4096, 3, 10, 3, 2, timeout_s=420
    ),
}


def offline_weights_supported() -> bool:
    """True once perce_ds.config.LossConfig has `weights_from` (offline-weights PerCE)."""
    from perce_ds.config import LossConfig

    return "weights_from" in {f.name for f in fields(LossConfig)}


# ---------------------------------------------------------------- FLOPs
@dataclass
class FlopModel:
    """Forward FLOPs of the body and of the response-only output head (see the module docstring)."""

    params_body: int
    n_layers: int
    d_attn: int
    hidden: int
    vocab: int
    checkpointing: bool

    @classmethod
    def from_lm(cls, lm: Any, checkpointing: bool) -> FlopModel:
        """Count from the built model; ZeRO-3 partitioned parameters report their full size as ds_numel."""
        skip = {id(lm.get_input_embeddings().weight), id(lm.get_output_embeddings().weight)}
        body = sum(int(getattr(p, "ds_numel", p.numel())) for p in lm.parameters() if id(p) not in skip)
        c = lm.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(body, c.num_hidden_layers, c.num_attention_heads * head_dim, c.hidden_size, c.vocab_size,
                   checkpointing)  # fmt: skip

    def body(self, lengths: list[int]) -> float:
        return float(sum(2 * self.params_body * n + 4 * self.n_layers * self.d_attn * n * n for n in lengths))

    def head(self, n_response: int) -> float:
        return 2.0 * self.hidden * self.vocab * n_response


@dataclass
class StepFlops:
    """FLOP and token counts of one optimizer step on this rank (real and padded shapes)."""

    ce: float = 0.0  # executed FLOPs of the CE step (with recomputation)
    ablated: float = 0.0  # the extra no-grad ablated forward
    ce_padded: float = 0.0
    ablated_padded: float = 0.0
    useful_ce: float = 0.0  # model FLOPs without recomputation (MFU)
    cond_tokens: int = 0
    abl_tokens: int = 0
    response_tokens: int = 0
    cond_slots: int = 0  # padded B x T of the conditioned pass
    abl_slots: int = 0
    profile_tokens: int = 0  # conditioned prompt minus ablated prompt
    cond_prompt_tokens: int = 0

    def add(self, other: StepFlops) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def step_flops(batches: list[Any], fm: FlopModel) -> StepFlops:
    """Count one step's micro-batches (perce_ds.data.collate.MicroBatch) with the FLOP model."""
    c = 4 if fm.checkpointing else 3
    out = StepFlops()
    for b in batches:
        cond = b.conditioned.attention_mask.sum(1).tolist()
        abl = b.ablated.attention_mask.sum(1).tolist()
        resp = b.response_mask.sum(1).tolist()
        n_resp = int(sum(resp))
        rows, t_cond, t_abl = len(cond), b.conditioned.input_ids.shape[1], b.ablated.input_ids.shape[1]
        out.ce += c * fm.body(cond) + 4 * fm.head(n_resp)
        out.ablated += fm.body(abl) + fm.head(n_resp)
        out.ce_padded += c * fm.body([t_cond] * rows) + 4 * fm.head(n_resp)
        out.ablated_padded += fm.body([t_abl] * rows) + fm.head(n_resp)
        out.useful_ce += 3 * fm.body(cond) + 3 * fm.head(n_resp)
        out.cond_tokens += int(sum(cond))
        out.abl_tokens += int(sum(abl))
        out.response_tokens += n_resp
        out.cond_slots += rows * t_cond
        out.abl_slots += rows * t_abl
        out.profile_tokens += int(sum(cond) - sum(abl))
        out.cond_prompt_tokens += int(sum(cond) - n_resp)
    return out


# ---------------------------------------------------------------- phase breakdown
@contextlib.contextmanager
def zero3_phases(timer: PhaseTimer) -> Iterator[None]:
    """Charge DeepSpeed's ZeRO-3 parameter fetch/release (all-gather and its bookkeeping) to the phase that
    triggered it. perce_ds marks its own phases (perce_ds.profiling); DeepSpeed offers no such points, so its
    coordinator's two methods are wrapped here, and an AttributeError says so if DeepSpeed renames them."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    saved = {name: getattr(Coordinator, name) for name in ("fetch_sub_module", "release_sub_module")}

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with timer.phase(label):
                return fn(*args, **kwargs)

        return wrapped

    Coordinator.fetch_sub_module = timed(saved["fetch_sub_module"], "zero3_fetch")
    Coordinator.release_sub_module = timed(saved["release_sub_module"], "zero3_release")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Coordinator, name, fn)


# ---------------------------------------------------------------- attention kernel
def attention_ops(trainer: Any, step: int) -> list[str]:
    """Names of the attention operators that one profiled step really ran (sdpa backend, flash-attn, ...)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        trainer.train_step(step)
    names = {e.key for e in prof.key_averages()}
    keys = ("attention", "flash", "attn", "fmha", "cudnn_sdpa")
    return sorted(n for n in names if any(k in n.lower() for k in keys))


def attention_kernel(ops: list[str], implementation: str) -> str:
    """One word for the kernel family that ran, from the profiled operator names."""
    joined = " ".join(ops)
    if "flash_attn" in joined or "FlashAttn" in joined:
        return "flash-attn (flash_attention_2)"
    if "_scaled_dot_product_flash_attention_for_cpu" in joined:
        return "sdpa: flash (CPU kernel)"
    if "_scaled_dot_product_flash_attention" in joined or "_flash_attention_forward" in joined:
        return "sdpa: flash"
    if "_scaled_dot_product_cudnn_attention" in joined:
        return "sdpa: cuDNN"
    if "_efficient_attention" in joined or "_scaled_dot_product_efficient_attention" in joined:
        return "sdpa: memory-efficient (not flash)"
    if "scaled_dot_product_attention" in joined:
        return "sdpa: math"
    return f"{implementation} (no sdpa/flash operator seen)"


# ---------------------------------------------------------------- workers (inside the distributed job)
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem_reset() -> int:
    """Start a peak-memory window; returns memory in use now (bytes)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return int(torch.cuda.memory_allocated())
    reset_peak_rss()
    return int(rss_bytes() or 0)


def _mem_peak() -> int:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return int(peak_rss_bytes() or 0)


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


def _load_config(spec: dict[str, Any], scheme: str, output_dir: str) -> Any:
    from perce_ds.config import RunConfig

    return RunConfig.load(spec["recipes"][scheme], [f"train.output_dir={output_dir}"])


def worker_time(spec: dict[str, Any], out: Path) -> None:
    """Interleaved timing of all schemes in this process group; rank 0 writes `out`."""
    import torch

    from perce_ds.engine import Trainer

    schemes = spec["schemes"]
    output_dir = str(Path(spec["workdir"]) / "runs-time")
    trainers = {}
    for s in schemes:
        if s == "perce_offline":
            run_estep(spec)
        trainers[s] = Trainer(_load_config(spec, s, output_dir), spec["ds_config"])
    first = trainers[schemes[0]]
    fm = FlopModel.from_lm(first.module.lm, first.cfg.model.activation_checkpointing)
    warmup, rounds = spec["warmup"], spec["rounds"]
    times: dict[str, list[float]] = {s: [] for s in schemes}
    transient: dict[str, list[int]] = {s: [] for s in schemes}
    flops = StepFlops()
    for r in range(warmup + rounds):
        order = schemes if r % 2 == 0 else schemes[::-1]
        for s in order:
            before = _mem_reset()
            _sync()
            t0 = time.perf_counter()
            result = trainers[s].train_step(r)
            _sync()
            dt = time.perf_counter() - t0
            if not result.applied:
                raise RuntimeError(f"scheme {s}: step {r} was refused (non-finite loss); lower the benchmark lr")
            if r >= warmup:
                times[s].append(dt)
                transient[s].append(_mem_peak() - before)
        if r >= warmup:
            flops.add(step_flops(first.micro_batches(r), fm))
    flop_values = _all_reduce([getattr(flops, f.name) for f in fields(flops)])
    flops = StepFlops(**{f.name: type(getattr(flops, f.name))(v) for f, v in zip(fields(flops), flop_values)})

    breakdown: dict[str, dict[str, float]] = {}
    step_base = warmup + rounds
    for s in schemes:
        timer = PhaseTimer(_sync)
        totals = []
        with phase_timing(timer), zero3_phases(timer):
            for k in range(spec["breakdown_rounds"]):
                _sync()
                t0 = time.perf_counter()
                trainers[s].train_step(step_base + k)
                _sync()
                totals.append(time.perf_counter() - t0)
        n = max(1, len(totals))
        phases = {k: v / n for k, v in sorted(timer.totals.items())}
        top = sum(v for k, v in phases.items() if "/" not in k)
        phases["step_total"] = sum(totals) / n
        phases["other"] = phases["step_total"] - top
        breakdown[s] = phases

    kernel_trainer = trainers[schemes[-1]]
    ops = attention_ops(kernel_trainer, step_base + spec["breakdown_rounds"])
    max_transient = {s: _all_reduce([float(max(v))], "max")[0] for s, v in transient.items()}
    if first.is_rank0:
        write_json(out, {
            "times": times, "step_transient_bytes": max_transient, "flops": asdict(flops), "flop_model": asdict(fm),
            "breakdown": breakdown, "attention_ops": ops,
            "attention_kernel": attention_kernel(ops, kernel_trainer.attn_implementation),
            "attn_implementation": kernel_trainer.attn_implementation, "dtype": str(kernel_trainer.dtype),
            "world_size": first.world, "rounds": rounds, "warmup": warmup,
            "profile_items_dropped": first.data.reports["train"].profile_items_dropped,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        })  # fmt: skip


def run_estep(spec: dict[str, Any]) -> None:
    """Offline E-step with the initial model (same config and seed as the M-step's) into spec["weights_dir"]."""
    import gc

    from perce_ds import estep
    from perce_ds.engine import Trainer

    cfg = _load_config(spec, "perce", str(Path(spec["workdir"]) / "runs-estep"))
    trainer = Trainer(cfg, spec["ds_config"], inference_only=True)
    estep.estimate(trainer, Path(spec["weights_dir"]))
    del trainer
    gc.collect()


def worker_mem(spec: dict[str, Any], scheme: str, out: Path) -> None:
    """Peak memory of one scheme in a fresh process; rank 0 writes `out`."""
    from perce_ds.engine import Trainer

    with contextlib.suppress(ImportError):
        import pyarrow.parquet  # noqa: F401  (offline weights load it lazily: count it as library, for all schemes)
    baseline = _mem_reset()  # after imports, before anything of the run exists
    trainer = Trainer(_load_config(spec, scheme, str(Path(spec["workdir"]) / f"runs-mem-{scheme}")), spec["ds_config"])
    trainer.train_step(0)  # warm-up: optimizer state and ZeRO-3 traces are created lazily
    resident = _mem_reset()
    for k in range(spec["mem_steps"]):
        trainer.train_step(1 + k)
    peak = _mem_peak()
    peak, resident, baseline = _all_reduce([float(peak), float(resident), float(baseline)], "max")
    if trainer.is_rank0:
        write_json(out, {"scheme": scheme, "peak_mem_bytes": int(peak), "resident_before_steps_bytes": int(resident),
                         "baseline_bytes": int(baseline)})  # fmt: skip


# ---------------------------------------------------------------- the orchestrating process
def prepare(workdir: Path, preset: Preset, schemes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Data, tokenizer, DeepSpeed config and one recipe per scheme, all under workdir; returns the spec."""
    import yaml

    from perce_ds.data.synthetic import write_jsonl
    from perce_ds.data.tokenizer import train_sentencepiece_tokenizer

    records = make_records(preset.n_records, preset.shape, seed=0)
    data = workdir / "train.jsonl"
    write_jsonl(records, data)
    tok = train_sentencepiece_tokenizer(tokenizer_texts(records), workdir / "tokenizer", preset.tokenizer_vocab)
    if len(tok) > preset.model["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tok)} ids but the model vocabulary is {preset.model['vocab_size']}")
    ds = json.loads(Path(args.deepspeed).read_text())
    if args.torch_adam:
        ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["torch_adam"] = True
    ds_path = workdir / "ds_config.json"
    ds_path.write_text(json.dumps(ds, indent=2))
    s = preset.shape
    max_profile = int(s.profile_items * (s.item_tokens + 8) * 1.6) + 64
    recipes = {}
    for scheme in schemes:
        base, _, variant = scheme.partition("_")
        loss: dict[str, Any] = {"scheme": "ce", "track_pir": False} if base == "ce" else {"scheme": "perce"}
        if variant == "offline":
            loss["weights_from"] = str(workdir / "weights")
        if variant == "fused":
            loss["fused_passes"] = True
        recipe = {
            "model": {"config": preset.model, "tokenizer": str(workdir / "tokenizer"), "dtype": preset.dtype,
                      "attn_implementation": args.attn, "activation_checkpointing": not args.no_checkpointing},
            "data": {"train_files": [str(data)], "max_profile_tokens": max_profile, "packing": variant == "packed",
                     "max_length": max_profile + int(1.6 * (s.query_tokens + s.response_tokens)) + 128},
            "loss": loss,
            "train": {"run_name": scheme, "max_steps": 100000, "micro_batch_size": preset.micro_batch_size,
                      "grad_accum": 1, "lr": 1e-5, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                      "export_hf": False, "tensorboard": False, "resume": "none", "dist_timeout_s": 900},
        }  # fmt: skip
        path = workdir / f"recipe-{scheme}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipes[scheme] = str(path)
    spec = {
        "workdir": str(workdir), "schemes": schemes, "recipes": recipes, "ds_config": str(ds_path),
        "warmup": preset.warmup, "rounds": preset.rounds, "mem_steps": preset.mem_steps,
        "breakdown_rounds": preset.breakdown_rounds, "weights_dir": str(workdir / "weights"),
    }  # fmt: skip
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2))
    return spec


def summarise(timing: dict[str, Any], memory: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    """One row per scheme with the required keys, ratios to CE, the floor and the targets."""
    f = timing["flops"]
    n_steps = timing["rounds"]
    # Variants (_packed: padding-free batches, _fused: one forward for both passes) share their scheme's FLOPs.
    online = {s for s in timing["times"] if s.startswith("perce") and s != "perce_offline"}
    floors = {s: 1.0 + f["ablated"] / f["ce"] if s in online else 1.0 for s in timing["times"]}
    floors_padded = {s: 1.0 + f["ablated_padded"] / f["ce_padded"] if s in online else 1.0 for s in timing["times"]}
    executed = {s: f["ce"] + f["ablated"] if s in online else f["ce"] for s in timing["times"]}
    useful = {s: f["useful_ce"] + f["ablated"] if s in online else f["useful_ce"] for s in timing["times"]}
    peak = peak_flops(timing.get("gpu") or "", args.peak_tflops) if timing.get("gpu") else None
    med = {s: statistics.median(v) for s, v in timing["times"].items()}
    ce_times = timing["times"]["ce"]
    rows = []
    for s, t in timing["times"].items():
        m = memory.get(s, {})
        ce_m = memory.get("ce", {})
        above = m["peak_mem_bytes"] - m["baseline_bytes"] if m else None
        ce_above = ce_m["peak_mem_bytes"] - ce_m["baseline_bytes"] if ce_m else None
        row: dict[str, Any] = {
            "scheme": s,
            "median_step_s": med[s],
            "min_step_s": min(t),
            "max_step_s": max(t),
            "steps_measured": len(t),
            "tokens_per_s": f["cond_tokens"] / n_steps / med[s],
            "ratio_to_ce": med[s] / med["ce"],
            "paired_ratio_to_ce": statistics.median(a / b for a, b in zip(t, ce_times)),
            "floor_ratio": floors[s],
            "floor_ratio_padded": floors_padded[s],
            "peak_mem_bytes": m.get("peak_mem_bytes"),
            "mem_ratio_to_ce": m["peak_mem_bytes"] / ce_m["peak_mem_bytes"] if m and ce_m else None,
            "peak_mem_above_baseline_bytes": above,
            "mem_above_baseline_ratio_to_ce": above / ce_above if above is not None and ce_above else None,
            "step_transient_bytes": timing["step_transient_bytes"][s],
            "model_tflops_per_step": useful[s] / n_steps / 1e12,
            "mfu": useful[s] / n_steps / med[s] / peak if peak else None,
            "hfu": executed[s] / n_steps / med[s] / peak if peak else None,
            "breakdown_s": timing["breakdown"][s],
        }
        row["ratio_over_floor"] = row["ratio_to_ce"] / row["floor_ratio"]
        if s == "perce":
            row["meets_time_target"] = row["ratio_over_floor"] <= TIME_TARGET
            row["meets_mem_target"] = row["mem_ratio_to_ce"] is not None and row["mem_ratio_to_ce"] <= MEM_TARGET
        if s == "perce_offline":
            row["meets_time_target"] = row["ratio_to_ce"] <= OFFLINE_TARGET
        rows.append(row)
    return rows


COLUMNS = [
    ("scheme", "scheme", ""), ("median_step_s", "median step s", ".4f"), ("tokens_per_s", "cond tok/s", ",.0f"),
    ("ratio_to_ce", "time/CE", ".3f"), ("paired_ratio_to_ce", "paired", ".3f"), ("floor_ratio", "floor", ".3f"),
    ("ratio_over_floor", "ratio/floor", ".3f"), ("floor_ratio_padded", "floor(padded)", ".3f"),
    ("peak_mem_bytes", "peak mem", "bytes"), ("mem_ratio_to_ce", "mem/CE", ".3f"),
    ("peak_mem_above_baseline_bytes", "peak-baseline", "bytes"), ("mem_above_baseline_ratio_to_ce", "(-base)/CE", ".3f"),
    ("step_transient_bytes", "step transient", "bytes"), ("mfu", "MFU", "pct"),
]  # fmt: skip


def report(rows: list[dict], timing: dict[str, Any], info: dict[str, Any], notes: list[str]) -> str:
    f = timing["flops"]
    n = timing["rounds"]
    lines = [
        f"step_cost: {info['device']}, world size {timing['world_size']}, dtype {timing['dtype']}, "
        f"attention {timing['attn_implementation']} -> {timing['attention_kernel']}, commit {info['commit']}, "
        f"{info['date_utc']} UTC, load avg {info['load_avg_1m']:.2f}",
        f"model: {timing['flop_model']['params_body'] / 1e6:.2f}M body params, vocab {timing['flop_model']['vocab']}, "
        f"checkpointing {timing['flop_model']['checkpointing']}; per step (all ranks): "
        f"{f['cond_tokens'] / n:.0f} conditioned tokens ({f['profile_tokens'] / max(1, f['cond_prompt_tokens']):.0%} "
        f"of the prompt is profile), {f['abl_tokens'] / n:.0f} ablated, {f['response_tokens'] / n:.0f} response; "
        f"padding {1 - f['cond_tokens'] / f['cond_slots']:.1%} (conditioned) / "
        f"{1 - f['abl_tokens'] / f['abl_slots']:.1%} (ablated)",
        f"{timing['rounds']} timed rounds after {timing['warmup']} warm-up, interleaved A B | B A ...",
        "",
        format_table(rows, COLUMNS),
        "",
        "where the time goes (seconds per step; a/b = b inside phase a):",
    ]
    keys = sorted({k for r in rows for k in r["breakdown_s"]}, key=lambda k: (k.split("/")[0], "/" in k, k))
    bd_rows = [{"phase": k, **{r["scheme"]: r["breakdown_s"].get(k) for r in rows}} for k in keys]
    lines.append(format_table(bd_rows, [("phase", "phase", "")] + [(r["scheme"], r["scheme"], ".4f") for r in rows]))
    lines.append("")
    for r in rows:
        if r["scheme"] == "perce":
            lines.append(
                f"target online PerCE time/CE <= {TIME_TARGET} x floor: {r['ratio_to_ce']:.3f} / {r['floor_ratio']:.3f}"
                f" = {r['ratio_over_floor']:.3f} -> {'MET' if r['meets_time_target'] else 'NOT MET'}"
            )
            if r["mem_ratio_to_ce"] is None:
                lines.append("target peak memory PerCE/CE: not measured (--no-memory)")
            else:
                lines.append(
                    f"target peak memory PerCE/CE <= {MEM_TARGET}: {r['mem_ratio_to_ce']:.3f} (above the library "
                    f"baseline: {r['mem_above_baseline_ratio_to_ce']:.3f}) -> {'MET' if r['meets_mem_target'] else 'NOT MET'}"
                )
        if r["scheme"] == "perce_offline":
            lines.append(f"target offline PerCE within 3% of CE: {r['ratio_to_ce']:.3f} -> "
                         f"{'MET' if r['meets_time_target'] else 'NOT MET'}")  # fmt: skip
    lines += notes
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    preset = PRESETS["smoke" if args.smoke else args.preset]
    for name in ("rounds", "warmup", "micro_batch_size"):
        if getattr(args, name) is not None:
            setattr(preset, name, getattr(args, name))
    schemes = ["ce", "perce", *args.variants]
    notes = []
    if args.offline == "off":
        notes.append("offline-weights PerCE: not measured (--offline off)")
    elif offline_weights_supported():
        schemes.append("perce_offline")
        notes.append("offline-weights PerCE: weights from an in-process E-step (perce_ds.estep.estimate) with the "
                     "initial model; training reads them through loss.weights_from (no ablated pass)")  # fmt: skip
    elif args.offline == "on":
        raise SystemExit("--offline on: perce_ds.config has no loss.weights_from (offline EM) in this checkout")
    else:
        notes.append("offline-weights PerCE: not available (perce_ds.config has no loss.weights_from); not measured")
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="perce-step-cost-")
        workdir = Path(tmp.name)
    try:
        prepare(workdir, preset, schemes, args)
        timeout = args.timeout or preset.timeout_s
        t0 = time.perf_counter()
        launch(MODULE, ["--worker", "time", "--spec", str(workdir / "spec.json"), "--out", str(workdir / "time.json")],
               args.nproc, timeout)  # fmt: skip
        timing = json.loads((workdir / "time.json").read_text())
        memory: dict[str, dict[str, Any]] = {}
        if not args.no_memory:
            # Peak memory does not depend on speed, so the per-scheme processes run side by side.
            def measure(s: str) -> dict[str, Any]:
                out = workdir / f"mem-{s}.json"
                launch(MODULE, ["--worker", "mem", "--spec", str(workdir / "spec.json"), "--scheme", s, "--out",
                                str(out)], args.nproc, timeout, {"MALLOC_MMAP_THRESHOLD_": "65536"})  # fmt: skip
                return json.loads(out.read_text())

            with ThreadPoolExecutor(len(schemes)) as pool:
                memory = dict(zip(schemes, pool.map(measure, schemes)))
        info = machine_info()
        info["wall_s"] = time.perf_counter() - t0
        rows = summarise(timing, memory, args)
        common = {"world_size": timing["world_size"], "device": info["device"], "dtype": timing["dtype"],
                  "attention_kernel": timing["attention_kernel"], "attention_ops": timing["attention_ops"],
                  "preset": "smoke" if args.smoke else args.preset, "commit": info["commit"], "date_utc": info["date_utc"],
                  "flops_per_run": timing["flops"], "flop_model": timing["flop_model"],
                  "profile_items_dropped": timing["profile_items_dropped"]}  # fmt: skip
        for r in rows:
            r.update(common)
        print(report(rows, timing, info, notes))
        print(f"(wall time of the measurement jobs: {info['wall_s']:.0f} s)")
        if args.json:
            write_json(args.json, rows)
    finally:
        if tmp is not None and not args.keep_workdir:
            tmp.cleanup()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny size (~1 minute on 2 CPU cores), for CI")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="ranks (GPUs, or CPU processes on gloo)")
    p.add_argument("--json", help="write the per-scheme results here")
    p.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero3.json"), help="DeepSpeed JSON config")
    p.add_argument("--attn", default="auto", choices=["auto", "flash_attention_2", "sdpa", "eager"])
    p.add_argument("--torch-adam", action="store_true", help="torch AdamW instead of DeepSpeed's JIT-built FusedAdam")
    p.add_argument("--no-checkpointing", action="store_true", help="turn activation checkpointing off")
    p.add_argument("--no-memory", action="store_true", help="skip the per-scheme peak-memory processes")
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        choices=["ce_packed", "perce_packed", "perce_fused"],
        help="also time these layouts: padding-free batches (data.packing), one fused forward (loss.fused_passes)",
    )
    p.add_argument("--offline", choices=["auto", "on", "off"], default="auto",
                   help="offline-weights PerCE: auto = when perce_ds supports loss.weights_from")  # fmt: skip
    p.add_argument("--rounds", type=int, help="timed rounds (default: the preset's)")
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds (default: the preset's)")
    p.add_argument("--micro-batch-size", type=int, help="default: the preset's")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when its name is not known")
    p.add_argument("--timeout", type=int, help="seconds per worker job")
    p.add_argument("--workdir", help="keep data, recipes and worker outputs here (default: a temp dir)")
    p.add_argument("--keep-workdir", action="store_true")
    # internal: the distributed workers
    p.add_argument("--worker", choices=["time", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        if torch.cuda.is_available():  # before any CUDA call, so rank k's memory stats are GPU k's
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        spec = json.loads(Path(args.spec).read_text())
        if args.worker == "time":
            worker_time(spec, Path(args.out))
        else:
            worker_mem(spec, args.scheme, Path(args.out))
        from perce_ds.distributed import exit_process, shutdown

        shutdown()
        exit_process(0)  # no interpreter teardown with gloo threads alive
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
