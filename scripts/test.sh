#!/usr/bin/env bash
# Set up this checkout on a fresh Debian machine and run the whole test suite:
#   1. a virtualenv with the project and its test extra (torch pinned to the CPU build);
#   2. the real servers the s3 and slurm tiers need: a single-host Ceph radosgw (1 mon + 1 OSD on a
#      sparse file) and a single-node SLURM with munge (both installed with apt when missing, so run
#      as root), stopped again on exit;
#   3. pytest, with both tiers required (a broken server fails the run instead of skipping tests).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
state="$PWD/.ci-state"
export CEPH_S3_DIR="$state/ceph" SLURM_DIR="$state/slurm"

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'

trap '.ci/ceph-s3.sh stop "$CEPH_S3_DIR" >/dev/null 2>&1 || true; .ci/slurm.sh stop >/dev/null 2>&1 || true' EXIT
.ci/ceph-s3.sh init "$CEPH_S3_DIR"
.ci/slurm.sh start
COSCTL_REQUIRE_CEPH=1 COSCTL_REQUIRE_SLURM=1 .venv/bin/python -m pytest "$@"
