"""What the model will see, per split: counts, token-length percentiles, trimming, and two rendered prompts.

`launch/prepare_data.py` prints `summary_lines` and writes `write_inspection`'s files; the numbers come from the
split's SplitReport (the same counts training logs in data_report.json) and the tokenised examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from perce_ds.data.pipeline import PreparedData, SplitReport
from perce_ds.data.prompts import TokenizedExample

PERCENTILES = (50, 90, 99, 100)
LENGTH_KEYS = (
    "profile_size", "profile_items_kept", "conditioned_prompt_tokens", "ablated_prompt_tokens", "response_tokens",
)  # fmt: skip


def percentiles(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/max of a list (all zeros when it is empty)."""
    if not values:
        return {f"p{p}": 0.0 for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}


def split_stats(examples: list[TokenizedExample], report: SplitReport) -> dict[str, Any]:
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


def summary_lines(split: str, s: dict[str, Any]) -> list[str]:
    """`split_stats` as the lines prepare_data prints."""
    lines = [f"[{split}] {s['records']} records ({s['records_read']} read, {s['records_skipped']} skipped), "
             f"{s['users']} users"]  # fmt: skip
    lines += [f"  {key:27s} " + "  ".join(f"{k} {v:g}" for k, v in s[key].items()) for key in LENGTH_KEYS]
    lines.append(
        f"  trimmed: {s['profile_items_dropped']} items dropped, {s['profile_items_trimmed']} items cut, "
        f"{s['profile_tokens_trimmed']} tokens; capped responses: {s['responses_capped']}; "
        f"empty profiles: {s['empty_profiles']}; profiles cut to nothing: {s['profiles_cut_to_nothing']}"
    )
    fields = s["profile_item_fields"]
    if fields:
        missing = {k: v for k, v in fields["items_missing_field"].items() if v}
        lines.append(
            f"  profile items: {fields['profile_items']}; the prompt shows {fields['prompt_fields']}; "
            f"items lacking one (rendered empty): {missing or 'none'}; not shown: {fields['unused_item_fields']}"
        )
    if s["cache_file"]:
        lines.append(f"  cache: {s['cache_file']} ({'built' if s['cache_built'] else 'reused'})")
    return lines


def write_examples(out_dir: Path, split: str, examples: list[TokenizedExample], tokenizer: Any) -> None:
    """One example (the first with a profile, else the first) rendered as the two passes see it."""
    if not examples:
        return
    ex = next((e for e in examples if e.cond_prompt_ids != e.abl_prompt_ids), examples[0])
    for name, prompt in (("conditioned", ex.cond_prompt_ids), ("ablated", ex.abl_prompt_ids)):
        text = tokenizer.decode(prompt + ex.response_ids)
        header = (f"# {split} record {ex.record_id}: {name} prompt ({len(prompt)} tokens) + response "
                  f"({len(ex.response_ids)} tokens)\n")  # fmt: skip
        (out_dir / f"{split}_{name}.txt").write_text(header + text, encoding="utf-8")


def write_inspection(data: PreparedData, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Per split: stats (also in out_dir/report.json) and the rendered example prompts; returns the stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, examples in (("train", data.train), ("eval", data.eval)):
        stats[split] = split_stats(examples, data.reports[split])
        write_examples(out_dir, split, examples, data.tokenizer)
    (out_dir / "report.json").write_text(json.dumps(stats, indent=2))
    return stats
