#!/usr/bin/env bash
# Stage-speed benchmark on one lent GPU (H100/H200), in one call of at most ~8 minutes:
#   1. the GPU's name;  2. carried wheels -> /tmp/site (never over the image's torch);
#   3. versions + every carried package's requirements checked;  4. bf16 matmul peak (8192^3);
#   5. bench/stage_speed.py --shape 1b, then --shape 7b and a host-vs-device build check while time lasts.
# Results land in $OUT: env.txt, 1b.{json,txt}, 7b.{json,txt}, build-cpu.{json,txt}.
#
# The machine has python3 + torch (CUDA) + transformers but no deepspeed or pydantic and no network:
# the wheels listed in bench/README.md ("GPU run") must be in $WHEELS (default .whl/, carried).
#   usage, from the repo root: bash bench/gpu.sh        (env: OUT, WHEELS, BUDGET_S)
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
import cos_model, cosctl.engine, deepspeed, transformers  # noqa: E401,F401  (imports must work)

print(f"imports ok: deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
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

# One stage_speed run under a time limit; a run that is cut off still leaves its finished rows in JSON.
bench() {
  local name=$1 limit=$2 rc=0
  shift 2
  if ((limit < 60)); then
    echo "== skip $name: ${limit}s left"
    return 0
  fi
  echo "== $name (limit ${limit}s, $(left)s left)"
  timeout -k 15 "$limit" python3 bench/stage_speed.py "$@" --peak-tflops "$PEAK" --json "$OUT/$name.json" \
    2>&1 | tee "$OUT/$name.txt" || rc=$?
  echo "== $name: exit $rc after ${SECONDS}s"
  if ((rc != 0)) && [[ -s $OUT/$name.json ]]; then  # cut off: the table of the rows that finished
    python3 bench/stage_speed.py --report "$OUT/$name.json" 2>&1 | tee -a "$OUT/$name.txt" || true
  fi
}

bench 1b "$(min 200 $(($(left) - 130)))" --shape 1b
# 32 and 336 first: the ratio that matters survives a cut-off run.
bench 7b "$(min 240 $(($(left) - 20)))" --shape 7b --tokens 32,336,528,80,576
# The path `cosctl pretrain` takes (model built on the host, then moved) against the default device build.
bench build-cpu "$(min 90 $(($(left) - 10)))" --shape 1b --tokens 32 --warmup 0 --steps 1 --build-on cpu
echo "== done in ${SECONDS}s"
