"""2-rank worker: a short PerCE run (Trainer.train) on ZeRO-3, then demo_evaluation called with the arguments
Trainer._generation_eval passes; each rank writes the returned dict to <out>/rank<R>.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perce_ds.config import RunConfig
from perce_ds.data.pipeline import data_files
from perce_ds.data.sources import load_many
from perce_ds.distributed import exit_process, shutdown
from perce_ds.engine import Trainer
from perce_ds.evaluation.demo import demo_evaluation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    trainer = Trainer(RunConfig.load(args.recipe), args.deepspeed)
    trainer.train()  # the whole (short) run: checkpoint, eval, HF export -> a complete run directory
    records = load_many(data_files(trainer.cfg)[1])[0] if trainer.data.eval else None
    demo = demo_evaluation(trainer.engine, trainer.module, trainer.tokenizer, trainer.data.eval, records,
                           trainer.run_dir, trainer.rank, trainer.world, max_new_tokens=args.max_new_tokens)  # fmt: skip
    # the engine must still train afterwards
    after = trainer.train_step(trainer.total_steps)
    demo["_train_after"] = after.applied
    demo["_checkpointing_restored"] = trainer.module.lm.is_activation_checkpointing
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{trainer.rank}.json").write_text(json.dumps(demo))
    if trainer.is_rank0:
        print(demo["summary_lines"])
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown with gloo threads alive
