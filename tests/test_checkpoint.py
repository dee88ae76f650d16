"""Checkpoint commit protocol on the file:// store: manifests, `latest`, verification, retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosctl.checkpoint.layout import (
    CheckpointError,
    ContentMismatch,
    apply_retention,
    commit,
    fetch,
    find_latest,
    list_committed,
    owned_by_rank,
    read_manifest,
    upload_tree,
    verify,
)
from cosctl.cli.app import app
from cosctl.storage import LocalStore, StorageError, check_key


def write_checkpoint(store: LocalStore, tmp: Path, step: int, committed: bool = True) -> None:
    """Stage two ranks' files for `step`, upload them, and (optionally) commit."""
    local = tmp / f"stage_{step}"
    (local / "zero").mkdir(parents=True)
    for rank in (0, 1):
        (local / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes([rank, step]) * 100)
        (local / f"rank_{rank:05d}.json").write_text(json.dumps({"rank": rank, "step": step}))
    (local / "spec.json").write_text("{}")
    name = f"step_{step:08d}"
    files = {}
    for rank in (0, 1):
        files.update(upload_tree(store, local, f"checkpoints/{name}", rank))
    if committed:
        commit(store, name, files, {"step": step, "world_size": 2})


def test_each_rank_uploads_only_its_own_files():
    """Per-rank shards and rank files go with their rank; shared files with rank 0."""
    assert owned_by_rank("zero/zero_pp_rank_3_mp_rank_00_model_states.pt", 3)
    assert not owned_by_rank("zero/zero_pp_rank_3_mp_rank_00_model_states.pt", 0)
    assert owned_by_rank("rank_00001.json", 1) and not owned_by_rank("rank_00001.json", 0)
    assert owned_by_rank("spec.json", 0) and not owned_by_rank("spec.json", 1)


def test_commit_writes_manifest_then_latest(tmp_path):
    """A committed checkpoint has a manifest with every file's size and hash, and `latest` names it."""
    store = LocalStore(tmp_path / "out")
    write_checkpoint(store, tmp_path, 5)
    latest = find_latest(store)
    assert latest.name == "step_00000005" and latest.step == 5
    assert (tmp_path / "out/checkpoints/latest").read_text() == "step_00000005"
    files = latest.manifest["files"]
    assert len(files) == 5 and all(len(f["sha256"]) == 64 and f["size"] > 0 for f in files.values())


def test_commit_refuses_an_object_changed_in_the_store_after_its_upload(tmp_path):
    """A shard rewritten in the store between its upload and the commit (same size, other bytes) is not
    committed: commit raises naming it, and neither the manifest nor `latest` is written."""
    store = LocalStore(tmp_path / "out")
    local = tmp_path / "stage"
    (local / "zero").mkdir(parents=True)
    shard = local / "zero" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(bytes(range(200)))
    (local / "spec.json").write_text("{}")
    files = {**upload_tree(store, local, "checkpoints/step_00000001", 0)}
    files.update(upload_tree(store, local, "checkpoints/step_00000001", 1))
    stored = tmp_path / "out" / "checkpoints" / "step_00000001" / "zero" / shard.name
    stored.write_bytes(bytes(reversed(range(200))))
    with pytest.raises(ContentMismatch, match=f"{shard.name}: its sha256 is not the one uploaded"):
        commit(store, "step_00000001", files, {"step": 1, "world_size": 2})
    assert read_manifest(store, "step_00000001") is None and not (tmp_path / "out/checkpoints/latest").exists()


def test_uncommitted_checkpoint_is_never_latest(tmp_path):
    """Files of a newer save without a manifest (a crash mid-save) are ignored by resume."""
    store = LocalStore(tmp_path / "out")
    write_checkpoint(store, tmp_path, 5)
    write_checkpoint(store, tmp_path, 10, committed=False)
    assert find_latest(store).step == 5
    assert [c.step for c in list_committed(store)] == [5]


def test_corrupt_file_is_caught_by_fetch_and_verify(tmp_path):
    """A flipped byte in a shard fails verification, naming the file; fetch refuses to use it."""
    store = LocalStore(tmp_path / "out")
    write_checkpoint(store, tmp_path, 5)
    shard = tmp_path / "out/checkpoints/step_00000005/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    committed = find_latest(store)
    assert verify(store, committed, tmp_path / "scratch") == ["zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    with pytest.raises(CheckpointError, match="zero_pp_rank_1"):
        fetch(store, committed, tmp_path / "restore", rank=1)
    result = CliRunner().invoke(app, ["ckpt", "verify", str(tmp_path / "out")])
    assert result.exit_code == 1 and "zero_pp_rank_1" in result.output


def test_fetch_downloads_one_ranks_files_and_verifies(tmp_path):
    """Rank 1 fetches its own shard and rank file plus the shared files, not rank 0's."""
    store = LocalStore(tmp_path / "out")
    write_checkpoint(store, tmp_path, 5)
    local = fetch(store, find_latest(store), tmp_path / "restore", rank=1)
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == ["rank_00001.json", "spec.json", "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_manifest_keys_cannot_escape_the_checkpoint(tmp_path):
    """A manifest naming ../ or absolute paths is rejected before anything is read."""
    store = LocalStore(tmp_path / "out")
    write_checkpoint(store, tmp_path, 5)
    path = tmp_path / "out/checkpoints/step_00000005/manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    path.write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="unsafe object key"):
        read_manifest(store, "step_00000005")
    for key in ("/abs", "a/../b", "a//b", "..", "a\\b", ""):
        with pytest.raises(StorageError):
            check_key(key)


def test_retention_keeps_the_newest_committed(tmp_path):
    """keep_last=2 deletes older committed checkpoints, never an uncommitted newer one."""
    store = LocalStore(tmp_path / "out")
    for step in (1, 2, 3):
        write_checkpoint(store, tmp_path, step)
    write_checkpoint(store, tmp_path, 4, committed=False)
    assert apply_retention(store, keep_last=2) == ["step_00000001"]
    assert [c.step for c in list_committed(store)] == [2, 3]
    assert store.list("checkpoints/step_00000004/")  # in-progress save untouched
    assert not store.list("checkpoints/step_00000001/")


def test_local_store_writes_atomically_and_lists_real_objects(tmp_path):
    """put_bytes lands via a temp file + rename; listing ignores temp files; ranges read slices."""
    store = LocalStore(tmp_path)
    store.put_bytes(b"0123456789", "a/b.bin")
    (tmp_path / "a" / ".b.bin.tmp-1").write_bytes(b"partial")
    assert store.list() == ["a/b.bin"]
    assert store.get_bytes("a/b.bin", 2, 5) == b"234" and store.size("a/b.bin") == 10
    store.delete("a/b.bin")
    assert store.size("a/b.bin") is None
    with pytest.raises(StorageError, match="no such object"):
        store.get_bytes("a/b.bin")


def test_pull_and_push_copy_a_verified_checkpoint(tmp_path):
    """`ckpt push` / `ckpt pull` copy the newest checkpoint with its manifest and move `latest`."""
    store = LocalStore(tmp_path / "run")
    write_checkpoint(store, tmp_path, 3)
    write_checkpoint(store, tmp_path, 7)
    runner = CliRunner()
    pushed = runner.invoke(app, ["ckpt", "push", str(tmp_path / "run"), "--to", str(tmp_path / "bucket")])
    assert pushed.exit_code == 0, pushed.output
    bucket = LocalStore(tmp_path / "bucket")
    assert [c.step for c in list_committed(bucket)] == [7]
    assert verify(bucket, find_latest(bucket), tmp_path / "scratch") == []
    pulled = runner.invoke(
        app, ["ckpt", "pull", f"{tmp_path / 'run'}/checkpoints/step_00000003", "--to", str(tmp_path / "copy")]
    )
    assert pulled.exit_code == 0, pulled.output
    copy = LocalStore(tmp_path / "copy")
    assert find_latest(copy).step == 3 and (tmp_path / "copy/checkpoints/latest").read_text() == "step_00000003"
