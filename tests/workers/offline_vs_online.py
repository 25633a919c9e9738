"""Worker: online PerCE weights of the live engine vs the weights launch/estimate.py stored.

For the micro-batches the E-step formed, computes the weights exactly as training does
(ablated no-grad pass + detached conditioned log-probs -> scheme) and compares them with the
stored ones for the same records. Writes the largest absolute difference to <out>/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from perce_ds import estep  # noqa: E402
from perce_ds.cli import parse_overrides  # noqa: E402
from perce_ds.config import RunConfig  # noqa: E402
from perce_ds.data.collate import collate  # noqa: E402
from perce_ds.data.order import shard_batches  # noqa: E402
from perce_ds.distributed import shutdown  # noqa: E402
from perce_ds.engine import Trainer  # noqa: E402
from perce_ds.loss import token_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args, rest = parser.parse_known_args()
    trainer = Trainer(RunConfig.load(args.recipe, parse_overrides(rest)), args.deepspeed)
    stored = estep.OfflineWeights(args.weights, estep.fingerprint(trainer.cfg, trainer.data.train, trainer.tokenizer))
    worst, n = 0.0, 0
    with torch.no_grad():  # the micro-batches launch/estimate.py formed, scored the way training scores them
        for idx, keep in shard_batches(
            len(trainer.data.train), trainer.rank, trainer.world, trainer.cfg.train.micro_batch_size
        ):
            batch = collate([trainer.data.train[i] for i in idx], trainer.tokenizer.pad_token_id, scored=keep)
            _, stats = trainer.token_stats(batch, 0, 0)
            online = token_weights(stats, trainer.cfg.loss)
            offline, pir = stored.for_batch(batch)
            worst = max(worst, float((online - offline).abs().max()), float((stats.pir - pir).abs().max()))
            n += online.numel()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{trainer.rank}.json").write_text(json.dumps({"max_abs_diff": worst, "tokens": n}))
    shutdown()


if __name__ == "__main__":
    main()
