"""Worker: online PerCE weights of the live engine vs the weights launch/estimate.py stored.

For the micro-batches the E-step formed, computes the weights exactly as training does
(ablated no-grad pass + detached conditioned log-probs -> scheme) and compares them with the
stored ones for the same records; also measures this model's fp32 PIR error against float64 on the same
tokens (the scale of a legitimate disagreement) and counts the weights on each clip bound. Writes
<out>/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from perce_ds import estep
from perce_ds.cli import parse_overrides
from perce_ds.config import RunConfig
from perce_ds.data.collate import collate
from perce_ds.data.order import shard_batches
from perce_ds.distributed import exit_process, shutdown
from perce_ds.engine import Trainer
from perce_ds.loss import token_weights
from tests.launch_utils import reference_logprobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args, rest = parser.parse_known_args()
    cfg = RunConfig.load(args.recipe, parse_overrides(rest))
    # The same model in float64, one unpadded sequence at a time: how far this model's fp32 arithmetic is
    # from exact PIR on these very tokens, the scale any two fp32 evaluations can disagree on. Loaded before
    # the Trainer exists: under its live ZeRO-3 config transformers would load it partitioned.
    exact = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float64).eval()
    trainer = Trainer(cfg, args.deepspeed)
    stored = estep.OfflineWeights(args.weights, estep.fingerprint(trainer.cfg, trainer.data.train, trainer.tokenizer))
    worst, fp32_error, n, all_weights = 0.0, 0.0, 0, []
    with torch.no_grad():  # the micro-batches launch/estimate.py formed, scored the way training scores them
        for number, (idx, keep) in enumerate(
            shard_batches(len(trainer.data.train), trainer.rank, trainer.world, trainer.cfg.train.micro_batch_size)
        ):
            examples = [trainer.data.train[i] for i in idx]
            batch = collate(examples, trainer.tokenizer.pad_token_id, scored=keep)
            _, stats = trainer.token_stats(batch, number, 0)  # seeded as estep.estimate seeds each batch
            online = token_weights(stats, trainer.cfg.loss)
            offline, pir = stored.for_batch(batch)
            worst = max(worst, float((online - offline).abs().max()), float((stats.pir - pir).abs().max()))
            pir_exact = torch.cat([
                reference_logprobs(exact, e.cond_prompt_ids, e.response_ids)
                - reference_logprobs(exact, e.abl_prompt_ids, e.response_ids)
                for e, counted in zip(examples, keep, strict=True) if counted
            ])  # fmt: skip
            fp32_error = max(fp32_error, float((stats.pir.double() - pir_exact).abs().max()))
            n += online.numel()
            all_weights.append(online)
    w, lo, hi = torch.cat(all_weights), trainer.cfg.loss.clip_min, trainer.cfg.loss.clip_max
    result = {
        "max_abs_diff": worst,
        "tokens": n,
        "fp32_error": fp32_error,
        "at_clip_min": int((w <= lo).sum()),
        "at_clip_max": int((w >= hi).sum()),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{trainer.rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown with gloo threads alive
