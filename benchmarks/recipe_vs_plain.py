"""Does the experiment fit? One PerCE step through the recipe (DeepSpeed ZeRO-3) against a plain PyTorch loop.

    python -m benchmarks.recipe_vs_plain [--smoke] [--nproc 1 2] [--rounds N] [--json out.json]

The recipe: `perce_ds.engine.Trainer.train_step` of `recipes/persona_smollm2.yaml` (SmolLM2-135M-Instruct,
persona_natural data, micro-batch 2 per rank, max_length 512, max_profile_tokens 384) under
`ds_configs/zero3.json`, on 1 rank and on N ranks (gloo on CPU). The plain loop does the same math in one
process without DeepSpeed: the same Hugging Face model (copied from the recipe's initial weights, so both
start equal), wrapped in the same `perce_ds.model.PerceLM` (ablated pass without grad, conditioned pass with
grad, the library's chunked log-prob head: only the engine differs), weights clip(PIR, clip_min, clip_max)
from `perce_ds.loss.token_weights`, the loss sum_i w_i * -log p_i / N with N the response tokens of the
whole global batch, one backward per micro-batch (gradient accumulation over the ranks' micro-batches),
gradient clipping at `train.max_grad_norm` and `torch.optim.AdamW` with the recipe's lr, betas, eps and
weight decay. It consumes the very micro-batches the ranks consume at that step (collated once by the
recipe's own data pipeline: `Trainer.data`, `Trainer.order`), so at N ranks it does N micro-batches.

How it is measured
------------------
* One distributed job per world size. Every rank builds the recipe's Trainer(s); rank 0 also builds the
  plain loop. Rounds r = 0, 1, ... run the recipe variants and the plain loop interleaved (A B | B A | ...;
  alternating cancels drifts of a shared machine), all on the batch of step r. While rank 0 runs the plain
  step the other ranks wait in a barrier (idle in gloo; their CPU time during the plain steps is recorded).
  The first `warmup` rounds are dropped; per variant the median step time, ratio = median / median(plain)
  and the median of the per-round paired ratios are reported.
* Threads: each recipe rank runs with OMP_NUM_THREADS = cores / ranks (`--threads-per-rank`); the plain loop
  runs with one rank's thread count (torch.set_num_threads around its own steps; `--plain-threads` to change
  it): at 1 rank both have the whole machine; at N ranks the plain loop has one rank's share and does all
  N micro-batches, so the ratio is what spreading the global batch over N processes gains or costs.
* Same math, checked: the recipe's and the plain loop's loss at every round (both models take the same
  steps from the same weights, so they stay equal up to float rounding) - `loss_max_rel_diff`. The plain
  loop and fp32 variants without ZeRO partitioning copy the first variant's initial weights; other variants
  start from their own initialisation, the same for a pretrained model.
* Where the time goes: `breakdown_rounds` extra rounds under perce_ds.profiling timing (ablated forward,
  conditioned forward and the log-prob head inside them, backward, optimizer step) plus DeepSpeed's ZeRO-3
  fetch/release (benchmarks.step_cost.zero3_phases); `other` = step time minus the phases (collate, the
  loss weights, all-reduces of counts and metrics, DeepSpeed's bookkeeping outside its hooks, Python).
* Peak RSS: fresh processes, one per variant (the recipe at N ranks: max over ranks; the plain loop: one
  process), VmHWM over a warm-up and `mem_steps` steps (`--no-memory` skips them).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, format_table, launch, machine_info, write_json
from benchmarks.step_cost import _all_reduce, _mem_peak, _mem_reset, _sync, zero3_phases
from perce_ds.profiling import PhaseTimer, phase
from perce_ds.profiling import timing as phase_timing

MODULE = "benchmarks.recipe_vs_plain"
TARGET = 1.3  # recipe step / plain-loop step at 1 rank
PLAIN = "plain"
RECIPE = ROOT / "recipes" / "persona_smollm2.yaml"
DS_CONFIG = ROOT / "ds_configs" / "zero3.json"
# Benchmark settings on top of the recipe: a constant learning rate (the plain loop has no schedule), no
# files written per step, never resume an earlier benchmark's checkpoint.
TRAIN_OVERRIDES = {"max_steps": 100000, "lr_scheduler": "constant", "warmup_ratio": 0.0, "export_hf": False,
                   "report_to": [], "resume": "none", "save_every": 0, "eval_every": 0}  # fmt: skip
# --smoke: the recipe's data and loop on a tiny llama from scratch (a trained sentencepiece tokenizer, no
# SmolLM2 folder needed), few users.
SMOKE_MODEL = {
    "config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
               "tie_word_embeddings": True},
    "tokenizer_vocab_size": 600, "attn_implementation": "sdpa", "activation_checkpointing": False, "dtype": "auto",
}  # fmt: skip


@dataclass
class Sizes:
    warmup: int
    rounds: int
    breakdown_rounds: int
    mem_steps: int
    timeout_s: int


SIZES = {"smoke": Sizes(1, 3, 1, 1, 240), "full": Sizes(1, 5, 1, 1, 3000)}


# ---------------------------------------------------------------- the plain loop
class PlainLoop:
    """The recipe's step without DeepSpeed: one process, plain autograd, torch.optim.AdamW (module docstring).

    It reads the recipe's prepared data and data order, so at step r it sees the micro-batches every rank of a
    `world`-rank run sees; `init_from` (a ZeRO-3 model, gathered; a collective) sets the initial weights.
    """

    def __init__(self, cfg: Any, data: Any, order: Any, threads: int, eps: float, init_from: Any | None = None):
        import torch
        from transformers.integrations import deepspeed as hf_ds

        from perce_ds.loss import get_scheme
        from perce_ds.model import PerceLM, build_causal_lm, resolve_attn_implementation, resolve_dtype

        self.scheme = get_scheme(cfg.loss.scheme)
        if self.scheme.window_statistic is not None or cfg.loss.weights_from or cfg.loss.fused_passes:
            raise SystemExit(f"the plain loop implements per-token schemes with separate passes; the recipe has "
                             f"loss.scheme={cfg.loss.scheme}, weights_from={cfg.loss.weights_from!r}, "
                             f"fused_passes={cfg.loss.fused_passes}")  # fmt: skip
        self.cfg, self.data, self.order, self.threads = cfg, data, order, threads
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        )
        # A live ZeRO-3 Trainer has registered its config with transformers (zero.Init for every model built
        # meanwhile): build outside it, a whole ordinary model, and restore the registration afterwards.
        ref = hf_ds._hf_deepspeed_config_weak_ref
        registered = ref() if ref is not None else None
        hf_ds.unset_hf_deepspeed_config()
        try:
            lm = build_causal_lm(cfg.model, data.tokenizer, resolve_dtype(cfg.model.dtype),
                                 resolve_attn_implementation(cfg.model.attn_implementation))  # fmt: skip
        finally:
            if registered is not None:
                hf_ds.set_hf_deepspeed_config(registered)
        self.model = PerceLM(lm, cfg.loss.logprob_chunk_size).to(self.device)
        if init_from is not None:
            copy_weights(init_from, lm)
        self.model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        self.model.train()
        t = cfg.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=t.lr, betas=tuple(t.adam_betas), eps=eps, weight_decay=t.weight_decay
        )
        self.max_grad_norm = t.max_grad_norm

    def batches(self, step: int) -> list[Any]:
        """Every rank's micro-batches of optimizer step `step`, as the recipe's ranks collate them."""
        from perce_ds.data.collate import collate

        pad, packing = self.data.tokenizer.pad_token_id, self.cfg.data.packing
        return [collate([self.data.train[i] for i in idx], pad, packing).to(self.device)
                for rank in range(self.order.world_size) for idx in self.order.window(step, rank)]  # fmt: skip

    def step(self, step: int) -> float:
        """One optimizer step over the global batch; returns the loss (weighted NLL per response token)."""
        import torch

        from perce_ds.loss import TokenStats, token_weights, weighted_nll_sum

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            batches = self.batches(step)
            n_global = max(1, sum(b.n_response_tokens for b in batches))
            self.opt.zero_grad(set_to_none=True)
            wnll = 0.0
            for b in batches:
                out = self.model(**b.conditioned.as_kwargs(), response_ids=b.response_ids,
                                 response_mask=b.response_mask, ablated=b.ablated.as_kwargs())  # fmt: skip
                stats = TokenStats(out["logp"].detach(), b.seq_ids(), out["logp_ablated"])
                numerator = weighted_nll_sum(out["logp"], token_weights(stats, self.cfg.loss, self.scheme))
                with phase("backward"):
                    (numerator / n_global).backward()
                wnll += float(numerator.detach())
            with phase("optimizer_step"):
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
                self.opt.step()
            return wnll / n_global
        finally:
            torch.set_num_threads(previous)


def copy_weights(zero_lm: Any, plain_lm: Any | None) -> None:
    """plain_lm's parameters := zero_lm's. ZeRO-3 parameters are gathered one at a time, a collective: every
    rank calls this, ranks without a plain model pass None."""
    import deepspeed
    import torch

    target = dict(plain_lm.named_parameters()) if plain_lm is not None else None
    with torch.no_grad():
        for name, p in zero_lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if target is not None:
                    target.pop(name).copy_(p.data)
    if target:
        raise RuntimeError(f"plain model parameters without a recipe counterpart: {sorted(target)[:5]}")


# ---------------------------------------------------------------- workers
def _config(spec: dict[str, Any], name: str) -> Any:
    from perce_ds.config import RunConfig

    return RunConfig.load(spec["recipe"], [f"train.output_dir={Path(spec['workdir']) / 'runs'}",
                                           f"train.run_name={name}"])  # fmt: skip


def _timed(fn: Any, *args: Any) -> tuple[float, Any]:
    _sync()
    t0 = time.perf_counter()
    result = fn(*args)
    _sync()
    return time.perf_counter() - t0, result


def _usage() -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of this process so far: on a shared machine the CPU a
    step consumes varies less than its wall time, and page faults count fresh memory touched."""
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_minflt


def worker_time(spec: dict[str, Any], out: Path) -> None:
    """Interleaved rounds of the recipe variants and the plain loop; rank 0 writes `out`."""
    import torch
    import torch.distributed as dist
    from transformers.integrations import deepspeed as hf_ds

    from perce_ds.ds_config import zero_stage
    from perce_ds.engine import Trainer

    variants: dict[str, str] = spec["variants"]  # name -> DeepSpeed config
    trainers = {}
    for name, ds in variants.items():
        # A ZeRO-3 Trainer registers its config with transformers (zero.Init for every model built while it
        # lives); a variant of another stage built after it must not be partitioned.
        hf_ds.unset_hf_deepspeed_config()
        trainers[name] = Trainer(_config(spec, name), ds)
    first = next(iter(trainers.values()))
    for trainer in trainers.values():
        # Start every variant from the first one's weights where that is a plain copy: an fp32 engine without ZeRO
        # partitioning steps the module's own parameters. (A pretrained model starts equal anyway; one built from a
        # config is initialised differently inside and outside zero.Init.)
        if trainer is not first and zero_stage(trainer.ds_config) == 0 and trainer.dtype == torch.float32:
            copy_weights(first.module.lm, trainer.module.lm)
    eps = first.ds_config["optimizer"]["params"].get("eps", 1e-8)
    if first.is_rank0:
        plain = PlainLoop(first.cfg, first.data, first.order, spec["plain_threads"], eps, init_from=first.module.lm)
    else:
        plain = copy_weights(first.module.lm, None)  # the gathers are collectives
    names = [*variants, PLAIN]
    times: dict[str, list[float]] = {n: [] for n in names}
    losses: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # rank 0's CPU seconds per step
    faults: dict[str, list[int]] = {n: [] for n in names}  # rank 0's minor page faults per step
    idle_cpu_s = 0.0  # CPU time a waiting rank spends while rank 0 runs the plain step

    def run(name: str, step: int) -> tuple[float, float]:
        if name != PLAIN:
            dt, result = _timed(trainers[name].train_step, step)
            if not result.applied:
                raise RuntimeError(f"{name}: step {step} was refused (non-finite loss)")
            return dt, result.metrics["loss"]
        if plain is not None:
            dt, loss = _timed(plain.step, step)
            dist.barrier()
            return dt, loss
        nonlocal idle_cpu_s
        cpu0 = time.process_time()
        dist.barrier()
        idle_cpu_s += time.process_time() - cpu0
        return 0.0, 0.0

    warmup, rounds = spec["warmup"], spec["rounds"]
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cpu0, faults0 = _usage()
            dt, loss = run(name, r)
            cpu1, faults1 = _usage()
            losses[name].append(loss)
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(cpu1 - cpu0)
                faults[name].append(faults1 - faults0)
    n_tokens = [sum(b.n_response_tokens for b in (plain.batches(r) if plain else [])) for r in range(warmup + rounds)]

    breakdown: dict[str, dict[str, float]] = {}
    step_base = warmup + rounds
    for name in names:
        timer = PhaseTimer(_sync)
        totals = []
        with phase_timing(timer), zero3_phases(timer):
            for k in range(spec["breakdown_rounds"]):
                totals.append(run(name, step_base + k)[0])
        phases = {k: v / max(1, len(totals)) for k, v in sorted(timer.totals.items())}
        phases["step_total"] = sum(totals) / max(1, len(totals))
        phases["other"] = phases["step_total"] - sum(v for k, v in phases.items() if "/" not in k and k != "step_total")
        breakdown[name] = phases
    idle_cpu_s = _all_reduce([idle_cpu_s], "max")[0]
    if first.is_rank0:
        write_json(out, {
            "world_size": first.world, "times": times, "losses": losses, "breakdown": breakdown,
            "rank0_cpu_s": cpu, "rank0_minor_faults": faults,
            "warmup": warmup, "rounds": rounds, "response_tokens_per_step": n_tokens,
            "threads_per_rank": torch.get_num_threads(), "plain_threads": spec["plain_threads"],
            "waiting_ranks_cpu_s_during_plain": idle_cpu_s, "dtype": str(first.dtype),
            "attn_implementation": first.attn_implementation, "micro_batch_size": first.cfg.train.micro_batch_size,
            "n_params": sum(p.numel() for p in plain.params) if plain else None,
            "ds_configs": {n: trainers[n].ds_config for n in variants},
        })  # fmt: skip


def worker_mem(spec: dict[str, Any], name: str, out: Path) -> None:
    """Peak RSS of one variant in a fresh process (group); rank 0 writes `out`. The plain loop's process has
    no DeepSpeed engine: it prepares the recipe's data itself."""
    baseline = _mem_reset()  # after imports, before anything of the run exists
    if name == PLAIN:
        from perce_ds.data.order import DataOrder
        from perce_ds.data.pipeline import prepare_data

        cfg = _config(spec, "mem-plain")
        data = prepare_data(cfg, True, lambda: None)
        t = cfg.train
        order = DataOrder(len(data.train), spec.get("nproc", 1), t.micro_batch_size, t.grad_accum, t.seed)
        step = PlainLoop(cfg, data, order, spec["plain_threads"], eps=1e-8).step
    else:
        from perce_ds.engine import Trainer

        step = Trainer(_config(spec, f"mem-{name}"), spec["variants"][name]).train_step
    step(0)  # warm-up: optimizer state is created lazily
    resident = _mem_reset()
    for k in range(spec["mem_steps"]):
        step(1 + k)
    peak = float(_mem_peak())
    if name != PLAIN:
        peak, resident, baseline = _all_reduce([peak, float(resident), float(baseline)], "max")
    if int(os.environ.get("RANK", "0")) == 0:
        write_json(out, {"peak_mem_bytes": int(peak), "resident_before_steps_bytes": int(resident),
                         "baseline_bytes": int(baseline)})  # fmt: skip


# ---------------------------------------------------------------- the orchestrating process
def prepare(workdir: Path, args: argparse.Namespace) -> Path:
    """The benchmark's recipe (the given one plus TRAIN_OVERRIDES; --smoke: a tiny model, few users)."""
    import yaml

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    recipe.setdefault("train", {}).update(TRAIN_OVERRIDES)
    model = recipe.setdefault("model", {})
    if model.get("name_or_path") and not Path(model["name_or_path"]).is_absolute():
        model["name_or_path"] = str(ROOT / model["name_or_path"])
    if args.smoke:
        recipe["model"] = dict(SMOKE_MODEL)
        recipe["data"]["synthetic"].update({"users": 8, "eval_users": 2})
    path = workdir / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def summarise(timing: dict[str, Any], memory: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant: medians, ratios to the plain loop, losses, memory, breakdown."""
    t = timing["times"]
    plain = statistics.median(t[PLAIN])
    rows = []
    for name, values in t.items():
        med = statistics.median(values)
        diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(timing["losses"][name], timing["losses"][PLAIN])]
        m = memory.get(name, {})
        rows.append({
            "variant": name, "world_size": timing["world_size"], "median_step_s": med, "min_step_s": min(values),
            "max_step_s": max(values), "steps_measured": len(values), "ratio_to_plain": med / plain,
            "paired_ratio_to_plain": _median_ratio(values, t[PLAIN]),
            "paired_ratios": [x / y for x, y in zip(values, t[PLAIN])],
            "loss_max_rel_diff": max(diffs) if diffs else None, "peak_mem_bytes": m.get("peak_mem_bytes"),
            "rank0_cpu_s": statistics.median(timing["rank0_cpu_s"][name]),
            "rank0_minor_faults": statistics.median(timing["rank0_minor_faults"][name]),
            "peak_mem_above_baseline_bytes": m["peak_mem_bytes"] - m["baseline_bytes"] if m else None,
            "threads": timing["plain_threads"] if name == PLAIN else timing["threads_per_rank"],
            "processes": 1 if name == PLAIN else timing["world_size"], "breakdown_s": timing["breakdown"][name],
        })  # fmt: skip
        if name != PLAIN and timing["world_size"] == 1:
            rows[-1]["meets_target"] = rows[-1]["ratio_to_plain"] <= TARGET
    return rows


COLUMNS = [
    ("world_size", "ranks", ""), ("variant", "variant", ""), ("processes", "procs", ""), ("threads", "threads", ""),
    ("median_step_s", "median step s", ".2f"), ("min_step_s", "min", ".2f"), ("max_step_s", "max", ".2f"),
    ("ratio_to_plain", "/plain", ".3f"), ("paired_ratio_to_plain", "paired", ".3f"),
    ("rank0_cpu_s", "rank-0 CPU s", ".2f"), ("rank0_minor_faults", "page faults", ",.0f"),
    ("loss_max_rel_diff", "loss rel diff", ".1e"), ("peak_mem_bytes", "peak RSS", "bytes"),
]  # fmt: skip
PHASES = [("ablated_fwd", "ablated forward (no grad)"), ("ablated_fwd/logprob_head", "  of which log-prob head"),
          ("ablated_fwd/zero3_fetch", "  of which ZeRO-3 fetch"), ("ablated_fwd/zero3_release", "  of which ZeRO-3 release"),
          ("cond_fwd", "conditioned forward"), ("cond_fwd/logprob_head", "  of which log-prob head"),
          ("cond_fwd/zero3_fetch", "  of which ZeRO-3 fetch"), ("cond_fwd/zero3_release", "  of which ZeRO-3 release"),
          ("backward", "backward"), ("backward/logprob_head_bwd", "  of which log-prob head"),
          ("backward/zero3_fetch", "  of which ZeRO-3 fetch"), ("backward/zero3_release", "  of which ZeRO-3 release"),
          ("optimizer_step", "optimizer step"), ("zero3_fetch", "ZeRO-3 fetch outside the passes"),
          ("zero3_release", "ZeRO-3 release outside the passes"), ("other", "other (collate, weights, all-reduces, Python)"),
          ("step_total", "step total")]  # fmt: skip


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    cols = [(f"{r['world_size']}r {r['variant']}", r) for r in rows]
    known = {k for k, _ in PHASES}
    extra = sorted({k for r in rows for k in r["breakdown_s"]} - known)
    table = [{"phase": label, **{c: r["breakdown_s"].get(k) for c, r in cols}} for k, label in PHASES]
    table += [{"phase": k, **{c: r["breakdown_s"].get(k) for c, r in cols}} for k in extra]
    table = [row for row in table if any(row[c] is not None for c, _ in cols)]
    return format_table(table, [("phase", "phase (s per step)", "")] + [(c, c, ".3f") for c, _ in cols])


def report(rows: list[dict[str, Any]], timings: list[dict[str, Any]], info: dict[str, Any]) -> str:
    first = timings[0]
    lines = [
        f"recipe_vs_plain: {info['device']}, commit {info['commit']}, {info['date_utc']} UTC, "
        f"load avg {info['load_before']} -> {info['load_after']}; dtype {first['dtype']}, "
        f"attention {first['attn_implementation']}, {first['n_params'] / 1e6:.1f}M parameters, "
        f"micro-batch {first['micro_batch_size']} per rank",
        *(f"{t['world_size']} rank(s): {t['rounds']} timed rounds after {t['warmup']} warm-up, interleaved; "
          f"response tokens per step {statistics.median(t['response_tokens_per_step']):.0f} (median); "
          f"waiting ranks' CPU during the plain steps {t['waiting_ranks_cpu_s_during_plain']:.2f} s"
          for t in timings),
        "",
        format_table(rows, COLUMNS),
        "",
        "where the time goes (one instrumented round after the timed ones):",
        breakdown_table(rows),
        "",
    ]  # fmt: skip
    for r in rows:
        if "meets_target" in r:
            lines.append(f"target {r['variant']} at 1 rank <= {TARGET} x plain loop: {r['ratio_to_plain']:.3f} "
                         f"(paired {r['paired_ratio_to_plain']:.3f}) -> {'MET' if r['meets_target'] else 'NOT MET'}")  # fmt: skip
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> int:
    sizes = SIZES["smoke" if args.smoke else "full"]
    for name in ("rounds", "warmup"):
        if getattr(args, name) is not None:
            setattr(sizes, name, getattr(args, name))
    variants = dict(v.split("=", 1) for v in args.variant) if args.variant else {"recipe": str(DS_CONFIG)}
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="perce-recipe-vs-plain-")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    try:
        rows, timings, plain_memory = [], [], {}
        for nproc in args.nproc:
            threads = args.threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
            spec = {"workdir": str(workdir / f"n{nproc}"), "recipe": str(prepare(workdir, args)), "variants": variants,
                    "warmup": sizes.warmup, "rounds": sizes.rounds, "breakdown_rounds": sizes.breakdown_rounds,
                    "mem_steps": sizes.mem_steps, "plain_threads": args.plain_threads or threads, "nproc": nproc}  # fmt: skip
            spec_path = workdir / f"spec-n{nproc}.json"
            spec_path.write_text(json.dumps(spec, indent=2))
            env = {"OMP_NUM_THREADS": str(threads)}
            timeout = args.timeout or sizes.timeout_s
            out = workdir / f"time-n{nproc}.json"
            launch(MODULE, ["--worker", "time", "--spec", str(spec_path), "--out", str(out)], nproc, timeout, env)
            timing = json.loads(out.read_text())
            memory = {}
            for name in [] if args.no_memory else [*variants, PLAIN]:
                if name == PLAIN and plain_memory:  # one process at any world size: measured once
                    memory[PLAIN] = plain_memory
                    continue
                mem_out = workdir / f"mem-n{nproc}-{name}.json"
                launch(MODULE, ["--worker", "mem", "--spec", str(spec_path), "--name", name, "--out", str(mem_out)],
                       1 if name == PLAIN else nproc, timeout, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"})  # fmt: skip
                memory[name] = json.loads(mem_out.read_text())
            plain_memory = memory.get(PLAIN, plain_memory)
            timings.append(timing)
            rows += summarise(timing, memory)
        info = machine_info()
        info["load_before"] = " ".join(f"{x:.2f}" for x in load_before)
        info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(report(rows, timings, info))
        if args.json:
            write_json(args.json, {"machine": info, "rows": rows, "timings": timings})
    finally:
        if tmp is not None and not args.keep_workdir:
            tmp.cleanup()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny llama on the recipe's data (~1 minute), for CI")
    p.add_argument("--recipe", default=str(RECIPE), help="the training recipe to time (default: %(default)s)")
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="world sizes, one job each")
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME=DS_CONFIG",
        help="a recipe variant (repeatable; default: recipe=ds_configs/zero3.json), timed side by side",
    )
    p.add_argument("--threads-per-rank", type=int, help="OMP_NUM_THREADS of each rank (default: cores / ranks)")
    p.add_argument("--plain-threads", type=int, help="torch threads of the plain loop (default: one rank's)")
    p.add_argument("--rounds", type=int, help="timed rounds")
    p.add_argument("--warmup", type=int, help="untimed warm-up rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    p.add_argument("--json", help="write rows, timings and machine facts here")
    p.add_argument("--timeout", type=int, help="seconds per worker job")
    p.add_argument("--workdir", help="keep recipe, specs and worker outputs here (default: a temp dir)")
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--worker", choices=["time", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        spec = json.loads(Path(args.spec).read_text())
        if args.worker == "time":
            worker_time(spec, Path(args.out))
        else:
            worker_mem(spec, args.name, Path(args.out))
        from perce_ds.distributed import exit_process, shutdown

        shutdown()
        exit_process(0)  # no interpreter teardown with gloo threads alive
    return orchestrate(args)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
