"""Checkpoints in a store (docs/design.md §6): the layout, the commit protocol, and finding, fetching,
copying, verifying and retiring committed checkpoints. Published artefacts (`model/`, `adapter/`) follow the
same rule. `cosctl.checkpoint.checkpointer.Checkpointer` uses these functions to save and restore a running job.

Layout under the run's output URI (every key is built by `checkpoint_key`):

    checkpoints/step_00000100/zero/...           DeepSpeed ZeRO shards (model + optimizer + scheduler)
    checkpoints/step_00000100/rank_00000.json    per-rank RNG states and data-loader position
    checkpoints/step_00000100/trainable/...      gathered trainable weights (bridge or peft adapter)
    checkpoints/step_00000100/spec.json          the resolved run spec
    checkpoints/step_00000100/parts/...          per-rank upload receipts (until the commit)
    checkpoints/step_00000100/manifest.json      size + sha256 of every file above, step, world size
    checkpoints/step_00000100/latest             "zero": DeepSpeed's own tag file (zero_to_fp32.py reads it)
    checkpoints/latest                           name of the newest committed checkpoint
    abandoned/<when>_from_step_N/checkpoints/... checkpoints of a branch abandoned by a rollback to step N
    model/ or adapter/ + manifest.json           the stage's published artefact

Commit order: every rank writes and uploads its files -> rank 0 checks every object's size and sha256
against the rank's receipt (what the store reports, else a read) ->
`manifest.json` -> only then `latest`. A checkpoint without a manifest is not a checkpoint; a reader
re-hashes every file it uses against the manifest before loading it. Only `ObjectNotFound` means that
something is absent; any other storage error is raised as itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import CheckpointError, NotPublished
from ..storage import ObjectNotFound, ObjectStore, StorageError, StoreSettings, check_key, join_uri, sha256_file

PREFIX = "checkpoints"
LATEST = f"{PREFIX}/latest"
MANIFEST = "manifest.json"
ZERO_TAG = "zero"  # the folder DeepSpeed's shards go in (its "tag")
PARTS = "parts"
FORMAT_VERSION = 1

__all__ = ["CheckpointError", "Committed", "NotPublished", "checkpoint_key", "checkpoint_name", "checkpoint_uri"]


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at optimizer step `step` (`step_00000100`)."""
    return f"step_{step:08d}"


def checkpoint_key(name: str, *parts: str) -> str:
    """The store key of a checkpoint folder (`checkpoints/step_N`) or of a path inside it."""
    return "/".join([PREFIX, check_key(name), *parts])


def checkpoint_uri(run_uri: str, name: str) -> str:
    """The URI of a checkpoint folder under a run's output URI."""
    return join_uri(run_uri, PREFIX, name)


def step_of(name: str) -> int:
    return int(name.removeprefix("step_"))


@dataclass(frozen=True)
class Committed:
    name: str
    manifest: dict
    manifest_sha256: str

    @property
    def step(self) -> int:
        return self.manifest["step"]


def split_checkpoint_uri(uri: str) -> tuple[str, str | None]:
    """`RUN/checkpoints/step_N` -> (RUN, "step_N"); a run URI -> (RUN, None)."""
    marker = f"/{PREFIX}/"
    if marker not in uri:
        return uri, None
    run, _, name = uri.rstrip("/").rpartition(marker)
    if not name.startswith("step_") or "/" in name:
        raise CheckpointError(f"{uri}: expected RUN/{PREFIX}/step_NNNNNNNN")
    return run, name


def file_rank(relative: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for shared files. Per-rank files are DeepSpeed's
    ZeRO partitions (`zero_pp_rank_N_...`) and our `rank_NNNNN.json`; DeepSpeed's
    `mp_rank_00_model_states.pt` (ZeRO-2's module state, whose number is the tensor-parallel rank) is
    shared, as every other file is."""
    name = relative.rsplit("/", 1)[-1]
    for marker in ("zero_pp_rank_", "rank_"):
        if name.startswith(marker):
            digits = name[len(marker) :].split("_", 1)[0].split(".", 1)[0]
            if digits.isdigit():
                return int(digits)
    return None


def owned_by_rank(relative: str, rank: int) -> bool:
    """Which rank uploads a file: per-rank files their rank, shared files rank 0 (so a multi-node run
    never needs a shared filesystem)."""
    owner = file_rank(relative)
    return owner == rank or (owner is None and rank == 0)


def owned_files(local_dir: Path, rank: int) -> list[Path]:
    """The files under `local_dir` that `rank` uploads, sorted. The walk tolerates folders that other
    ranks empty and remove meanwhile (a staging folder on a shared filesystem)."""
    found = []
    for folder, _, names in os.walk(local_dir):  # os.walk skips what vanishes under it
        for name in names:
            path = Path(folder) / name
            if owned_by_rank(path.relative_to(local_dir).as_posix(), rank):
                found.append(path)
    return sorted(found)


def remove_owned(local_dir: Path, rank: int) -> None:
    """Delete the staged files `rank` owns, then every folder left empty (no rank deletes another's)."""
    for path in owned_files(local_dir, rank):
        path.unlink(missing_ok=True)
    for folder, _, _ in sorted(os.walk(local_dir), key=lambda entry: -len(entry[0])):
        try:
            os.rmdir(folder)
        except OSError:  # not empty yet: another rank's files
            pass


def upload_tree(store: ObjectStore, local_dir: Path, prefix: str, rank: int, stop=None) -> dict[str, dict]:
    """Upload the files this rank owns; return {relative path: {size, sha256}} for them. `stop()`, when
    given, is asked between files (a closing committer gives up without finishing a large tree)."""
    entries = {}
    for path in owned_files(local_dir, rank):
        if stop is not None and stop():
            raise InterruptedError(f"upload of {local_dir} stopped")
        relative = path.relative_to(local_dir).as_posix()
        entry = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        store.put_file(path, f"{prefix}/{relative}")
        if store.size(f"{prefix}/{relative}") != entry["size"]:
            raise StorageError(f"{store.uri}/{prefix}/{relative}: size after upload differs")
        entries[relative] = entry
    return entries


class ContentMismatch(CheckpointError):
    """A stored object is not what its rank uploaded (size or sha256): retrying cannot fix it, and the
    checkpoint is never committed."""


def stored_sha256(store: ObjectStore, key: str, chunk_bytes: int = 8 << 20) -> str:
    """The sha256 of the object at `key`: as the store reports it without a download (a local store
    hashes the file where it lies; S3 the sha256 recorded with the object at upload), else hashed
    from ranged reads when the store cannot say (an object another client rewrote)."""
    reported = store.sha256(key)
    if reported is not None:
        return reported
    digest, offset = hashlib.sha256(), 0
    while chunk := store.get_bytes(key, offset, offset + chunk_bytes):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def commit(store: ObjectStore, name: str, files: dict[str, dict], meta: dict) -> Committed:
    """Rank 0: check every object is the one its rank uploaded (size, then sha256 against the
    receipt), write the manifest, then move `latest`. A missing object is a CheckpointError (the
    committer retries it); a different one is a ContentMismatch."""
    for relative, entry in files.items():
        key = checkpoint_key(name, relative)
        size = store.size(key)
        if size is None:
            raise CheckpointError(f"{store.uri}/{key}: missing, expected {entry['size']} bytes")
        if size != entry["size"]:
            raise ContentMismatch(f"{store.uri}/{key}: expected {entry['size']} bytes, found {size}; not committed")
        if stored_sha256(store, key) != entry["sha256"]:
            raise ContentMismatch(
                f"{store.uri}/{key}: its sha256 is not the one uploaded (changed in the store since); not committed"
            )
    manifest = {"format": FORMAT_VERSION, "name": name, **meta, "files": dict(sorted(files.items()))}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    store.put_bytes(data, checkpoint_key(name, MANIFEST))
    store.put_bytes(name.encode(), LATEST)
    return Committed(name, manifest, hashlib.sha256(data).hexdigest())


def read_manifest(store: ObjectStore, name: str) -> Committed | None:
    """The committed checkpoint `name`, or None when it has no manifest (uncommitted or absent). Any
    other storage error (auth, endpoint, timeout) is raised: a store that fails is not an empty one."""
    try:
        data = store.get_bytes(checkpoint_key(name, MANIFEST))
    except ObjectNotFound:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise CheckpointError(f"{store.uri}/{checkpoint_key(name, MANIFEST)}: not valid JSON ({err})") from None
    for key in manifest.get("files", {}):
        check_key(checkpoint_key(name, key))  # a manifest may not point outside its checkpoint
    return Committed(name, manifest, hashlib.sha256(data).hexdigest())


def checkpoint_names(store: ObjectStore) -> list[str]:
    """Names of every checkpoint folder in the store, committed or not, sorted."""
    return sorted(
        {
            key.split("/")[1]
            for key in store.list(PREFIX + "/")
            if key.count("/") >= 2 and key.split("/")[1].startswith("step_")
        }
    )


def list_committed(store: ObjectStore) -> list[Committed]:
    """Committed checkpoints (those with a manifest), oldest first."""
    found = [read_manifest(store, name) for name in checkpoint_names(store)]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def find_latest(store: ObjectStore) -> Committed | None:
    """The newest committed checkpoint. The `latest` pointer is for people and other tools; resume
    trusts manifests only, so a pointer that lags a crash (or names a checkpoint whose manifest is
    gone) cannot send it to an incomplete checkpoint."""
    committed = list_committed(store)
    return committed[-1] if committed else None


def resolve_checkpoint(uri: str, settings: StoreSettings | None = None) -> tuple[ObjectStore, Committed]:
    """`RUN/checkpoints/step_N` -> that committed checkpoint; `RUN` -> its newest committed one."""
    from ..storage import open_store

    run, name = split_checkpoint_uri(uri)
    store = open_store(run, settings)
    committed = read_manifest(store, name) if name else find_latest(store)
    if committed is None:
        raise CheckpointError(f"{uri}: no committed checkpoint (no manifest.json)")
    return store, committed


def fetch(store: ObjectStore, committed: Committed, local_dir: Path, rank: int | None = None) -> Path:
    """Download (all, or one rank's and the shared) files of a checkpoint and verify each hash."""
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    for relative, entry in committed.manifest["files"].items():
        if rank is not None and file_rank(relative) not in (rank, None):
            continue
        target = local_dir / relative
        key = checkpoint_key(committed.name, relative)
        try:
            store.get_file(key, target)
        except ObjectNotFound:
            raise CheckpointError(f"{store.uri}/{key}: listed in the manifest but missing") from None
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise CheckpointError(f"{store.uri}/{key}: content does not match its manifest")
    return local_dir


def copy_checkpoint(src: ObjectStore, committed: Committed, dst: ObjectStore, scratch: Path) -> Committed:
    """Copy a committed checkpoint between stores: every file verified against the source manifest,
    uploaded, then the manifest, then `latest` (only if the copy is the destination's newest)."""
    local = fetch(src, committed, Path(scratch) / committed.name)
    prefix = checkpoint_key(committed.name)
    files: dict[str, dict] = {}
    for rank in range(committed.manifest["world_size"]):
        files.update(upload_tree(dst, local, prefix, rank))
    if files != committed.manifest["files"]:
        raise CheckpointError(f"{dst.uri}/{prefix}: copied files differ from the source manifest")
    data = json.dumps(committed.manifest, indent=1, sort_keys=True).encode()
    dst.put_bytes(data, checkpoint_key(committed.name, MANIFEST))
    newest = find_latest(dst)
    if newest is None or newest.step <= committed.step:
        dst.put_bytes(committed.name.encode(), LATEST)
    shutil.rmtree(local, ignore_errors=True)
    return Committed(committed.name, committed.manifest, hashlib.sha256(data).hexdigest())


def verify(store: ObjectStore, committed: Committed, scratch: Path) -> list[str]:
    """Re-hash every file of a committed checkpoint; return the files that do not match."""
    bad = []
    for relative, entry in committed.manifest["files"].items():
        target = Path(scratch) / relative
        try:
            store.get_file(checkpoint_key(committed.name, relative), target)
        except ObjectNotFound:
            bad.append(relative)
            continue
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            bad.append(relative)
        target.unlink()
    return bad


def delete_checkpoint(store: ObjectStore, name: str) -> None:
    """Uncommit a checkpoint (its manifest goes first, so a kill midway leaves no manifest whose files
    are gone), then delete its files in batches."""
    store.delete(checkpoint_key(name, MANIFEST))
    store.delete_many(store.list(checkpoint_key(name) + "/"))


def apply_retention(store: ObjectStore, keep_last: int) -> list[str]:
    """Delete committed checkpoints of the current line beyond the newest `keep_last`, and uncommitted
    leftovers older than the newest commit. Never touches anything newer than the newest commit, nor
    checkpoints moved aside by a rollback (they are no longer under `checkpoints/`)."""
    committed = list_committed(store)
    if not committed:
        return []
    newest = committed[-1].step
    keep = {c.name for c in committed[-keep_last:]}
    removed = []
    for name in checkpoint_names(store):
        if name in keep or step_of(name) >= newest:
            continue
        delete_checkpoint(store, name)
        removed.append(name)
    return removed


ABANDONED = "abandoned"


def move_aside(store: ObjectStore, newer: list[Committed], resumed: str | None) -> str:
    """Roll the store back: move the committed checkpoints of an abandoned branch (`newer`) under
    `abandoned/<when>/checkpoints/`. Every manifest goes first (copied aside, then all deleted in one
    batch), so a kill midway never leaves part of the branch committed in the current line; then
    `latest` names the checkpoint resumed from (when it is in this store, else the newest one left),
    then the files follow. Returns the prefix they went to."""
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{ABANDONED}/{when}_from_{resumed or 'another_run'}"
    manifests = [checkpoint_key(c.name, MANIFEST) for c in newer]
    for key in manifests:
        store.put_bytes(store.get_bytes(key), f"{aside}/{key}")
    store.delete_many(manifests)
    remaining = list_committed(store)
    if resumed is not None or remaining:
        store.put_bytes((resumed or remaining[-1].name).encode(), LATEST)
    else:
        store.delete(LATEST)
    for checkpoint in newer:
        for key in store.list(checkpoint_key(checkpoint.name) + "/"):
            store.move(key, f"{aside}/{key}")
    return aside


def list_abandoned(store: ObjectStore) -> list[tuple[str, Committed]]:
    """(prefix, checkpoint) for every committed checkpoint moved aside by a rollback, oldest first."""
    prefixes = sorted({key.split("/")[1] for key in store.list(ABANDONED + "/") if key.count("/") >= 2})
    found = []
    for prefix in prefixes:
        sub = _Prefixed(store, f"{ABANDONED}/{prefix}")
        found += [(f"{ABANDONED}/{prefix}", committed) for committed in list_committed(sub)]
    return found


class _Prefixed:
    """A read-only view of a store under a key prefix (for listing an abandoned branch)."""

    def __init__(self, store: ObjectStore, prefix: str):
        self.store, self.prefix, self.uri = store, prefix, f"{store.uri}/{prefix}"

    def list(self, prefix: str = "") -> list[str]:
        return [key[len(self.prefix) + 1 :] for key in self.store.list(f"{self.prefix}/{prefix}")]

    def get_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        return self.store.get_bytes(f"{self.prefix}/{key}", start, end)


def publish(store: ObjectStore, local_dir: Path, prefix: str) -> dict:
    """Upload a finished artefact folder (model, adapter) and write its manifest last, so a folder
    with a manifest is always complete."""
    files = upload_tree(store, Path(local_dir), prefix, rank=0)
    manifest = {"format": FORMAT_VERSION, "files": files}
    store.put_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), f"{prefix}/{MANIFEST}")
    return manifest


def _published_key(prefix: str, relative: str) -> str:
    return check_key(f"{prefix}/{relative}" if prefix else relative)


def read_published(store: ObjectStore, prefix: str) -> tuple[bytes, dict]:
    """The manifest of the folder published at `prefix`, as stored and parsed; `NotPublished` if none."""
    try:
        data = store.get_bytes(_published_key(prefix, MANIFEST))
        return data, json.loads(data)
    except ObjectNotFound:
        raise NotPublished(f"{store.uri}/{prefix}: no {MANIFEST}; not a complete published folder") from None
    except ValueError as err:
        raise CheckpointError(f"{store.uri}/{prefix}/{MANIFEST}: not valid JSON ({err})") from None


def fetch_published(store: ObjectStore, prefix: str, local_dir: Path) -> Path:
    """Download a published folder into `local_dir`, verifying every file against its manifest; the
    manifest itself is kept beside them (`MANIFEST`), as the record of what was fetched."""
    data, manifest = read_published(store, prefix)
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    for relative, entry in manifest["files"].items():
        key = _published_key(prefix, relative)
        target = local_dir / relative
        store.get_file(key, target)
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise CheckpointError(f"{store.uri}/{key}: content does not match its manifest")
    (local_dir / MANIFEST).write_bytes(data)
    return local_dir


def verify_published(store: ObjectStore, prefix: str, scratch: Path) -> tuple[dict, list[str]]:
    """Re-hash every file of the folder published at `prefix`; return its manifest and the files that
    are missing or do not match it (size or sha256)."""
    _, manifest = read_published(store, prefix)
    bad = []
    for relative, entry in manifest["files"].items():
        target = Path(scratch) / relative
        try:
            store.get_file(_published_key(prefix, relative), target)
        except ObjectNotFound:
            bad.append(f"{relative} (missing)")
            continue
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            bad.append(relative)
        target.unlink()
    return manifest, bad
