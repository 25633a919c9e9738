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
import json
import sys
from pathlib import Path
from typing import Any

from perce_ds.cli import exit_code_of, parse_overrides

ROOT = Path(__file__).resolve().parent.parent

PERCENTILES = (50, 90, 99, 100)


def percentiles(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/max of a list (all zeros when it is empty)."""
    import numpy as np

    if not values:
        return {f"p{p}": 0.0 for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def split_stats(examples: list[Any], report: Any) -> dict[str, Any]:
    """The numbers printed and saved for one split."""
    summary = report.summary()
    return {
        "records": len(examples),
        "records_read": summary["records_read"],
        "records_skipped": summary["records_skipped"],
        "users": summary["users"],
        "profile_size": percentiles(report.profile_sizes),
        "profile_items_kept": percentiles([e.profile_items_kept for e in examples]),
        "conditioned_prompt_tokens": percentiles([len(e.cond_prompt_ids) for e in examples]),
        "ablated_prompt_tokens": percentiles([len(e.abl_prompt_ids) for e in examples]),
        "response_tokens": percentiles([len(e.response_ids) for e in examples]),
        "profile_items_dropped": summary["profile_items_dropped"],
        "profile_items_trimmed": summary["profile_items_trimmed"],
        "profile_tokens_trimmed": summary["profile_tokens_trimmed"],
        "responses_capped": summary["responses_capped"],
        "empty_profiles": summary["empty_profiles"],
        "profiles_cut_to_nothing": summary["profiles_cut_to_nothing"],
        "cache_file": summary["cache_file"],
        "cache_built": summary["cache_built"],
        "profile_item_fields": summary.get("profile_item_fields", {}),
    }


def write_examples(out_dir: Path, split: str, examples: list[Any], tokenizer: Any) -> None:
    """One example (the first with a profile, else the first) rendered as the two passes see it."""
    if not examples:
        return
    ex = next((e for e in examples if e.cond_prompt_ids != e.abl_prompt_ids), examples[0])
    for name, prompt in (("conditioned", ex.cond_prompt_ids), ("ablated", ex.abl_prompt_ids)):
        text = tokenizer.decode(prompt + ex.response_ids)
        header = f"# {split} record {ex.record_id}: {name} prompt ({len(prompt)} tokens) + response ({len(ex.response_ids)} tokens)\n"
        (out_dir / f"{split}_{name}.txt").write_text(header + text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.yaml"), help="YAML recipe")
    args, rest = parser.parse_known_args(argv)

    from perce_ds.config import RunConfig
    from perce_ds.data.pipeline import prepare_data

    cfg = RunConfig.load(args.recipe, parse_overrides(rest))
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, is_rank0=True, barrier=lambda: None)
    out_dir = cfg.run_dir / "data_inspection"
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, examples in (("train", data.train), ("eval", data.eval)):
        stats[split] = split_stats(examples, data.reports[split])
        write_examples(out_dir, split, examples, data.tokenizer)
        s = stats[split]
        print(
            f"[{split}] {s['records']} records ({s['records_read']} read, {s['records_skipped']} skipped), {s['users']} users"
        )
        for key in (
            "profile_size",
            "profile_items_kept",
            "conditioned_prompt_tokens",
            "ablated_prompt_tokens",
            "response_tokens",
        ):
            print(f"  {key:27s} " + "  ".join(f"{k} {v:g}" for k, v in s[key].items()))
        print(
            f"  trimmed: {s['profile_items_dropped']} items dropped, {s['profile_items_trimmed']} items cut, "
            f"{s['profile_tokens_trimmed']} tokens; capped responses: {s['responses_capped']}; "
            f"empty profiles: {s['empty_profiles']}; profiles cut to nothing: {s['profiles_cut_to_nothing']}"
        )
        fields = s["profile_item_fields"]
        if fields:
            missing = {k: v for k, v in fields["items_missing_field"].items() if v}
            print(
                f"  profile items: {fields['profile_items']}; the prompt shows {fields['prompt_fields']}; "
                f"items lacking one (rendered empty): {missing or 'none'}; not shown: {fields['unused_item_fields']}"
            )
        if s["cache_file"]:
            print(f"  cache: {s['cache_file']} ({'built' if s['cache_built'] else 'reused'})")
    (out_dir / "report.json").write_text(json.dumps(stats, indent=2))
    print(f"rendered examples and report.json in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code_of(main))
