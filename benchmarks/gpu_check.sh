#!/usr/bin/env bash
# One-shot GPU check for a lent H200: every stage runs and reports, the whole run stays under 10 minutes.
#
#   bash benchmarks/gpu_check.sh --prepare        # here, with the package registry: wheels into .whl/gpu (~10 MB)
#   bash benchmarks/gpu_check.sh --verify-bundle  # here: install base image + bundle into a clean venv, offline
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (device tool: carry [".whl"])
#   bash benchmarks/gpu_check.sh --cpu-dry        # the same stages on tiny sizes, on a CPU (tests this script)
#
# The lent machine's image (python 3.12, CUDA torch, transformers, accelerate, peft, triton; no registry) lacks
# deepspeed and datasets. --prepare builds deepspeed's wheel (a source-only package: pure Python, its ops
# JIT-build on use) and downloads, at the versions of this .venv, every other distribution named in
# benchmarks/gpu_requirements.txt and what they need beyond that base (cp312 wheels). On the GPU the script
# installs (pip --no-index --target .gpu_site) only the carried distributions the image lacks, so it never
# shadows the image's own builds. pyarrow (55 MB) and pandas (12 MB) do not fit the device's 64 MiB transfer
# beside the rest: the lent image ships them (device KINDS.md); for an image without them `--prepare --large`
# puts them in .whl/gpu-large to carry on their own. The preflight names any missing module.
#
# --verify-bundle proves the bundle complete: a fresh python3.11 venv gets the image's base (torch from this
# machine's wheel, transformers, accelerate, peft from the registry), then the same pinned set (cp311 wheels of
# the same versions, incl. the large tier) with `pip install --no-index` and pip's dependency check, then imports
# deepspeed, datasets and perce_ds and resolves a DeepSpeed config.
#
# Stages (bf16, DeepSpeed ZeRO-3 on ONE GPU, activation checkpointing on; each under its own time limit):
#   0. preflight: versions, required imports, nvcc / FusedAdam availability, sdpa flash backend
#   1. benchmarks.step_cost --preset gpu1b: ~1.1B-parameter Qwen3-like model, LongLaMP-shaped batches; CE vs
#      online PerCE vs offline-weights PerCE: tokens/s, MFU, ratio to the analytic floor, attention kernel, memory
#   2. benchmarks.logprob_memory: chunked vs naive log-probs at 4,096 tokens, H 2,560, vocab 151,936 (bf16 memory)
#   3. the same, fp32: equality to 1e-5
#   4. pytest -m gpu: bf16 ZeRO-3 PerCE through launch/train.py (weights spread over the clip range), fp32 logits
#      from bf16 inputs, packing refusal, and every other gpu-marked test file in tests/
# Then one summary table. Exit status: 1 if any stage failed, else 0. Outputs land in $OUT
# (default benchmarks/gpu_check_out/). Python: $PYTHON, else .venv/bin/python, else python3.
# Optimizer: on CUDA, unless DeepSpeed ships FusedAdam prebuilt, perce_ds's DeepSpeed config resolution picks
# torch's AdamW (`torch_adam`), which needs no JIT build; step_cost passes --torch-adam for the same reason.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

MODE=gpu
LARGE=0
for arg in "$@"; do
    case "$arg" in
        --cpu-dry) MODE=cpu-dry ;;
        --prepare) MODE=prepare ;;
        --verify-bundle) MODE=verify ;;
        --large) LARGE=1 ;;
        -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --prepare [--large], --verify-bundle, --cpu-dry or nothing)" >&2
           exit 2 ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

WHEELS=.whl/gpu
LARGE_WHEELS=.whl/gpu-large
REQS=benchmarks/gpu_requirements.txt
# Beside the names in $REQS, what they need that the image's base (torch, transformers, accelerate, peft) lacks.
DEPS=(hjson ninja msgpack py-cpuinfo pydantic pydantic_core annotated-types typing-inspection typing_extensions
      einops dill multiprocess xxhash fsspec pluggy iniconfig)
LARGE_DEPS=(pyarrow pandas python-dateutil six tzdata)

# prepare_bundle DIR PYVER ABI [large]: deepspeed's wheel + pinned wheels for python PYVER into DIR
prepare_bundle() {
    local dir=$1 pyver=$2 abi=$3 large=$4
    local names=() pins=()
    version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
    mkdir -p "$dir"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "deepspeed==$(version deepspeed)" || return 1
    mapfile -t names < <(grep -v -e '^#' -e '^deepspeed$' -e '^$' "$REQS")
    names+=("${DEPS[@]}")
    for name in "${names[@]}"; do pins+=("$name==$(version "$name")"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$dir" "${pins[@]}" || return 1
    if [[ "$large" == 1 ]]; then
        pins=()
        for name in "${LARGE_DEPS[@]}"; do pins+=("$name==$(version "$name")"); done
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
            --abi "$abi" --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d "$dir/large" "${pins[@]}" || return 1
    fi
}

if [[ "$MODE" == prepare ]]; then
    rm -rf "$WHEELS" "$LARGE_WHEELS"
    prepare_bundle "$WHEELS" 3.12 cp312 "$LARGE" || { echo "gpu_check.sh --prepare: failed" >&2; exit 1; }
    [[ -d "$WHEELS/large" ]] && mv "$WHEELS/large" "$LARGE_WHEELS"
    ls "$WHEELS"
    du -sh "$WHEELS" ${LARGE:+"$LARGE_WHEELS"} 2>/dev/null
    exit 0
fi

if [[ "$MODE" == verify ]]; then
    # A clean venv standing for the bare GPU image, then the bundle installed with no registry at all.
    work=$(mktemp -d /tmp/gpu_bundle.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    base_py=${BASE_PYTHON:-python3.11}
    echo "== bundle for $("$base_py" --version) (same pins as .whl/gpu, cp311 wheels) =="
    prepare_bundle "$work/wheels" 3.11 cp311 1 || { echo "verify: preparing the bundle failed" >&2; exit 1; }
    "$base_py" -m venv "$work/venv"
    vpy="$work/venv/bin/python"
    version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
    echo "== base image stand-in: torch, transformers, accelerate, peft (from the registry) =="
    "$vpy" -m pip install -q "torch==$(version torch)" transformers accelerate peft || exit 1
    "$vpy" -m pip list --format=freeze > "$work/base.txt"
    echo "== the bundle, offline: pip install --no-index (dependencies checked by pip) =="
    mapfile -t reqs < <(grep -v -e '^#' -e '^$' "$REQS")
    "$vpy" -m pip install --isolated --no-index --find-links "$work/wheels" --find-links "$work/wheels/large" "${reqs[@]}" \
        || { echo "verify: the bundle is incomplete (pip could not resolve the names above offline)" >&2; exit 1; }
    "$vpy" -m pip check || exit 1
    echo "== imports =="
    PYTHONPATH="$PWD" "$vpy" - <<'EOF' || exit 1
import importlib.metadata as m
import deepspeed, datasets, pyarrow, psutil
import perce_ds.engine, perce_ds.estep, perce_ds.evaluation.evaluate
from perce_ds.config import RunConfig
from perce_ds.ds_config import load_ds_config, resolve_ds_config
import torch
cfg = RunConfig.load("recipes/demo.yaml")
ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 1, 64, torch.float32)
print("imported deepspeed", deepspeed.__version__, "| datasets", datasets.__version__, "| pyarrow",
      pyarrow.__version__, "| psutil", psutil.__version__, "| perce_ds from", perce_ds.engine.__file__)
print("resolved zero3.json: stage", ds["zero_optimization"]["stage"], "| optimizer", ds["optimizer"])
EOF
    wheels=("$work"/wheels/*.whl "$work"/wheels/large/*.whl)
    echo "bundle OK: ${#wheels[@]} carried wheels (large tier included), installed offline over" \
         "$(wc -l < "$work/base.txt") base distributions"
    exit 0
fi

OUT="${OUT:-benchmarks/gpu_check_out}"
mkdir -p "$OUT"
: > "$OUT/stages.tsv"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

# stage NAME LIMIT_S CMD...: run with a time limit, stdout to $OUT/NAME.txt and the console, stderr to
# $OUT/NAME.stderr (its tail shown on failure), status to stages.tsv; never stops the script
stage() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit} s) =="
    timeout --kill-after=10 "$limit" "$@" 2> "$OUT/$name.stderr" | tee "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$OUT/stages.tsv"
    if [[ $rc != 0 ]]; then
        echo "!! stage $name failed (exit $rc$([[ $rc == 124 || $rc == 137 ]] && echo ': time limit')); stderr tail:"
        tail -n 15 "$OUT/$name.stderr"
    fi
    return 0
}

if [[ "$MODE" == gpu ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: torch sees no CUDA device here; run with --cpu-dry to test the script on a CPU" >&2
        exit 1
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
    for dir in "$WHEELS" "$LARGE_WHEELS"; do
        compgen -G "$dir/*.whl" >/dev/null || continue
        # Install only what the image lacks: its own builds (numpy ABI, CUDA) stay in charge.
        mapfile -t missing < <("$PY" - "$dir" <<'EOF'
import importlib.metadata as m, pathlib, re, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        m.version(re.sub(r"[-_.]+", "-", name))
    except m.PackageNotFoundError:
        print(wheel)
EOF
)
        if (( ${#missing[@]} )); then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu_site \
                "${missing[@]}" || echo "!! installing the carried wheels failed"
            echo "installed from $dir into .gpu_site: ${missing[*]##*/}"
        fi
    done
    [[ -d .gpu_site ]] && export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    STEP_ARGS=(--preset gpu1b --torch-adam --rounds 6 --warmup 2 --timeout 180)
    LOGPROB_BF16=(--full --hidden 2560 --dtype bf16 --repeats 3 --timeout 60)
    LOGPROB_FP32=(--full --hidden 2560 --dtype fp32 --vocabs 151936 --timeout 60)
    STEP_LIMIT=220; LOGPROB_LIMIT=75; TESTS_LIMIT=140
else
    export CUDA_VISIBLE_DEVICES=""
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    STEP_ARGS=(--smoke)
    LOGPROB_BF16=(--smoke --dtype bf16 --vocabs 151936)
    LOGPROB_FP32=(--smoke --dtype fp32 --vocabs 151936)
    STEP_LIMIT=300; LOGPROB_LIMIT=120; TESTS_LIMIT=120
fi

stage preflight 45 "$PY" - <<'EOF'
import importlib, importlib.metadata as m, platform, shutil, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
missing = []
for mod in ("deepspeed", "transformers", "datasets", "pyarrow", "pandas", "psutil", "sentencepiece", "yaml",
            "pytest", "perce_ds.engine", "perce_ds.estep"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report every missing piece, then fail
        missing.append(f"{mod} ({type(e).__name__}: {e})")
for dist in ("deepspeed", "transformers", "datasets", "pyarrow", "accelerate", "peft"):
    try:
        print(f"  {dist} {m.version(dist)}")
    except m.PackageNotFoundError:
        print(f"  {dist} not installed")
from perce_ds.ds_config import fused_adam_needs_jit, jit_toolchain_available
from perce_ds.model import flash_attn_available
print(f"nvcc: {shutil.which('nvcc') or 'none'}; FusedAdam needs a JIT build: {fused_adam_needs_jit()}; "
      f"JIT toolchain available: {jit_toolchain_available()}")
print(f"flash-attn importable: {flash_attn_available()}")
if torch.cuda.is_available():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only the flash backend allowed: fails if it cannot run
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        print("sdpa flash backend (bf16, causal, head dim 128): runs")
    except RuntimeError as e:
        print(f"sdpa flash backend: does not run ({e})")
if missing:
    print("MISSING (carry them: bash benchmarks/gpu_check.sh --prepare [--large]):", *missing, sep="\n  ")
    sys.exit(1)
EOF

stage step_cost "$STEP_LIMIT" "$PY" -m benchmarks.step_cost "${STEP_ARGS[@]}" --json "$OUT/step_cost.json"
stage logprob_bf16 "$LOGPROB_LIMIT" "$PY" -m benchmarks.logprob_memory "${LOGPROB_BF16[@]}" --json "$OUT/logprob_bf16.json"
stage logprob_fp32 "$LOGPROB_LIMIT" "$PY" -m benchmarks.logprob_memory "${LOGPROB_FP32[@]}" --json "$OUT/logprob_fp32.json"
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
stage gpu_tests "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu "${GPU_TESTS[@]}"

echo "== summary ($MODE, $(( $(date +%s) - START )) s) =="
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
print(f"{'stage':<14}{'exit':>6}{'seconds':>9}")
for name, rc, secs in stages:
    print(f"{name:<14}{rc:>6}{secs:>9}  {'ok' if rc == '0' else 'FAILED'}")
print()


def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as e:
        print(f"({name}: not available: {e})")
        return None


mib = lambda b: f"{b / 2**20:,.0f} MiB" if b is not None else "n/a"
pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"
steps, bf16, fp32 = load("step_cost.json"), load("logprob_bf16.json"), load("logprob_fp32.json")
targets = []
if steps:
    first = steps[0]
    fm = first["flop_model"]
    params = fm["params_body"] + fm["hidden"] * fm["vocab"]
    print(f"model: {params / 1e9:.2f}B parameters ({fm['params_body'] / 1e9:.2f}B body), dtype {first['dtype']}, "
          f"world size {first['world_size']}, device {first['device']}")
    print(f"attention kernel: {first['attention_kernel']}  (operators: {', '.join(first['attention_ops']) or 'none'})")
    head = (f"{'scheme':<14}{'step s':>9}{'tok/s':>10}{'MFU':>8}{'HFU':>8}{'time/CE':>9}{'floor':>8}"
            f"{'ratio/floor':>12}{'peak mem':>12}{'mem/CE':>8}")
    print(head)
    print("-" * len(head))
    for r in steps:
        print(f"{r['scheme']:<14}{r['median_step_s']:>9.3f}{r['tokens_per_s']:>10,.0f}{pct(r.get('mfu')):>8}"
              f"{pct(r.get('hfu')):>8}{r['ratio_to_ce']:>9.3f}{r['floor_ratio']:>8.3f}{r['ratio_over_floor']:>12.3f}"
              f"{mib(r['peak_mem_bytes']):>12}{(r['mem_ratio_to_ce'] or float('nan')):>8.3f}")
    perce = next(r for r in steps if r["scheme"] == "perce")
    targets.append(("PerCE time/CE <= 1.05 x floor", f"{perce['ratio_over_floor']:.3f}", perce["ratio_over_floor"] <= 1.05))
    if perce.get("mem_ratio_to_ce") is not None:
        targets.append(("PerCE peak mem/CE <= 1.05", f"{perce['mem_ratio_to_ce']:.3f}", perce["mem_ratio_to_ce"] <= 1.05))
    if first.get("mfu") is not None:
        targets.append(("MFU >= 45% (CE step)", pct(first["mfu"]), first["mfu"] >= 0.45))
    offline = next((r for r in steps if r["scheme"] == "perce_offline"), None)
    if offline:
        targets.append(("offline PerCE within 3% of CE", f"{offline['ratio_to_ce']:.3f}", offline["ratio_to_ce"] <= 1.03))
    print()
if bf16 or fp32:
    print(f"{'log-probs':<10}{'vocab':>8}{'dtype':>6}{'method':>9}{'chunk':>7}{'time s':>9}{'peak':>11}{'naive/this':>11}")
    for r in (bf16 or []) + (fp32 or []):
        print(f"{'':<10}{r['vocab']:>8}{r['dtype']:>6}{r['method']:>9}{str(r['chunk'] or '-'):>7}{r['time_s']:>9.3f}"
              f"{mib(r['peak_extra_bytes']):>11}{r['mem_reduction_vs_naive']:>11.2f}")
    print()
if bf16:
    chunk = next(r for r in bf16 if r["method"] == "chunked" and r["vocab"] == 151936)
    targets.append(("log-probs >= 4x lower (bf16)", f"{chunk['mem_reduction_vs_naive']:.2f}x", chunk["mem_reduction_vs_naive"] >= 4))
if fp32:
    agree = [r.get("agrees") for r in fp32 if r["method"] == "chunked"]
    targets.append(("chunked as exact as naive (fp32)", str(agree), bool(agree) and all(a is True for a in agree)))
print("targets:")
for name, value, met in targets:
    print(f"  {name:<32}{value:>10} -> {'MET' if met else 'NOT MET'}")
tests = (out / "gpu_tests.txt").read_text().strip().splitlines() if (out / "gpu_tests.txt").exists() else []
print(f"  GPU tests: {tests[-1] if tests else 'no output'}")
EOF

failed=$(awk -F'\t' '$2 != 0' "$OUT/stages.tsv" | wc -l)
echo "gpu_check.sh: $failed of $(wc -l < "$OUT/stages.tsv") stages failed ($(( $(date +%s) - START )) s in all)"
[[ $failed == 0 ]]
