"""Build the tokenised data of a recipe and show what the model will see.

    python launch/prepare_data.py --recipe recipes/longlamp/review_qwen3_4b.yaml [--data.retrieval.top_k 2 ...]

Runs the same preparation as training (loading, retrieval, prompts, the tokenised cache) in one process,
without torch.distributed, so the cache is ready before a job starts. Prints per split: records, users,
profile sizes, token-length percentiles of the conditioned and ablated prompts and the responses, trimmed
profile items/tokens, capped responses, empty profiles. Writes <run_dir>/data_inspection/: report.json and,
per split, one rendered conditioned and one ablated prompt (with the response) as plain text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perce_ds.cli import exit_code_of, parse_overrides

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="YAML recipe")
    args, rest = parser.parse_known_args(argv)

    from perce_ds.config import RunConfig
    from perce_ds.data.inspection import summary_lines, write_inspection
    from perce_ds.data.pipeline import prepare_data

    cfg = RunConfig.load(args.recipe, parse_overrides(rest))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, is_rank0=True, barrier=lambda: None)
    out_dir = cfg.run_dir / "data_inspection"
    for split, stats in write_inspection(data, out_dir).items():
        print("\n".join(summary_lines(split, stats)))
    print(f"rendered examples and report.json in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
