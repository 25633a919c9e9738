"""Convert a checkpoint to DeepSpeed's universal format, to resume on a different number of ranks.

    python launch/convert_checkpoint.py runs/X/checkpoints/step_N [--out DIR]
    deepspeed --num_gpus M launch/train.py ... --train.resume runs/X/checkpoints_universal/step_N

ZeRO shards are tied to the world size that wrote them; the universal copy holds whole parameters and
optimizer states, and the trainer loads it with `checkpoint.load_universal`. Keep the global batch
(micro x accumulation x ranks) unchanged across the move so the data order continues exactly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a complete checkpoints/step_N directory")
    parser.add_argument("--out", type=Path, help="default: <run>/checkpoints_universal/step_N")
    args = parser.parse_args(argv)

    from perce_ds import checkpoint

    if not checkpoint.is_checkpoint(args.checkpoint):
        parser.error(f"{args.checkpoint} is not a complete perce_ds checkpoint (no {checkpoint.STATE_FILE})")
    if not checkpoint.zero_partitioned(args.checkpoint):
        parser.error(
            f"{args.checkpoint} was written without ZeRO partitioning (ZeRO stage 0, e.g. ds_configs/zero0.json), "
            "and DeepSpeed builds the universal format from ZeRO shards: resume it on the world size that wrote it, "
            "or start a new run from its hf/ export"
        )
    out = args.out or args.checkpoint.parent.parent / "checkpoints_universal" / args.checkpoint.name
    checkpoint.convert_to_universal(args.checkpoint, out)
    state = checkpoint.read_state(out)
    print(f"universal checkpoint of step {state['step']} (written by {state['world_size']} ranks): {out}")
    print(f"resume on any number of ranks with --train.resume {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
