"""cosctl.checkpoint.checkpointer and cosctl.checkpoint.committer in one process on a local store: rollback, retention,
what a committed checkpoint leaves behind, and a store or disk that fails while training goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cosctl.checkpoint.layout import (
    ABANDONED,
    MANIFEST,
    delete_checkpoint,
    find_latest,
    list_abandoned,
    list_committed,
    read_manifest,
    verify,
)
from cosctl.common.errors import StoreUnavailable
from cosctl.storage import LocalStore
from cosctl.train import run as run_module
from cosctl.train.loop import Stopped
from tests.harness import tiny_spec
from tests.test_safe_load import plant_in_checkpoint


def steps_in(run_dir) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]


def test_rollback_moves_the_newer_branch_aside_and_auto_continues_the_new_line(tiny_data, tmp_path, in_process):
    """Resuming a 4-step run from step 2 moves steps 3-4 aside (kept, listed as abandoned), commits the
    new step 3 with `latest` on it, and `--resume auto` then continues the new line, not the old one."""
    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 4), tmp_path / "first")
    store = LocalStore(out)
    in_process(tiny_spec(tiny_data, out, 3), tmp_path / "rolled", resume=f"{out}/checkpoints/step_00000002")
    assert [c.step for c in list_committed(store)] == [1, 2, 3]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003"
    abandoned = list_abandoned(store)
    assert [c.step for _, c in abandoned] == [3, 4] and all(p.startswith(ABANDONED) for p, _ in abandoned)
    resumed = in_process(tiny_spec(tiny_data, out, 5), tmp_path / "rolled")
    assert resumed["steps"] == 5 and [c.step for c in list_committed(store)][-1] == 5
    assert [c.step for _, c in list_abandoned(store)] == [3, 4]


def test_retention_keeps_the_last_of_the_current_line_only(tiny_data, tmp_path, in_process):
    """keep_last 1 after a rollback keeps only the new line's newest checkpoint; the abandoned branch
    is untouched; no empty step folders are left on disk."""
    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 4, "checkpoint.keep_last=10"), tmp_path / "first")
    in_process(
        tiny_spec(tiny_data, out, 3, "checkpoint.keep_last=1"),
        tmp_path / "second",
        resume=f"{out}/checkpoints/step_00000002",
    )
    store = LocalStore(out)
    assert [c.step for c in list_committed(store)] == [3]
    assert [c.step for _, c in list_abandoned(store)] == [3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_a_committed_checkpoint_has_no_receipts_and_runs_zero_to_fp32_as_shipped(tiny_data, tmp_path, in_process):
    """Committed checkpoints keep no parts/ receipts, and DeepSpeed's own zero_to_fp32.py inside one
    converts it without extra arguments (the folder carries DeepSpeed's `latest` tag file)."""
    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 2), tmp_path / "work")
    ckpt = out / "checkpoints" / "step_00000002"
    assert not (ckpt / "parts").exists()
    assert (ckpt / "latest").read_text().strip() == "zero"
    result = subprocess.run(
        [sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(tmp_path / "fp32")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert any((tmp_path / "fp32").iterdir())


def test_metrics_hold_each_step_once_after_a_resume(tiny_data, tmp_path, in_process):
    """A run resumed from step 2 after reaching step 3 trains step 3 again: metrics.jsonl lists 1, 2, 3
    once each."""
    out = tmp_path / "out"
    spec = tiny_spec(tiny_data, out, 3)
    in_process(spec, tmp_path / "work")
    in_process(spec, tmp_path / "work", resume=f"{out}/checkpoints/step_00000002")
    assert steps_in(tmp_path / "work") == [1, 2, 3]


class FlakyStore(LocalStore):
    """A local store whose writes fail (endpoint down) while `down` is set, or for `outage_s` seconds
    from the first checkpoint write on."""

    down = False
    failures = 0
    outage_s = 0.0
    down_until: float | None = None

    def put_file(self, local_path, key):
        self._maybe_fail(key)
        super().put_file(local_path, key)

    def put_bytes(self, data, key):
        self._maybe_fail(key)
        super().put_bytes(data, key)

    def _maybe_fail(self, key):
        if FlakyStore.outage_s and FlakyStore.down_until is None and key.startswith("checkpoints/step_"):
            FlakyStore.down_until = time.monotonic() + FlakyStore.outage_s
        if FlakyStore.down or (FlakyStore.down_until or 0) > time.monotonic():
            FlakyStore.failures += 1
            raise StoreUnavailable(f"{self.uri}/{key}: put failed: the endpoint does not answer")


@pytest.fixture
def flaky(monkeypatch):
    FlakyStore.down, FlakyStore.failures, FlakyStore.outage_s, FlakyStore.down_until = False, 0, 0.0, None
    monkeypatch.setattr(run_module, "open_store", lambda uri, settings=None: FlakyStore(uri))
    return FlakyStore


def test_training_goes_on_through_an_outage_and_commits_afterwards(tiny_data, tmp_path, in_process, flaky, monkeypatch):
    """The store goes down during the run: steps keep training, uploads retry in the background, and
    once it is back every checkpoint commits; none is lost and the run ends normally."""
    from cosctl.checkpoint import committer

    monkeypatch.setattr(committer.Committer, "__init__", _short_backoff(committer.Committer.__init__))
    out = tmp_path / "out"
    flaky.outage_s = 2.0
    summary = in_process(tiny_spec(tiny_data, out, 6, "checkpoint.keep_last=10"), tmp_path / "work")
    assert summary["steps"] == 6 and flaky.failures > 0
    store = LocalStore(out)
    committed = list_committed(store)
    assert committed[-1].step == 6 and all(verify(store, c, tmp_path / "scratch") == [] for c in committed)


def test_an_outage_past_the_limit_stops_at_a_step_boundary_for_requeue(
    tiny_data, tmp_path, in_process, flaky, monkeypatch
):
    """A store that stays down past storage.max_outage_minutes stops the run at a step boundary with
    exit code 75 (requeue) and a reason naming the store, without committing anything partial."""
    from cosctl.checkpoint import committer

    monkeypatch.setattr(committer.Committer, "__init__", _short_backoff(committer.Committer.__init__))
    out = tmp_path / "out"
    flaky.down = True
    with pytest.raises(Stopped) as stopped:
        in_process(tiny_spec(tiny_data, out, 400, "storage.max_outage_minutes=0.02"), tmp_path / "work")
    assert stopped.value.exit_code == 75 and "has been failing" in str(stopped.value)
    assert find_latest(LocalStore(out)) is None


def test_a_full_staging_disk_stops_for_requeue_naming_the_path(tiny_data, tmp_path, in_process, monkeypatch):
    """When the staging folder has no room for a checkpoint, every rank agrees before writing, and the
    run stops with exit 75 and 'no space left on <path>'."""
    import shutil

    from cosctl.checkpoint import checkpointer

    monkeypatch.setattr(checkpointer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(Stopped) as stopped:
        in_process(tiny_spec(tiny_data, tmp_path / "out", 4), tmp_path / "work")
    assert stopped.value.exit_code == 75 and f"no space left on {tmp_path / 'work'}" in str(stopped.value)


def test_retention_uncommits_before_it_deletes(tmp_path):
    """Deleting a checkpoint removes its manifest first, then its files in one batch."""
    store = LocalStore(tmp_path)
    for key in ("checkpoints/step_00000001/zero/a.pt", f"checkpoints/step_00000001/{MANIFEST}"):
        store.put_bytes(b"{}", key)
    order = []
    store.delete = lambda key, _d=store.delete: (order.append(("one", key)), _d(key))
    store.delete_many = lambda keys, _d=store.delete_many: (order.append(("batch", tuple(keys))), _d(keys))
    delete_checkpoint(store, "step_00000001")
    assert order[0] == ("one", f"checkpoints/step_00000001/{MANIFEST}") and order[1][0] == "batch"
    assert not (tmp_path / "checkpoints").exists()


def test_a_store_that_fails_is_not_an_empty_one(tmp_path):
    """read_manifest returns None only for a missing manifest; a store error propagates as itself."""

    class Down(LocalStore):
        def get_bytes(self, key, start=None, end=None):
            raise StoreUnavailable(f"{self.uri}/{key}: the endpoint does not answer")

    assert read_manifest(LocalStore(tmp_path), "step_00000001") is None
    with pytest.raises(StoreUnavailable):
        read_manifest(Down(tmp_path), "step_00000001")


def _short_backoff(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "backoff_s": 0.05, "max_backoff_s": 0.2})

    return patched


def test_a_write_that_fails_inside_deepspeeds_save_stops_for_requeue(tiny_data, tmp_path, in_process, monkeypatch):
    """torch.save failing for lack of space (it raises RuntimeError, not OSError) inside DeepSpeed's
    collective save: the rank still reaches DeepSpeed's barrier, and the run stops with exit 75 and
    'no space left on <path>' instead of a traceback or a hang."""
    import torch

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "optim_states" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos: No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(Stopped) as stopped:
        in_process(tiny_spec(tiny_data, tmp_path / "out", 4), tmp_path / "work")
    assert stopped.value.exit_code == 75 and f"no space left on {tmp_path / 'work'}" in str(stopped.value)


def test_a_rank_that_fails_unexpectedly_stops_rank_0_waiting(tmp_path):
    """Rank 1's upload fails with an error the retries do not cover: it says it gave up, rank 0 stops
    waiting for its receipt at once, and both know they can no longer checkpoint."""
    from cosctl.checkpoint.committer import Committer, Staged

    store = LocalStore(tmp_path / "store")
    ranks = [Committer(store, rank, 2, keep_last=2, backoff_s=0.01) for rank in (0, 1)]
    for rank, committer in enumerate(ranks):
        local = tmp_path / f"stage{rank}"
        (local / "zero").mkdir(parents=True)
        (local / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
        if rank == 1:
            committer.store = type(
                "Broken", (LocalStore,), {"put_file": lambda self, *a: (_ for _ in ()).throw(ValueError("unexpected"))}
            )(tmp_path / "store")
        committer.submit(Staged("step_00000001", local, {"step": 1, "world_size": 2}, "id", blocked_s=0.0))
    started = time.monotonic()
    assert ranks[1].drain(10) is False and "unexpected" in ranks[1].failure()
    while ranks[0].waiting and time.monotonic() - started < 10:  # rank 0 gives up before anyone asks
        time.sleep(0.01)
    assert ranks[0].drain(10) is False and time.monotonic() - started < 10
    assert ranks[0].drain(0) is True  # the failure was reported once; nothing is pending now
    assert find_latest(store) is None
    for committer in ranks:
        committer.close()


def test_a_failed_resume_leaves_the_newer_branch_committed(tiny_data, tmp_path, in_process):
    """Resuming from step 2 with a changed learning rate is refused, and steps 3-4 stay committed:
    nothing is rolled aside before every rank has restored the checkpoint."""
    from cosctl.common.errors import CheckpointError

    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 4), tmp_path / "work")
    with pytest.raises(CheckpointError, match="optim.lr"):
        in_process(
            tiny_spec(tiny_data, out, 4, "optim.lr=0.5"), tmp_path / "work", resume=f"{out}/checkpoints/step_00000002"
        )
    assert [c.step for c in list_committed(LocalStore(out))][-2:] == [3, 4]
    assert list_abandoned(LocalStore(out)) == []


def test_rollback_uncommits_the_whole_branch_before_moving_files(tmp_path):
    """move_aside takes every newer manifest out of the current line before it moves any file: a move
    that fails midway leaves no part of the abandoned branch committed there."""
    from cosctl.checkpoint.layout import Committed, move_aside

    class FailingMove(LocalStore):
        moves = 0

        def move(self, key, new_key):
            FailingMove.moves += 1
            if FailingMove.moves > 1:
                raise StoreUnavailable(f"{self.uri}/{key}: the endpoint does not answer")
            super().move(key, new_key)

    store = FailingMove(tmp_path)
    for step in (1, 2, 3):
        store.put_bytes(b"x", f"checkpoints/step_0000000{step}/zero/a.pt")
        store.put_bytes(json.dumps({"step": step, "files": {}}).encode(), f"checkpoints/step_0000000{step}/{MANIFEST}")
    newer = [c for c in list_committed(store) if c.step > 1]
    with pytest.raises(StoreUnavailable):
        move_aside(store, newer, "step_00000001")
    assert [c.step for c in list_committed(store)] == [1]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000001"
    assert [c.step for _, c in list_abandoned(store)] == [2, 3]
    assert isinstance(newer[0], Committed)


def test_a_resume_never_unpickles_a_planted_shard(tiny_data, tmp_path, in_process):
    """A committed checkpoint whose optimizer shard (manifest hash correct) holds a pickle that would
    create a file: the resume on the same world size is refused naming the shard; the file is never
    created."""
    from cosctl.common.errors import CheckpointError

    out = tmp_path / "out"
    in_process(tiny_spec(tiny_data, out, 1), tmp_path / "work")
    marker = tmp_path / "marker"
    plant_in_checkpoint(out / "checkpoints" / "step_00000001", "zero/zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(CheckpointError, match="optim_states.pt: refused to load"):
        in_process(tiny_spec(tiny_data, out, 2), tmp_path / "work")
    assert not marker.exists()


class SlowStore(LocalStore):
    """A local store whose uploads of step 2's files take `delay_s` each; the first one sends this
    process SIGTERM (a stop that arrives while that checkpoint is uploading)."""

    delay_s = 0.5
    signalled = False

    def put_file(self, local_path, key):
        if key.startswith("checkpoints/step_00000002/"):
            if not SlowStore.signalled:
                SlowStore.signalled = True
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(SlowStore.delay_s)
        super().put_file(local_path, key)


@pytest.mark.parametrize("grace_s", [120.0, 0.0])
def test_sigterm_during_an_upload_lets_it_commit_within_the_grace(
    tiny_data, tmp_path, in_process, monkeypatch, grace_s
):
    """SIGTERM while step 2's checkpoint uploads (slowly) and no save is due: the run waits for it, it
    commits, and the exit line names it; with storage.stop_grace_s=0 the upload is abandoned as before
    and nothing is committed."""
    SlowStore.signalled = False
    monkeypatch.setattr(run_module, "open_store", lambda uri, settings=None: SlowStore(uri))
    out = tmp_path / "out"
    spec = tiny_spec(tiny_data, out, 12, "checkpoint.every_steps=2", f"storage.stop_grace_s={grace_s}")
    with pytest.raises(Stopped) as stopped:
        in_process(spec, tmp_path / "work")
    message = str(stopped.value)
    assert stopped.value.exit_code == 143 and SlowStore.signalled
    latest = find_latest(LocalStore(out))
    if grace_s:
        assert latest is not None and latest.step == 2 and verify(LocalStore(out), latest, tmp_path / "s") == []
        assert "the upload of step_00000002 to commit" in message
        assert message.endswith(f"last committed checkpoint: file://{out}/checkpoints/step_00000002")
    else:
        assert latest is None and message.endswith("SIGTERM; last committed checkpoint: none")
