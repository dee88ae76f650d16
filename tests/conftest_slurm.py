"""Pytest plugin with the SLURM fixtures: the single-node cluster of `.ci/slurm.sh` and job helpers.

SLURM tests skip only when the SLURM binaries are absent and `COSCTL_REQUIRE_SLURM` is unset; CI sets
`COSCTL_REQUIRE_SLURM=1`, so a missing or broken cluster fails instead of silently skipping.
`--update-golden` (or `COSCTL_UPDATE_GOLDEN=1`) rewrites the golden files instead of comparing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "slurm.sh"
SLURM_BINARIES = ("sbatch", "scontrol", "slurmctld", "slurmd")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden", action="store_true", help="Rewrite tests/golden/ files from the current output."
    )


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return request.config.getoption("--update-golden") or os.environ.get("COSCTL_UPDATE_GOLDEN") == "1"


@dataclass(frozen=True)
class Slurm:
    """Read-side helpers for jobs on the test cluster."""

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout)) if result.returncode == 0 else {}

    def wait(self, job_id: str, done, timeout_s: float, poll_s: float = 0.5) -> dict[str, str]:
        """Poll the job until `done(job)` holds; fail with the job record on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job and done(job):
                return job
            time.sleep(poll_s)
        pytest.fail(f"job {job_id} not done after {timeout_s:.0f} s: {self.job(job_id)}")

    def wait_final(self, job_id: str, timeout_s: float) -> dict[str, str]:
        return self.wait(job_id, lambda job: job.get("JobState") in FINAL_STATES, timeout_s)


def _slurm_sh(command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SLURM_SCRIPT), command], capture_output=True, text=True, timeout=timeout)


def _unavailable(message: str) -> None:
    if os.environ.get("COSCTL_REQUIRE_SLURM") == "1":
        pytest.fail(f"COSCTL_REQUIRE_SLURM=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Slurm]:
    """The single-node cluster: reused when already up, else started (and then stopped) here."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    if missing:
        _unavailable(f"SLURM is not installed (missing {', '.join(missing)}); run `sudo .ci/slurm.sh start`")
    os.environ["SLURM_CONF"] = _slurm_sh("env").stdout.strip().removeprefix("export SLURM_CONF=")
    started_here = False
    if _slurm_sh("status").returncode != 0:
        result = _slurm_sh("start")
        if result.returncode != 0:
            _unavailable(f"`.ci/slurm.sh start` failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        started_here = True
    yield Slurm()
    if started_here:
        _slurm_sh("stop")
