"""A validated sweep: a grid of training runs x seeds, selection on validation, test scored once, one table.

    python launch/sweep.py --recipe recipes/persona_smollm2_sweep.yaml             # run what is left, then report
    python launch/sweep.py --recipe recipes/persona_smollm2_sweep.yaml --dry-run   # the cells and their cost
    python launch/sweep.py --recipe R --retrain-missing [--dry-run]  # retrain selected cells whose model is elsewhere
    python launch/sweep.py --recipe R --only-aggregate      # table + plots from the committed cell files only
    python launch/sweep.py --recipe R --slurm               # = bash launch/slurm/sweep.sh R: one array task per cell
    python launch/sweep.py --recipe R --parallel 4          # up to 4 cells of a stage at once on this machine

Each cell is `launch/train.py` (or `deepspeed --num_gpus N launch/train.py`) with the cell's overrides,
`--train.resume auto` and `--train.keep_best <metric>`; finished cells are skipped, a killed one resumes. The
recipe format is in perce_ds/sweep/spec.py; the README section "Sweeps: PerCE vs CE, validated" explains the rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, type=Path, help="a sweep recipe (recipes/*_sweep.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their overrides and estimated cost")
    p.add_argument("--only-aggregate", action="store_true",
                   help="train and score nothing: rebuild the table and plots from the committed files")  # fmt: skip
    p.add_argument("--slurm", action="store_true", help="submit the sweep to SLURM (bash launch/slurm/sweep.sh RECIPE)")
    p.add_argument("--pending", action="store_true",
                   help="print 'STAGE i,j,...' (the next stage's cells not done) or 'none' (used by sweep.sh)")  # fmt: skip
    p.add_argument("--stage", type=int, default=0, help="with --cell-index: the stage (0 = the grid)")
    p.add_argument("--cell-index", type=int, help="run this one cell of --stage (a SLURM array task) and exit")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="run up to N cells of a stage at once on this machine (they share its devices)")  # fmt: skip
    p.add_argument("--retrain-missing", action="store_true",
                   help="before test scoring, train again the selected cells whose hf_best is not on this machine")  # fmt: skip
    args = p.parse_args(argv)

    from perce_ds.sweep import runner
    from perce_ds.sweep.spec import load_spec

    root = ROOT  # the recipe's relative paths and the entry points are the repository's
    recipe = args.recipe if args.recipe.is_absolute() else Path.cwd() / args.recipe
    spec = load_spec(recipe, root)
    if args.slurm:
        import subprocess

        return subprocess.call(["bash", str(root / "launch" / "slurm" / "sweep.sh"), str(recipe)])
    if args.dry_run:
        print(runner.dry_run(spec, root, retrain_missing=args.retrain_missing))
    elif args.pending:
        todo = runner.pending(spec, root)
        print("none" if todo is None else f"{todo[0]} {','.join(map(str, todo[1]))}")
    elif args.cell_index is not None:
        ran = runner.run_one(spec, root, args.stage, args.cell_index)
        print(f"stage {args.stage} cell {args.cell_index}: {'finished' if ran else 'already done'}")
    elif args.only_aggregate:
        runner.aggregate(spec, root, score=False)
    else:
        runner.run_all(spec, root, parallel=args.parallel, retrain_missing=args.retrain_missing)
    return 0


if __name__ == "__main__":
    from perce_ds.cli import exit_code_of

    sys.exit(exit_code_of(main))
