"""Checkpoints: what a resume point holds, the commit protocol, and finding/restoring the newest one.

Layout under the run's output URI:

    checkpoints/step_00000100/zero/...           DeepSpeed ZeRO shards (model + optimizer + scheduler)
    checkpoints/step_00000100/rank_00000.json    per-rank RNG states and data-loader position
    checkpoints/step_00000100/trainable/...      gathered trainable weights (bridge or peft adapter)
    checkpoints/step_00000100/spec.json          the resolved run spec
    checkpoints/step_00000100/manifest.json      size + sha256 of every file above, step, world size
    checkpoints/latest                           name of the newest committed checkpoint

Commit order: every rank writes and uploads its files -> rank 0 verifies every object's size ->
`manifest.json` -> only then `latest`. A checkpoint without a manifest is not a checkpoint; a reader
re-hashes every file it uses against the manifest before loading it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .storage import ObjectStore, StorageError, check_key, sha256_file

PREFIX = "checkpoints"
LATEST = f"{PREFIX}/latest"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


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
    """The rank a checkpoint file belongs to (DeepSpeed's per-rank shards, our rank files), or None
    for shared files."""
    name = relative.rsplit("/", 1)[-1]
    for marker in ("zero_pp_rank_", "rank_"):
        if marker in name:
            digits = name.split(marker, 1)[1].split("_", 1)[0].split(".", 1)[0]
            if digits.isdigit():
                return int(digits)
    return None


def owned_by_rank(relative: str, rank: int) -> bool:
    """Which rank uploads a file: per-rank files their rank, shared files rank 0 (so a multi-node run
    never needs a shared filesystem)."""
    owner = file_rank(relative)
    return owner == rank or (owner is None and rank == 0)


def upload_tree(store: ObjectStore, local_dir: Path, prefix: str, rank: int) -> dict[str, dict]:
    """Upload the files this rank owns; return {relative path: {size, sha256}} for them."""
    entries = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(local_dir).as_posix()
        if not owned_by_rank(relative, rank):
            continue
        entry = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        store.put_file(path, f"{prefix}/{relative}")
        if store.size(f"{prefix}/{relative}") != entry["size"]:
            raise StorageError(f"{store.uri}/{prefix}/{relative}: size after upload differs")
        entries[relative] = entry
    return entries


def commit(store: ObjectStore, name: str, files: dict[str, dict], meta: dict) -> Committed:
    """Rank 0: check every object exists at its size, write the manifest, then move `latest`."""
    prefix = f"{PREFIX}/{name}"
    for relative, entry in files.items():
        size = store.size(f"{prefix}/{relative}")
        if size != entry["size"]:
            raise CheckpointError(f"{store.uri}/{prefix}/{relative}: expected {entry['size']} bytes, found {size}")
    manifest = {"format": FORMAT_VERSION, "name": name, **meta, "files": dict(sorted(files.items()))}
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    store.put_bytes(data, f"{prefix}/{MANIFEST}")
    store.put_bytes(name.encode(), LATEST)
    return Committed(name, manifest, hashlib.sha256(data).hexdigest())


def read_manifest(store: ObjectStore, name: str) -> Committed | None:
    try:
        data = store.get_bytes(f"{PREFIX}/{check_key(name)}/{MANIFEST}")
    except StorageError:
        return None
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise CheckpointError(f"{store.uri}/{PREFIX}/{name}/{MANIFEST}: not valid JSON ({err})") from None
    for key in manifest.get("files", {}):
        check_key(f"{PREFIX}/{name}/{key}")  # a manifest may not point outside its checkpoint
    return Committed(name, manifest, hashlib.sha256(data).hexdigest())


def list_committed(store: ObjectStore) -> list[Committed]:
    """Committed checkpoints (those with a manifest), oldest first."""
    names = sorted({key.split("/")[1] for key in store.list(PREFIX + "/") if key.count("/") >= 2})
    found = [read_manifest(store, n) for n in names if n.startswith("step_")]
    return sorted((c for c in found if c is not None), key=lambda c: c.step)


def find_latest(store: ObjectStore) -> Committed | None:
    """The newest committed checkpoint. The `latest` pointer is for people and other tools; resume
    trusts manifests only, so a pointer that lags a crash (or names a checkpoint whose manifest is
    gone) cannot send it to an incomplete checkpoint."""
    committed = list_committed(store)
    return committed[-1] if committed else None


def resolve_checkpoint(uri: str, storage_spec=None) -> tuple[ObjectStore, Committed]:
    """`RUN/checkpoints/step_N` -> that committed checkpoint; `RUN` -> its newest committed one."""
    from .storage import open_store

    run, name = split_checkpoint_uri(uri)
    store = open_store(run, storage_spec)
    committed = read_manifest(store, name) if name else find_latest(store)
    if committed is None:
        raise CheckpointError(f"{uri}: no committed checkpoint (no manifest.json)")
    return store, committed


def fetch(store: ObjectStore, committed: Committed, local_dir: Path, rank: int | None = None) -> Path:
    """Download (all, or one rank's and the shared) files of a checkpoint and verify each hash."""
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    prefix = f"{PREFIX}/{committed.name}"
    for relative, entry in committed.manifest["files"].items():
        if rank is not None and file_rank(relative) not in (rank, None):
            continue
        target = local_dir / relative
        store.get_file(f"{prefix}/{relative}", target)
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise CheckpointError(f"{store.uri}/{prefix}/{relative}: content does not match its manifest")
    return local_dir


def copy_checkpoint(src: ObjectStore, committed: Committed, dst: ObjectStore, scratch: Path) -> Committed:
    """Copy a committed checkpoint between stores: every file verified against the source manifest,
    uploaded, then the manifest, then `latest` (only if the copy is the destination's newest)."""
    local = fetch(src, committed, Path(scratch) / committed.name)
    prefix = f"{PREFIX}/{committed.name}"
    files: dict[str, dict] = {}
    for rank in range(committed.manifest["world_size"]):
        files.update(upload_tree(dst, local, prefix, rank))
    if files != committed.manifest["files"]:
        raise CheckpointError(f"{dst.uri}/{prefix}: copied files differ from the source manifest")
    data = json.dumps(committed.manifest, indent=1, sort_keys=True).encode()
    dst.put_bytes(data, f"{prefix}/{MANIFEST}")
    newest = find_latest(dst)
    if newest is None or newest.step <= committed.step:
        dst.put_bytes(committed.name.encode(), LATEST)
    shutil.rmtree(local, ignore_errors=True)
    return Committed(committed.name, committed.manifest, hashlib.sha256(data).hexdigest())


def verify(store: ObjectStore, committed: Committed, scratch: Path) -> list[str]:
    """Re-hash every file of a committed checkpoint; return the files that do not match."""
    bad = []
    prefix = f"{PREFIX}/{committed.name}"
    for relative, entry in committed.manifest["files"].items():
        target = Path(scratch) / relative
        try:
            store.get_file(f"{prefix}/{relative}", target)
        except StorageError:
            bad.append(relative)
            continue
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            bad.append(relative)
        target.unlink()
    return bad


def apply_retention(store: ObjectStore, keep_last: int) -> list[str]:
    """Delete committed checkpoints beyond the newest `keep_last`, and uncommitted leftovers older
    than the newest commit. Never touches anything newer than the newest commit."""
    committed = list_committed(store)
    if not committed:
        return []
    newest = committed[-1].step
    keep = {c.name for c in committed[-keep_last:]}
    removed = []
    names = {key.split("/")[1] for key in store.list(PREFIX + "/") if key.count("/") >= 2}
    for name in sorted(names):
        if name in keep or not name.startswith("step_") or step_of(name) >= newest:
            continue
        for key in store.list(f"{PREFIX}/{name}/"):
            if not key.endswith(MANIFEST):
                store.delete(key)
        store.delete(f"{PREFIX}/{name}/{MANIFEST}")  # last: a half-deleted checkpoint is uncommitted
        removed.append(name)
    return removed


class BackgroundCommit:
    """Uploads this rank's staged checkpoint off the training thread and, on rank 0, commits it once
    every rank's part has arrived. At most one upload is in flight: `submit` first waits for the
    previous one. Failures are retried, then reported; they never commit a partial checkpoint.

    Each rank announces its finished upload with `parts/rank_NNNNN.json` (its files' sizes and
    hashes) or `parts/rank_NNNNN.failed`; rank 0 waits for all parts, checks every object's size,
    writes `manifest.json`, moves `latest` and applies retention.
    """

    def __init__(self, store: ObjectStore, rank: int, world_size: int, keep_last: int, log,
                 num_attempts: int = 4, part_timeout_s: float = 1800.0):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.rank, self.world_size, self.keep_last, self.log = store, rank, world_size, keep_last, log
        self.num_attempts, self.part_timeout_s = num_attempts, part_timeout_s
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self.pending = None
        self.failures: list[str] = []

    def submit(self, local_dir: Path, name: str, meta: dict, blocked_s: float) -> None:
        self.wait()
        self.pending = self.pool.submit(self._run, Path(local_dir), name, meta, blocked_s)

    def wait(self) -> bool:
        """Block until the in-flight upload (if any) is done; False if it failed (already reported)."""
        if self.pending is None:
            return True
        outcome, self.pending = self.pending.result(), None
        return outcome

    def close(self) -> None:
        self.wait()
        self.pool.shutdown()

    def _run(self, local_dir: Path, name: str, meta: dict, blocked_s: float) -> bool:
        started = time.monotonic()
        prefix = f"{PREFIX}/{name}"
        try:
            files = self._upload_with_retries(local_dir, prefix)
            self.store.put_bytes(json.dumps(files).encode(), f"{prefix}/parts/rank_{self.rank:05d}.json")
            if self.rank == 0:
                committed = commit(self.store, name, self._await_parts(prefix), meta)
                removed = apply_retention(self.store, self.keep_last)
                size_mb = sum(f["size"] for f in committed.manifest["files"].values()) / 2**20
                self.log(f"checkpoint {name} committed to {self.store.uri} ({size_mb:.1f} MiB; training blocked "
                         f"{blocked_s:.2f} s, upload + commit {time.monotonic() - started:.2f} s; manifest "
                         f"{committed.manifest_sha256[:12]})" + (f"; removed {', '.join(removed)}" if removed else ""))
            return True
        except Exception as err:  # noqa: BLE001 - reported and recorded; training goes on
            if self.rank != 0:
                try:
                    self.store.put_bytes(str(err).encode(), f"{prefix}/parts/rank_{self.rank:05d}.failed")
                except StorageError:
                    pass
            self.failures.append(f"{name}: {err}")
            self.log(f"checkpoint {name} was NOT committed: {err}")
            return False
        finally:
            shutil.rmtree(local_dir, ignore_errors=True) if self.rank == 0 else _remove_owned(local_dir, self.rank)

    def _upload_with_retries(self, local_dir: Path, prefix: str) -> dict[str, dict]:
        for attempt in range(1, self.num_attempts + 1):
            try:
                return upload_tree(self.store, local_dir, prefix, self.rank)
            except StorageError as err:
                if attempt == self.num_attempts:
                    raise
                self.log(f"upload to {self.store.uri}/{prefix} failed (attempt {attempt}/{self.num_attempts}): "
                         f"{err}; retrying")
                time.sleep(min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def _await_parts(self, prefix: str) -> dict[str, dict]:
        deadline = time.monotonic() + self.part_timeout_s
        while True:
            keys = set(self.store.list(f"{prefix}/parts/"))
            failed = sorted(k for k in keys if k.endswith(".failed"))
            if failed:
                raise CheckpointError(f"other ranks failed to upload: {', '.join(failed)}")
            parts = [f"{prefix}/parts/rank_{r:05d}.json" for r in range(self.world_size)]
            if all(p in keys for p in parts):
                files: dict[str, dict] = {}
                for part in parts:
                    files.update(json.loads(self.store.get_bytes(part)))
                return files
            if time.monotonic() > deadline:
                raise CheckpointError(f"{self.store.uri}/{prefix}: not every rank uploaded within {self.part_timeout_s:.0f} s")
            time.sleep(0.2)


def _remove_owned(local_dir: Path, rank: int) -> None:
    for path in list(Path(local_dir).rglob("*")):
        if path.is_file() and owned_by_rank(path.relative_to(local_dir).as_posix(), rank):
            path.unlink(missing_ok=True)


class SaveClock:
    """When to save: every N steps and/or every M minutes since the last save."""

    def __init__(self, every_steps: int | None, every_minutes: float | None):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.last_save = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self.last_save >= 60 * self.every_minutes

    def saved(self) -> None:
        self.last_save = time.monotonic()


def publish(store: ObjectStore, local_dir: Path, prefix: str) -> dict:
    """Upload a finished artefact folder (model, adapter) and write its manifest last, so a folder
    with a manifest is always complete."""
    files = upload_tree(store, Path(local_dir), prefix, rank=0)
    manifest = {"format": FORMAT_VERSION, "files": files}
    store.put_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), f"{prefix}/{MANIFEST}")
    return manifest


def fetch_published(store: ObjectStore, prefix: str, local_dir: Path) -> Path:
    """Download a published folder into `local_dir`, verifying every file against its manifest."""
    def key_of(relative: str) -> str:
        return check_key(f"{prefix}/{relative}" if prefix else relative)

    try:
        manifest = json.loads(store.get_bytes(key_of(MANIFEST)))
    except StorageError:
        raise CheckpointError(f"{store.uri}/{prefix}: no {MANIFEST}; not a complete published folder") from None
    except ValueError as err:
        raise CheckpointError(f"{store.uri}/{prefix}/{MANIFEST}: not valid JSON ({err})") from None
    local_dir = Path(local_dir)
    if local_dir.exists():
        shutil.rmtree(local_dir)
    for relative, entry in manifest["files"].items():
        key = key_of(relative)
        target = local_dir / relative
        store.get_file(key, target)
        if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
            raise CheckpointError(f"{store.uri}/{key}: content does not match its manifest")
    return local_dir
