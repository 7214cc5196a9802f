#!/usr/bin/env bash
# The GPU checks, in stages that each fit one 10-minute call of the device tool (its image: torch 2.11 cu130,
# transformers 5.17, peft, accelerate, no `datasets`, no network; 5.17 is below the package's floor of 5.20, which
# concerns pipelines and streamed data: the package is installed with --no-deps, and the GPU stages' test files
# pass under 5.17 on CPU, session 19). Run them back to back (the machine stays warm
# only ~30 s between calls):
#   run(command="bash benchmarks/run_gpu_checks.sh generate1 tests")  # bench_generate --gpu --batch 1, then the GPU
#                                                                     # tests with what is left (~8 min in all)
#   run(command="bash benchmarks/run_gpu_checks.sh tests train")   # GPU tests, then bench_train --gpu (~6 min)
#   run(command="bash benchmarks/run_gpu_checks.sh generate16")    # bench_generate --gpu --batch 16 (~6 min)
#   run(command="bash benchmarks/run_gpu_checks.sh profile")       # kernels per call, top operators (~2 min)
#   run(command="bash benchmarks/run_gpu_checks.sh tune")          # batch 1 block 16 compiled rows per compile setting
#   run(command="bash benchmarks/run_gpu_checks.sh experiments")   # the same rows per model variant (~8 min)
# Each stage leaves its log and the tables it appended (RESULTS.md) in $OUT: copy the new sections into the repo's
# benchmarks/RESULTS.md. The stages of one call share its time: a benchmark gets what is left (SIGTERM then writes
# the finished rows) and a stage with under 90 s left is not started. With no stage named, all of them run (longer
# than one call allows: set CALL_SECONDS to the real limit). The device tool shortens a call when less device time is
# left than its timeout (then it kills the call before the script's own `timeout`s fire, and the sections are lost):
# with under 10 minutes left (`status`: budget_left_s), pass CALL_SECONDS=<budget_left_s - 40> in the command.
set -uo pipefail
CALL_SECONDS=${CALL_SECONDS:-580}  # the device call ends at 600 s: each benchmark gets what is left of it, so that its
                                   # own SIGTERM handler writes the finished rows before the call is killed
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)  # the image's python3 holds torch
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
"$PY" -m pip install -q --no-deps pytest 2>/dev/null
if ! "$PY" -c "import bd3lm_hf.modeling.generation_bd3lm" 2>"$OUT/import.log"; then
  echo "bd3lm_hf does not import after the editable install (see $OUT/import.log):"; tail -5 "$OUT/import.log"; exit 3
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
: > "$OUT/RESULTS.md"
stage_budget() {  # BUDGET = seconds left of this call; stop the script when too few remain to measure anything
  BUDGET=$((CALL_SECONDS - SECONDS))
  if [ "$BUDGET" -lt 90 ]; then echo "only ${BUDGET}s left of this call: stopping before $1"; exit 4; fi
}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests train generate1 generate16)
for stage in "${stages[@]}"; do
  case "$stage" in
    tests) stage_budget tests  # flex training fwd+bwd, bf16, flash (if installed), compiled static == eager, no
      # recompiles; bounded like the benchmarks (a hung test would take the stages after it), and per test where
      # the image has pytest-timeout. Only the GPU tests (test_compilation.py runs on the CPU alone: CI has it; in
      # session 20 it took the rest of the call); each test's outcome is printed as it ends (-v; -rsfEx: why each
      # skipped, failed or xfailed), so that a cut keeps what finished.
      per_test=(); "$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 240)
      timeout "$BUDGET" "$PY" -m pytest -o addopts= -v -rsfEx -p no:cacheprovider "${per_test[@]}" \
        "tests/test_static_cache.py::test_compiled_flex_static_generation_matches_eager_sdpa_on_gpu" \
        "tests/test_static_cache.py::test_compiled_static_generation_matches_eager_on_gpu" \
        "tests/test_benchmarks.py::test_mlp_epilogue_experiment_computes_the_model_on_cuda" \
        tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | tail -25
      echo "pytest rc=${PIPESTATUS[0]} (124: cut by the stage's timeout)" | tee -a "$OUT/tests.log" ;;
    train) stage_budget train
      timeout "$BUDGET" "$PY" benchmarks/bench_train.py --gpu --results "$OUT/RESULTS.md" 2>&1 \
        | tee "$OUT/bench_train.log" | tail -20 ;;
    generate1) stage_budget generate1
      timeout "$BUDGET" "$PY" benchmarks/bench_generate.py --gpu --batch 1 --results "$OUT/RESULTS.md" 2>&1 \
        | tee "$OUT/bench_generate_b1.log" | tail -30 ;;
    generate16) stage_budget generate16
      timeout "$BUDGET" "$PY" benchmarks/bench_generate.py --gpu --batch 16 --results "$OUT/RESULTS.md" 2>&1 \
        | tee "$OUT/bench_generate_b16.log" | tail -30 ;;
    tune|experiments)  # batch 1, block 16, compiled rows only, one setting after the other (compare within the run)
      # tune: compile settings (max-autotune was measured in session 4: ~20% slower per call; see RESULTS.md);
      #   combo_kernels: inductor fuses independent small kernels horizontally (fewer launches per call).
      # experiments: model variants (benchmarks/experiments.py). Session 20 measured them all on the 4 tokens/call
      #   row: none beat the baseline's own run-to-run spread (RESULTS.md's GPU summary).
      if [ "$stage" = tune ]; then
        settings=("--compile-mode reduce-overhead"
                  "--inductor-option triton.cudagraphs=True --inductor-option combo_kernels=True"
                  "--inductor-option triton.cudagraphs=True --inductor-option coordinate_descent_tuning=True")
      else
        # the two GEMM variants also together (what adopting both would give), before the process-wide switch.
        # No "--attn flex_attention": on the image's torch (2.11) inductor cannot lower the step's flex call, so the
        # row fails as "ran eagerly" after ~90 s of eager generation (session 20); add it back on a newer torch.
        settings=("--compile-mode reduce-overhead" "--experiment mlp-epilogue"
                  "--experiment aligned-logits" "--experiment mlp-epilogue+aligned-logits"
                  "--experiment sdpa-efficient")
      fi
      for setting in "${settings[@]}"; do
        stage_budget "$stage $setting"
        # shellcheck disable=SC2086  # the setting is several arguments
        timeout "$BUDGET" "$PY" benchmarks/bench_generate.py --gpu --batch 1 --block 16 --only static+compiled \
          $setting --results "$OUT/RESULTS.md" 2>&1 | tee -a "$OUT/$stage.log" | tail -8
      done ;;
    profile) stage_budget profile
      timeout "$BUDGET" "$PY" benchmarks/profile_step.py --gpu --context 1056 2>&1 | tee "$OUT/profile.log" | tail -40 ;;
    *) echo "unknown stage $stage (tests, train, generate1, generate16, tune, experiments, profile)"; exit 2 ;;
  esac
done
