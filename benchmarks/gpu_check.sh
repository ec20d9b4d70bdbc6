#!/usr/bin/env bash
# Everything this project checks on an NVIDIA GPU, in one command (about 10 minutes on one GPU):
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]          # default: benchmarks/results/gpu
#
# 1. the tests that need CUDA (tests/test_cuda.py: both scripts on cuda against the CPU, bfloat16 against
#    transformers on the same GPU, tied weights, the dtype for this GPU), and the CPU-independent rest of
#    the suite's fast tests;
# 2. the decode benchmark on cuda: both scripts, beam search, int8, transformers, at a short prompt and at
#    4,096 tokens of context, two rounds.
# It writes tests.log, benchmark.md, benchmark.json and nvidia-smi.txt into RESULTS_DIR. Run it from the
# repository root, in the environment the README's test command sets up.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to PyTorch')"
nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
python -m pytest -q -rs tests/test_cuda.py tests/test_platform.py 2>&1 | tee "$OUT_DIR/tests.log"
python benchmarks/bench_decode.py --device cuda --rounds 2 --new-tokens 128 --depths 0,4096 \
    --only minimal,tutorial,minimal-speedups-off,tutorial-beam5,tutorial-int8,transformers,accuracy,bandwidth \
    --json "$OUT_DIR/benchmark.json" | tee "$OUT_DIR/benchmark.md"
