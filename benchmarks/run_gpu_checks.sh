#!/usr/bin/env bash
# Every GPU check in one call of the device tool (its image: torch 2.11 cu130, transformers 5.17, peft, accelerate,
# no `datasets`, no network):   run(command="bash benchmarks/run_gpu_checks.sh")
# Installs the package without dependencies, runs the GPU tests and both GPU benchmarks, and leaves the logs and
# benchmarks/RESULTS.md in $OUT (copy the new sections into the repo's RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python -m pip install -q --no-deps pytest 2>/dev/null
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
# 1. correctness on the GPU: flex training forward+backward, bf16, flash (if installed), compiled static cache
python -m pytest -q tests/test_gpu.py tests/test_static_cache.py tests/test_golden.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
# 2. speed (if the 10-minute limit of one call is short, run the two benchmarks in separate calls)
timeout 900 python benchmarks/bench_generate.py --gpu 2>&1 | tee "$OUT/bench_generate.log" | tail -30
timeout 600 python benchmarks/bench_train.py --gpu 2>&1 | tee "$OUT/bench_train.log" | tail -15
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
