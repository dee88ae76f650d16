"""The checkpointer of a running job (docs/design.md §6, §7): when to save, saving (stage locally, upload and commit in the
background), restoring, and what a resume point holds. Collective: every rank calls it.

A resume point is the DeepSpeed ZeRO state (trainable weights, optimizer, LR scheduler), every rank's
RNG states and data-loader position, the step, the resolved spec and the gathered trainable weights.
`--resume auto` continues from the newest committed checkpoint so that N steps == N/2 + resume + N/2.
The layout and the commit protocol are `cosctl.checkpoint`'s; this module only calls them.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (
    MANIFEST,
    PARTS,
    PREFIX,
    ZERO_TAG,
    CheckpointError,
    Committed,
    apply_retention,
    checkpoint_key,
    checkpoint_name,
    checkpoint_uri,
    commit,
    fetch,
    find_latest,
    owned_by_rank,
    resolve_checkpoint,
    split_checkpoint_uri,
    upload_tree,
)
from .dist import Dist, all_reduce
from .log import log
from .spec import spec_hash, spec_to_dict
from .storage import ObjectStore, StorageError
# Spec sections that may change across a resume; anything else changes the model or the data order.
RESUMABLE_CHANGES = ("checkpoint.", "storage.", "slurm.", "eval.", "data.num_workers", "run.output", "optim.num_steps")


def _weights_only_load(path: str, map_location=None):
    """DeepSpeed's shard loader, but refusing to unpickle anything beyond tensors, containers and the
    few DeepSpeed types its state holds (its own loader uses weights_only=False)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused to load (not a plain tensor checkpoint): {str(err)[:300]}") from None


def rng_state() -> dict:
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [v.tolist() if hasattr(v, "tolist") else v for v in np.random.get_state()],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def spec_diff(old: dict, new: dict) -> list[tuple[str, object, object]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Restored:
    """Where a resumed run continues: the step, the checkpoint's URI and this rank's loader position
    (which carries the token budget the checkpoint was trained with)."""

    step: int
    uri: str
    loader_state: dict


class Checkpointer:
    """Saves and restores full resume points of one run in its output store (collective: every rank
    calls every method, in the same order). Files are staged under `staging`, uploaded and committed
    in the background by `BackgroundCommit`; `restore` continues from the newest committed one."""

    def __init__(self, spec, store: ObjectStore, staging: Path, dist_info: Dist, write_trainable):
        self.spec, self.store, self.dist = spec, store, dist_info
        self.staging = Path(staging) / PREFIX
        self.write_trainable = write_trainable
        self.last_saved_step: int | None = None
        self.committer = BackgroundCommit(store, dist_info.rank, dist_info.world_size, spec.checkpoint.keep_last)

    def save(self, engine, loader_state: dict, step: int, wait: bool = False) -> None:
        """Write a full resume point locally (collective), then upload and commit it in the background;
        with `wait`, return only once it is committed (final save, preemption)."""
        if self.last_saved_step == step:
            if wait:
                self._wait_committed(step)
            return
        started = time.monotonic()
        self.committer.wait()  # at most one upload in flight; also frees its staging folder
        name = checkpoint_name(step)
        local = self.staging / name
        if self.dist.is_main:
            shutil.rmtree(local, ignore_errors=True)
            self._clear_uncommitted(name)
        dist.barrier()
        engine.save_checkpoint(str(local), tag=ZERO_TAG, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
        local.mkdir(parents=True, exist_ok=True)
        rank_file = {"rank": self.dist.rank, "rng": rng_state(), "loader": loader_state}
        (local / f"rank_{self.dist.rank:05d}.json").write_text(json.dumps(rank_file))
        self.write_trainable(engine, local / "trainable")
        if self.dist.is_main:
            (local / "spec.json").write_text(json.dumps(spec_to_dict(self.spec), indent=1))
        dist.barrier()
        meta = {"step": step, "world_size": self.dist.world_size, "spec_hash": spec_hash(self.spec),
                "stage": self.spec.stage, "created": time.time(), "versions": _versions()}
        self.committer.submit(local, name, meta, blocked_s=time.monotonic() - started)
        self.last_saved_step = step
        if wait:
            self._wait_committed(step)

    def _clear_uncommitted(self, name: str) -> None:
        """Remove what an interrupted earlier attempt left under this checkpoint's name (stale parts
        would otherwise be committed with the new files)."""
        keys = self.store.list(checkpoint_key(name) + "/")
        manifest = checkpoint_key(name, MANIFEST)
        if manifest in keys:  # resuming from an older checkpoint over a newer one: uncommit it first
            self.store.delete(manifest)
        for key in keys:
            self.store.delete(key)

    def _wait_committed(self, step: int) -> None:
        """Collective: return once rank 0 has committed (or every rank raises). Without it a rank
        could exit (and its launcher kill rank 0) or clean the shared staging folder mid-commit."""
        ok = self.committer.wait()
        if not all_reduce([1.0 if ok else 0.0], self.dist.device, op="min")[0]:
            reason = self.committer.failures[-1] if self.committer.failures else "another rank failed"
            raise CheckpointError(f"checkpoint {checkpoint_name(step)} could not be committed: {reason}")

    def _choose(self, resume: str, overwrite: bool) -> tuple[ObjectStore, Committed | None]:
        latest = find_latest(self.store)
        if resume == "never":
            if latest is not None and not overwrite:
                raise CheckpointError(
                    f"{self.store.uri} already has checkpoints (newest: step {latest.step}); "
                    "use --resume auto to continue or --overwrite to start over")
            if latest is not None and self.dist.is_main:
                for key in self.store.list(PREFIX + "/"):
                    self.store.delete(key)
            dist.barrier()
            return self.store, None
        if resume == "auto":
            return self.store, latest
        if split_checkpoint_uri(resume)[1] is None:
            raise CheckpointError(f"--resume {resume}: expected auto, never or RUN/checkpoints/step_NNNNNNNN")
        return resolve_checkpoint(resume, self.spec.storage.to_settings())

    def restore(self, engine, resume: str, overwrite: bool) -> Restored | None:
        """Restore the engine and this rank's RNG from the chosen checkpoint; None when starting fresh."""
        store, committed = self._choose(resume, overwrite)
        if committed is None:
            log.info(f"starting fresh (no committed checkpoint in {self.store.uri})")
            return None
        self._check_compatible(committed)
        local = self.staging / f"restore_rank{self.dist.rank}"
        fetch(store, committed, local, rank=self.dist.rank)
        self._show_diff(local / "spec.json")
        # Hashes were verified by fetch(); load the shards without executing pickled code.
        engine.checkpoint_engine.load = _weights_only_load
        engine.load_checkpoint(str(local), tag=ZERO_TAG, load_module_strict=False)
        rank_file = json.loads((local / f"rank_{self.dist.rank:05d}.json").read_text())
        set_rng_state(rank_file["rng"])
        shutil.rmtree(local, ignore_errors=True)
        self.last_saved_step = committed.step
        uri = checkpoint_uri(store.uri, committed.name)
        log.info(f"resuming from {uri} at step {committed.step} (manifest sha256 {committed.manifest_sha256})")
        return Restored(committed.step, uri, rank_file["loader"])

    def _check_compatible(self, committed: Committed) -> None:
        manifest = committed.manifest
        if manifest.get("stage") != self.spec.stage:
            raise CheckpointError(f"checkpoint {committed.name} is from stage {manifest.get('stage')!r}, not {self.spec.stage!r}")
        if manifest.get("world_size") != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {committed.name} was written by {manifest.get('world_size')} ranks; this run has "
                f"{self.dist.world_size} (ZeRO shards cannot be re-partitioned on resume)")

    def _show_diff(self, saved_spec: Path) -> None:
        diff = spec_diff(json.loads(saved_spec.read_text()), spec_to_dict(self.spec))
        if not diff:
            return
        log.info("the spec differs from the checkpoint's:")
        for key, old, new in diff:
            log.info(f"  {key}: {old!r} -> {new!r}")
        blocking = [k for k, _, _ in diff if not k.startswith(RESUMABLE_CHANGES)]
        if blocking:
            raise CheckpointError(f"cannot resume with changed {', '.join(blocking)}: they change the model, "
                                  "the optimisation or the data order; start a new run instead")

    def close(self) -> None:
        self.committer.close()
        shutil.rmtree(self.staging, ignore_errors=True)


class BackgroundCommit:
    """Uploads this rank's staged checkpoint off the training thread and, on rank 0, commits it once
    every rank's part has arrived. At most one upload is in flight: `submit` first waits for the
    previous one. Failures are retried, then reported; they never commit a partial checkpoint.

    Each rank announces its finished upload with `parts/rank_NNNNN.json` (its files' sizes and
    hashes) or `parts/rank_NNNNN.failed`; rank 0 waits for all parts, checks every object's size,
    writes `manifest.json`, moves `latest` and applies retention.
    """

    def __init__(self, store: ObjectStore, rank: int, world_size: int, keep_last: int,
                 num_attempts: int = 4, part_timeout_s: float = 1800.0):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.rank, self.world_size, self.keep_last = store, rank, world_size, keep_last
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
        prefix = checkpoint_key(name)
        try:
            files = self._upload_with_retries(local_dir, prefix)
            self.store.put_bytes(json.dumps(files).encode(), checkpoint_key(name, PARTS, f"rank_{self.rank:05d}.json"))
            if self.rank == 0:
                committed = commit(self.store, name, self._await_parts(name), meta)
                removed = apply_retention(self.store, self.keep_last)
                size_mb = sum(f["size"] for f in committed.manifest["files"].values()) / 2**20
                log.info(f"checkpoint {name} committed to {self.store.uri} ({size_mb:.1f} MiB; training blocked "
                         f"{blocked_s:.2f} s, upload + commit {time.monotonic() - started:.2f} s; manifest "
                         f"{committed.manifest_sha256[:12]})" + (f"; removed {', '.join(removed)}" if removed else ""))
            return True
        except Exception as err:  # noqa: BLE001 - reported and recorded; training goes on
            if self.rank != 0:
                try:
                    self.store.put_bytes(str(err).encode(), checkpoint_key(name, PARTS, f"rank_{self.rank:05d}.failed"))
                except StorageError:
                    pass
            self.failures.append(f"{name}: {err}")
            log.warning(f"checkpoint {name} was NOT committed: {err}")
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
                log.warning(f"upload to {self.store.uri}/{prefix} failed (attempt {attempt}/{self.num_attempts}): "
                         f"{err}; retrying")
                time.sleep(min(30.0, 2.0**attempt))
        raise AssertionError("unreachable")

    def _await_parts(self, name: str) -> dict[str, dict]:
        prefix = checkpoint_key(name)
        deadline = time.monotonic() + self.part_timeout_s
        while True:
            keys = set(self.store.list(checkpoint_key(name, PARTS) + "/"))
            failed = sorted(k for k in keys if k.endswith(".failed"))
            if failed:
                raise CheckpointError(f"other ranks failed to upload: {', '.join(failed)}")
            parts = [checkpoint_key(name, PARTS, f"rank_{r:05d}.json") for r in range(self.world_size)]
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


def _versions() -> dict:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
