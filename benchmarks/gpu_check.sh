#!/usr/bin/env bash
# One-shot GPU check (one H100/H200, under 8 minutes): the first time loraforge's Triton kernels
# meet a real GPU. Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter
#
# Steps, each with its own time limit (60 + 45 + 60 + 75 + 3 x 35 + 2 x 60 = 465 s at most):
#   1. environment: GPU, driver, torch / triton / transformers / peft / bitsandbytes versions
#   2. the CUDA cases of the kernel and optimizer tests (pytest -k cuda: the paged optimizers; the
#      kernel tests run Triton's interpreter on CPU, so their CUDA cases are step 3)
#   3. benchmarks/gpu_parity.py: every Triton kernel on CUDA vs its PyTorch reference, and a 4-bit
#      Llama + LoRA under apply_kernels vs the references
#   4. benchmarks/kernel_micro.py: dequant / gemv / elementwise / cross-entropy vs bitsandbytes, eager
#   5. benchmarks/train_step.py --device cuda, Llama-3 1B and 8B shapes (2 x 2048), the peer arms
#      (HF + PEFT + bitsandbytes; Unsloth where importable, at 8B only with UNSLOTH_8B=1) beside
#      loraforge; each row also gives the fraction of the bf16 GEMM ceiling (see train_step.py)
# Peer packages: if .gpu/site.tgz exists (benchmarks: ../shared/bench/make_gpu_site.sh) it is
# unpacked to /tmp/site and put on PYTHONPATH. train_step's GPU arms need
# ../shared/bench/peer_arms.py (or PEER_DIR=...); without it step 5 is skipped and says so.
# Output: each step's own tables as it runs, then ONE summary table (step, status, seconds, the
# headline figures). Logs stay in $OUT_DIR (default /tmp/gpu_check). Exit status 1 if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT_DIR=${OUT_DIR:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -f .gpu/site.tgz ]; then
  mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PEER_DIR=${PEER_DIR:-../shared/bench}

declare -a SUMMARY=()
FAILED=0

# step NAME LIMIT_SECONDS HEADLINE_COMMAND -- COMMAND...: run with a time limit, keep the log,
# record status, seconds and the headline (HEADLINE_COMMAND reads the log on stdin).
step() {
  local name=$1 limit=$2 headline=$3; shift 4
  local log="$OUT_DIR/$name.log" start rc status
  echo -e "\n===== $name (limit ${limit}s): $*" >&2
  start=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|130|137) status="TIMEOUT"; FAILED=1 ;;
    *) status="FAIL ($rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("| $name | $status | $(( $(date +%s) - start )) | $(bash -c "$headline" < "$log" | tr '\n' ' ' | cut -c1-400) |")
}

has_cuda=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

step environment 60 "tail -n 3" -- "$PYTHON" - <<'EOF'
import importlib, subprocess, torch
for mod in ("torch", "triton", "transformers", "peft", "bitsandbytes", "unsloth"):
    try:
        print(f"{mod} {importlib.import_module(mod).__version__}")
    except Exception as exc:
        print(f"{mod}: not importable ({type(exc).__name__})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, CUDA {torch.version.cuda}")
    print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip())
else:
    print("no CUDA device: the GPU steps below only say so")
EOF

if [ "$has_cuda" = 1 ]; then
  step "tests: CUDA cases" 45 "grep -E 'passed|failed|error' | tail -n 1" -- \
    "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/test_kernels_dequant.py tests/test_kernels_elementwise.py \
      tests/test_kernels_cross_entropy.py tests/test_kernels_lora.py tests/test_optim_paged.py \
      tests/test_optim_adamw8bit.py -rs
  step "CUDA parity" 60 "grep -E 'FAIL|CUDA cases pass' | tail -n 6" -- "$PYTHON" benchmarks/gpu_parity.py
  step "kernel micro" 75 "grep -E '^\| (4096 x 4096|14336 x 4096) \| (1 \||[0-9.]+ \()' | head -n 3" -- \
    "$PYTHON" benchmarks/kernel_micro.py
  if [ -f "$PEER_DIR/peer_arms.py" ]; then
    # one process per arm and shape, each with its own limit: a slow arm cannot hide the others.
    # Unsloth at 8B first writes a 16 GB random checkpoint: only with UNSLOTH_8B=1.
    unsloth=0
    "$PYTHON" -c "import unsloth" >/dev/null 2>&1 && unsloth=1
    for shape in llama3-1b llama3-8b; do
      for arm in peft unsloth loraforge; do
        if [ "$arm" = unsloth ] && { [ $unsloth = 0 ] || { [ "$shape" = llama3-8b ] && [ "${UNSLOTH_8B:-0}" != 1 ]; }; }; then
          continue
        fi
        step "train step $shape $arm" $([ "$shape" = llama3-1b ] && echo 35 || echo 60) \
          "grep -E '^\| $arm \|'" -- \
          "$PYTHON" benchmarks/train_step.py --device cuda --shape "$shape" --bs 2 --seq 2048 --steps 4 --warm 2 \
            --arms "$arm"
      done
    done
  else
    SUMMARY+=("| train step | skipped | 0 | $PEER_DIR/peer_arms.py not found (set PEER_DIR) |")
  fi
else
  step "CUDA parity" 60 "tail -n 1" -- "$PYTHON" benchmarks/gpu_parity.py
  step "kernel micro (CPU smoke)" 120 "tail -n 1" -- "$PYTHON" benchmarks/kernel_micro.py --cpu-smoke
  SUMMARY+=("| tests, train step | skipped | 0 | no CUDA device |")
fi

echo
echo "## loraforge GPU check ($(date -u +%Y-%m-%dT%H:%MZ), logs in $OUT_DIR)"
echo
echo "| step | status | seconds | headline |"
echo "|---|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
exit $FAILED
