#!/usr/bin/env bash
# Everything only a GPU can show, as one prepared run that fits one call of a lent GPU machine
# (10 minutes a command): by default it ends within TOTAL_S=560 s and writes $OUT/RESULTS_gpu.md
# (benchmarks/RESULTS.md's format: heading with what, machine and date, the command, the tables),
# printed at the end, next to $OUT/gpu_checks.log and the JSON results.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_checks.sh           # on the GPU machine, from anywhere
#   DEVICE=cpu OUT=/tmp/dry bash benchmarks/gpu_checks.sh  # dry run here: same code paths, tiny size
#
# Default stages (STAGES="env build ops train"):
#   env    nvidia-smi, torch/CUDA versions, where hydra/omegaconf come from
#   build  the CUDA local-attention extension (JIT, timed; ~50 s on the H200)
#   ops    bench_local_attention.py's GPU rows: fwd and fwd+bwd per call at the ATRC sizes, fp32 and
#          bf16, vs the PyTorch reference on the same GPU, the FLOP floor, peak memory, kernel profile
#   train  bench_train.py at paper size (batch 8 at 425x560): contexts none / atrc / search x paths
#          fp32, bf16, compile (torch.compile of forward + loss, trainer.compile.parts=[step], default
#          mode), bf16+cudagraphs (mode=reduce-overhead, bf16 autocast): step ms, images/s, x none,
#          peak MiB (max_memory_allocated), ATen ops/step (eager rows), kernel ms/step
#          (torch.profiler), host ms/step (until the step function returns, before synchronising).
#          The eager rows run first (quick); then the compile rows are compiled concurrently
#          (PARALLEL_COMPILE processes; a first compilation of the ATRC step took > 200 s on the
#          H200) and timed one at a time with the others idle; a row that cannot finish in the time
#          left reads "timeout (N s)" or "not run: ..." in the table, never dropped.
# Optional stages (name them in STAGES):
#   tests        the `cuda`-marked tests (CUDA kernel vs the float64 reference, bf16/fp16, gradcheck,
#                opcheck; training steps with the CUDA op forced); needs pytest (on the image)
#   smoke_train  a 40-step bf16 ATRC training run through Accelerate (needs pyEdgeEval for odsF)
#
# Knobs (all optional): TOTAL_S (560; 1200 with DEVICE=cpu), STAGES, TRAIN_CONTEXTS ("none atrc
# search"), TRAIN_PATHS ("fp32 bf16 compile bf16+cudagraphs"; any of bench_train.py's paths:
# + channels_last, no_recompute (search only)), STEPS (10), WARMUP (3), PARALLEL_COMPILE (6; 0 = one compile row after
# the other), COMPILE_TIMEOUT_S (per compile row, 480), ROW_TIMEOUT_S (per eager row, 150), PYTHON
# (python3), DEVICE (cuda | cpu; DRY_RUN=1 = cpu). Stages after a failed one still run; each has its
# own time limit, cut to what is left of TOTAL_S.
#
# Imports: PYTHONPATH gets the repository. The GPU image has torch, accelerate, opencv, scipy, ...
# but not hydra-core / omegaconf (nor their antlr4 runtime); when `import hydra, omegaconf` fails,
# the script adds, in this order: $PYDEPS (a folder holding them), .venv/lib/python3*/site-packages
# (pure-Python packages: carry only these three folders of the development venv, e.g. `carry:
# [".venv/lib/python3.11/site-packages/hydra", ".venv/lib/python3.11/site-packages/omegaconf",
# ".venv/lib/python3.11/site-packages/antlr4"]`), or wheels in .whl/ (installed into /tmp).
# The inductor cache is /tmp/atrc_inductor_cache (TORCHINDUCTOR_CACHE_DIR), kept while the machine
# is: a second run on the same machine loads the compilations instead of redoing them.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
KNOBS="DRY_RUN DEVICE TOTAL_S STAGES TRAIN_CONTEXTS TRAIN_PATHS STEPS WARMUP PARALLEL_COMPILE COMPILE_TIMEOUT_S ROW_TIMEOUT_S"
CMD="bash benchmarks/gpu_checks.sh" # as called, for the report's heading
for v in $KNOBS; do
  [ -n "${!v:-}" ] && CMD="$v=\"${!v}\" $CMD"
done
OUT=${OUT:-/tmp/atrc_gpu_checks}
PY=${PYTHON:-python3}
[ "${DRY_RUN:-0}" = 1 ] && DEVICE=cpu
DEVICE=${DEVICE:-cuda}
case "$DEVICE" in
  cuda) TOTAL_S=${TOTAL_S:-560} ;;
  cpu) TOTAL_S=${TOTAL_S:-1200} ;;
  *) echo "gpu_checks.sh: DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
STAGES=${STAGES:-"env build ops train"}
for s in $STAGES; do
  case " env build ops tests train smoke_train " in
    *" $s "*) ;;
    *) echo "gpu_checks.sh: unknown stage '$s' in STAGES (stages: env build ops tests train smoke_train)" >&2; exit 2 ;;
  esac
done
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
FINAL_RESERVE_S=10 # for writing RESULTS_gpu.md at the end
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_checks.log"
: >"$LOG"
WORK=$(mktemp -d /tmp/atrc_gpu_checks.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cuda ]; then
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/atrc_torch_ext}
  export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/atrc_inductor_cache}
fi

# ---- hydra-core / omegaconf: from the image, $PYDEPS, a carried venv folder, or .whl/ wheels
have_hydra() { $PY -c 'import hydra, omegaconf' >/dev/null 2>&1; }
DEPS_NOTE="hydra/omegaconf: from the packages of $PY"
if ! have_hydra; then
  DEPS_NOTE=""
  for d in ${PYDEPS:-} .venv/lib/python3*/site-packages; do
    if [ -d "$d/hydra" ] && [ -d "$d/omegaconf" ]; then
      d=$(cd "$d" && pwd)
      export PYTHONPATH="$PYTHONPATH:$d"
      if have_hydra; then DEPS_NOTE="hydra/omegaconf: from $d"; break; fi
    fi
  done
  if [ -z "$DEPS_NOTE" ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/atrc_site .whl/*.whl >>"$LOG" 2>&1
    export PYTHONPATH="$PYTHONPATH:/tmp/atrc_site"
    have_hydra && DEPS_NOTE="hydra/omegaconf: from the wheels in .whl/"
  fi
  if [ -z "$DEPS_NOTE" ]; then
    DEPS_NOTE="hydra/omegaconf: NOT importable"
    echo "gpu_checks.sh: $PY cannot import hydra/omegaconf: carry .venv/lib/python3.11/site-packages/{hydra,omegaconf,antlr4} (or set PYDEPS); see the header" | tee -a "$LOG"
  fi
fi

export DEPS_NOTE

# ---- the machine's name, for the headings
if [ "$DEVICE" = cuda ]; then
  MACHINE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  MACHINE=${MACHINE:-unknown GPU (nvidia-smi failed)}
  # concurrent compile processes need the GPU's default compute mode (not exclusive-process)
  COMPUTE_MODE=$(nvidia-smi --query-gpu=compute_mode --format=csv,noheader 2>/dev/null | head -n 1)
  if [ -z "${PARALLEL_COMPILE:-}" ] && [ -n "$COMPUTE_MODE" ] && [ "$COMPUTE_MODE" != Default ]; then
    PARALLEL_COMPILE=0
    echo "compute mode '$COMPUTE_MODE': the compile rows run one after the other" | tee -a "$LOG"
  fi
else
  MACHINE="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1) ($(nproc) cores)"
fi

SUMMARY="$WORK/summary.md"
printf '| stage | result | seconds |\n|---|---|---|\n' >"$SUMMARY"

stage() { # stage NAME LIMIT_S CMD...: runs CMD within min(LIMIT_S, what is left), output to the log
  local name=$1 limit=$2 t0 rc left result
  shift 2
  [[ " $STAGES " == *" $name "* ]] || return 0
  t0=$(date +%s)
  left=$((DEADLINE - FINAL_RESERVE_S - t0))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "===== $name skipped: TOTAL_S=$TOTAL_S reached" | tee -a "$LOG"
    echo "| $name | skipped: TOTAL_S=$TOTAL_S reached | 0 |" >>"$SUMMARY"
    return 0
  fi
  echo "===== $name (limit ${limit} s) $(date +%T)" | tee -a "$LOG"
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) result="ok" ;;
    124 | 137) result="timed out (limit $limit s)" ;;
    *) result="failed (exit $rc)" ;;
  esac
  echo "===== $name: $result in $(($(date +%s) - t0)) s" | tee -a "$LOG"
  echo "| $name | $result | $(($(date +%s) - t0)) |" >>"$SUMMARY"
  if [ "$rc" != 0 ]; then # the end of its output, to see why without the log
    sed -n "/^===== $name (limit/,\$p" "$LOG" | tail -n 15 | sed 's/^/    /'
  fi
}
# a stage's limit when it is to take all that is left: known only when it starts
left_now() { echo $((DEADLINE - FINAL_RESERVE_S - $(date +%s))); }

TRAIN_CONTEXTS=${TRAIN_CONTEXTS:-"none atrc search"}
TRAIN_PATHS=${TRAIN_PATHS:-"fp32 bf16 compile bf16+cudagraphs"}
if [ "$DEVICE" = cuda ]; then
  stage env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,compute_mode --format=csv; \
    $PY -c 'import torch,sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'; \
    nvcc --version | tail -2; nproc; echo \"\$DEPS_NOTE\""

  stage build 180 $PY -c "
import time
from atrc_exp.ops import build
t = time.perf_counter(); build.get_extension('cuda', verbose=True)
print(f'CUDA extension built in {time.perf_counter() - t:.1f} s')"

  stage ops 120 $PY benchmarks/bench_local_attention.py --skip-cpu --repeat 10 --ref-repeat 3 --profile \
    --sizes 8x33x107x140 8x33x128x128 8x90x107x140 --machine "$MACHINE" --markdown "$WORK/ops.md" \
    --out "$OUT/results-ops-gpu.json"

  stage tests 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_local_attention.py tests/test_train.py -rA

  stage smoke_train 180 $PY -m atrc_exp.train context=atrc context.genotype=genotypes/nyud_hrnet18.json \
    trainer.max_steps=40 trainer.val_interval=40 trainer.mixed_precision=bf16 trainer.progress=false \
    paths.log_dir=/tmp/atrc_gpu_runs paths.data_dir=/tmp/atrc_gpu_data \
    dataset.generator.n_train=64 dataset.generator.n_val=16
  [[ " $STAGES " == *" smoke_train "* ]] && tail -n 30 /tmp/atrc_gpu_runs/runs/*/*/metrics.json >>"$LOG" 2>/dev/null

  # train takes all the time left (the stages above are optional, except env, build, ops)
  limit=$(left_now)
  # bench_train stops itself 20 s before the stage's limit and writes what it has
  # shellcheck disable=SC2086 # word splitting of the lists is intended
  stage train "$limit" $PY benchmarks/bench_train.py --devices cuda --contexts $TRAIN_CONTEXTS \
    --paths $TRAIN_PATHS --fast-contexts $TRAIN_CONTEXTS --steps "${STEPS:-10}" \
    --warmup "${WARMUP:-3}" --timeout "${ROW_TIMEOUT_S:-150}" --compile-timeout "${COMPILE_TIMEOUT_S:-480}" \
    --parallel-compile "${PARALLEL_COMPILE:-6}" --budget $((limit > 40 ? limit - 20 : limit / 2)) --machine "$MACHINE" \
    --markdown "$WORK/train.md" --out "$OUT/results-train-gpu.json"

else # DEVICE=cpu: the dry run, the same stages and code paths at a tiny size on the CPU
  stage env 30 bash -c "$PY -c 'import torch,sys; print(sys.version); print(torch.__version__)'; nproc; echo \"\$DEPS_NOTE\""

  stage build 300 $PY -c "
import time
from atrc_exp.ops import build
t = time.perf_counter(); build.get_extension('cpp', verbose=True)
print(f'C++ extension built (or loaded) in {time.perf_counter() - t:.1f} s')"

  stage ops 120 $PY benchmarks/bench_local_attention.py --repeat 1 --ref-repeat 1 --sizes 1x33x12x16 \
    --machine "$MACHINE" --markdown "$WORK/ops.md" --out "$OUT/results-ops-cpu.json"

  stage tests 600 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_local_attention.py tests/test_train.py -rA

  limit=$(left_now)
  # shellcheck disable=SC2086
  stage train "$limit" $PY benchmarks/bench_train.py --devices cpu --contexts $TRAIN_CONTEXTS \
    --paths $TRAIN_PATHS --fast-contexts $TRAIN_CONTEXTS --steps "${STEPS:-1}" \
    --warmup "${WARMUP:-0}" --size 1x64x96 --threads 2 --skip-compile --timeout "${ROW_TIMEOUT_S:-300}" \
    --budget $((limit > 40 ? limit - 20 : limit / 2)) --machine "$MACHINE" --markdown "$WORK/train.md" --out "$OUT/results-train-cpu.json"
fi

# ---- $OUT/RESULTS_gpu.md: what ran, where, then the tables
VERSIONS=$($PY -c 'import torch, platform; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")' 2>/dev/null)
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
{
  if [ "$DEVICE" = cuda ]; then
    echo "## GPU checks (\`benchmarks/gpu_checks.sh\`): $MACHINE, $(date +%F)"
  else
    echo "## GPU checks, CPU dry run (\`benchmarks/gpu_checks.sh\`, DEVICE=cpu): $MACHINE, $(date +%F)"
  fi
  echo
  echo "Command: \`OUT=\$OUT $CMD\` (in the repository root)."
  echo
  echo "${VERSIONS:-torch: not importable}${DRIVER:+, driver $DRIVER}, $(nproc) host cores; $DEPS_NOTE."
  echo "Stages (limit TOTAL_S=$TOTAL_S s in all; details in gpu_checks.log):"
  echo
  cat "$SUMMARY"
  for part in ops train; do
    echo
    if [ -s "$WORK/$part.md" ]; then
      cat "$WORK/$part.md"
    elif [[ " $STAGES " == *" $part "* ]]; then
      echo "(stage $part wrote no table: see gpu_checks.log)"
    fi
  done
} >"$OUT/RESULTS_gpu.md"
echo "===== done in $(($(date +%s) - START)) s $(date +%T); $OUT/RESULTS_gpu.md:" | tee -a "$LOG"
echo
cat "$OUT/RESULTS_gpu.md"
