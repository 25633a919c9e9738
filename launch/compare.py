"""Compare evaluated runs: a table per task and metric with the relative gain over the first run and a
paired bootstrap p-value, a cross-task matrix, and the runs' training curves side by side.

    python launch/compare.py runs/CE runs/PERCE [--eval-name NAME] [--out DIR]
    python launch/compare.py --recipe recipes/demo_compare.yaml      # train CE and PerCE, evaluate, compare
    python launch/compare.py runs/CE runs/PERCE --token-eval --eval-name eval   # + teacher-forced token table

With --token-eval (or `token_eval: true` in a compare recipe), on a split with ground-truth persona spans:
the starting model (step 0) and every run's hf/ are scored token by token (perce_ds/evaluation/token_eval.py)
and tokens.md / tokens.json hold NLL and accuracy per token class, ROUGE-L / METEOR, PIR as a detector,
each with a paired bootstrap 95% interval of the difference against the first run. The token table scores
the eval (validation) split; --token-split test scores the test split, with each model's PIR-detector
threshold chosen on validation (no selection on test).

Each run must have been evaluated (launch/evaluate.py) into <run>/eval/<NAME>/ (default: <run>/eval/).
Writes <out>/compare.md, compare.json and training_curves.png (default out: <first run>/../compare).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def eval_dirs_of(run: Path) -> list[Path]:
    """Every evaluation directory of a run (eval/ and its sub-directories holding scores.json)."""
    root = run / "eval"
    return sorted(p.parent for p in root.glob("**/scores.json") if p.parent.name != "demo")


def compare(runs: list[Path], eval_name: str, out: Path, seed: int = 0) -> str:
    """Write compare.md / compare.json / training_curves.png into `out`; return the Markdown."""
    from perce_ds.evaluation import report

    dirs = [r / "eval" / eval_name for r in runs]
    for r, d in zip(runs, dirs):
        if not (d / "scores.json").is_file():
            raise SystemExit(f"error: {d}/scores.json missing: run `python launch/evaluate.py --run {r}` first")
    labels = [r.name for r in runs]
    comparison = report.compare_runs(dirs, labels, seed)
    matrix = report.cross_task_matrix({r.name: eval_dirs_of(r) for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    report.plot_training_curves(runs, labels, out / "training_curves.png")
    judged = judge_comparison(dirs, labels, seed)
    md = (
        f"# Comparison ({eval_name or 'default evaluation'})\n\nScores x100; gain relative to `{labels[0]}`; "
        "p: two-sided paired bootstrap over shared records (1000 resamples, seeded).\n\n"
        + report.render_comparison(comparison)
        + render_generation_lengths(dirs, labels)
        + (render_judge_comparison(judged) if judged else "")
        + "\n## Cross-task matrix\n\n"
        + report.render_matrix(matrix)
        + "\n![training curves](training_curves.png)\n"
    )
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(
        json.dumps({**comparison, "cross_task_meteor": matrix, "judge": judged}, indent=2)
    )
    return md


def render_generation_lengths(dirs: list[Path], labels: list[str]) -> str:
    """Each run's mean generated length and end-of-turn rate (scores.json; n/a for evaluations made before these
    were recorded)."""
    lines = ["\n| run | mean generated tokens | end of turn (%) |", "|---|---|---|"]
    for d, label in zip(dirs, labels):
        gen = json.loads((d / "scores.json").read_text())["overall"].get("generation") or {}
        if gen.get("n"):
            lines.append(f"| {label} | {gen['mean_generated_tokens']:.1f} | {100 * gen['end_of_turn_rate']:.1f} |")
        else:
            lines.append(f"| {label} | n/a | n/a |")
    return "\n".join(lines) + "\n"


def judge_comparison(dirs: list[Path], labels: list[str], seed: int = 0) -> dict | None:
    """The LLM judge's means per run and each run's paired difference to the first (records scored in both), when
    every evaluation was judged (launch/judge.py) by the same judge with the same rubric; else None."""
    from perce_ds.evaluation.judge import JUDGE_METRICS
    from perce_ds.evaluation.token_eval import paired_mean_difference

    if not all((d / "judge.json").is_file() for d in dirs):
        return None
    results = [json.loads((d / "judge.json").read_text()) for d in dirs]
    judges = {(r["judge"], r["prompt_version"]) for r in results}
    if len(judges) > 1:
        return {"error": f"the evaluations were judged by different judges or rubrics: {sorted(judges)}"}
    rows = [
        {json.loads(x)["record_id"]: json.loads(x) for x in (d / "judge.jsonl").read_text().splitlines()} for d in dirs
    ]
    scored = [{k: v for k, v in r.items() if v["status"] == "scored"} for r in rows]
    out = {"judge": results[0]["judge"], "prompt_version": results[0]["prompt_version"], "labels": labels,
           "overall": [r["overall"] for r in results], "differences": {}}  # fmt: skip
    for label, other in zip(labels[1:], scored[1:]):
        shared = [k for k in scored[0] if k in other]
        out["differences"][label] = {"n_paired": len(shared)} | {
            m: paired_mean_difference([scored[0][k][m] for k in shared], [other[k][m] for k in shared], seed=seed)
            for m in JUDGE_METRICS
        }
    return out


def render_judge_comparison(judged: dict) -> str:
    """The judge's table: per metric each run's mean (scored / judged) and its difference to the first run."""
    if "error" in judged:
        return f"\n## LLM judge\n\nNot compared: {judged['error']}.\n"
    labels = judged["labels"]
    head = ["judge score (1-5)", *labels] + [f"{lab} - {labels[0]} [95% CI] (n paired)" for lab in labels[1:]]
    lines = [
        f"\n## LLM judge\n\nJudge `{judged['judge']}`, rubric `{judged['prompt_version']}` "
        "(perce_ds/evaluation/judge_prompts/); means over scored records (scored / judged in brackets); differences "
        "over records scored in both runs, paired bootstrap 95% interval (2000 resamples, seeded).\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for metric in ("personalisation", "quality"):
        cells = [metric]
        for s in judged["overall"]:
            mean = s[metric]["mean"]
            cells.append(f"{'n/a' if mean is None else f'{mean:.2f}'} ({s['n_scored']}/{s['n_records']})")
        for lab in labels[1:]:
            d = judged["differences"][lab]
            diff = d[metric]
            cells.append(
                "n/a" if not d["n_paired"] else
                f"{diff['diff']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}] ({d['n_paired']})"
            )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scores_of(model_dir: Path, cfg, records, examples, tokenizer, cache: Path, meta: dict):
    """Token scores of one model, cached in `cache` (keyed by the model's identity)."""
    from perce_ds.evaluation import runs as runs_mod
    from perce_ds.evaluation import token_eval

    identity = runs_mod.model_identity(model_dir)
    if cache.is_file():
        stored = json.loads(cache.read_text())["meta"]
        if stored.get("model_id") == identity and stored.get("split") == meta["split"]:
            return token_eval.load(cache)
    from perce_ds.model import resolve_dtype

    lm = runs_mod.load_plain_model(model_dir, resolve_dtype(cfg.model.dtype), _device())
    rows = token_eval.score_tokens(lm, tokenizer, records, examples)
    token_eval.save(rows, cache, {**meta, "model": str(model_dir), "model_id": identity})
    return rows


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def token_compare(runs: list[Path], eval_name: str, out: Path, seed: int = 0, split: str = "eval") -> str:
    """Teacher-forced token table of the runs against the first, plus the starting model; write tokens.md/json.

    `split` "eval" (validation) or "test". The PIR detector's threshold is chosen on validation only: on the
    test split each model's threshold is the best one on the validation split (scored too), and test F1 is
    reported at it.
    """
    from perce_ds.data import pipeline
    from perce_ds.data.tokenizer import load_tokenizer
    from perce_ds.evaluation import runs as runs_mod
    from perce_ds.evaluation import token_eval
    from perce_ds.evaluation.report import _per_record

    cfg = runs_mod.load_run_config(runs[0])
    for r in runs[1:]:
        other = runs_mod.load_run_config(r)
        if other.data != cfg.data or other.model.name_or_path != cfg.model.name_or_path:
            raise SystemExit(f"error: {r} was trained on other data or from another model than {runs[0]}")
    init_dir = Path(cfg.model.name_or_path) if cfg.model.name_or_path else runs[0] / "hf_init"
    if not (init_dir / "config.json").is_file():
        raise SystemExit(f"error: no starting model to score at {init_dir} (a hub id? build the folder first)")
    tokenizer = load_tokenizer(runs_mod.resolve_model_dir(runs[0], None))
    models = {"step0": init_dir, **{r.name: runs_mod.resolve_model_dir(r, None) for r in runs}}
    caches = {"step0": out / "tokens_step0.json", **{r.name: r / "eval" / "tokens.json" for r in runs}}

    def scored_split(name: str) -> dict[str, list]:
        records = runs_mod.split_records(cfg, name)
        examples, _ = runs_mod.tokenize_for_eval(records, tokenizer, pipeline.prompt_settings(cfg))
        meta = {"split": name, "n_records": len(records)}
        suffix = "" if name == "eval" else f"_{name}"
        return {k: _scores_of(models[k], cfg, records, examples, tokenizer,
                              caches[k].with_name(f"{caches[k].stem}{suffix}.json"), meta) for k in models}  # fmt: skip

    rows = scored_split(split)
    clip = cfg.loss.clip_min
    thresholds: dict[str, float | None] = dict.fromkeys(models)
    if split != "eval":  # the detector threshold of each model is selected on validation
        for k, val_rows in scored_split("eval").items():
            detector = token_eval.summarise(val_rows, clip).get("pir_detector")
            thresholds[k] = detector["selected_threshold"] if detector else None
    summaries = {k: token_eval.summarise(v, clip, thresholds[k]) for k, v in rows.items()}
    scored = [rows[r.name] for r in runs]
    diffs = {r.name: {c: token_eval.paired_difference(scored[0], s, c, seed=seed)
                      for c in token_eval_classes()} for r, s in zip(runs[1:], scored[1:])}  # fmt: skip
    gen = {}
    per = (
        [_per_record(r / "eval" / eval_name) for r in runs]
        if all((r / "eval" / eval_name / "per_record.jsonl").is_file() for r in runs)
        else []
    )
    for i, r in enumerate(runs[1:], 1):
        if per:
            shared = [k for k in per[0] if k in per[i]]
            gen[r.name] = {m: token_eval.paired_mean_difference([per[0][k][m] for k in shared], [per[i][k][m] for k in shared], seed=seed)
                           for m in ("rougeL", "meteor")}  # fmt: skip
    gen_means = {
        r.name: {m: float(sum(p[k][m] for k in p) / len(p)) for m in ("rougeL", "meteor")} for r, p in zip(runs, per)
    }
    result = {"summaries": summaries, "differences": diffs, "generation_differences": gen, "generation_means": gen_means,
              "runs": [str(r) for r in runs], "step0_model": str(init_dir), "split": split}  # fmt: skip
    md = render_token_table(result, [r.name for r in runs])
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokens.json").write_text(json.dumps(result, indent=2))
    (out / "tokens.md").write_text(md)
    return md


def token_eval_classes() -> tuple[str, ...]:
    from perce_ds.evaluation import token_eval

    return (*token_eval.PERSONA_CLASSES, token_eval.OTHER)


def render_token_table(result: dict, labels: list[str]) -> str:
    """Markdown: per metric, the baseline's value and each run's value with its difference [95% CI]."""
    s, d, g = result["summaries"], result["differences"], result["generation_differences"]

    def cell(value, diff=None, scale=1.0, digits=3):
        if value is None:
            return "n/a"
        text = f"{scale * value:.{digits}f}"
        if diff:
            text += f" ({scale * diff['diff']:+.{digits}f} [{scale * diff['ci_low']:+.{digits}f}, {scale * diff['ci_high']:+.{digits}f}])"
        return text

    split = {"eval": "validation", "test": "test"}.get(result.get("split", "eval"), result.get("split"))
    head = [f"metric ({split} split, unseen users)", "step 0", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, name in (("nll", "NLL"), ("acc", "accuracy")):
        for cls in token_eval_classes():
            if not s["step0"][cls]["tokens"]:
                continue
            row = [
                f"{name}, {cls} tokens ({s['step0'][cls]['tokens']})",
                cell(s["step0"][cls][key]),
                cell(s[labels[0]][cls][key]),
            ]
            row += [cell(s[lab][cls][key], d[lab][cls][key]) for lab in labels[1:]]
            lines.append("| " + " | ".join(row) + " |")
    for m, name in (("rougeL", "ROUGE-L (x100, greedy)"), ("meteor", "METEOR (x100, greedy)")):
        if labels[0] in result["generation_means"]:
            row = [name, "", cell(result["generation_means"][labels[0]][m], scale=100, digits=2)]
            row += [cell(result["generation_means"][lab][m], g[lab][m], scale=100, digits=2) for lab in labels[1:]]
            lines.append("| " + " | ".join(row) + " |")
    if "pir_detector" in s["step0"]:
        chosen = "threshold chosen on validation" if split != "validation" else "best threshold"
        for key, rnd, name in (("f1_at_selected", "random_f1_at_selected", f"PIR detector F1, {chosen} (random)"),
                               ("f1_at_0", "random_f1_at_0", "PIR detector F1, PIR > 0 (random)")):  # fmt: skip
            row = [name] + [
                f"{s[k]['pir_detector'][key]:.3f} ({s[k]['pir_detector'][rnd]:.3f})" for k in ("step0", *labels)
            ]
            lines.append("| " + " | ".join(row) + " |")
    for cls in ("persona", "other"):
        row = [f"mean PIR, {cls} tokens"] + [f"{s[k]['pir_mean'][cls]:.3f}" for k in ("step0", *labels)]
        lines.append("| " + " | ".join(row) + " |")
    share = s["step0"]["share_pir_above_clip_min"]
    note = (f"\nShare of eval tokens with PIR > clip_min ({share['clip_min']}) at step 0: {share['all']:.3f} "
            f"(persona {share['persona']:.3f}, other {share['other']:.3f}). Differences: run - {labels[0]}, "
            "paired bootstrap 95% interval over records (2000 resamples, seeded); NLL in nats per token.\n")  # fmt: skip
    return "\n".join(lines) + "\n" + note


def run_recipe(path: Path) -> list[Path]:
    """Train and evaluate every run of a compare recipe; return the run directories in order."""
    import yaml

    spec = yaml.safe_load(path.read_text())
    out_dir = Path(spec.get("output_dir", "runs"))
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(spec.get("num_gpus", 2))]
    common = [f"--{k}={v}" for k, v in (spec.get("overrides") or {}).items()]
    run_dirs = []
    for run in spec["runs"]:
        name = run["name"]
        own = [f"--{k}={v}" for k, v in (run.get("overrides") or {}).items()]  # this run only, after the common ones
        cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / spec.get("deepspeed", "ds_configs/zero3.json")),
               "--recipe", str(ROOT / run["recipe"]), f"--train.output_dir={out_dir}", f"--train.run_name={name}", *common, *own]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        ev = [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--run", str(out_dir / name),
              *[str(a) for a in spec.get("evaluate_args", [])]]  # fmt: skip
        print("+", " ".join(ev), flush=True)
        subprocess.run(ev, check=True, cwd=ROOT)
        run_dirs.append(out_dir / name)
    return run_dirs


def _eval_name_of(evaluate_args: list) -> str:
    """The eval sub-directory launch/evaluate.py writes for these arguments (EvalOptions.output_name)."""
    import importlib.util

    from perce_ds.evaluation.evaluate import EvalOptions

    spec = importlib.util.spec_from_file_location("perce_evaluate_cli", ROOT / "launch" / "evaluate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    a = cli.build_parser().parse_args(["--run", "x", *map(str, evaluate_args)])
    return EvalOptions(run=a.run, split=a.split, tasks=a.tasks, ablated=a.ablated, name=a.name).output_name()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories; the first is the baseline")
    p.add_argument("--recipe", type=Path, help="a compare recipe (recipes/demo_compare.yaml): train, evaluate, compare")
    p.add_argument("--eval-name", default="", help="evaluation sub-directory to compare (default: eval/ itself)")
    p.add_argument("--out", type=Path, help="output directory (default: <first run>/../compare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-eval", action="store_true", help="also the teacher-forced token table (tokens.md)")
    p.add_argument(
        "--token-split",
        default="eval",
        choices=["eval", "test"],
        help="split of the token table (eval = validation; on test the PIR threshold is chosen on eval)",
    )
    args = p.parse_args(argv)
    runs = run_recipe(args.recipe) if args.recipe else args.runs
    spec_eval_name = None
    if args.recipe:
        import yaml

        spec = yaml.safe_load(args.recipe.read_text())
        args.token_eval = args.token_eval or bool(spec.get("token_eval"))
        spec_eval_name = _eval_name_of(spec.get("evaluate_args", []))
    eval_name = args.eval_name or spec_eval_name or ""
    if len(runs) < 2:
        p.error("give at least two run directories (or --recipe)")
    out = args.out or runs[0].parent / "compare"
    print(compare(runs, eval_name, out, args.seed))
    print(f"wrote {out}/compare.md, compare.json, training_curves.png")
    if args.token_eval:
        print(token_compare(runs, eval_name, out, args.seed, args.token_split))
        print(f"wrote {out}/tokens.md, tokens.json")
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of

    sys.exit(exit_code_of(main))
