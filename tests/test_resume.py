"""Exact resume and crash safety of training runs (2 gloo ranks, file:// output).

N steps == N/2 steps + kill -9 + resume + N/2 steps: same loss and learning rate at every step.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from cosctl.checkpoint.layout import find_latest, verify
from cosctl.storage import LocalStore
from tests.harness import REPO, cosctl, env, kill_when, run, steps, train_command
from tests.test_resume_data import copy_data, damage_an_image_of_step, loader_state

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


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


def test_resume_refuses_a_corrupt_checkpoint(tiny_data, tmp_path):
    """A flipped byte in a committed shard stops the resume with one clear error naming the file."""
    out = tmp_path / "out"
    cmd = train_command(tiny_data, tmp_path / "work", out, 2, 1)
    run(cmd, tmp_path)
    shard = next((out / "checkpoints" / "step_00000002" / "zero").glob("*rank_1*optim_states.pt"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    longer = train_command(tiny_data, tmp_path / "work", out, 4, 1)
    result = subprocess.run(longer, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert f"{shard.name}: content does not match its manifest" in result.stderr


def test_a_zero2_run_resumes_on_two_ranks(tiny_data, tmp_path):
    """ZeRO-2 writes one shared module-state file (mp_rank_00_model_states.pt) that every rank must
    read: 2 ranks resume a zero2 checkpoint and continue exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(train_command(tiny_data, full / "work", full / "out", 4, 2, "deepspeed.template=zero2"), tmp_path)
    resumed = run(
        train_command(tiny_data, part / "work", part / "out", 4, 2, "deepspeed.template=zero2")
        + ["--resume", f"{full / 'out'}/checkpoints/step_00000002"],
        tmp_path,
    )
    assert "at step 2" in resumed.stdout
    expected, got = steps(full / "work"), steps(part / "work")
    assert [got[s]["loss"] for s in (3, 4)] == [expected[s]["loss"] for s in (3, 4)]


def test_two_ranks_skip_an_image_damaged_between_segments_alike(tiny_data, tmp_path):
    """2 ranks, an image of step 3 damaged after step 2: the resume with data.max_bad_fraction raised
    trains to step 4, and both ranks' checkpoints hold the same skip list (the rank that read the
    image told the other)."""
    data = copy_data(tiny_data, tmp_path / "data")
    out = tmp_path / "out"
    run(train_command(data, tmp_path / "work", out, 2, 1), tmp_path)
    index, _, _ = damage_an_image_of_step(data, 2)
    run(train_command(data, tmp_path / "work", out, 4, 1, "data.max_bad_fraction=0.05"), tmp_path)
    for step in (3, 4):
        assert (
            loader_state(out, step, rank=0)["bad_samples"] == loader_state(out, step, rank=1)["bad_samples"] == [index]
        )
    assert [steps(tmp_path / "work")[s]["skipped_samples"] for s in (2, 3, 4)] == [0, 1, 1]


def test_a_resume_on_edited_data_exits_1_in_one_line_and_new_data_continues(tiny_data, tmp_path):
    """2 ranks: train.json edited after 2 steps; the resume exits 1 with one line that names
    --new-data; with --new-data the run continues to step 3 from the start of a new data order."""
    data = copy_data(tiny_data, tmp_path / "data")
    out = tmp_path / "out"
    cmd = train_command(data, tmp_path / "work", out, 2, 1)
    run(cmd, tmp_path)
    records = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(records[:-1]))
    longer = train_command(data, tmp_path / "work", out, 3, 1)
    refused = cosctl(*longer[3:], tmp=tmp_path)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr[-3000:]
    assert lines[0].startswith("error: step_00000002 was trained on other data") and "--new-data" in lines[0]
    resumed = run(longer + ["--new-data"], tmp_path)
    assert "continuing its weights from the start of a new data order" in resumed.stdout
    assert (loader_state(out, 3)["epoch"], loader_state(out, 3)["step"]) == (0, 1)
