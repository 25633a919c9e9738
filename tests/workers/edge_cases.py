"""2-rank worker for engine edge cases; each rank writes its observations to <out>/rank<R>.json.

1. uneven: rank 1's micro-batch has no response tokens, rank 0's has some -> the step completes.
2. nonfinite: rank 1 alone produces a NaN loss -> the step is refused on both ranks, parameters
   unchanged; the next finite step applies.
3. save refusal: a NaN parameter -> save() raises and no checkpoint directory appears.
4. max_nonfinite_steps: NaN losses in a row -> NonFiniteLossError after the limit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perce_ds import loss
from perce_ds.config import RunConfig
from perce_ds.distributed import exit_process, shutdown
from perce_ds.engine import NonFiniteLossError, Trainer

POISON = {"on": False}


def _poisoned(stats, cfg):
    w = loss.REGISTRY["perce"].weights(stats, cfg)
    return torch.full_like(w, float("nan")) if POISON["on"] else w


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(trainer.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def max_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    loss.REGISTRY["poisoned_perce"] = loss.WeightScheme("poisoned_perce", _poisoned, needs_ablated=True)
    cfg = RunConfig.load(args.recipe, ["loss.scheme=poisoned_perce", "train.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, args.deepspeed)
    rank = trainer.rank
    out: dict[str, object] = {}

    # 1. uneven response tokens across ranks
    original = trainer.micro_batches

    def uneven(step: int):
        batches = original(step)
        if rank == 1:
            for b in batches:
                b.response_mask[:] = False
        return batches

    trainer.micro_batches = uneven
    before = snapshot(trainer)
    result = trainer.train_step(0)
    trainer.micro_batches = original
    after = snapshot(trainer)
    out["uneven"] = {"applied": result.applied, "loss": result.metrics.get("loss"), "change": max_change(before, after),
                     "finite": all(bool(torch.isfinite(t).all()) for t in after.values())}  # fmt: skip

    # 2. a NaN on one rank refuses the step everywhere
    before = snapshot(trainer)
    POISON["on"] = rank == 1
    refused = trainer.train_step(1)
    POISON["on"] = False
    after_refused = snapshot(trainer)
    applied = trainer.train_step(2)
    after_applied = snapshot(trainer)
    out["nonfinite"] = {
        "refused_applied": refused.applied,
        "change_after_refused": max_change(before, after_refused),
        "next_applied": applied.applied,
        "change_after_next": max_change(after_refused, after_applied),
        "next_loss": applied.metrics.get("loss"),
    }

    # 3. no checkpoint with non-finite weights
    import deepspeed

    name, param = next(iter(trainer.module.named_parameters()))
    saved = snapshot(trainer)[name]
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if rank == 0:
            param.data[0].fill_(float("nan"))
    try:
        trainer.save(99)
        out["save_refused"] = False
    except RuntimeError as e:
        out["save_refused"] = "non-finite" in str(e)
    out["step_99_exists"] = (trainer.ckpt_root / "step_99").exists()
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        if rank == 0:
            param.data.copy_(saved)

    # 4. consecutive non-finite steps stop the run
    POISON["on"] = True
    stopped_at = None
    for step in range(3, 8):
        try:
            trainer.train_step(step)
        except NonFiniteLossError:
            stopped_at = step
            break
    out["stopped_at"] = stopped_at
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown with gloo threads alive
