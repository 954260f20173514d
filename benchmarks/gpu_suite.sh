#!/usr/bin/env bash
# All GPU checks of vrpo-fast as ONE command, for a short loan of one H100 / H200 (or any CUDA GPU).
#
#   OUT=/path/to/out bash benchmarks/gpu_suite.sh            # default OUT=./gpu_out
#   bash benchmarks/gpu_suite.sh --dry-run                   # print the plan, run nothing
#   SUITE_STEPS="tests roofline" bash benchmarks/gpu_suite.sh  # only some steps (names below)
#
# Steps (name: what -> file in $OUT; cap = longest it may take; typical = expected on an H100):
#   env        nvidia-smi summary, torch / triton / CUDA versions                   -> suite.log   cap 30 s, ~10 s
#   install    pip install -e . --no-build-isolation --no-deps (only if vrpo_fast.{_C,kernels}
#              do not import; the device copy of the tree has no build)             -> suite.log   cap 240 s, ~60 s
#   roofline   copy GB/s + bf16 / fp32 / tf32 GEMM TFLOP/s (bench_roofline.py)      -> roofline.md, roofline.json  cap 90 s, ~20 s
#   tests      TRITON_INTERPRET=0 pytest tests/test_gpu.py (compiled kernels)       -> gpu_tests.txt  cap 240 s, ~90-150 s
#   token      bench_token_stats.py on CUDA, N=2048 x V=151936 bf16 + fused linear   -> bench_ops.md  cap 150 s, ~60 s
#   gae        bench_gae.py on CUDA (all shapes, no CPU fresh-process memory runs)   -> bench_ops.md  cap 90 s, ~30 s
#   vib        bench_vib.py --device cuda                                           -> bench_ops.md  cap 60 s, ~20 s
#   train      bench_train_step.py --config 0.5b --device cuda --quick              -> bench_train_step.md  cap 180 s, ~60 s
#   real       bench_real_model.py --device cuda: README's real-model command (SmolLM2-135M, or a random model
#              of its architecture where the smollm2 extra is missing), 6 RL steps, tokens/s
#                                                                               -> bench_train_step.md  cap 240 s, ~60-120 s
#   train_full bench_train_step.py --config 0.5b --device cuda --steps 1 (64 x 1024 tokens), only if
#              >= SUITE_TRAIN_FULL_MIN_S (200) of the budget is left                -> bench_train_step.md  the rest
# Whole run: SUITE_BUDGET_S (default 450 s = 7.5 min); every step's timeout is min(cap, budget left - 15 s),
# and a step is skipped when under 20 s would be left for it. Each step's failure is logged and the
# suite moves on. $OUT receives 7 files at most: suite.log, summary.md, roofline.md, roofline.json,
# gpu_tests.txt, bench_ops.md, bench_train_step.md.
#
# Without CUDA (e.g. a CPU dev box) the GPU steps are skipped with a reason; roofline runs in --quick
# CPU mode and the GPU tests report themselves skipped, so the script can be checked anywhere.

set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$PWD

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or --help)"; exit 2 ;;
  esac
done

OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
BUDGET_S=${SUITE_BUDGET_S:-450}
RESERVE_S=15
TRAIN_FULL_MIN_S=${SUITE_TRAIN_FULL_MIN_S:-200}
STEPS=${SUITE_STEPS:-"env install roofline tests token gae vib train real train_full"}
PYTEST_ARGS=${SUITE_PYTEST_ARGS:-"-q -rfEs --maxfail=10 --durations=15 -p no:cacheprovider"}

# Compiled Triton kernels (tests/conftest.py would default to the interpreter), unbuffered output,
# no network for Hugging Face.
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PY OUT

START=$(date +%s)

wants() { [[ " $STEPS " == *" $1 "* ]]; }
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(date +%s) + START )); }

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: OUT=$OUT PY=$PY budget=${BUDGET_S}s steps: $STEPS"
  echo "pytest args: $PYTEST_ARGS"
  echo "files written: suite.log summary.md roofline.md roofline.json gpu_tests.txt bench_ops.md bench_train_step.md"
  exit 0
fi

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.md

main() {
{
  echo "# GPU suite summary"
  echo
  echo "started: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), budget ${BUDGET_S}s, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
} > "$SUMMARY"

record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 |" >> "$SUMMARY"
  echo ">>> $1: $2 (${3}s; ${BUDGET_S}s budget, $(left)s left)"
}

# run_step NAME CAP_SECONDS 'shell command' -- runs under `timeout` in its own bash, never aborts the suite.
run_step() {
  local name=$1 cap=$2 cmd=$3
  if ! wants "$name"; then
    return 0
  fi
  local budget
  budget=$(( $(left) - RESERVE_S ))
  local limit=$(( cap < budget ? cap : budget ))
  if [ "$limit" -lt 20 ]; then
    record "$name" "SKIPPED (budget spent: ${budget}s left)" 0
    return 0
  fi
  echo
  echo "=== [$(elapsed)s] $name (timeout ${limit}s) ==="
  echo "\$ $cmd"
  local t0 rc
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "set -o pipefail; $cmd"
  rc=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then
    record "$name" "ok" "$took"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" "FAILED: timed out after ${limit}s" "$took"
    echo "FAILED: $name timed out after ${limit}s"
  else
    record "$name" "FAILED: exit code $rc" "$took"
    echo "FAILED: $name (exit code $rc)"
  fi
  return 0
}

# ---------------------------------------------------------------------------------------------
# env (~10 s): what machine, which versions
# ---------------------------------------------------------------------------------------------
HAS_CUDA=0
if wants env; then
  echo "=== [$(elapsed)s] env ==="
  t0=$(date +%s)
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 20 nvidia-smi -L || echo "FAILED: nvidia-smi -L"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv \
      || echo "FAILED: nvidia-smi --query-gpu"
  else
    echo "nvidia-smi not found"
  fi
  echo "python: $(command -v "$PY") ($($PY --version 2>&1))"
  if ! timeout 60 $PY -c 'import torch, triton; print("torch", torch.__version__, "| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'; then
    echo "torch + triton import failed; trying pip install triton (may have no network)"
    timeout 120 $PY -m pip install -q triton || echo "FAILED: pip install triton"
  fi
  record env ok $(( $(date +%s) - t0 ))
fi
# SUITE_ASSUME_CUDA=1|0 overrides the detection (to exercise the GPU branch's failure handling on a CPU box).
HAS_CUDA=${SUITE_ASSUME_CUDA:-$(timeout 60 $PY -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)}
if [ "$HAS_CUDA" != 1 ]; then
  echo "NOTE: no CUDA device visible to $PY: GPU benchmarks are skipped, roofline runs in CPU --quick mode,"
  echo "      tests/test_gpu.py reports itself skipped."
fi

# ---------------------------------------------------------------------------------------------
# install (~60 s when needed): the copy of the tree on a device machine has no build; vrpo_fast.kernels
# exists only through the package_dir mapping of an install. Runs in this shell (PYTHONPATH fallback).
# ---------------------------------------------------------------------------------------------
if wants install; then
  echo
  echo "=== [$(elapsed)s] install ==="
  t0=$(date +%s)
  status=ok
  if timeout 60 $PY -c 'import vrpo_fast._C, vrpo_fast.kernels.token_stats' 2>/dev/null; then
    echo "vrpo_fast (with _C and kernels) already importable: no install"
  else
    limit=$(( $(left) - RESERVE_S )); limit=$(( limit < 240 ? limit : 240 ))
    # --no-deps: no registry may be reachable; torch, transformers, ... are preinstalled there.
    if ! timeout -k 10 "$limit" $PY -m pip install -e . --no-build-isolation --no-deps -q; then
      status="FAILED: pip install -e ."
      echo "FAILED: pip install -e . --no-build-isolation --no-deps"
    fi
    if ! timeout 60 $PY -c 'import vrpo_fast.kernels.token_stats' 2>/dev/null; then
      # Fallback on the throwaway device copy: a link for the package_dir mapping, repo on the path.
      echo "vrpo_fast.kernels not importable after install: linking vrpo_fast/kernels -> ../kernels, PYTHONPATH=$REPO"
      [ -e vrpo_fast/kernels ] || ln -s ../kernels vrpo_fast/kernels
      export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
      status="$status; fallback PYTHONPATH"
    fi
  fi
  timeout 60 $PY -c 'import vrpo_fast, vrpo_fast.kernels.token_stats; from vrpo_fast.ops.gae import _load_extension; ext, why = _load_extension(); print("vrpo_fast OK; C++ extension:", "built" if ext is not None else f"missing ({why})")' \
    || { echo "FAILED: import vrpo_fast"; status="FAILED: import vrpo_fast"; }
  record install "$status" $(( $(date +%s) - t0 ))
fi

# ---------------------------------------------------------------------------------------------
# roofline (~20 s): measured limits first, before any number is compared with anything
# ---------------------------------------------------------------------------------------------
if [ "$HAS_CUDA" = 1 ]; then
  run_step roofline 90 '$PY benchmarks/bench_roofline.py --json "$OUT/roofline.json" | tee "$OUT/roofline.md"'
else
  run_step roofline 90 '$PY benchmarks/bench_roofline.py --device cpu --quick --json "$OUT/roofline.json" | tee "$OUT/roofline.md"'
fi

# ---------------------------------------------------------------------------------------------
# tests (~90-150 s, mostly Triton compiling ~40 kernel variants): compiled kernels vs references
# ---------------------------------------------------------------------------------------------
export PYTEST_ARGS
run_step tests 240 'TRITON_INTERPRET=0 $PY -m pytest tests/test_gpu.py $PYTEST_ARGS 2>&1 | tee "$OUT/gpu_tests.txt"'

# ---------------------------------------------------------------------------------------------
# op benchmarks (~110 s together) -> bench_ops.md
# ---------------------------------------------------------------------------------------------
if [ "$HAS_CUDA" = 1 ]; then
  BENCH_OPS=$OUT/bench_ops.md
  export BENCH_OPS
  run_step token 150 'echo "## token_logprobs_entropy / linear_logprobs_entropy (bench_token_stats.py)" >> "$BENCH_OPS";
    $PY benchmarks/bench_token_stats.py --device cuda --quick --V 151936 --linear 4096 2048 151936 | tee -a "$BENCH_OPS"'
  run_step gae 90 '{ echo; echo "## gae (bench_gae.py)"; } >> "$BENCH_OPS";
    $PY benchmarks/bench_gae.py --no-memory | tee -a "$BENCH_OPS"'
  run_step vib 60 '{ echo; echo "## vib_sample_kl (bench_vib.py)"; } >> "$BENCH_OPS";
    $PY benchmarks/bench_vib.py --device cuda | tee -a "$BENCH_OPS"'

  # -------------------------------------------------------------------------------------------
  # training step (longest, last): quick 0.5b first (always gives a table), the full-size step only
  # if the budget still allows it
  # -------------------------------------------------------------------------------------------
  BENCH_TRAIN=$OUT/bench_train_step.md
  export BENCH_TRAIN
  run_step train 180 '$PY benchmarks/bench_train_step.py --config 0.5b --device cuda --quick | tee -a "$BENCH_TRAIN"'
  run_step real 240 'echo >> "$BENCH_TRAIN"; $PY benchmarks/bench_real_model.py --device cuda --steps 6 --timeout 220 | tee -a "$BENCH_TRAIN"'
  if wants train_full; then
    if [ $(( $(left) - RESERVE_S )) -ge "$TRAIN_FULL_MIN_S" ]; then
      run_step train_full 600 'echo >> "$BENCH_TRAIN"; $PY benchmarks/bench_train_step.py --config 0.5b --device cuda --steps 1 | tee -a "$BENCH_TRAIN"'
    else
      record train_full "SKIPPED (under ${TRAIN_FULL_MIN_S}s of budget left; run SUITE_STEPS=train_full alone)" 0
    fi
  fi
else
  for s in token gae vib train real train_full; do
    wants "$s" && record "$s" "SKIPPED (no CUDA device)" 0
  done
fi

# ---------------------------------------------------------------------------------------------
echo
echo "=== [$(elapsed)s] done ==="
echo "finished: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(elapsed)s" >> "$SUMMARY"
n_files=$(find "$OUT" -type f | wc -l)
if [ "$n_files" -gt 8 ]; then
  echo "WARNING: $n_files files in $OUT (only 8 come back from a device machine)"
fi
cat "$SUMMARY"
}

# Everything is also written to $OUT/suite.log (what is there comes back even if the caller kills
# this script at its own time limit); the pipeline waits for tee to finish writing.
main 2>&1 | tee -a "$OUT/suite.log"
exit 0
