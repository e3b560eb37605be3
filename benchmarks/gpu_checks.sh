#!/usr/bin/env bash
# Everything only a GPU can show, as one prepared run (a lent GPU machine is short-lived):
#   1. build the CUDA local-attention extension (timed)
#   2. the `cuda`-marked tests (CUDA kernel vs the float64 reference, bf16/fp16, gradcheck, opcheck;
#      a few training steps on the GPU with the CUDA op forced: local fp32/bf16, search)
#   3. bench-ops on the GPU: fwd and fwd+bwd per call at the ATRC sizes, fp32 and bf16, vs the
#      PyTorch reference on the same GPU, with the FLOP floor
#   4. the training-step benchmark at paper size (batch 8, 425x560): contexts none / ATRC / search,
#      fp32 vs bf16 (and channels_last), the search without recomputation, peak CUDA memory (search
#      must fit in 40 GB), ATen ops per step (the host's work)
#   5. the ATRC step under torch.compile (default mode and CUDA graphs), fp32 and bf16
#   6. a short real training run on the GPU (ATRC distillation, bf16 through Accelerate;
#      SKIP_SMOKE=1 skips it)
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh          # python3 must have torch with CUDA
#   STAGES="env train_compile" TOTAL_S=580 OUT=/tmp/gpu bash benchmarks/gpu_checks.sh   # some stages
#
# Stages: env build tests ops train_bench train_compile smoke_train. A lent machine runs one
# command for at most 10 minutes: run the compile rows (minutes of compilation per configuration)
# in a call of their own. With 15 minutes of device time in all (a machine's start included), one
# call of about 9 minutes fits. What is still unmeasured, in order of what it can tell:
# * the whole model compiled and replayed as CUDA graphs, the one path likely to reach bf16 2x
#   (on the H200 the bf16 step's kernels alone took 104 ms of fp32's 162, and 2x is 81 ms: only
#   inductor's fusion with the launches gone can get there; its first compilation took over 200 s
#   there, so give it the call):
#     STAGES="env train_compile" COMPILE_PATHS="fp32 bf16+cudagraphs" COMPILE_TIMEOUT_S=480 \
#       TOTAL_S=580 OUT=$OUT bash benchmarks/gpu_checks.sh
# * the regional rows (shorter compilation; the head stays eager and host-bound, so likely short
#   of 2x): STAGES="env train_compile" TOTAL_S=540 COMPILE_TIMEOUT_S=200 OUT=$OUT bash ...
#   (fp32 eager, bf16 + regional compile, bf16 + regional CUDA graphs; the whole-model rows if
#   time is left);
# * the eager rows, search included (its per-forward synchronisations were removed and the
#   `no_recompute` row added after the 2026-11-29 table), about 3 minutes:
#     STAGES="env train_bench" QUICK=1 TOTAL_S=400 OUT=$OUT bash benchmarks/gpu_checks.sh
#
# Each stage has its own time limit and appends to $OUT/gpu_checks.log; the JSON results land in
# $OUT. Stages after a failed one still run. Needs the runtime dependencies of atrc_exp importable
# (PYTHONPATH is set to the repository; hydra-core/omegaconf may come from a wheel folder, see
# benchmarks/RESULTS.md).
set -u
OUT=${OUT:-/tmp/atrc_gpu_checks}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
# the whole run ends within TOTAL_S seconds: each stage gets min(its limit, what is left)
TOTAL_S=${TOTAL_S:-1500}
DEADLINE=$(($(date +%s) + TOTAL_S))
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/atrc_torch_ext}

stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2 t0 rc left
  shift 2
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then
    return
  fi
  t0=$(date +%s)
  left=$((DEADLINE - t0))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "===== $name skipped: TOTAL_S reached" | tee -a "$LOG"
    return
  fi
  echo "===== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "===== $name rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  $PY -c 'import torch,sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'; \
  nvcc --version | tail -2; nproc"

stage build 240 $PY -c "
import time, torch
from atrc_exp.ops import build
t = time.perf_counter(); build.get_extension('cuda', verbose=True)
print(f'CUDA extension built in {time.perf_counter() - t:.1f} s')"

stage tests 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_local_attention.py tests/test_train.py -rA

stage ops 120 $PY benchmarks/bench_local_attention.py --skip-cpu --repeat 10 --ref-repeat 3 --profile \
  --sizes 8x33x107x140 8x33x128x128 8x90x107x140 --out "$OUT/results-ops-gpu.json"

if [ "$QUICK" = 1 ]; then
  paths="fp32 bf16 bf16+cudnn_benchmark no_recompute"
else
  paths="fp32 bf16 channels_last cudnn_benchmark bf16+cudnn_benchmark no_recompute"
fi
stage train_bench 300 $PY benchmarks/bench_train.py --devices cuda --contexts none atrc search \
  --paths $paths --fast-contexts none atrc --rounds 1 --steps 10 --warmup 3 --timeout 200 \
  --out "$OUT/results-train-gpu.json"

# torch.compile of the ATRC step: default mode and CUDA graphs (reduce-overhead), vs fp32 eager.
# The first compilation of the whole ATRC training step takes minutes (> 200 s on an H200 machine's
# 16 cores, ~330 s on 2 CPU cores); the regional rows (trainer.compile.regional=true: HRNet's
# modules one by one, identical ones compiled once; the backbone 1.5x faster to compile on the
# CPU) come first so that they fit a short lease. Each configuration gets COMPILE_TIMEOUT_S
# (default 480).
COMPILE_PATHS=${COMPILE_PATHS:-"fp32 bf16+compile_regional bf16+cudagraphs_regional compile_regional bf16+compile bf16+cudagraphs"}
stage train_compile 1500 $PY benchmarks/bench_train.py --devices cuda --contexts atrc \
  --paths $COMPILE_PATHS \
  --fast-contexts atrc --rounds 1 --steps 10 --warmup 3 \
  --timeout "${COMPILE_TIMEOUT_S:-480}" --out "$OUT/results-train-compile-gpu.json"

[ "${SKIP_SMOKE:-0}" = 1 ] || stage smoke_train 180 $PY -m atrc_exp.train context=atrc context.genotype=genotypes/nyud_hrnet18.json \
  trainer.max_steps=40 trainer.val_interval=40 trainer.mixed_precision=bf16 trainer.progress=false \
  paths.log_dir=/tmp/atrc_gpu_runs paths.data_dir=/tmp/atrc_gpu_data \
  dataset.generator.n_train=64 dataset.generator.n_val=16
tail -n 30 /tmp/atrc_gpu_runs/runs/*/*/metrics.json >>"$LOG" 2>/dev/null

echo "done $(date +%T)" | tee -a "$LOG"
