"""2-rank worker: a LoRA run through Trainer.train() (as launch/train.py runs it), then what only the live engine
can tell, written to <out>/rank<R>.json:

- frozen: every frozen parameter, gathered after training, equals the base model's file bit for bit;
- optimizer: the fp32 partition this rank's optimizer holds, against the adapter's parameter count;
- greedy: the in-engine model's greedy continuation of a few prompts (to compare with the merged hf/ export).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from perce_ds.config import RunConfig
from perce_ds.distributed import exit_process, shutdown
from perce_ds.engine import Trainer

PROMPTS = [[5, 17, 42, 9], [3, 8, 8, 120], [11, 250, 7, 60]]  # token ids of the tiny tokenizer
GREEDY_TOKENS = 12


def frozen_equal_to_base(trainer: Trainer, base_file: Path) -> tuple[int, list[str]]:
    """(frozen tensors compared, names that differ from the base model's weights)."""
    import deepspeed
    from safetensors.torch import load_file

    base = load_file(str(base_file))
    checked, differ = 0, []
    for name, p in trainer.module.lm.named_parameters():
        if p.requires_grad:
            continue
        key = name.replace(".base_layer.", ".")
        with deepspeed.zero.GatheredParameters([p]):
            same = key in base and torch.equal(p.detach(), base[key])
        checked += 1
        if not same:
            differ.append(name)
    return checked, differ


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--deepspeed", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    cfg = RunConfig.load(args.recipe)
    trainer = Trainer(cfg, args.deepspeed)
    trainer.train()
    rank = trainer.rank
    checked, differ = frozen_equal_to_base(trainer, Path(cfg.model.name_or_path) / "model.safetensors")
    trainable = [p for p in trainer.module.parameters() if p.requires_grad]
    flat = trainer.engine.optimizer.fp32_partitioned_groups_flat
    trainer.engine.eval()
    with torch.no_grad():
        greedy = trainer.module.lm.generate(
            input_ids=torch.tensor(PROMPTS), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
            do_sample=False, synced_gpus=True, pad_token_id=trainer.tokenizer.pad_token_id,
        )  # fmt: skip
    out = {
        "frozen_checked": checked,
        "frozen_differ": differ,
        "adapter_parameters": sum(int(p.ds_numel) for p in trainable),
        "optimizer_partition": sum(int(t.numel()) for t in flat),
        "greedy": greedy.tolist(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    shutdown()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown with gloo threads alive
