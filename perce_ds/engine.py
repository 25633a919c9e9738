"""The PerCE training loop around one DeepSpeed engine.

One optimizer step = one window of `grad_accum` micro-batches. For each micro-batch:
  E: the persona-ablated pass (no grad, no checkpointing) gives log P(y_i | x, y_<i);
     the conditioned pass gives log P(y_i | p_u, x, y_<i) and, detached, the weights w_i;
  M: loss = -sum_i w_i log P(y_i | p_u, x, y_<i) / N, N = response tokens of the whole window on
     all ranks; backward; step.
Both passes go through the same engine, in the same order on every rank (ZeRO-3 all-gathers are
collectives); a micro-batch with no response tokens still runs both passes and a backward.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from perce_ds import checkpoint, distributed, estep, lora
from perce_ds.best import KeepBest
from perce_ds.config import RunConfig
from perce_ds.data.collate import MicroBatch, PassInputs, collate, fuse_passes
from perce_ds.data.order import DataOrder
from perce_ds.data.pipeline import PreparedData, data_files, prepare_data, require_profiles
from perce_ds.data.sources import load_many
from perce_ds.distributed import all_reduce_sum, any_rank, init_process_group, local_device, skip_micro_step
from perce_ds.ds_config import load_ds_config, resolve_ds_config, zero_stage
from perce_ds.estep import OfflineWeights
from perce_ds.evaluation.demo import demo_evaluation
from perce_ds.evaluation.teacher_forced import eval_metrics, eval_sums, teacher_forced
from perce_ds.logging_utils import metrics_logger, setup_logging
from perce_ds.loss import TokenStats, get_scheme, token_weights, weighted_nll_sum
from perce_ds.lr_schedule import lr_lambda
from perce_ds.model import (
    PerceLM,
    build_causal_lm,
    check_packing_kernel,
    hidden_size,
    resolve_attn_implementation,
    resolve_dtype,
)
from perce_ds.preemption import StopRequest
from perce_ds.profiling import phase
from perce_ds.step_stats import CEWatch, StepStats

log = logging.getLogger("perce_ds")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float | None]
    applied: bool


class Trainer:
    """Set up data, model and engine for a RunConfig; `train()` runs it to the end."""

    def __init__(self, cfg: RunConfig, ds_config_path: str | Path, inference_only: bool = False):
        self.cfg = cfg
        self.inference_only = inference_only  # E-step jobs: no optimizer states, no checkpoints
        if not dist.is_initialized():
            init_process_group(cfg.train.dist_timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_rank0 = self.rank == 0
        self.device = local_device()
        self.run_dir = cfg.run_dir
        if self.is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        setup_logging(self.is_rank0, self.run_dir / "train.log")
        torch.manual_seed(cfg.train.seed)

        self.data: PreparedData = prepare_data(cfg, self.is_rank0, dist.barrier)
        self.tokenizer = self.data.tokenizer
        if cfg.train.eval_every and not self.data.eval:
            log.warning("train.eval_every=%d but the eval split is empty: nothing to evaluate", cfg.train.eval_every)
        self.order = DataOrder(
            len(self.data.train), self.world, cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed
        )
        self.total_steps = cfg.train.max_steps or self.order.steps_per_epoch * cfg.train.epochs
        self.scheme = get_scheme(cfg.loss.scheme)
        self.offline: OfflineWeights | None = None
        if cfg.loss.weights_from and not inference_only:
            expected = estep.fingerprint(cfg, self.data.train, self.tokenizer)
            self.offline = OfflineWeights(cfg.loss.weights_from, expected)
            log.info("offline EM: weights from %s (fingerprint %s)", cfg.loss.weights_from, expected)
        self.run_ablated = self.offline is None and (self.scheme.needs_ablated or cfg.loss.track_pir)
        if self.offline is None and self.scheme.needs_ablated:
            require_profiles(self.data.train, self.data.reports["train"], cfg.loss.scheme)

        self.dtype = resolve_dtype(cfg.model.dtype)
        self.attn_implementation = resolve_attn_implementation(cfg.model.attn_implementation)
        check_packing_kernel(cfg.data.packing, self.device, self.attn_implementation)
        log.info("attention: %s, dtype: %s, world size: %d", self.attn_implementation, self.dtype, self.world)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.engine, self.module = self._build_engine(ds_config_path)
        if self.module.dropout_sources and self.run_ablated:  # README "Dropout and PIR"
            log.info("model dropout (%s): PIR from eval-mode passes, one extra no-grad forward per micro-batch",
                     ", ".join(self.module.dropout_sources[:4]))  # fmt: skip

        self.metrics = metrics_logger(cfg, self.is_rank0, self.resume_from is not None, wandb=not inference_only)
        self.start_step = 0
        self.nonfinite_in_a_row = 0
        self.refused_steps = 0
        self.ce_watch = CEWatch(cfg.loss.warn_no_personal_steps, cfg.loss.clip_min)
        if not inference_only:
            self._write_run_files()
            self._maybe_resume()
        t = cfg.train
        self.best = KeepBest(self.run_dir, t.keep_best, t.keep_best_mode, self.start_step > 0, t.keep_best_patience,
                             t.eval_every)  # fmt: skip

    # ---------------------------------------------------------------- setup
    def _build_engine(self, ds_config_path: str | Path) -> tuple[Any, PerceLM]:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        hidden = hidden_size(self.cfg.model)
        self.ds_config = resolve_ds_config(load_ds_config(ds_config_path), self.cfg, self.world, hidden, self.dtype)
        self.resume_from = (
            None if self.inference_only else checkpoint.resume_point(self.ckpt_root, self.cfg.train.resume, self.world)
        )
        if self.resume_from is not None and checkpoint.read_state(self.resume_from).get("universal"):
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        # Must stay referenced for the whole run: transformers consults it for zero.Init at build
        # time and for synced_gpus in generate().
        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config) if zero_stage(self.ds_config) == 3 else None
        lm = build_causal_lm(self.cfg.model, self.tokenizer, self.dtype, self.attn_implementation)
        # LoRA: adapters injected into lm in place, so PerceLM runs both passes through the adapted weights.
        self.peft_model = None if self.cfg.model.lora is None else lora.add_adapters(lm, self.cfg.model.lora)
        module = PerceLM(lm, self.cfg.loss.logprob_chunk_size)
        if self.inference_only:
            self.ds_config.pop("optimizer", None)
            engine, _, _, _ = deepspeed.initialize(model=module, config=self.ds_config)
            engine.eval()
            return engine, module
        module.set_activation_checkpointing(self.cfg.model.activation_checkpointing)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, self.total_steps)),
        )
        return engine, module

    def _write_run_files(self) -> None:
        if not self.is_rank0:
            return
        self.cfg.dump(self.run_dir / "config.yaml")
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        reports = {k: v.summary() for k, v in self.data.reports.items()}
        (self.run_dir / "data_report.json").write_text(json.dumps(reports, indent=2))
        log.info(
            "data: %d train / %d eval examples; global batch %d; %d steps (%d per epoch, %d records unused per epoch)",
            len(self.data.train), len(self.data.eval), self.order.global_batch, self.total_steps,
            self.order.steps_per_epoch, self.order.dropped_per_epoch,
        )  # fmt: skip

    def _maybe_resume(self) -> None:
        path = self.resume_from
        if path is None:
            self.metrics.truncate_after(0)  # a fresh start: rows of an earlier attempt in this run dir are stale
            return
        state = checkpoint.load_checkpoint(self.engine, path)
        self.start_step = int(state["step"])
        self.metrics.truncate_after(self.start_step)  # rows logged after this checkpoint are replayed
        log.info("resumed from %s at step %d", path, self.start_step)

    # ---------------------------------------------------------------- one step
    def micro_batches(self, step: int) -> list[MicroBatch]:
        pad = self.tokenizer.pad_token_id
        return [
            collate([self.data.train[i] for i in idx], pad, self.cfg.data.packing).to(self.device)
            for idx in self.order.window(step, self.rank)
        ]

    def _forward(
        self,
        inputs: PassInputs,
        batch: MicroBatch,
        with_entropy: bool = False,
        response: tuple | None = None,
        ablated: PassInputs | None = None,
    ) -> dict[str, torch.Tensor | None]:
        response_ids, response_mask = response or (batch.response_ids, batch.response_mask)
        return self.engine(
            response_ids=response_ids,
            response_mask=response_mask,
            with_entropy=with_entropy,
            ablated=None if ablated is None else ablated.as_kwargs(),
            **inputs.as_kwargs(),
        )

    def _rng(self, step: int, micro: int) -> torch.Generator:
        """Per (step, rank, micro-batch) randomness for schemes that draw: the same after a resume."""
        return torch.Generator().manual_seed(hash((self.cfg.train.seed, step, self.rank, micro)) & 0x7FFFFFFF)

    def token_stats(self, batch: MicroBatch, step: int, micro: int) -> tuple[torch.Tensor, TokenStats]:
        """E-step for one micro-batch: returns (logp_cond with grad, detached statistics)."""
        if self.run_ablated and self.cfg.loss.fused_passes:
            # One forward over both passes (one ZeRO-3 all-gather); the ablated half is detached, so
            # its activations are kept and backpropagated through for nothing: the trade-off.
            fused, ids2, mask2 = fuse_passes(batch, self.tokenizer.pad_token_id)
            n = batch.n_response_tokens
            if self.module.dropout_sources:
                # Dropout masks would differ between the halves: the statistics come from an eval-mode fused pass,
                # the gradient from a train-mode conditioned pass (a second engine call per micro-batch).
                with torch.no_grad(), self.module.dropout_off():
                    out = self._forward(fused, batch, with_entropy=self.scheme.needs_entropy, response=(ids2, mask2))
                logp = self._forward(batch.conditioned, batch)["logp"] if torch.is_grad_enabled() else out["logp"][:n]
            else:
                out = self._forward(fused, batch, with_entropy=self.scheme.needs_entropy, response=(ids2, mask2))
                logp = out["logp"][:n]
            entropy = out["entropy"][:n] if out["entropy"] is not None else None
            return logp, TokenStats(
                out["logp"][:n].detach(), batch.seq_ids(), out["logp"][n:].detach(), entropy, self._rng(step, micro)
            )
        # The ablated pass (no grad, no checkpointing) runs first, inside the same engine call: see PerceLM.forward.
        # On a model with dropout the statistics come from eval-mode passes there ("logp_stats").
        ablated = batch.ablated if self.run_ablated else None
        out = self._forward(batch.conditioned, batch, with_entropy=self.scheme.needs_entropy, ablated=ablated)
        logp_abl, logp_stats = out.get("logp_ablated"), out.get("logp_stats", out["logp"])
        stats = TokenStats(logp_stats.detach(), batch.seq_ids(), logp_abl, out["entropy"], self._rng(step, micro))
        return out["logp"], stats

    def train_step(self, step: int) -> StepResult:
        """One optimizer step (or a refused one when a loss is not finite)."""
        t0 = time.perf_counter()
        batches = self.micro_batches(step)
        n_global = int(
            all_reduce_sum(torch.tensor([float(sum(b.n_response_tokens for b in batches))]), self.device).item()
        )
        step_stats = StepStats()
        refused = False
        window_scheme = self.offline is None and self.scheme.window_statistic is not None
        # With several micro-batches the window statistic must be known before the first backward: a no-grad
        # pre-pass. With one, the grad pass itself gives it (one all-reduce, no extra forward).
        window_mean = self._window_mean_prepass(batches) if window_scheme and len(batches) > 1 else None
        for micro, batch in enumerate(batches):
            if refused:  # the window is lost; keep the engine's micro-step count aligned
                skip_micro_step(self.engine)
                continue
            logp_cond, stats = self.token_stats(batch, step, micro)
            if self.offline is not None:
                with phase("offline_weights_lookup"):
                    weights, pir = self.offline.for_batch(batch)
            else:
                if window_scheme:
                    stats.window_mean = window_mean if window_mean is not None else self._global_mean([stats])
                weights = token_weights(stats, self.cfg.loss, self.scheme)
                pir = stats.pir if stats.logp_abl is not None else None
            numerator = weighted_nll_sum(logp_cond, weights)
            finite = all_reduce_sum(torch.tensor([float(torch.isfinite(numerator).item())]), self.device)
            if finite.item() < self.world:
                refused = True
                skip_micro_step(self.engine)
                continue
            # DeepSpeed averages gradients over data-parallel ranks; scaling by world / N_global turns
            # that average into one token mean over the whole window on all ranks.
            loss = numerator * (self.world / max(n_global, 1))
            with phase("backward"):
                self.engine.backward(loss, scale_wrt_gas=False)
            with phase("optimizer_step"):
                self.engine.step()
            step_stats.add_micro_batch(batch, stats, weights, numerator, pir, self.cfg.loss.clip_min)
        step_stats.sums = all_reduce_sum(step_stats.sums, self.device)
        if refused:
            return self._refuse(step)
        self.nonfinite_in_a_row = 0
        metrics = step_stats.metrics(
            time.perf_counter() - t0, self.engine.get_lr()[0], self.engine.get_global_grad_norm()
        )
        return StepResult(step, metrics, applied=True)

    def _global_mean(self, stats: list[TokenStats]) -> float:
        """Mean of the scheme's window statistic over these micro-batches' tokens on all ranks."""
        total = torch.zeros(2, dtype=torch.float64)
        for s in stats:
            values = self.scheme.window_statistic(s).double()
            total += torch.tensor([float(values.sum()), float(values.numel())], dtype=torch.float64)
        total = all_reduce_sum(total, self.device)
        return float(total[0] / total[1]) if total[1] > 0 else 1.0

    @torch.no_grad()
    def _window_mean_prepass(self, batches: list[MicroBatch]) -> float:
        """The window statistic's global mean from a no-grad conditioned pass over every micro-batch (in eval mode
        when the per-token statistics are: a model with dropout and the ablated pass, see PerceLM.forward)."""
        stats = []
        eval_stats = self.run_ablated and bool(self.module.dropout_sources)
        with self.module.activation_checkpointing_paused(), self.module.dropout_off(eval_stats):
            for batch in batches:
                out = self._forward(batch.conditioned, batch, with_entropy=self.scheme.needs_entropy)
                stats.append(TokenStats(out["logp"], batch.seq_ids(), entropy=out["entropy"]))
        return self._global_mean(stats)

    def _refuse(self, step: int) -> StepResult:
        self.nonfinite_in_a_row += 1
        self.refused_steps += 1
        log.warning(
            "step %d refused: non-finite loss (%d in a row, limit train.max_nonfinite_steps=%d); parameters unchanged",
            step, self.nonfinite_in_a_row, self.cfg.train.max_nonfinite_steps,
        )  # fmt: skip
        if self.nonfinite_in_a_row >= max(1, self.cfg.train.max_nonfinite_steps):
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite loss (last: step {step}); stopping. "
                f"The last checkpoint in {self.ckpt_root} holds finite weights: lower train.lr or inspect the data"
            )
        return StepResult(step, {"refused": 1.0}, applied=False)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float | None]:
        """Teacher-forced CE with and without the profile, accuracy, PIR on persona vs other tokens and, on a split
        with persona spans, NLL / accuracy per token class (teacher_forced.eval_metrics; all ranks)."""
        if not self.data.eval:
            return {}
        self.engine.eval()
        try:
            with self.module.activation_checkpointing_paused():
                scored = teacher_forced(self.engine, self.data.eval, self.tokenizer.pad_token_id,
                                        self.cfg.train.micro_batch_size, self.device, self.rank, self.world,
                                        with_hits=True)  # fmt: skip
        finally:
            self.engine.train()
        return eval_metrics(all_reduce_sum(eval_sums(scored, self.data.eval), self.device).tolist())

    # ---------------------------------------------------------------- the run
    def save(self, step: int) -> Path:
        state = {
            "step": step,
            "world_size": self.world,
            "total_steps": self.total_steps,
            "scheme": self.cfg.loss.scheme,
        }
        path = checkpoint.save_checkpoint(self.engine, self.ckpt_root, step, state, self.cfg.train.keep_last)
        log.info("checkpoint: %s", path)
        return path

    def train(self) -> dict[str, Any]:
        """Run from start_step to total_steps; checkpoint, evaluate, export, and return a summary.

        Ends early (with a checkpoint, summary["stopped"] set) on train.stop_after, on SIGUSR1/SIGTERM
        or when train.max_wall_time is spent; the latter two ask the launcher to requeue the job. Early stopping
        (train.keep_best_patience) ends it as finished, at the evaluation that spent the patience.
        """
        from tqdm import tqdm

        self.engine.train()
        if self.cfg.train.save_init_model and self.start_step == 0:
            self._export_hf("hf_init")
        stop = StopRequest(self.cfg.train.max_wall_time)
        end = self.total_steps
        if self.cfg.train.stop_after:
            end = min(end, self.start_step + self.cfg.train.stop_after)
        last: dict[str, float | None] = {}
        step = self.start_step
        evaluation: dict[str, Any] | None = None  # the last evaluation when the patience ran out (early stop)
        early = self.best.patience_spent(step)  # a resumed run that had stopped early
        with tqdm(
            total=self.total_steps, initial=step, disable=not self.is_rank0, desc="train", dynamic_ncols=True
        ) as bar:
            while step < end and not early:
                result = self.train_step(step)
                step += 1
                bar.update(1)
                if result.applied:
                    last = result.metrics
                    self.metrics.log(step, result.metrics, every=self.cfg.train.log_every)
                    if self.scheme.needs_ablated:
                        self.ce_watch.update(step, result.metrics.get("personal_ratio"))
                    bar.set_postfix(loss=f"{last['loss']:.4f}" if last.get("loss") is not None else "n/a")
                if self.cfg.train.eval_every and step % self.cfg.train.eval_every == 0 and step < self.total_steps:
                    evaluation = self._evaluate_and_log(step)  # the final one comes after the loop
                    early = self.best.patience_spent(step)
                if any_rank(stop.requested(), self.device):
                    break
                if self.cfg.train.save_every and step % self.cfg.train.save_every == 0 and step < end and not early:
                    self.save(step)
        if step > self.start_step or not checkpoint.complete_checkpoints(self.ckpt_root):
            self.save(step)
        if early:
            log.info("early stop at step %d: %s last improved at step %d", step, self.best.metric, self.best.step)
        elif step < self.total_steps:
            reason = stop.reason or "train.stop_after"
            log.warning(
                "stopped at step %d of %d (%s); resume with --train.resume auto", step, self.total_steps, reason
            )
            return self._finish(last, {"stopped": reason, "stopped_at": step, "requeue": stop.reason is not None})
        evaluation = evaluation if early and evaluation is not None else self._evaluate_and_log(step)
        if self.cfg.train.final_generation_eval and self.data.eval:
            evaluation |= self._generation_eval()
        if self.cfg.train.export_hf:
            self._export_hf("hf")
        early_stop = {"early_stopped_at": step, "best_step": self.best.step} if early else {}
        return self._finish(last, early_stop | {"eval": evaluation})

    def _export_hf(self, folder: str) -> None:
        """<run_dir>/<folder>: the model as a Hugging Face folder (a collective: every rank calls it)."""
        card = checkpoint.model_card(self.cfg.train.run_name, self.cfg.to_dict(), self.total_steps, self.world)
        lora.export_model(self.peft_model, self.module.lm, self.tokenizer, self.run_dir / folder, self.is_rank0, card)

    def _evaluate_and_log(self, step: int) -> dict[str, Any]:
        evaluation = self.evaluate()
        if evaluation:  # no eval split: nothing to log
            self.metrics.log(step, evaluation, split="eval")
        if not self.inference_only and self.best.update(step, evaluation):  # the same values on every rank
            self._export_hf("hf_best.tmp")
            if self.is_rank0:
                self.best.commit(self.run_dir / "hf_best.tmp")
        return evaluation

    def _generation_eval(self) -> dict[str, Any]:
        """Generate for the eval split and score it (ROUGE/METEOR, persona-token accuracy, PIR F1)."""
        records = load_many(data_files(self.cfg)[1])[0] if self.cfg.data.source == "files" else None
        result = demo_evaluation(
            self.engine, self.module, self.tokenizer, self.data.eval, records, self.run_dir,
            self.rank, self.world, max_new_tokens=self.cfg.train.eval_max_new_tokens,
        )  # fmt: skip
        self.engine.train()
        return result

    def _finish(self, last: dict[str, float | None], extra: dict[str, Any]) -> dict[str, Any]:
        """summary.json (a stopped run's too, marked "stopped": what ran, on which device), the metrics log closed."""
        summary = {
            "run_dir": str(self.run_dir),
            "steps": self.total_steps,
            "scheme": self.cfg.loss.scheme,
            "final": last,
            "refused_steps": self.refused_steps,
            "records_skipped": {k: len(v.skipped) for k, v in self.data.reports.items()},
            "profile_items_dropped": {k: v.profile_items_dropped for k, v in self.data.reports.items()},
            "profiles_cut_to_nothing": {k: v.profiles_cut_to_nothing for k, v in self.data.reports.items()},
            "world_size": self.world,
            "attn_implementation": self.attn_implementation,
            "device": distributed.device_label(),  # what step_time_s was measured on
        } | extra
        if self.is_rank0:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics.close()
        return summary
