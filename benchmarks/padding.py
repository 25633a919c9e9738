"""Padding fraction of padded vs packed (data.packing) micro-batches on LongLaMP-shaped data.

    python -m benchmarks.padding [--json PATH] [--micro-batch-sizes 2 4 8]

Tokenises the LongLaMP fixture copies in tests/fixtures/longlamp (the hub layout, with the recipes'
retrieval and budgets) with a sentencepiece tokenizer trained on their text, forms micro-batches in
the training order (DataOrder) and counts, per pass, the positions the model computes against the
real tokens: padded layout = rows x (longest prompt + longest response); packed = real tokens only.
Prints a table and optionally writes JSON (one object per task x micro-batch size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT
from perce_ds.config import RunConfig
from perce_ds.data.collate import collate
from perce_ds.data.order import DataOrder
from perce_ds.data.pipeline import prepare_data
from perce_ds.data.tokenizer import train_sentencepiece_tokenizer

FIXTURES = ROOT / "tests" / "fixtures" / "longlamp"
TASKS = ("abstract_generation_user", "product_review_user", "topic_writing_user")


def fixture_texts() -> list[str]:
    import pyarrow.parquet as pq

    texts = []
    for task in TASKS:
        for row in pq.read_table(FIXTURES / task / "train-00000-of-00001.parquet").to_pylist():
            texts += [row["input"], row["output"], *(" ".join(map(str, item.values())) for item in row["profile"])]
    return texts


def measure(task: str, tokenizer_dir: Path, out_dir: Path, micro: int) -> dict:
    cfg = RunConfig.load(None, [
        "data.source=longlamp", f"data.longlamp.dataset={FIXTURES}", f"data.longlamp.config={task}",
        "data.retrieval.top_k=4", "data.max_length=2560", "data.max_profile_tokens=1536", "data.on_bad_record=skip",
        "model.name_or_path=unused", f"model.tokenizer={tokenizer_dir}", f"train.output_dir={out_dir}",
        f"train.micro_batch_size={micro}", "train.run_name=padding",
    ])  # fmt: skip
    data = prepare_data(cfg, is_rank0=True, barrier=lambda: None)
    order = DataOrder(len(data.train), 1, micro, 1, seed=0)
    counts = {"cond_real": 0, "cond_padded": 0, "abl_real": 0, "abl_padded": 0}
    for step in range(order.steps_per_epoch):
        for idx in order.window(step, 0):
            batch = collate([data.train[i] for i in idx], data.tokenizer.pad_token_id)
            packed = collate([data.train[i] for i in idx], data.tokenizer.pad_token_id, packed=True)
            assert packed.conditioned.n_positions == batch.conditioned.n_tokens  # packing computes real tokens only
            counts["cond_real"] += batch.conditioned.n_tokens
            counts["cond_padded"] += batch.conditioned.n_positions
            counts["abl_real"] += batch.ablated.n_tokens
            counts["abl_padded"] += batch.ablated.n_positions
    both_real, both_padded = counts["cond_real"] + counts["abl_real"], counts["cond_padded"] + counts["abl_padded"]
    return {
        "task": task, "micro_batch_size": micro, "records": len(data.train), **counts,
        "padding_fraction_conditioned": 1 - counts["cond_real"] / counts["cond_padded"],
        "padding_fraction_ablated": 1 - counts["abl_real"] / counts["abl_padded"],
        "padding_fraction_both": 1 - both_real / both_padded,
        "padding_fraction_packed": 0.0,
        "positions_saved_by_packing": 1 - both_real / both_padded,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train_sentencepiece_tokenizer(fixture_texts(), Path(tmp) / "tok", vocab_size=2000)
        for task in TASKS:
            for micro in args.micro_batch_sizes:
                rows.append(measure(task, Path(tmp) / "tok", Path(tmp) / "runs", micro))
    print(f"{'task':<26}{'micro':>6}{'records':>8}{'pad cond':>10}{'pad abl':>9}{'pad both':>10}{'packed':>8}")
    for r in rows:
        print(f"{r['task']:<26}{r['micro_batch_size']:>6}{r['records']:>8}{r['padding_fraction_conditioned']:>10.1%}"
              f"{r['padding_fraction_ablated']:>9.1%}{r['padding_fraction_both']:>10.1%}{0:>8.1%}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
