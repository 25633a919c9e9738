#!/usr/bin/env bash
# Create .venv/ with everything perce-ds needs (idempotent).
#   PERCE_TORCH   torch requirement to install first (default torch==2.13.0)
#   PERCE_EXTRAS  extras of this package to install (default: test)
# torch goes in first because deepspeed's source build imports it; asking for a pinned version
# keeps pip from pulling a multi-GB CUDA build on CPU-only machines that carry a local CPU wheel.
# On a CUDA cluster set PERCE_TORCH to the build matching your driver, and PERCE_EXTRAS=test,flash (,vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${PERCE_TORCH:-torch==2.13.0}"
# The serve-test extra builds llama.cpp (llama-cpp-python) from source: a portable x86-64 build (AVX2, no AVX-512 /
# AMX), since -march=native with AMX tiles crashed (SIGSEGV in libggml-cpu on multi-token prompts) on our CPUs.
if [[ ",${PERCE_EXTRAS:-test}," == *",serve-test,"* && -z "${CMAKE_ARGS:-}" && "$(uname -m)" == x86_64 ]]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
.venv/bin/python -m pip install -q -e ".[${PERCE_EXTRAS:-test}]"
bash launch/setup_wordnet.sh  # WordNet for METEOR (NLTK), offline afterwards
.venv/bin/python -c "import torch, deepspeed, transformers, datasets; print('perce-ds env ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
