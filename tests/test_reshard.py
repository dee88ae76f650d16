"""Resuming on another number of ranks (ZeRO-3 through DeepSpeed's universal checkpoint): the global
batch and the samples of every step stay the same, and the losses continue as if nothing changed."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.harness import REPO, env, run, steps, train_command
from tests.test_safe_load import plant_in_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def one_rank(cmd: list[str]) -> list[str]:
    """The same training command on one rank."""
    index = cmd.index("--nproc")
    return cmd[:index] + ["--nproc", "1"] + cmd[index + 2 :]


@pytest.mark.parametrize(
    ("ranks", "extra"),
    [((2, 1), ()), ((1, 2), ()), ((2, 1), ("optim.lr_by_module={resampler: 5.0e-4}",))],
    ids=["2to1", "1to2", "2to1-two-lr-groups"],
)
def test_resume_on_another_world_size_continues_the_run(tiny_data, tmp_path, ranks, extra):
    """6 steps on W ranks == 3 steps on W ranks + 3 on W' ranks from the step-3 checkpoint: the same
    samples per step, and losses within 1e-4 relative; also with a module at its own lr (two
    optimizer groups, each keeping its lr)."""
    first, second = ranks
    base = train_command(tiny_data, tmp_path / "straight", tmp_path / "out", 6, 3, *extra)
    run(base if first == 2 else one_rank(base), tmp_path)
    resumed = train_command(tiny_data, tmp_path / "resumed", tmp_path / "out-resumed", 6, 3, *extra) + [
        "--resume",
        f"{tmp_path / 'out'}/checkpoints/step_00000003",
    ]
    result = run(resumed if second == 2 else one_rank(resumed), tmp_path)
    assert f"re-partitioning step_00000003 from {first} ranks to {second}" in result.stdout
    expected, got = steps(tmp_path / "straight"), steps(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6]
    worst = max(abs(got[s]["loss"] / expected[s]["loss"] - 1) for s in got)
    print(f"reshard {first} -> {second} ranks: steps 4-6 losses within {worst:.1e} relative of the straight run")
    for step in (4, 5, 6):
        assert got[step]["samples"] == expected[step]["samples"]
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4)
        assert got[step]["lr"] == pytest.approx(expected[step]["lr"], rel=1e-9)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["world_size"] == second


def test_a_resume_on_another_world_size_never_unpickles_a_planted_shard(tiny_data, tmp_path):
    """A committed 1-rank checkpoint whose optimizer shard (manifest hash correct) holds a pickle that
    would create a file: resuming it on 2 ranks, through DeepSpeed's universal conversion, stops with
    exit 1 and one line naming the shard, and the file is never created."""
    out = tmp_path / "out"
    run(one_rank(train_command(tiny_data, tmp_path / "work", out, 1, 1)), tmp_path)
    marker = tmp_path / "marker"
    shard = "zero/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant_in_checkpoint(out / "checkpoints" / "step_00000001", shard, marker)
    cmd = train_command(tiny_data, tmp_path / "work2", tmp_path / "out2", 2, 1)
    cmd += ["--resume", f"{out}/checkpoints/step_00000001"]
    result = subprocess.run(cmd, cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{shard.split('/')[-1]}: refused to load" in errors[0], result.stderr[-3000:]
    assert not marker.exists()
