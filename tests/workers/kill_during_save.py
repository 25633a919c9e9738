"""2-rank worker: train with save_every=2 and SIGKILL rank 0 in the middle of writing step 4's
checkpoint (after DeepSpeed wrote its first file), as a node failure or `kill -9` would."""

from __future__ import annotations

import argparse
import os
import signal

from perce_ds.config import RunConfig
from perce_ds.engine import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    trainer = Trainer(RunConfig.load(args.recipe, ["train.save_every=2", "train.max_steps=6"]), args.deepspeed)
    engine_save = trainer.engine.checkpoint_engine.save

    def save_then_die(state_dict, path, *a, **kw):
        result = engine_save(state_dict, path, *a, **kw)
        if ".tmp-step_4" in str(path) and trainer.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    trainer.engine.checkpoint_engine.save = save_then_die
    trainer.train()


if __name__ == "__main__":
    main()
