"""Saving and restoring full resume points of a training run (collective; every rank calls them).

A resume point is the DeepSpeed ZeRO state (trainable weights, optimizer, LR scheduler), every rank's
RNG states and data-loader position, the step, the resolved spec and the gathered trainable weights.
`--resume auto` continues from the newest committed checkpoint so that N steps == N/2 + resume + N/2.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import (
    BackgroundCommit, CheckpointError, Committed, checkpoint_name, fetch, find_latest, resolve_checkpoint,
    split_checkpoint_uri,
)
from .engine import Dist
from .spec import spec_hash, spec_to_dict
from .storage import open_store

ZERO_TAG = "zero"
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


class Resumer:
    def __init__(self, spec, output: str, staging: Path, dist_info: Dist, write_trainable):
        self.spec, self.output, self.dist = spec, output, dist_info
        self.store = open_store(output, spec.storage)
        self.staging = Path(staging) / "checkpoints"
        self.write_trainable = write_trainable
        self.last_saved_step: int | None = None
        log = (lambda message: print(f"[{spec.stage}] {message}", flush=True)) if dist_info.is_main else (lambda m: None)
        self.committer = BackgroundCommit(self.store, dist_info.rank, dist_info.world_size,
                                          spec.checkpoint.keep_last, log)

    def _rank_file(self, loader) -> dict:
        return {"rank": self.dist.rank, "rng": rng_state(), "loader": loader.state_dict()}

    def save(self, engine, loader, step: int, wait: bool = False) -> None:
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
        (local / f"rank_{self.dist.rank:05d}.json").write_text(json.dumps(self._rank_file(loader)))
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
        prefix = f"checkpoints/{name}/"
        keys = self.store.list(prefix)
        manifest = prefix + "manifest.json"
        if manifest in keys:  # resuming from an older checkpoint over a newer one: uncommit it first
            self.store.delete(manifest)
        for key in keys:
            self.store.delete(key)

    def _wait_committed(self, step: int) -> None:
        """Collective: return once rank 0 has committed (or every rank raises). Without it a rank
        could exit (and its launcher kill rank 0) or clean the shared staging folder mid-commit."""
        ok = torch.tensor([1.0 if self.committer.wait() else 0.0], device=self.dist.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1.0:
            reason = self.committer.failures[-1] if self.committer.failures else "another rank failed"
            raise CheckpointError(f"checkpoint {checkpoint_name(step)} could not be committed: {reason}")

    def _choose(self, resume: str, overwrite: bool) -> tuple[object, Committed | None]:
        latest = find_latest(self.store)
        if resume == "never":
            if latest is not None and not overwrite:
                raise CheckpointError(
                    f"{self.store.uri} already has checkpoints (newest: step {latest.step}); "
                    "use --resume auto to continue or --overwrite to start over")
            if latest is not None and self.dist.is_main:
                for key in self.store.list("checkpoints/"):
                    self.store.delete(key)
            dist.barrier()
            return self.store, None
        if resume == "auto":
            return self.store, latest
        if split_checkpoint_uri(resume)[1] is None:
            raise CheckpointError(f"--resume {resume}: expected auto, never or RUN/checkpoints/step_NNNNNNNN")
        return resolve_checkpoint(resume, self.spec.storage)

    def restore(self, engine, loader, resume: str, overwrite: bool, say) -> int:
        """Restore the chosen checkpoint; return the step to continue from (0 when starting fresh)."""
        store, committed = self._choose(resume, overwrite)
        if committed is None:
            say(f"[{self.spec.stage}] starting fresh (no committed checkpoint in {self.store.uri})")
            return 0
        self._check_compatible(committed)
        local = self.staging / f"restore_rank{self.dist.rank}"
        fetch(store, committed, local, rank=self.dist.rank)
        self._show_diff(local / "spec.json", say)
        # Hashes were verified by fetch(); load the shards without executing pickled code.
        engine.checkpoint_engine.load = _weights_only_load
        engine.load_checkpoint(str(local), tag=ZERO_TAG, load_module_strict=False)
        rank_file = json.loads((local / f"rank_{self.dist.rank:05d}.json").read_text())
        set_rng_state(rank_file["rng"])
        loader.load_state_dict(rank_file["loader"])
        shutil.rmtree(local, ignore_errors=True)
        self.last_saved_step = committed.step
        say(f"[{self.spec.stage}] resuming from {store.uri}/checkpoints/{committed.name} at step {committed.step} "
            f"(manifest sha256 {committed.manifest_sha256})")
        return committed.step

    def _check_compatible(self, committed: Committed) -> None:
        manifest = committed.manifest
        if manifest.get("stage") != self.spec.stage:
            raise CheckpointError(f"checkpoint {committed.name} is from stage {manifest.get('stage')!r}, not {self.spec.stage!r}")
        if manifest.get("world_size") != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {committed.name} was written by {manifest.get('world_size')} ranks; this run has "
                f"{self.dist.world_size} (ZeRO shards cannot be re-partitioned on resume)")

    def _show_diff(self, saved_spec: Path, say) -> None:
        diff = spec_diff(json.loads(saved_spec.read_text()), spec_to_dict(self.spec))
        if not diff:
            return
        say(f"[{self.spec.stage}] the spec differs from the checkpoint's:")
        for key, old, new in diff:
            say(f"  {key}: {old!r} -> {new!r}")
        blocking = [k for k, _, _ in diff if not k.startswith(RESUMABLE_CHANGES)]
        if blocking:
            raise CheckpointError(f"cannot resume with changed {', '.join(blocking)}: they change the model, "
                                  "the optimisation or the data order; start a new run instead")

    def close(self) -> None:
        self.committer.close()
        shutil.rmtree(self.staging, ignore_errors=True)


def _versions() -> dict:
    import deepspeed
    import transformers

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
