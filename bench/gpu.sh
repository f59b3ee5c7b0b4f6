#!/usr/bin/env bash
# The GPU path measured on one CUDA machine, in one run that ends well inside 8 minutes.
#
#   bench/gpu.sh fetch     where a package registry is reachable: fill bench/wheels, stamp the commit
#   bench/gpu.sh           on the GPU machine (no registry needed); OUT=DIR for the results
#                          (default bench/results), LOHA_GPU_BUDGET=SECONDS for the whole run
#                          (420 on a GPU; 900 for the check without one)
#
# Steps, each under its own time limit (a step that fails or hangs is recorded, and the next
# one runs; the steps before the two bypass ones end 100 s before the budget does, which keeps
# those a share), all written to ONE results file, $OUT/gpu-results.txt, summary first:
#   install  the packages of bench/wheels this Python lacks (bench/gpu_wheels.py), into a
#            folder put on PYTHONPATH after the repository, which is never built
#   env      the GPU's name, driver, torch / CUDA / triton / diffusers / lycoris versions, commit
#   tests    the kernel tests on the GPU: tests/test_kernels.py, test_kernels_bypass.py and
#            test_kernels_triton.py with LOHA_TEST_DEVICE=cuda (fp16/bf16/fp32, odd shapes,
#            ranks 1..64, Tucker, the bypass kernels; the Triton cases compiled for this GPU,
#            not interpreted), and the CUDA tests of tests/test_merge.py
#   apply    bench/apply.py --sdxl --cuda: ours (grouped Triton), the Khatri–Rao addmm_, the
#            ComfyUI way, LyCORIS 4.1.3's Triton loha_merge and more against the HBM floor,
#            medians of interleaved rounds, ratios and the targets printed
#   merge    bench/merge.py --sdxl: a whole SDXL checkpoint merged with --device cuda and on the CPU
#   tune     bench/apply.py --tune --cuda: tile shapes and the Khatri–Rao crossover, with the
#            values they suggest for loha/kernels/tuning.py
#   bypass   bench/bypass.py --cuda: fp16 SD1.5 UNet (64×64 latent) and text-encoder forwards,
#            base / ours in bypass / ΔW rebuilt each forward / patched, interleaved, with the
#            issue-17 targets (bypass ≤ +10 % on the UNet forward, ≥ 3× faster on the LoHa part)
#   bypass-tune  bench/bypass.py --tune --cuda: the fused Triton bypass kernel's tiles per dtype,
#            with the values they suggest for loha/kernels/tuning.py
#
# Without CUDA (or with LOHA_GPU_SMOKE=1) it checks itself in a few minutes: the same steps on
# small shapes on the CPU, the Triton kernels under TRITON_INTERPRET=1, and what needs CUDA
# reported as "skipped: no CUDA".
#
# `fetch` runs (pure-Python wheels for any CPython >= 3.10; Pillow, which diffusers imports, per
# CPython version; diffusers 0.37.1 accepts huggingface-hub 0.34 to 1.x and runs with 2.x):
#   python3 -m pip download --no-deps --only-binary=:all: --implementation py --python-version 3.10 \
#       --platform any -d bench/wheels diffusers==0.37.1 lycoris-lora==4.1.3 einops toml requests \
#       urllib3 idna certifi charset-normalizer pytest pluggy iniconfig pygments packaging \
#       exceptiongroup tomli typing-extensions tqdm tomli-w
#   python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
#       --python-version 3.1X -d bench/wheels pillow             (X = 0, 1, 2, 3)
#   git rev-parse HEAD > bench/wheels/COMMIT
# bench/wheels (about 35 MB, git-ignored) then travels with the working tree. The commit is
# taken from LOHA_COMMIT, else from git, else from bench/wheels/COMMIT.

set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WHEELS=$REPO/bench/wheels

PURE_WHEELS="diffusers==0.37.1 lycoris-lora==4.1.3 einops toml requests urllib3 idna certifi charset-normalizer
  pytest pluggy iniconfig pygments packaging exceptiongroup tomli typing-extensions tqdm tomli-w"

if [[ "${1:-}" == "fetch" ]]; then
  mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --implementation py --python-version 3.10 \
    --platform any -d "$WHEELS" $PURE_WHEELS || exit 1
  for minor in 10 11 12 13; do
    python3 -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --python-version "3.$minor" -d "$WHEELS" pillow || exit 1
  done
  { git rev-parse HEAD; [[ -n "$(git status --porcelain --untracked-files=no)" ]] && echo "with uncommitted changes"; } \
    > "$WHEELS/COMMIT"
  echo "bench/wheels: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1); commit $(head -1 "$WHEELS/COMMIT")"
  exit 0
fi

OUT=${OUT:-$REPO/bench/results}
mkdir -p "$OUT"
RESULTS=$OUT/gpu-results.txt
WORK=${LOHA_GPU_WORK:-${TMPDIR:-/tmp}/loha-gpu}
mkdir -p "$WORK"
START=$(date +%s)

if [[ "${LOHA_GPU_SMOKE:-0}" != "1" ]] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  GPU=1
  unset TRITON_INTERPRET  # compiled kernels, never the interpreter
  MODE="GPU"
  BUDGET=${LOHA_GPU_BUDGET:-420}
else
  GPU=0
  export TRITON_INTERPRET=1
  MODE="smoke (no CUDA: small shapes on the CPU, Triton under TRITON_INTERPRET=1; GPU figures pending)"
  BUDGET=${LOHA_GPU_BUDGET:-900}
fi
DEADLINE=$((START + BUDGET))
if [[ -n "${LOHA_COMMIT:-}" ]]; then
  COMMIT=$LOHA_COMMIT
elif git rev-parse HEAD >/dev/null 2>&1; then
  COMMIT=$(git rev-parse HEAD)
  [[ -n "$(git status --porcelain --untracked-files=no)" ]] && COMMIT="$COMMIT with uncommitted changes"
elif [[ -f "$WHEELS/COMMIT" ]]; then
  COMMIT="$(paste -sd' ' "$WHEELS/COMMIT") (from bench/wheels/COMMIT)"
else
  COMMIT=unknown
fi

export PYTHONPATH=$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_CACHE_DIR=$WORK/triton-cache LYCORIS_KERNEL_CACHE_DIR=$WORK/lycoris-cache

BODY=$WORK/body.txt
: > "$BODY"
SUMMARY=()
KEEP=0  # seconds of the budget kept back for the steps still to come

header() {
  echo "loha bench/gpu.sh results"
  echo "mode:    $MODE"
  echo "commit:  $COMMIT"
  echo "started: $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC'), took $(($(date +%s) - START)) s of a $BUDGET s budget"
}

write_results() {  # the summary first, then every step's output
  { header; echo; echo "== summary"; printf '%s\n' "${SUMMARY[@]}"
    grep -E '^ *target' "$BODY" | sed 's/^ */  /'
    echo; cat "$BODY"; } > "$RESULTS.tmp" && mv "$RESULTS.tmp" "$RESULTS"
}

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it under its limit and the budget less KEEP, record its status
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - KEEP - $(date +%s)))
  if ((left < 20)); then
    SUMMARY+=("$(printf '%-12s skipped: out of time' "$name")")
    write_results
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s): $(head -c 160 <<< "$*" | head -1)" | tee -a "$BODY"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$BODY"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  SUMMARY+=("$(printf '%-12s %s in %d s' "$name" "$status" $(($(date +%s) - t0)))")
  echo "--- $name: $status" | tee -a "$BODY"
  write_results
}

skip() {  # skip NAME WHY
  SUMMARY+=("$(printf '%-12s skipped: %s' "$1" "$2")")
  echo "=== $1: skipped: $2" | tee -a "$BODY"
  write_results
}

ENV_PY='
import importlib.metadata as md, os, platform, subprocess, torch
print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}")
versions = []
for dist in ("triton", "diffusers", "transformers", "huggingface-hub", "peft", "safetensors", "lycoris-lora", "pytest"):
    try:
        versions.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        versions.append(f"{dist} missing")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); " + ", ".join(versions))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name()}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
    try:
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        print(f"nvidia-smi ({query}): {smi.stdout.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"nvidia-smi: {e}")
else:
    print("GPU: none (this torch sees no CUDA device)")
'

PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs)
KERNEL_TESTS=(tests/test_kernels.py tests/test_kernels_bypass.py tests/test_kernels_triton.py)

step install 90 python3 bench/gpu_wheels.py --wheels "$WHEELS" --target "$WORK/site"
step env 30 python3 -c "$ENV_PY"
if ((GPU)); then
  KEEP=100  # the bypass steps' share, whatever the steps before them take
  step tests 180 env LOHA_TEST_DEVICE=cuda "${PYTEST[@]}" "${KERNEL_TESTS[@]}" -k "not under_interpreter"
  step merge-tests 60 "${PYTEST[@]}" tests/test_merge.py -k cuda
  step apply 180 python3 bench/apply.py --sdxl --cuda --no-peft --dtypes fp16 --reps 5
  step merge 180 python3 bench/merge.py --sdxl --only ours-cuda ours --keep "$WORK/merge"
  step tune 120 python3 bench/apply.py --tune --cuda
  KEEP=40 step bypass 60 python3 bench/bypass.py --cuda
  KEEP=0 step bypass-tune 60 python3 bench/bypass.py --tune --cuda
else
  KEEP=150
  step tests 300 env LOHA_TEST_DEVICE=cpu "${PYTEST[@]}" "${KERNEL_TESTS[@]}"
  step merge-tests 120 "${PYTEST[@]}" tests/test_merge.py -k cuda
  step apply 300 python3 bench/apply.py --tiny --triton --no-peft --dtypes fp16 --reps 1
  step merge 180 python3 bench/merge.py --tiny --only ours --keep "$WORK/merge"
  skip merge-cuda "no CUDA (bench/merge.py --only ours-cuda)"
  step tune 240 python3 bench/apply.py --tune --triton --tiny
  KEEP=60 step bypass 90 python3 bench/bypass.py --tiny
  KEEP=0 step bypass-tune 60 python3 bench/bypass.py --tune --triton --tiny
  skip targets "no CUDA (the HBM floor, LyCORIS's Triton loha_merge and the fp16 bypass need a GPU)"
fi
write_results
echo
echo "results: $RESULTS"
sed '/^=== /,$d' "$RESULTS"
