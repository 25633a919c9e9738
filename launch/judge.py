"""Score an evaluation's answers with an LLM judge: personalisation and quality, integers 1-5, per record.

    python launch/judge.py --run runs/NAME --judge hf:.models/SmolLM2-135M-Instruct
    python launch/judge.py --run runs/NAME --split eval --judge openai:http://HOST:8000,model=Qwen/Qwen3-32B,api_key_env=JUDGE_KEY
    python launch/judge.py --run runs/NAME --judge vllm:/models/Qwen3-32B,tp=4

The evaluation directory is the one launch/evaluate.py wrote for the same --split / --ablated / --tasks / --name
(<run>/eval/ by default). The rubric is perce_ds/evaluation/judge_prompts/<--prompt-version>.txt. Writes
judge.jsonl, judge.json and judge.md beside scores.json; verdicts are cached in <eval dir>/judge_cache.jsonl
(or --cache) per (judge, rubric version, record, answer), so a rerun asks only about new answers.
launch/compare.py shows the judge's means beside ROUGE / METEOR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run directory (runs/NAME)")
    p.add_argument(
        "--judge", required=True, help="hf:PATH | vllm:PATH[,tp=N] | openai:URL,model=NAME[,api_key_env=VAR]"
    )
    p.add_argument("--split", default="test", choices=["test", "eval"])
    p.add_argument("--ablated", action="store_true", help="the persona-ablated evaluation")
    p.add_argument("--tasks", nargs="*", default=[], help="the evaluation restricted to these tasks")
    p.add_argument("--name", help="the evaluation's sub-directory of <run>/eval/ (overrides the three above)")
    p.add_argument("--prompt-version", default="v1", help="rubric perce_ds/evaluation/judge_prompts/<V>.txt")
    p.add_argument("--max-attempts", type=int, default=3, help="asks per record before it counts as unscored")
    p.add_argument("--retry-unscored", action="store_true", help="ask again about cached unscored records")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48, help="the judge's reply budget")
    p.add_argument("--cache", type=Path, help="verdict cache (default <eval dir>/judge_cache.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perce_ds.evaluation import judge
    from perce_ds.evaluation.evaluate import EvalOptions
    from perce_ds.evaluation.judge_backends import load_judge_items, make_judge, parse_judge_spec
    from perce_ds.logging_utils import setup_logging

    setup_logging(True)
    parse_judge_spec(args.judge)  # a malformed spec fails before anything loads
    rubric = judge.load_rubric(args.prompt_version)
    name = EvalOptions(run=args.run, split=args.split, tasks=args.tasks, ablated=args.ablated, name=args.name)
    eval_dir = args.run / "eval" / name.output_name()
    items, meta = load_judge_items(args.run, eval_dir)
    model = make_judge(args.judge, args.max_new_tokens)
    cache = judge.VerdictCache(args.cache or eval_dir / "judge_cache.jsonl")
    verdicts = judge.judge_items(
        model, items, rubric, cache, args.max_attempts, args.batch_size, retry_unscored=args.retry_unscored
    )
    summary_meta = {"run": args.run.name, "eval_dir": str(eval_dir), "seed": args.seed, "split": meta.get("split")}
    summary_meta["n_from_cache"] = sum(v.cached for v in verdicts)
    summary_meta["judge_calls"] = model.calls  # prompts sent to the judge by this invocation (retries included)
    judge.write_judge_outputs(eval_dir, verdicts, model.model_id, rubric, summary_meta)
    print((eval_dir / "judge.md").read_text())
    print(
        f"wrote {eval_dir}/judge.md, judge.json, judge.jsonl ({summary_meta['n_from_cache']} verdicts from the cache)"
    )
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of

    sys.exit(exit_code_of(main))
