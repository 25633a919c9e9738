#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (about 4-5 minutes; hard limits keep it under 6).
#
#   bash benchmarks/gpu_check.sh --prepare    # here, with the package registry: wheels into .whl/gpu (~10 MB)
#   bash benchmarks/gpu_check.sh              # on the GPU machine (device tool: carry [".whl"])
#   bash benchmarks/gpu_check.sh --cpu-dry    # the same Python on tiny sizes, on a CPU (tests this script)
#
# The lent machine's image has CUDA torch and transformers but no deepspeed, no sentencepiece, no pytest and
# no registry: --prepare builds deepspeed's wheel (a source-only package; pure Python, its ops JIT-build on
# use) and downloads the other missing pure-Python / cp312 wheels at the versions of this .venv; the GPU run
# unpacks them into .gpu_site/ and puts that on PYTHONPATH when `import deepspeed` fails there.
#
# What it runs (all bf16, DeepSpeed ZeRO-3 on ONE GPU, activation checkpointing on):
#   1. benchmarks.step_cost --preset gpu1b: a randomly initialised ~1.1B-parameter Qwen3-like model
#      (hidden 2048, 16 layers, vocab 151,936, built from a config), LongLaMP-shaped batches (8 x ~1,900
#      tokens), CE vs online PerCE (vs offline-weights PerCE when perce_ds has it), interleaved in one job;
#      tokens/s, model FLOPs utilisation (dense bf16 peak of the device), step ratio vs the analytic floor,
#      the attention kernel that really ran (profiled operator names), peak memory per scheme.
#   2. benchmarks.logprob_memory --full: chunked vs naive log-probs at 4,096 tokens, hidden 2,560,
#      vocab 151,936 and 128,256, in bf16 (memory, time) and fp32 (equality to 1e-5).
#   3. pytest -m gpu (tests/test_gpu.py): bf16 ZeRO-3 PerCE steps through launch/train.py, PIR from bf16
#      inputs within 1e-3 of an exact reference (fp32 logits via torch.mm out_dtype), packing refused
#      without flash-attn's varlen kernel. flash-attn cannot be built inside a lease: the environment
#      lines report whether sdpa's own flash backend runs bf16 causal attention instead.
# Then one summary table. Every output lands in $OUT (default benchmarks/gpu_check_out/).
# Needs a Python with CUDA torch, deepspeed and transformers: $PYTHON, else .venv/bin/python, else python3.
# DeepSpeed's FusedAdam would JIT-compile (needs nvcc, ~1 minute): --torch-adam uses torch's AdamW instead.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu-dry) MODE=cpu-dry ;;
        --prepare) MODE=prepare ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (use --prepare, --cpu-dry or nothing)" >&2; exit 2 ;;
    esac
done

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

WHEELS=.whl/gpu
CARRIED=(hjson ninja msgpack py-cpuinfo pydantic pydantic_core annotated-types typing-inspection typing_extensions
         einops sentencepiece protobuf PyYAML pytest pluggy iniconfig pytest-timeout)
if [[ "$MODE" == prepare ]]; then
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$(version deepspeed)"
    pins=()
    for name in "${CARRIED[@]}"; do pins+=("$name==$(version "$name")"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${pins[@]}"
    ls "$WHEELS"
    du -sh "$WHEELS"
    exit 0
fi
OUT="${OUT:-benchmarks/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

if [[ "$MODE" == gpu ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check.sh: torch sees no CUDA device here; run with --cpu-dry to test the script on a CPU" >&2
        exit 1
    fi
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia_smi.txt"
    if ! "$PY" -c 'import deepspeed' 2>/dev/null; then
        if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
            echo "gpu_check.sh: no deepspeed here and no wheels in $WHEELS: run 'bash benchmarks/gpu_check.sh --prepare'" \
                 "where the registry is reachable and carry .whl" >&2
            exit 1
        fi
        rm -rf .gpu_site && mkdir -p .gpu_site
        for wheel in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$wheel" .gpu_site; done
        export PYTHONPATH="$PWD/.gpu_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed the carried wheels into .gpu_site: $(cd "$WHEELS" && echo *.whl)"
    fi
    STEP_ARGS=(--preset gpu1b --torch-adam --timeout 300)
    LOGPROB_BF16=(--full --hidden 2560 --dtype bf16 --repeats 3 --timeout 100)
    LOGPROB_FP32=(--full --hidden 2560 --dtype fp32 --vocabs 151936 --timeout 100)
    STEP_LIMIT=330
    LOGPROB_LIMIT=110
    TESTS_LIMIT=200
else
    export CUDA_VISIBLE_DEVICES=""
    STEP_ARGS=(--smoke)
    LOGPROB_BF16=(--smoke --dtype bf16 --vocabs 151936)
    LOGPROB_FP32=(--smoke --dtype fp32 --vocabs 151936)
    STEP_LIMIT=300
    LOGPROB_LIMIT=120
    TESTS_LIMIT=120
fi

"$PY" - <<'EOF' | tee "$OUT/environment.txt"
import importlib.util, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}")
try:
    from perce_ds.model import flash_attn_available
    print(f"flash-attn importable: {flash_attn_available()} (installed: {importlib.util.find_spec('flash_attn') is not None})")
except Exception as e:  # noqa: BLE001 - only informational
    print(f"flash-attn check failed: {e}")
if torch.cuda.is_available():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # only the flash backend allowed: fails if it cannot run
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        print("sdpa flash backend (bf16, causal, head dim 128): runs")
    except RuntimeError as e:
        print(f"sdpa flash backend: does not run ({e})")
EOF

echo "== 1/4 step cost (CE vs PerCE, ZeRO-3, bf16) =="
timeout "$STEP_LIMIT" "$PY" -m benchmarks.step_cost "${STEP_ARGS[@]}" --json "$OUT/step_cost.json" \
    2> "$OUT/step_cost.stderr" | tee "$OUT/step_cost.txt"

echo "== 2/4 log-prob memory, bf16 =="
timeout "$LOGPROB_LIMIT" "$PY" -m benchmarks.logprob_memory "${LOGPROB_BF16[@]}" \
    --json "$OUT/logprob_bf16.json" 2> "$OUT/logprob_bf16.stderr" | tee "$OUT/logprob_bf16.txt"

echo "== 3/4 log-prob equality, fp32 =="
timeout "$LOGPROB_LIMIT" "$PY" -m benchmarks.logprob_memory "${LOGPROB_FP32[@]}" \
    --json "$OUT/logprob_fp32.json" 2> "$OUT/logprob_fp32.stderr" | tee "$OUT/logprob_fp32.txt"

echo "== 4/4 GPU tests (pytest -m gpu; on a CPU they skip with their reason) =="
set +e
timeout "$TESTS_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
set -e

echo "== summary ($MODE, $(( $(date +%s) - START )) s) =="
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = json.loads((out / "step_cost.json").read_text())
bf16 = json.loads((out / "logprob_bf16.json").read_text())
fp32 = json.loads((out / "logprob_fp32.json").read_text())
mib = lambda b: f"{b / 2**20:,.0f} MiB" if b is not None else "n/a"
pct = lambda x: f"{100 * x:.1f}%" if x is not None else "n/a"
first = steps[0]
fm = first["flop_model"]
params = fm["params_body"] + fm["hidden"] * fm["vocab"]
print(f"model: {params / 1e9:.2f}B parameters ({fm['params_body'] / 1e9:.2f}B body), dtype {first['dtype']}, "
      f"world size {first['world_size']}, device {first['device']}")
print(f"attention kernel: {first['attention_kernel']}  (operators: {', '.join(first['attention_ops']) or 'none'})")
print()
head = f"{'scheme':<14}{'step s':>9}{'tok/s':>10}{'MFU':>8}{'HFU':>8}{'time/CE':>9}{'floor':>8}{'ratio/floor':>12}{'peak mem':>12}{'mem/CE':>8}"
print(head)
print("-" * len(head))
for r in steps:
    print(f"{r['scheme']:<14}{r['median_step_s']:>9.3f}{r['tokens_per_s']:>10,.0f}{pct(r.get('mfu')):>8}{pct(r.get('hfu')):>8}"
          f"{r['ratio_to_ce']:>9.3f}{r['floor_ratio']:>8.3f}{r['ratio_over_floor']:>12.3f}{mib(r['peak_mem_bytes']):>12}"
          f"{r['mem_ratio_to_ce']:>8.3f}")
print()
print(f"{'log-probs':<10}{'vocab':>8}{'dtype':>6}{'method':>9}{'chunk':>7}{'time s':>9}{'peak':>11}{'naive/this':>11}")
for r in bf16 + fp32:
    print(f"{'':<10}{r['vocab']:>8}{r['dtype']:>6}{r['method']:>9}{str(r['chunk'] or '-'):>7}{r['time_s']:>9.3f}"
          f"{mib(r['peak_extra_bytes']):>11}{r['mem_reduction_vs_naive']:>11.2f}")
print()
perce = next(r for r in steps if r["scheme"] == "perce")
chunk = next(r for r in bf16 if r["method"] == "chunked" and r["vocab"] == 151936)
agree = [r.get("agree_1e-5") for r in fp32 if r["method"] == "chunked"]
print("targets:")
print(f"  PerCE time/CE <= 1.05 x floor: {perce['ratio_over_floor']:.3f} -> {'MET' if perce['ratio_over_floor'] <= 1.05 else 'NOT MET'}")
print(f"  PerCE peak mem/CE <= 1.05:     {perce['mem_ratio_to_ce']:.3f} -> {'MET' if perce['mem_ratio_to_ce'] <= 1.05 else 'NOT MET'}")
print(f"  MFU >= 45% (CE step):          {pct(first.get('mfu'))} -> "
      f"{'MET' if (first.get('mfu') or 0) >= 0.45 else 'NOT MET' if first.get('mfu') is not None else 'n/a (no GPU peak)'}")
print(f"  log-probs >= 4x lower (bf16):  {chunk['mem_reduction_vs_naive']:.2f}x -> {'MET' if chunk['mem_reduction_vs_naive'] >= 4 else 'NOT MET'}")
print(f"  chunked == naive (fp32, 1e-5): {all(a is True for a in agree) and bool(agree)}")
tests = (out / "gpu_tests.txt").read_text().strip().splitlines()
print(f"  GPU tests:                     {tests[-1] if tests else 'no output'}")
offline = next((r for r in steps if r["scheme"] == "perce_offline"), None)
if offline:
    print(f"  offline PerCE within 3% of CE: {offline['ratio_to_ce']:.3f} -> {'MET' if offline['ratio_to_ce'] <= 1.03 else 'NOT MET'}")
EOF
