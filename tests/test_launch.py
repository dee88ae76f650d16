"""Runs with several local ranks end the way a user reads them: one line and one exit code for a user
error; SIGTERM / Ctrl-C stop every rank at a step boundary, say what was committed and how to continue."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from cosctl.checkpoint.layout import find_latest
from cosctl.launch.local import continue_command
from cosctl.storage import LocalStore
from tests.harness import REPO, env, train_command

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def test_continue_command_resumes_the_same_run():
    """The continuation drops --resume/--overwrite and adds --resume auto, keeping everything else."""
    line = continue_command(
        ["pretrain", "r.yaml", "--nproc", "2", "--resume", "never", "--overwrite", "--set", "a=b c"]
    )
    assert line == "continue with: cosctl pretrain r.yaml --nproc 2 --set 'a=b c' --resume auto"


def test_a_user_error_on_two_ranks_prints_one_line_and_no_traceback(tiny_data, tmp_path):
    """A data error found by both ranks: exit 1, the message once, no launcher or rank traceback."""
    cmd = train_command(tiny_data, tmp_path / "work", tmp_path / "out", 4, 2, "data.max_text_tokens=5")
    result = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "too_long" in errors[0]
    for noise in ("Traceback", "ChildFailedError", "torch.distributed"):
        assert noise not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("signum", "code", "extra"),
    [(signal.SIGTERM, 143, ()), (signal.SIGINT, 130, ("--save-on-stop",))],
    ids=["sigterm", "ctrl-c-save-on-stop"],
)
def test_a_stop_signal_ends_every_rank_at_a_step_boundary(tiny_data, tmp_path, signum, code, extra):
    """SIGTERM or SIGINT to `cosctl pretrain --nproc 2`: exit 143 / 130 after a step boundary, the last
    committed checkpoint named (with --save-on-stop: the stopped step's), the command to continue
    printed, no traceback."""
    out = tmp_path / "out"
    cmd = train_command(tiny_data, tmp_path / "work", out, 400, 3) + list(extra)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = LocalStore(out)
    deadline = time.monotonic() + 240
    while find_latest(store) is None:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if "stopped at step" in line]
    assert len(stopped) == 1 and "last committed checkpoint: file://" in stopped[0]
    step = int(stopped[0].split("stopped at step ")[1].split(":")[0])
    latest = find_latest(store)
    assert latest.step == step if extra else latest.step <= step
    assert "continue with: cosctl pretrain" in stderr and "--resume auto" in stderr
    assert "Traceback" not in stderr
