#!/usr/bin/env bash
# Stage-speed benchmark on one lent GPU (H100/H200), in one call of at most ~8 minutes:
#   1. the GPU's name;  2. carried wheels -> /tmp/site (never over the image's torch);
#   3. versions + every carried package's requirements checked;  4. bf16 matmul peak (8192^3);
#   5. variants while time lasts: bench/stage_speed.py (each row a real `cosctl pretrain` run, figures
#      from its metrics.jsonl) and bench/engine_step.py (the engine alone: the lower bound the product is
#      compared with). First the 1b product rows followed by the engine matched to them, the engine built
#      on the host, the 1b default rows, with DataLoader workers, the 7b default rows; then the engine
#      variants of earlier rounds (32/336/528 tokens each) through the product: the engine as it was
#      ("before"), as it is, an auto budget with and without gradient checkpointing, 7b with an auto
#      budget, ZeRO-2 with a fixed and an auto budget. VARIANTS="a b" picks and orders.
# Results land in $OUT: env.txt and <variant>.{json,txt} (1b-paths also 1b-paths-engine.{json,txt}; the
# device tool returns at most 8 files: pick at most 3 variants per call).
#
# The machine has python3 + torch (CUDA) + transformers but no deepspeed or pydantic and no network:
# the wheels listed in bench/README.md ("GPU run") must be in $WHEELS (default .whl/, carried). The
# product path also needs what `cosctl pretrain` imports (typer, yaml, PIL, tensorboard) and psutil:
# checked below; without them the stage_speed variants are skipped.
#   usage, from the repo root: bash bench/gpu.sh        (env: OUT, WHEELS, BUDGET_S, VARIANTS)
set -euo pipefail
export PYTHONUNBUFFERED=1

cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/stage_speed_out}
WHEELS=${WHEELS:-.whl}
SITE=/tmp/site
BUDGET_S=${BUDGET_S:-450}  # whole script; keeps an 8-minute call's margin for start-up and copying
mkdir -p "$OUT"
left() { echo $((BUDGET_S - SECONDS)); }
min() { if (($1 < $2)); then echo "$1"; else echo "$2"; fi; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"

echo "== wheels from $WHEELS"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
((${#wheels[@]})) || { echo "no wheels in $WHEELS: see bench/README.md (GPU run)"; exit 1; }
for wheel in "${wheels[@]}"; do
  case $(basename "$wheel") in
    torch-* | torchvision-* | torchaudio-* | triton-* | nvidia_*)
      echo "refusing $wheel: the image's CUDA torch stack must stay as it is"; exit 1 ;;
  esac
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
[[ ! -e $SITE/torch ]] || { echo "torch landed in $SITE"; exit 1; }
export PYTHONPATH=$SITE:$REPO
export DS_ACCELERATOR=cuda TORCH_EXTENSIONS_DIR=/tmp/torch_extensions
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Each row builds and frees a whole model: growable segments keep the freed memory reusable.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

echo "== versions and requirements"
python3 - "$SITE" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
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
for name in ("huggingface_hub", "tokenizers", "safetensors", "regex", "typer", "accelerate", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
if problems:
    sys.exit("unmet requirements (carry these wheels too):\n  " + "\n  ".join(problems))
import cos_model, cosctl.train.engine, deepspeed, transformers  # noqa: E401,F401  (imports must work)

print(f"imports ok: deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
EOF
# What the product path (python -m cosctl pretrain, and the bench around it) imports beyond the above.
PRODUCT_OK=1
python3 - <<'EOF' 2>&1 | tee -a "$OUT/env.txt" || PRODUCT_OK=0
import importlib
import sys

missing = []
for name in ("typer", "yaml", "PIL", "torch.utils.tensorboard", "psutil", "cosctl.cli", "cosctl.train"):
    try:
        importlib.import_module(name)
    except ImportError as err:
        missing.append(f"{name} ({err})")
if missing:
    sys.exit("product path unavailable, missing: " + "; ".join(missing))
print("product path imports ok")
EOF

echo "== bf16 matmul peak"
PEAK=$(python3 - <<'EOF'
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
echo "measured bf16 peak: $PEAK TFLOP/s" | tee -a "$OUT/env.txt"

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
  timeout -k 15 "$limit" python3 "bench/$script" "$@" --peak-tflops "$PEAK" --json "$OUT/$name.json" \
    2>&1 | tee "$OUT/$name.txt" || rc=$?
  echo "== $name: exit $rc after ${SECONDS}s"
  if ((rc != 0)) && [[ -s $OUT/$name.json ]]; then  # cut off: the table of the rows that finished
    python3 "bench/$script" --report "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt" || true
  fi
}

# The 1b budget of the fixed-budget rows: 192 samples of 96 tokens where the GPU has ~140 GiB (the
# 528-token row peaks at 114 GiB), 128 where it has ~80 GiB.
MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
BUDGET_1B=$((MEM_MIB > 100000 ? 18432 : 12288))
PAIR=(--rows 32/224,336/448 --warmup 2 --steps 6)
# The rows of the earlier rounds' engine variants, now each a `cosctl pretrain` run.
ROWS=(--tokens 32,336,528 --warmup 2 --steps 6)
# Product rows: the default rows (32/224, 336/224, 336/448, 528/448), each a `cosctl pretrain` run.
PRODUCT=(--warmup 2 --steps 6)
# "before": the engine as it was before block fetching and the block-sized prefetch bucket.
BEFORE=(--set deepspeed.zero3_fetch=module
        --set deepspeed.overrides.zero_optimization.stage3_prefetch_bucket_size=3774873)
# One run per variant, in the order of VARIANTS (default: all, most important first); a variant cut
# off by the budget still leaves its finished rows.
variant() {
  local left_after=$1 limit=$2 name=$3 script=$4
  shift 4
  bench "$name" "$(min "$limit" $(($(left) - left_after)))" "$script" "$@"
}
# Engine rows sized as the 1b product rows of this call, once 1b-paths has written some.
MATCH=()
run_variant() {
  case $1 in
    # The product rows, then the engine alone matched to them (same vocab, text, samples): the gap.
    1b-paths) variant 100 240 "$1" stage_speed.py --shape 1b "${PAIR[@]}" --tokens-per-micro-batch "$BUDGET_1B"
      if [[ -s $OUT/1b-paths.json ]]; then MATCH=(--match "$OUT/1b-paths.json"); fi
      variant 10 120 "$1-engine" engine_step.py --shape 1b "${PAIR[@]}" --tokens-per-micro-batch "$BUDGET_1B" \
        "${MATCH[@]}" ;;
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
VARIANTS=${VARIANTS:-1b-paths 1b-build-cpu 1b-product 1b-product-workers 7b-product 1b-before 1b-block 1b-auto-ckpt
7b-auto 1b-auto 1b-zero2 1b-zero2-auto}
for name in $VARIANTS; do
  run_variant "$name"
done
echo "== done in ${SECONDS}s"
