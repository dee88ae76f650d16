#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine and run the whole test suite, cheapest checks first:
#   1. a virtualenv with the project, its test extra and the optional ones (lmms-eval, mlflow, wandb;
#      torch pinned to the CPU build);
#   2. lint: `ruff check`, `ruff format --check` and `lint-imports` (the package contracts; all configured in
#      pyproject.toml);
#   3. the fast tier (`-m "not slow and not s3 and not slurm"`): a minute, fails early;
#   4. the real servers the s3 and slurm tiers need: a single-host Ceph radosgw (1 mon + 1 OSD on a
#      sparse file) and a single-node SLURM with munge (installed with apt when missing, so run as
#      root), stopped again on exit;
#   5. the rest (`-m "slow or s3 or slurm"`), with both servers required: a broken server fails the
#      run instead of skipping tests.
# Extra arguments go to both pytest runs, e.g. `bash scripts/test.sh -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
state="$PWD/.ci-state"
export CEPH_S3_DIR="$state/ceph" SLURM_DIR="$state/slurm"

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,lmms,mlflow,wandb]'
# PyPI's torchvision wheels (lmms-eval's dependency) are CUDA builds that cannot load beside the CPU torch
# ("operator torchvision::nms does not exist"), and transformers imports torchvision whenever it is
# installed; nothing here needs it.
.venv/bin/pip uninstall -q -y torchvision
export COSCTL_REQUIRE_EXTRAS=1  # the extras' tests fail rather than skip (tests/extras.py)

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -m "not slow and not s3 and not slurm" "$@"

trap '.ci/ceph-s3.sh stop "$CEPH_S3_DIR" >/dev/null 2>&1 || true; .ci/slurm.sh stop >/dev/null 2>&1 || true' EXIT
.ci/ceph-s3.sh init "$CEPH_S3_DIR"
.ci/slurm.sh start
COSCTL_REQUIRE_CEPH=1 COSCTL_REQUIRE_SLURM=1 .venv/bin/python -m pytest -m "slow or s3 or slurm" "$@"
