#!/usr/bin/env bash
# The checks that need a CUDA machine, as one short script: the gpu-marked tests, then both
# benchmarks (CPU and CUDA figures). Usage: bash benchmarks/gpu_checks.sh [OUT_DIR]
# Expects robustcnn's dependencies importable by python3 (e.g. PYTHONPATH=$PWD:/path/to/site).
set -uo pipefail
out=${1:-reports/benchmarks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log" | tail -15
python3 benchmarks/train_throughput.py --out "$out/train_throughput.json" 2>&1 | tee "$out/train_throughput.log" | tail -14
python3 benchmarks/attacks.py --out "$out/attacks.json" 2>&1 | tee "$out/attacks.log" | tail -14
