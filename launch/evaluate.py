"""Score a run the way the paper does: generate on a split, ROUGE-1 / ROUGE-L / METEOR, report.

    python launch/evaluate.py --run runs/NAME [--split test|eval] [--tasks T ...] [--ablated] [--max-new-tokens N]
    deepspeed --num_gpus N launch/evaluate.py --run runs/NAME --zero3     # ZeRO-3 sharded, synced generation

Writes <run>/eval/ (or <run>/eval/<name>/ for other splits, --ablated, --tasks): generations.jsonl
(streamed; rerun the same command to resume), per_record.jsonl, scores.json, report.md.
--predict-only (a split without references, e.g. LaMP's test questions) writes no scores but the benchmark's
submission files: predictions_LaMP_N.json ({"task", "golds": [{"id", "output"}]}), else predictions.jsonl.
Under a launcher each rank generates a shard; rank 0 writes the files.

Backends (same prompts, stops, decoding, files and resume; README "Evaluating at scale"):
    --backend hf       in-process Hugging Face generate (default; sharded / ZeRO-3 under a launcher)
    --backend vllm     offline vLLM on <run>/hf, one process, CUDA GPUs (--tensor-parallel-size N);
                       needs `pip install -e '.[vllm]'`
    --backend openai   any OpenAI-compatible server: --base-url http://HOST:PORT --served-model NAME
                       [--api-key-env VAR] [--concurrency 8] [--request-timeout 600] [--max-retries 6]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_task_tokens(values: list[str]) -> dict[str, int]:
    """["task=N", ...] -> {task: N}."""
    out = {}
    for v in values:
        task, sep, n = v.partition("=")
        if not sep or not n.isdigit():
            raise SystemExit(f"--task-max-new-tokens {v!r}: expected TASK=N")
        out[task] = int(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run directory (runs/NAME)")
    p.add_argument("--split", default="test", choices=["test", "eval"])
    p.add_argument("--tasks", nargs="*", default=[], help="only these tasks")
    p.add_argument(
        "--data", nargs="*", default=[], help="record files of the split (needed for a file-based test split)"
    )
    p.add_argument("--ablated", action="store_true", help="prompts without profiles (persona-ablated)")
    p.add_argument(
        "--predict-only", action="store_true", help="no references: generate and write submission files, no scores"
    )
    p.add_argument("--model", help="HF folder to evaluate (default: <run>/hf)")
    p.add_argument("--checkpoint", help="a checkpoints/step_N directory instead of the exported model")
    p.add_argument("--zero3", action="store_true", help="shard the model with ZeRO-3 and generate with synced_gpus")
    p.add_argument("--name", help="output sub-directory of <run>/eval/")
    p.add_argument("--overwrite", action="store_true", help="discard earlier generations in the output directory")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (smoke tests)")
    p.add_argument(
        "--metrics-preset", help="strict | longlamp | mirror (default: the run's eval.metrics_preset); sets the "
        "ROUGE/METEOR settings and the decoding defaults that go with them",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, help="default: the metrics preset's (512)")
    p.add_argument("--task-max-new-tokens", nargs="*", default=[], metavar="TASK=N")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--dist-timeout", type=int, default=1800, help="seconds before a stuck collective fails")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm", "openai"], help="what generates (default hf)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs to shard the model over")
    p.add_argument("--base-url", help="openai: the server's base URL (http://HOST:PORT or .../v1)")
    p.add_argument("--served-model", help="openai: the model name the server knows the model by")
    p.add_argument(
        "--api-key-env", help="openai: name of the environment variable holding the API key (its value is never logged)"
    )
    p.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight at once")
    p.add_argument("--request-timeout", type=float, default=600.0, help="openai: seconds per request")
    p.add_argument("--max-retries", type=int, default=6, help="openai: retries (exponential backoff) per request")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the launcher")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from perce_ds.distributed import shutdown
    from perce_ds.evaluation.evaluate import EvalOptions, evaluate_run
    from perce_ds.evaluation.generation import GenerationSettings
    from perce_ds.evaluation.generation_openai import ServerSpec
    from perce_ds.evaluation.metrics import get_preset
    from perce_ds.evaluation.runs import EvalInputError, load_run_config
    from perce_ds.logging_utils import setup_logging

    setup_logging(int(__import__("os").environ.get("RANK", "0")) == 0)
    preset_name = args.metrics_preset or load_run_config(args.run).eval.metrics_preset
    try:
        preset = get_preset(preset_name)
    except ValueError as e:
        raise EvalInputError(f"--metrics-preset: {e}") from None
    settings = GenerationSettings(  # what the user passes wins over the preset's decoding
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else preset.max_new_tokens,
        max_new_tokens_per_task=parse_task_tokens(args.task_max_new_tokens), batch_size=args.batch_size,
        do_sample=args.sample or preset.do_sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    opts = EvalOptions(
        run=args.run, split=args.split, tasks=args.tasks, data=args.data, ablated=args.ablated, model=args.model,
        checkpoint=args.checkpoint, zero3=args.zero3, name=args.name, overwrite=args.overwrite, limit=args.limit,
        generation=settings, seed=args.seed, dist_timeout_s=args.dist_timeout, predict_only=args.predict_only,
        metrics_preset=preset.name, backend=args.backend, tensor_parallel_size=args.tensor_parallel_size,
        server=ServerSpec(
            args.base_url or "", args.served_model or "", args.api_key_env, concurrency=args.concurrency,
            timeout_s=args.request_timeout, max_retries=args.max_retries,
        ) if args.backend == "openai" else None,
    )  # fmt: skip
    scores = evaluate_run(opts)
    if scores is not None and opts.predict_only:
        print(
            f"wrote {', '.join(scores['files'])} ({scores['records']} records, {scores['missing']} without a generation)"
        )
    elif scores is not None:
        out = args.run / "eval" / opts.output_name()
        print((out / "report.md").read_text())
        print(f"wrote {out}/report.md, scores.json, per_record.jsonl, generations.jsonl")
    shutdown()
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of
    from perce_ds.distributed import exit_process

    exit_process(exit_code_of(main))  # no interpreter teardown with gloo threads alive
