#!/usr/bin/env bash
# The GPU run on one lent GPU (H100/H200), in one call that fits 8 minutes on an H100 (BUDGET_S, 450 s of
# it for this script; the rest is the machine's start and the copies):
#   1. the GPU's name;  2. carried wheels -> /tmp/site (never over the image's torch);
#   3. versions + every carried package's requirements checked;  4. bf16 matmul peak (8192^3);
#   5. the GPU tier first: `pytest -m gpu tests/test_gpu.py` (the product's path end to end on the 1b
#      shape: pretrain in bf16 with NCCL and an auto budget, checkpoint and exact resume, evals, inflate,
#      finetune, export and a transformers-only generate), within TIER_S (270 s);
#   6. then stage-speed variants while time lasts (default VARIANTS="1b-paths"): bench/stage_speed.py
#      (each row a real `cosctl pretrain` run, figures from its metrics.jsonl), then bench/engine_step.py
#      --match (the engine alone, sized as those rows: the lower bound the product is compared with). The
#      other variants (run_variant below) are for later calls: VARIANTS="a b" picks and orders, TIER_S=0
#      skips the tier;
#   7. one summary table (bench/gpu_summary.py, also $OUT/summary.md).
# Results land in $OUT: env.txt, gpu_tier.{txt,json}, <variant>.{json,txt} (1b-paths also
# 1b-paths-engine.{json,txt}) and summary.md: the 8 files the device tool returns at most.
#
# Checking it without a GPU: `bash -n bench/gpu.sh`; `DRY_RUN=1 bash bench/gpu.sh` prints every command it
# would run and runs none; `CPU_CHECK=1 bash bench/gpu.sh` runs the same steps CPU-sized with this
# checkout's environment (PYTHON=.venv/bin/python; no wheels; the tier at its narrow shape through
# COSCTL_GPU_TIER_ON_CPU=1, the tiny shape's rows as "tiny-paths").
#
# The machine has python3 + torch (CUDA) + transformers + pytest but no deepspeed or pydantic and no
# network: the wheels listed in bench/README.md ("GPU run") must be in $WHEELS (default .whl/, carried).
# The product path also needs what `cosctl pretrain` imports (typer, yaml, PIL, tensorboard), psutil and
# pytest: checked below; without them the tier and the stage_speed variants are skipped.
#   usage, from the repo root: bash bench/gpu.sh
#   env: OUT, WHEELS, BUDGET_S, TIER_S, VARIANTS, DRY_RUN, CPU_CHECK, PYTHON
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu_out}
WHEELS=${WHEELS:-.whl}
SITE=/tmp/site
BUDGET_S=${BUDGET_S:-450}  # whole script; keeps an 8-minute call's margin for start-up and copying
TIER_S=${TIER_S:-270}      # the GPU tier's share (about 230 s expected on an H100: bench/README.md)
DRY_RUN=${DRY_RUN:-0}
CPU_CHECK=${CPU_CHECK:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }
# A command, printed; run unless DRY_RUN.
run() {
  echo "+ $*"
  if ((!DRY_RUN)); then "$@"; fi
}
PRODUCT_OK=1

if ((CPU_CHECK)); then
  echo "cpu check: $(uname -m), $(nproc) cores" | tee "$OUT/env.txt"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  export DS_ACCELERATOR=cpu COSCTL_GPU_TIER_ON_CPU=1 OMP_NUM_THREADS=1
  PEAK=0.05  # a nominal CPU figure so that the MFU columns fill; not a measurement
  echo "measured bf16 peak: $PEAK TFLOP/s (nominal, CPU check)" | tee -a "$OUT/env.txt"
  MEM_MIB=81559
else
  if ((DRY_RUN)); then
    echo "+ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader" | tee "$OUT/env.txt"
    MEM_MIB=81559
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
    MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  fi

  echo "== wheels from $WHEELS"
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  ((${#wheels[@]})) || ((DRY_RUN)) || { echo "no wheels in $WHEELS: see bench/README.md (GPU run)"; exit 1; }
  for wheel in "${wheels[@]}"; do
    case $(basename "$wheel") in
      torch-* | torchvision-* | torchaudio-* | triton-* | nvidia_*)
        echo "refusing $wheel: the image's CUDA torch stack must stay as it is"; exit 1 ;;
    esac
  done
  run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]:-$WHEELS/*.whl}"
  [[ ! -e $SITE/torch ]] || { echo "torch landed in $SITE"; exit 1; }
  export PYTHONPATH=$SITE:$REPO
  export DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  # Each row builds and frees a whole model: growable segments keep the freed memory reusable.
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

  echo "== versions and requirements"
  if ((DRY_RUN)); then
    echo "+ $PYTHON - $SITE  (versions of the carried packages; their requirements met; imports work)"
  else
    "$PYTHON" - "$SITE" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import importlib.metadata as md
import sys

import torch
from packaging.requirements import Requirement

site = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__} from {torch.__file__}")
assert not torch.__file__.startswith(site), "torch must come from the image"
problems = []
for dist in sorted(md.distributions(path=[site]), key=lambda d: d.metadata["Name"].lower()):
    print(f"carried {dist.metadata['Name']} {dist.version}")
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)  # PYTHONPATH puts carried packages before the image's
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: found {have}")
for name in ("huggingface_hub", "tokenizers", "safetensors", "regex", "typer", "accelerate", "numpy", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
if problems:
    sys.exit("unmet requirements (carry these wheels too):\n  " + "\n  ".join(problems))
import cos_model, cosctl.train.engine, deepspeed, transformers  # noqa: E401,F401  (imports must work)

print(f"imports ok: deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
EOF
  fi

  # What the product path (python -m cosctl pretrain, the bench around it, the tier's pytest) imports
  # beyond the above.
  if ((DRY_RUN)); then
    echo "+ $PYTHON -  (imports of the product path and the tier)"
  else
    "$PYTHON" - <<'EOF' 2>&1 | tee -a "$OUT/env.txt" || PRODUCT_OK=0
import importlib
import sys

missing = []
for name in ("typer", "yaml", "PIL", "torch.utils.tensorboard", "psutil", "pytest", "cosctl.cli", "cosctl.train"):
    try:
        importlib.import_module(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("product path unavailable, missing: " + "; ".join(missing))
print("product path imports ok")
EOF
  fi

  echo "== bf16 matmul peak"
  if ((DRY_RUN)); then
    echo "+ $PYTHON -  (20 bf16 8192^3 matmuls after 5 warm-ups)"
    PEAK=800
  else
    PEAK=$("$PYTHON" - <<'EOF'
import time

import torch

n, repeats = 8192, 20
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(5):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(repeats):
    a @ b
torch.cuda.synchronize()
print(f"{2 * n**3 * repeats / (time.perf_counter() - start) / 1e12:.1f}")
EOF
)
  fi
  echo "measured bf16 peak: $PEAK TFLOP/s" | tee -a "$OUT/env.txt"
fi

# The GPU tier: the product's path end to end (tests/test_gpu.py), first, within TIER_S.
TIER_LIMIT=$(min "$TIER_S" "$(left)")
if ((TIER_LIMIT < 60)); then
  echo "== skip the GPU tier: ${TIER_LIMIT}s for it" | tee "$OUT/gpu_tier.txt"
elif ((!PRODUCT_OK)); then
  echo "== skip the GPU tier: the product path's imports are missing (env.txt)" | tee "$OUT/gpu_tier.txt"
else
  echo "== GPU tier (limit ${TIER_LIMIT}s, $(left)s left)"
  rc=0
  export COSCTL_GPU_TIER_REPORT=$OUT/gpu_tier.json
  run timeout -k 15 "$TIER_LIMIT" "$PYTHON" -m pytest -m gpu tests/test_gpu.py -x -q -rA -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tier.txt" || rc=$?
  echo "== GPU tier: exit $rc after ${SECONDS}s"
fi

# One run of bench/SCRIPT under a time limit; a run that is cut off still leaves its finished rows in JSON.
bench() {
  local name=$1 limit=$2 script=$3 rc=0
  shift 3
  if ((limit < 60)); then
    echo "== skip $name: ${limit}s left"
    return 0
  fi
  if [[ $script == stage_speed.py ]] && ((!PRODUCT_OK)); then
    echo "== skip $name: the product path's imports are missing (env.txt)"
    return 0
  fi
  echo "== $name (limit ${limit}s, $(left)s left)"
  run timeout -k 15 "$limit" "$PYTHON" "bench/$script" "$@" --peak-tflops "$PEAK" --json "$OUT/$name.json" \
    2>&1 | tee "$OUT/$name.txt" || rc=$?
  echo "== $name: exit $rc after ${SECONDS}s"
  if ((rc != 0)) && [[ -s $OUT/$name.json ]]; then  # cut off: the table of the rows that finished
    "$PYTHON" "bench/$script" --report "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt" || true
  fi
}

# The 1b budget of the fixed-budget rows: 192 samples of 96 tokens where the GPU has ~140 GiB (the
# 528-token row peaks at 114 GiB), 128 where it has ~80 GiB.
BUDGET_1B=$((MEM_MIB > 100000 ? 18432 : 12288))
PAIR=(--rows 32/224,336/448 --warmup 2 --steps 4)
# The rows of the earlier rounds' engine variants, now each a `cosctl pretrain` run.
ROWS=(--tokens 32,336,528 --warmup 2 --steps 6)
# Product rows: the default rows (32/224, 336/224, 336/448, 528/448), each a `cosctl pretrain` run.
PRODUCT=(--warmup 2 --steps 6)
# "before": the engine as it was before block fetching and the block-sized prefetch bucket.
BEFORE=(--set deepspeed.zero3_fetch=module
        --set deepspeed.overrides.zero_optimization.stage3_prefetch_bucket_size=3774873)
# One run per variant, in the order of VARIANTS; a variant cut off by the budget still leaves its
# finished rows.
variant() {
  local left_after=$1 limit=$2 name=$3 script=$4
  shift 4
  bench "$name" "$(min "$limit" $(($(left) - left_after)))" "$script" "$@"
}
# Engine rows sized as the product rows of this call, once a paths variant has written some.
MATCH=()
run_variant() {
  case $1 in
    # The product rows, then the engine alone matched to them (same vocab, text, samples): the gap.
    1b-paths) variant 60 150 "$1" stage_speed.py --shape 1b "${PAIR[@]}" --tokens-per-micro-batch "$BUDGET_1B"
      if [[ -s $OUT/1b-paths.json ]]; then MATCH=(--match "$OUT/1b-paths.json"); fi
      variant 10 90 "$1-engine" engine_step.py --shape 1b "${PAIR[@]}" --tokens-per-micro-batch "$BUDGET_1B" \
        "${MATCH[@]}" ;;
    # The CPU check's stand-in for 1b-paths: the same two steps at the tiny shape.
    tiny-paths) variant 60 150 "$1" stage_speed.py --shape tiny "${PAIR[@]}"
      if [[ -s $OUT/tiny-paths.json ]]; then MATCH=(--match "$OUT/tiny-paths.json"); fi
      variant 10 90 "$1-engine" engine_step.py --shape tiny "${PAIR[@]}" "${MATCH[@]}" ;;
    # The engine with the model built on the host, as the product builds it (round 1: 3x slower steps).
    1b-build-cpu) variant 10 150 "$1" engine_step.py --shape 1b --build-on cpu "${PAIR[@]}" \
      --tokens-per-micro-batch "$BUDGET_1B" "${MATCH[@]}" ;;
    1b-product) variant 10 300 "$1" stage_speed.py --shape 1b "${PRODUCT[@]}" --tokens-per-micro-batch "$BUDGET_1B" ;;
    # Image loading in DataLoader workers instead of inside the step (the spec's default is 0 workers).
    1b-product-workers) variant 10 240 "$1" stage_speed.py --shape 1b "${PAIR[@]}" \
      --tokens-per-micro-batch "$BUDGET_1B" --set data.num_workers=8 ;;
    7b-product) variant 10 400 "$1" stage_speed.py --shape 7b "${PRODUCT[@]}" --tokens-per-micro-batch auto ;;
    1b-before) variant 60 150 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch "$BUDGET_1B" \
      "${BEFORE[@]}" ;;
    1b-block) variant 60 150 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch "$BUDGET_1B" ;;
    1b-auto-ckpt) variant 10 200 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch auto \
      --gradient-checkpointing ;;
    7b-auto) variant 30 300 "$1" stage_speed.py --shape 7b "${ROWS[@]}" --tokens-per-micro-batch auto ;;
    1b-auto) variant 10 150 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch auto ;;
    1b-zero2) variant 10 150 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch "$BUDGET_1B" \
      --set deepspeed.template=zero2 ;;
    1b-zero2-auto) variant 10 150 "$1" stage_speed.py --shape 1b "${ROWS[@]}" --tokens-per-micro-batch auto \
      --set deepspeed.template=zero2 ;;
    *) echo "unknown variant $1"; exit 1 ;;
  esac
}
if ((CPU_CHECK)); then DEFAULT_VARIANTS=tiny-paths; else DEFAULT_VARIANTS=1b-paths; fi
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}
for name in $VARIANTS; do
  run_variant "$name"
done
echo "== done in ${SECONDS}s"
run "$PYTHON" bench/gpu_summary.py "$OUT"
