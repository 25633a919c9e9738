"""Compare evaluated runs: a table per task and metric with the relative gain over the first run and a
paired bootstrap p-value, a cross-task matrix, and the runs' training curves side by side.

    python launch/compare.py runs/CE runs/PERCE [--eval-name NAME] [--out DIR]
    python launch/compare.py --recipe recipes/demo_compare.yaml      # train CE and PerCE, evaluate, compare

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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


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
    md = (
        f"# Comparison ({eval_name or 'default evaluation'})\n\nScores x100; gain relative to `{labels[0]}`; "
        "p: two-sided paired bootstrap over shared records (1000 resamples, seeded).\n\n"
        + report.render_comparison(comparison)
        + "\n## Cross-task matrix\n\n"
        + report.render_matrix(matrix)
        + "\n![training curves](training_curves.png)\n"
    )
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps({**comparison, "cross_task_meteor": matrix}, indent=2))
    return md


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
        cmd = [*launcher, str(ROOT / "launch" / "train.py"), "--deepspeed", str(ROOT / spec.get("deepspeed", "ds_configs/zero3.json")),
               "--recipe", str(ROOT / run["recipe"]), f"--train.output_dir={out_dir}", f"--train.run_name={name}", *common]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        ev = [sys.executable, str(ROOT / "launch" / "evaluate.py"), "--run", str(out_dir / name),
              *[str(a) for a in spec.get("evaluate_args", [])]]  # fmt: skip
        print("+", " ".join(ev), flush=True)
        subprocess.run(ev, check=True, cwd=ROOT)
        run_dirs.append(out_dir / name)
    return run_dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories; the first is the baseline")
    p.add_argument("--recipe", type=Path, help="a compare recipe (recipes/demo_compare.yaml): train, evaluate, compare")
    p.add_argument("--eval-name", default="", help="evaluation sub-directory to compare (default: eval/ itself)")
    p.add_argument("--out", type=Path, help="output directory (default: <first run>/../compare)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    runs = run_recipe(args.recipe) if args.recipe else args.runs
    if len(runs) < 2:
        p.error("give at least two run directories (or --recipe)")
    out = args.out or runs[0].parent / "compare"
    print(compare(runs, args.eval_name, out, args.seed))
    print(f"wrote {out}/compare.md, compare.json, training_curves.png")
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of

    sys.exit(exit_code_of(main))
