"""Train with PerCE on DeepSpeed.

    deepspeed launch/train.py --deepspeed ds_configs/zero3.json [--recipe recipes/X.yaml] [--train.lr 1e-5 ...]

    python launch/train.py [--recipe ...]      # no launcher: one process (laptop, debugger, notebook)

With no --recipe the demo recipe runs (synthetic persona data, a tiny model, CPU-friendly).
Any config key can be overridden as `--section.key value` or `--section.key=value`.
A user error (config key or type, missing file, bad record) prints one `error: ...` line and exits 2;
its traceback goes to <run>/train.log.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perce_ds.cli import exit_code_of, parse_overrides, print_summary

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero3.json"), help="DeepSpeed JSON config")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="YAML recipe")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--dry-run", action="store_true", help="size the job (batch, steps, tokens, memory) and exit")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "8")), help="for --dry-run")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="for --dry-run")
    args, rest = parser.parse_known_args(argv)

    from perce_ds.config import RunConfig

    if args.dry_run:
        import json

        from perce_ds.dryrun import dry_run, format_report

        report = dry_run(
            RunConfig.load(args.recipe, parse_overrides(rest)), args.deepspeed, args.world_size, args.gpus_per_node
        )
        print(format_report(report))
        print(json.dumps(report))
        return 0
    from perce_ds.distributed import shutdown
    from perce_ds.engine import Trainer
    from perce_ds.preemption import REQUEUE_EXIT_CODE

    cfg = RunConfig.load(args.recipe, parse_overrides(rest))
    trainer = Trainer(cfg, args.deepspeed)
    try:
        summary = trainer.train()
    except BaseException:
        # The process ends without interpreter teardown (exit_process): close the sinks here, so a wandb run
        # records that it failed (exit code 1) instead of being left to be marked crashed.
        trainer.metrics.close(exit_code=1)
        raise
    if trainer.is_rank0:
        print_summary(summary)
    shutdown()
    return REQUEUE_EXIT_CODE if summary.get("requeue") else 0


if __name__ == "__main__":
    from perce_ds.distributed import exit_process

    exit_process(exit_code_of(main))  # no interpreter teardown with gloo threads alive
