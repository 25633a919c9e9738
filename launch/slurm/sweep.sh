#!/usr/bin/env bash
# A validated sweep on SLURM: one array task per cell, the next step as a dependent job.
#   bash launch/slurm/sweep.sh recipes/persona_smollm2_sweep.yaml
# Submits the first stage with cells not done (the grid; then, with confirm_seeds, the confirmation cells at
# each grid method's selected lr; then each `stages` entry, whose learning rate comes from a selection) as a job
# array of launch/slurm/sweep_cell.sbatch (one cell per task:
# `launch/sweep.py --stage S --cell-index $SLURM_ARRAY_TASK_ID`), and launch/slurm/sweep_next.sbatch with
# --dependency=afterok on the array. That job selects on validation and calls this script again for the next
# stage (whose lr it can now read), or, with every cell done, runs `launch/sweep.py --recipe R`: test scoring
# (once) and the table. A failed task stops the chain (afterok); fix it and run this script again: finished
# cells are skipped, a killed one resumes from its checkpoint. Extra sbatch flags for the cell tasks (partition,
# GPUs, time): PERCE_SWEEP_SBATCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."

RECIPE=${1:?usage: bash launch/slurm/sweep.sh SWEEP_RECIPE}
PYTHON=${PERCE_PYTHON:-$PWD/.venv/bin/python}
SBATCH=${SBATCH:-sbatch}
ROUND=${PERCE_SWEEP_ROUND:-0}
MAX_ROUNDS=${PERCE_SWEEP_MAX_ROUNDS:-10}   # a guard: each round is one stage, so a loop means a bug
if [ "$ROUND" -ge "$MAX_ROUNDS" ]; then
    echo "sweep: $ROUND rounds submitted and cells are still pending: stopping (see the cells' logs)" >&2
    exit 1
fi
read -r -a EXTRA <<< "${PERCE_SWEEP_SBATCH_ARGS:-}"
read -r STAGE TODO < <("$PYTHON" launch/sweep.py --recipe "$RECIPE" --pending)
if [ "$STAGE" = none ]; then
    job=$($SBATCH --parsable --job-name=perce-sweep-report "${EXTRA[@]}" \
        launch/slurm/sweep_next.sbatch "$RECIPE")
    echo "sweep: every cell done; report job $job"
    exit 0
fi
array=$($SBATCH --parsable --array="$TODO" --job-name="perce-sweep-s$STAGE" "${EXTRA[@]}" \
    launch/slurm/sweep_cell.sbatch "$RECIPE" "$STAGE")
echo "sweep: stage $STAGE cells $TODO: array job $array"
next=$(PERCE_SWEEP_ROUND=$((ROUND + 1)) $SBATCH --parsable --dependency="afterok:$array" \
    --job-name=perce-sweep-next launch/slurm/sweep_next.sbatch "$RECIPE")
echo "sweep: next step (selection, next stage or report) job $next"
