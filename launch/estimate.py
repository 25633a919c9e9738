"""Offline E-step: per-token PIR and PerCE weights for a dataset, with a fingerprint.

    deepspeed launch/estimate.py --deepspeed ds_configs/zero3.json --recipe R.yaml --out DIR [--model M] [--key value ...]

--model is an HF folder, a perce_ds checkpoint (runs/X/checkpoints/step_N), a LoRA adapter folder
(runs/X/hf_adapter: scored as its base model + the adapter), or omitted for the recipe's own model. A
checkpoint of a LoRA run needs that run's recipe (its model.lora): the checkpoint holds the adapter only.
When the estimating model is not already an HF folder (built from a config, a DeepSpeed checkpoint, or a
base model with an adapter), it is exported (merged) to DIR/model first, and the M-step must start from
that folder: `launch/train.py ... --model.name_or_path DIR/model --model.config null --loss.weights_from DIR`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perce_ds.cli import exit_code_of, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero3.json"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"))
    parser.add_argument("--model", default="", help="HF folder or checkpoints/step_N; default: the recipe's model")
    parser.add_argument("--out", required=True, help="directory for shard-*.parquet and index.json")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args, rest = parser.parse_known_args(argv)

    from perce_ds import checkpoint, estep, lora
    from perce_ds.config import RunConfig
    from perce_ds.distributed import shutdown
    from perce_ds.engine import Trainer

    overrides = parse_overrides(rest)
    model = Path(args.model) if args.model else None
    ds_checkpoint = model is not None and checkpoint.is_checkpoint(model)
    adapter = model is not None and (model / lora.ADAPTER_CONFIG).is_file()
    if adapter:
        overrides += lora.adapter_settings(model)
    elif model is not None and not ds_checkpoint:
        overrides += [f"model.name_or_path={model}", "model.config=null", "model.lora=null"]
    cfg = RunConfig.load(args.recipe, overrides)
    trainer = Trainer(cfg, args.deepspeed, inference_only=True)
    out = Path(args.out)
    if ds_checkpoint:
        checkpoint.load_lm_weights(trainer.module.lm, model)
    if cfg.model.name_or_path is None or ds_checkpoint or cfg.model.lora is not None:
        # Give the estimating model a folder the M-step can start from (and fingerprint); LoRA: merged.
        exported = out / "model"
        lora.export_model(trainer.peft_model, trainer.module.lm, trainer.tokenizer, exported, trainer.is_rank0,
                          "E-step model\n")  # fmt: skip
        cfg.model.name_or_path, cfg.model.config, cfg.model.tokenizer, cfg.model.lora = str(exported), None, None, None
    index = estep.estimate(trainer, out)
    if trainer.is_rank0:
        print(f"E-step: {index['records']} records -> {out} (fingerprint {index['fingerprint']})")
        print(f"M-step: --model.name_or_path {cfg.model.name_or_path} --model.config null --loss.weights_from {out}")
    shutdown()
    return 0


if __name__ == "__main__":
    from perce_ds.distributed import exit_process

    exit_process(exit_code_of(main))  # no interpreter teardown with gloo threads alive
