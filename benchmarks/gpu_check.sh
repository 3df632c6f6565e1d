#!/usr/bin/env bash
# The device check: everything a session with a lent GPU runs, in one call, within about eight minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh            # on a CUDA machine (the device tool sets OUT)
#   OUT=/tmp/dry bash benchmarks/gpu_check.sh --dry-run   # here, on the CPU: same steps, tiny shapes,
#                                                         # Triton's interpreter, no FlexAttention compile
#
# Steps, each time-boxed (the limits below, in seconds, can be changed through the environment):
#   env     device, driver, torch/triton versions                                      -> gpu_check.log
#   attn    benchmarks/attention.py at ViL-Small stages 1 and 2, bf16, B=64: triton (autotuned; the chunk
#           kernels) and triton_tiles (the query-tile kernels they replace, on the same card), chunked,
#           FlexAttention with the same mask and bias (compiled), NATTEN if importable             -> attention.json
#   step    benchmarks/train.py: a ViL-Small training step (bf16, B=64, 224), RPE and APE, eager and compiled,
#           triton and chunked, plain torch + AdamW where DeepSpeed is absent; images/s and MFU against the measured
#           bf16 matmul rate, and a torch.profiler breakdown of 3 steps per row                       -> train.json
#   jobs    benchmarks/jobs.py: every job in jobs/ for 2 steps at its own shapes and precision (its model, heads,
#           optimizer, micro-batch), and one evaluation forward that keeps every detection (NMS on CUDA) -> jobs.json
#           (the dry run: smoke and the digits detection and segmentation jobs, fp32, batch 1)
#   tests   the quick `gpu` tests of the fused kernel at one fixed kernel configuration  -> gpu_tests.xml
#           (VILSCALE_TRITON_CONFIG and VILSCALE_TRITON_CHUNK_CONFIG, no autotuning sweep), stopping after
#           5 failures
#   slow    the slow `gpu` tests (every variant's stage shapes, the 1024 backbone)      -> gpu_tests_slow.xml
#   report  benchmarks/gpu_report.py merges all of it into gpu_check.json (device, versions, commit, figures)
#
# GPU_CHECK_STEPS=env,tests,slow runs only the steps named (a rerun after a fix); the report always runs.
#
# Everything is written under $OUT (at most 9 files: what the device tool brings back). Nothing here
# imports deepspeed, ray, ffcv, kornia or submitit; the dry run makes them unimportable to prove it.
# The commit is read from git, or from VILSCALE_COMMIT where the tree has no history.
set -u

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (valid: --dry-run, --help)" >&2; exit 2 ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d)
  echo "OUT is not set: writing to $OUT"
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
STEPS="$(mktemp)"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH" "$STEPS"' EXIT

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$SCRATCH/triton-cache}
if [ -z "${VILSCALE_COMMIT:-}" ]; then
  VILSCALE_COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
  export VILSCALE_COMMIT
fi

if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1
  # the device image has none of these: make them unimportable here, so an import of one fails as it would there
  for package in deepspeed ray ffcv kornia submitit; do
    mkdir -p "$SCRATCH/absent/$package"
    echo "raise ImportError('$package is not installed on the device image (gpu_check.sh --dry-run)')" \
      > "$SCRATCH/absent/$package/__init__.py"
  done
  export PYTHONPATH="$SCRATCH/absent:$PYTHONPATH"
  DEVICE=cpu
else
  DEVICE=cuda
fi

LIMIT_ATTN=${LIMIT_ATTN:-210}
LIMIT_STEP=${LIMIT_STEP:-240}
LIMIT_JOBS=${LIMIT_JOBS:-180}
LIMIT_TESTS=${LIMIT_TESTS:-90}
LIMIT_SLOW=${LIMIT_SLOW:-90}
WORKERS=${WORKERS:-8}

say() { echo "$*" | tee -a "$LOG"; }
# GPU_CHECK_STEPS=tests,slow (say) runs only those steps: a rerun after a fix, within what is left of a lease
wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }

# run_step NAME LIMIT COMMAND...: runs with a time box, output to the log (and the terminal), records rc and time
run_step() {
  local name=$1 limit=$2
  shift 2
  if ! wanted "$name"; then
    say "=== $name: not in GPU_CHECK_STEPS, skipped"
    return
  fi
  say "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  # SIGINT first: pytest then still writes its junit file, the benchmarks keep the rows they wrote
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - started))
  [ "$rc" = 124 ] && say "=== $name: stopped at its time limit (${limit}s)"
  say "=== $name: exit $rc after ${took}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >> "$STEPS"
}

pytest_args=(-p no:cacheprovider -o addopts= -o console_output_style=classic -rfE --timeout=300)
if "$PY" -c "import xdist" 2>/dev/null && [ "$DRY_RUN" = 0 ]; then
  pytest_args+=(-n "$WORKERS")  # compiling the kernels' specialisations is CPU work: spread it over cores
fi

run_step env 30 "$PY" - <<'EOF'
import platform, subprocess, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton not importable:", error)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError) as error:
        print("nvidia-smi:", error)
for name in ("deepspeed", "ray", "ffcv", "kornia", "submitit", "natten"):
    try:
        __import__(name)
        print(name, "importable")
    except ImportError:
        print(name, "absent")
EOF

if [ "$DRY_RUN" = 1 ]; then
  # no CUDA here: the gpu tests are collected (their imports proven) but not run
  run_step tests "$LIMIT_TESTS" "$PY" -m pytest "${pytest_args[@]}" --collect-only -qq -m gpu \
    "$REPO/tests/test_kernels_triton_gpu.py"
  run_step attn "$LIMIT_ATTN" "$PY" "$REPO/benchmarks/attention.py" --quick --device cpu --dtypes fp32 \
    --backends triton,triton_tiles,chunked,flex,natten --cases vil_small_stage2 --repeats 1 \
    --out "$OUT/attention.json"
  unset VILSCALE_TRITON_KERNEL
  run_step step "$LIMIT_STEP" "$PY" "$REPO/benchmarks/train.py" --engine auto --device cpu --model vil_nano \
    --img-size 32 --window 2 --num-classes 10 --batch 2 --precision fp32 --backends triton,chunked \
    --pos-embeds rpe,ape --modes eager,compiled --profile --warmup 1 --steps 1 --json "$OUT/train.json"
  run_step jobs "$LIMIT_JOBS" "$PY" "$REPO/benchmarks/jobs.py" --device cpu --dry-run \
    --only smoke,digits_retinanet,digits_mask_rcnn,digits_semfpn --json "$OUT/jobs.json"
else
  # figures first (the deliverable of a short lease), then correctness at one fixed kernel configuration
  export TRITON_PRINT_AUTOTUNING=1  # the log says which configuration the autotuner chose per shape
  # the triton rows on the chunk kernels, the triton_tiles rows on the query-tile kernels (old against new)
  export VILSCALE_TRITON_KERNEL=chunks
  run_step attn "$LIMIT_ATTN" "$PY" "$REPO/benchmarks/attention.py" --dtypes bf16 \
    --backends triton,triton_tiles,chunked,flex,natten --cases vil_small_stage1,vil_small_stage2 \
    --out "$OUT/attention.json"
  unset VILSCALE_TRITON_KERNEL
  run_step step "$LIMIT_STEP" "$PY" "$REPO/benchmarks/train.py" --engine auto --model vil_small --img-size 224 \
    --batch 64 --precision bf16 --backends triton,chunked --pos-embeds rpe,ape --modes eager,compiled --profile \
    --warmup 3 --steps 10 --json "$OUT/train.json"
  run_step jobs "$LIMIT_JOBS" "$PY" "$REPO/benchmarks/jobs.py" --device cuda --steps 2 --json "$OUT/jobs.json"
  export VILSCALE_TRITON_CHUNK_CONFIG=${VILSCALE_TRITON_CHUNK_CONFIG:-4x2}
  VILSCALE_TRITON_CONFIG=${VILSCALE_TRITON_CONFIG:-8x8x8} run_step tests "$LIMIT_TESTS" \
    "$PY" -m pytest "${pytest_args[@]}" --maxfail=5 -m "gpu and not slow" \
    --junitxml="$OUT/gpu_tests.xml" "$REPO/tests/test_kernels_triton_gpu.py"
  VILSCALE_TRITON_CONFIG=${VILSCALE_TRITON_CONFIG:-8x8x8} run_step slow "$LIMIT_SLOW" \
    "$PY" -m pytest "${pytest_args[@]}" --maxfail=5 -m "gpu and slow" \
    --junitxml="$OUT/gpu_tests_slow.xml" "$REPO/tests/test_kernels_triton_gpu.py"
fi

GPU_CHECK_STEPS= run_step report 60 "$PY" "$REPO/benchmarks/gpu_report.py" --out "$OUT" --steps "$STEPS" \
  $([ "$DRY_RUN" = 1 ] && echo --dry-run)
say "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
# the check itself fails only when its report could not be written; figures and test results are in it
[ -s "$OUT/gpu_check.json" ]
