"""Exact resume and crash safety of training runs (2 gloo ranks, file:// output).

N steps == N/2 steps + kill -9 + resume + N/2 steps: same loss and learning rate at every step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cosctl.checkpoint import find_latest, verify
from cosctl.storage import LocalStore

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

REPO = Path(__file__).resolve().parents[1]


def train_command(data: Path, run_dir: Path, output: Path, num_steps: int, every: int) -> list[str]:
    overrides = [f"data.root={data}", f"model.tokenizer={data / 'tokenizer'}", f"optim.num_steps={num_steps}",
                 f"checkpoint.every_steps={every}", "checkpoint.keep_last=10", "eval.every_steps=null",
                 "batch.tokens_per_micro_batch=1024"]
    return [sys.executable, "-m", "cosctl", "pretrain", "recipes/tiny/pretrain.yaml", "--nproc", "2",
            "--run-dir", str(run_dir), "--output", str(output), *[a for o in overrides for a in ("--set", o)]]


def env(tmp: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp / "ext"),
            "PYTHONWARNINGS": "ignore::FutureWarning"}


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=env(tmp), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def steps(run_dir: Path) -> dict[int, dict]:
    """Last record per step in metrics.jsonl (a resumed run appends)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions,
    so killing its process group would leave them running)."""
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def kill_when(cmd: list[str], tmp: Path, ready) -> None:
    """Start `cmd` and SIGKILL it with all its ranks once `ready()` holds."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()


def test_killed_and_resumed_run_equals_uninterrupted_run(tiny_data, tmp_path):
    """8 steps straight == 4 steps, kill -9, resume from the committed step-4 checkpoint, 4 more steps:
    identical loss and learning rate at steps 5..8."""
    full = tmp_path / "full"
    run(train_command(tiny_data, full / "work", full / "out", 8, 4), tmp_path)
    part = tmp_path / "part"
    cmd = train_command(tiny_data, part / "work", part / "out", 8, 4)
    latest = part / "out" / "checkpoints" / "latest"
    kill_when(cmd, tmp_path, lambda: latest.exists() and latest.read_text() == "step_00000004")
    resumed = run(cmd, tmp_path)
    assert "resuming from" in resumed.stdout and "at step 4" in resumed.stdout
    expected, got = steps(full / "work"), steps(part / "work")
    for step in range(5, 9):
        assert got[step]["loss"] == expected[step]["loss"], (step, got[step]["loss"], expected[step]["loss"])
        assert got[step]["lr"] == expected[step]["lr"]


@pytest.mark.parametrize("kill_after_s", [2.0, 6.0, 9.0])
def test_kill_at_any_point_leaves_latest_complete(tiny_data, tmp_path, kill_after_s):
    """kill -9 at various points (inside saves included): the newest committed checkpoint verifies
    and the run resumes from it to the end."""
    out = tmp_path / "out"
    cmd = train_command(tiny_data, tmp_path / "work", out, 12, 1)  # a save after every step
    start = time.monotonic()
    kill_when(cmd, tmp_path, lambda: time.monotonic() - start > kill_after_s)
    store = LocalStore(out)
    latest = find_latest(store)
    if latest is not None:
        assert verify(store, latest, tmp_path / "scratch") == []
    result = run(cmd, tmp_path)
    final = find_latest(store)
    assert final.step == 12 and verify(store, final, tmp_path / "scratch") == []
    if latest is not None:
        assert f"at step {latest.step}" in result.stdout
