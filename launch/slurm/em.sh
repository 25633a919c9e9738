#!/usr/bin/env bash
# Offline EM rounds as dependent SLURM jobs: E(0) -> M(0) -> E(1) -> M(1) -> ...
#   bash launch/slurm/em.sh RECIPE --rounds R [--section.key value ...]
# Round r lives in <run_dir>/em/round_r/: weights/ (E-step) and m/ (M-step run, m/hf the model).
# E(r) scores the data with the model M(r-1) produced (round 0: the recipe's model); M(r) starts
# from that same model and trains on the stored weights. Re-running skips finished work: a round
# whose m/hf exists, and an E-step whose weights/index.json exists.
set -euo pipefail
cd "$(dirname "$0")/../.."

RECIPE=${1:?usage: bash launch/slurm/em.sh RECIPE --rounds R [--section.key value ...]}
shift
ROUNDS=1
OVERRIDES=()
while [ $# -gt 0 ]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done
PYTHON=${PERCE_PYTHON:-$PWD/.venv/bin/python}
SBATCH=${SBATCH:-sbatch}

read -r RUN_DIR RECIPE_MODEL < <("$PYTHON" - "$RECIPE" "${OVERRIDES[@]}" <<'PY'
import sys
from perce_ds.cli import parse_overrides
from perce_ds.config import RunConfig
cfg = RunConfig.load(sys.argv[1], parse_overrides(sys.argv[2:]))
print(cfg.run_dir, cfg.model.name_or_path or "-")
PY
)
EM_DIR=$RUN_DIR/em
mkdir -p "$EM_DIR"
model=$RECIPE_MODEL   # "-": the recipe builds its model; E(0) exports it to round_0/weights/model
prev=""
for ((r = 0; r < ROUNDS; r++)); do
    rd=$EM_DIR/round_$r
    if [ -f "$rd/m/hf/model.safetensors" ]; then
        echo "em: round $r already done ($rd/m/hf)"
        model=$rd/m/hf
        prev=""
        continue
    fi
    e_job=$prev
    if [ ! -f "$rd/weights/index.json" ]; then
        model_args=()
        [ "$model" != "-" ] && model_args=(--model "$model")
        e_job=$($SBATCH --parsable ${prev:+--dependency=afterok:$prev} --job-name="perce-e$r" \
            launch/slurm/estimate.sbatch "$RECIPE" --out "$rd/weights" "${model_args[@]}" \
            "${OVERRIDES[@]}" --train.output_dir "$rd" --train.run_name e)
        echo "em: round $r E-step job $e_job"
    fi
    m_model=$model
    [ "$model" = "-" ] && m_model=$rd/weights/model
    prev=$($SBATCH --parsable ${e_job:+--dependency=afterok:$e_job} --job-name="perce-m$r" \
        launch/slurm/train.sbatch "$RECIPE" "${OVERRIDES[@]}" --model.name_or_path "$m_model" \
        --model.config null --model.tokenizer null --loss.weights_from "$rd/weights" \
        --train.output_dir "$rd" --train.run_name m)
    echo "em: round $r M-step job $prev"
    model=$rd/m/hf
done
