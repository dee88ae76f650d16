"""The checkpointer of a running job (docs/design.md §6, §7): when to save, saving (stage locally;
`cosctl.checkpoint.committer` uploads and commits in the background), restoring, and what a resume point holds.
Collective: every rank calls every method, in the same order.

A resume point is the DeepSpeed ZeRO state (trainable weights, optimizer, LR scheduler), every rank's
RNG states and data-loader position, the step, the resolved spec and the gathered trainable weights.
`--resume auto` continues from the newest committed checkpoint so that N steps == N/2 + resume + N/2.

    restore: rank 0 resolves the checkpoint (auto / URI / never) and moves a newer, abandoned branch
             aside -> every rank verifies the same manifest (by its sha256) and its own files ->
             same world size: DeepSpeed's shards; another world size: the universal form (`reshard`)
    save:    every rank checks its staging disk -> writes its files -> all agree it worked -> queued
             for upload (one upload in flight; newer saves wait in the queue, training goes on)
    stop:    `stop_reason()` when the store has failed past the outage limit or staging ran out of disk;
             `finish_uploads(grace)` lets what is uploading commit before a stop without a save

The layout and the commit protocol are `cosctl.checkpoint.layout`'s; this module only calls them.
"""

from __future__ import annotations

import json
import random
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..common.dist import Dist, agreed, all_reduce, any_rank, barrier, broadcast, gather, on_main
from ..common.errors import SpecError
from ..common.log import log
from ..spec.specs import parse_spec, spec_hash, spec_to_dict
from ..storage import ObjectStore, open_store
from . import reshard
from .committer import Committer, Staged
from .layout import (
    MANIFEST,
    PREFIX,
    ZERO_TAG,
    CheckpointError,
    Committed,
    checkpoint_name,
    checkpoint_uri,
    fetch,
    list_committed,
    move_aside,
    read_manifest,
    remove_owned,
    resolve_checkpoint,
    split_checkpoint_uri,
)
from .safe_load import load_weights_only, weights_only_loads
from .staging import RecordingWriter, filesystem_group, free_bytes, partition_bytes, write_problem

# Spec sections that may change across a resume; anything else changes the model or the data order.
RESUMABLE_CHANGES = (
    "checkpoint.",
    "storage.",
    "slurm.",
    "eval.",
    "data.num_workers",
    "data.prepared",
    "data.cache_dir",
    "data.image_cache_mb",
    "data.max_bad_fraction",  # images damaged after a run started are skipped within it (docs/design.md §5)
    "run.output",
    "optim.num_steps",
    "tracking.",
)
# With --new-data the data order starts again: the data and how it is cut into micro-batches may change.
NEW_DATA_CHANGES = (
    "data.",
    "batch.tokens_per_micro_batch",
    "batch.max_tokens_per_micro_batch",
    "batch.memory_fraction",
    "batch.packing",
)


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
    """(key, old, new) for every dotted key whose value differs. A checkpoint written before a field
    existed ran with that field's default, so the old spec is read through today's spec model first
    (filling those defaults); one that no longer parses is compared as it was written."""
    try:
        old = spec_to_dict(parse_spec(old, "the checkpoint's spec"))
    except SpecError:
        pass
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class Restored:
    """Where a resumed run continues: the step, the checkpoint's URI and this rank's loader position
    (which carries the token budget the checkpoint was trained with), or None when the run continues
    on other data from the start of a new data order (`--new-data`)."""

    step: int
    uri: str
    loader_state: dict | None
    tracking: dict = field(default_factory=dict)  # the trackers' run ids ({} before they were kept)


class Checkpointer:
    """Saves and restores full resume points of one run in its output store."""

    def __init__(self, spec, store: ObjectStore, staging: Path, dist_info: Dist, write_trainable):
        self.spec, self.store, self.dist = spec, store, dist_info
        self.staging = Path(staging) / PREFIX
        self.write_trainable = write_trainable
        self.last_saved_step: int | None = None
        self.tracking_ids = dict  # rank 0: the trackers' run ids, kept in each manifest (`tracking`)
        self.resumed_from: str | None = None  # the checkpoint of the output store this run continues
        self.staged_bytes = 0  # what this rank's last save wrote: the next one needs about as much disk
        self._staging_failure: str | None = None
        if dist_info.is_main:  # an earlier attempt's leftovers (killed runs leave staged files)
            shutil.rmtree(self.staging, ignore_errors=True)
        barrier()
        self.committer = Committer(
            store,
            dist_info.rank,
            dist_info.world_size,
            spec.checkpoint.keep_last,
            max_outage_s=60 * spec.storage.max_outage_minutes,
        )

    # --- saving ----------------------------------------------------------------------------------

    def save(self, engine, loader_state: dict, step: int, wait: bool = False, timeout_s: float | None = None) -> bool:
        """Write a full resume point locally (collective) and queue it for upload and commit: uploads
        go one at a time, a newer save waits in the queue while the store is slow or down. With
        `wait`, return once everything queued is committed, or after `timeout_s` (final save,
        preemption). Returns whether it worked; if not, `stop_reason()` says why."""
        if self.last_saved_step != step:
            if not self._stage_and_queue(engine, loader_state, step):
                return False
        return self._wait_committed(step, timeout_s) if wait else True

    def _stage_and_queue(self, engine, loader_state: dict, step: int) -> bool:
        started = time.monotonic()
        name = checkpoint_name(step)
        local = self.staging / name
        problem = self._stage(engine, loader_state, step, local)
        problems = [p for p in gather(problem) if p]
        if problems:
            remove_owned(local, self.dist.rank)
            self._staging_failure = problems[0]
            log.warning(f"checkpoint {name} not saved: {problems[0]}")
            return False
        meta = {
            "step": step,
            "world_size": self.dist.world_size,
            "num_nodes": _num_nodes(self.dist),
            "spec_hash": spec_hash(self.spec),
            "stage": self.spec.stage,
            "created": time.time(),
            "versions": _versions(),
            "tracking": self.tracking_ids(),
        }
        save_id = broadcast(secrets.token_hex(8))
        self.committer.submit(Staged(name, local, meta, save_id, blocked_s=time.monotonic() - started))
        self.last_saved_step = step
        return True

    def _stage(self, engine, loader_state: dict, step: int, local: Path) -> str | None:
        """This rank's files of the checkpoint (collective); the reason it could not, or None."""
        short = self._short_of_disk(engine)
        if short:
            return short
        rank_file = {"rank": self.dist.rank, "rng": rng_state(), "loader": loader_state}
        problem = None
        try:
            if self.dist.is_main:
                shutil.rmtree(local, ignore_errors=True)
            barrier()
            local.mkdir(parents=True, exist_ok=True)
            (local / f"rank_{self.dist.rank:05d}.json").write_text(json.dumps(rank_file))
            if self.dist.is_main:
                (local / "spec.json").write_text(json.dumps(spec_to_dict(self.spec), indent=1))
        except Exception as err:  # written before the collective writes: a failure here strands no rank
            problem = write_problem(err, self.staging, local)
        # DeepSpeed's save ends in a barrier: a rank whose write fails must still reach it, so its
        # writer records the failure instead of raising (and every rank learns of it right after).
        writer = RecordingWriter(engine.checkpoint_engine)
        try:
            engine.save_checkpoint(
                str(local), tag=ZERO_TAG, client_state={"step": step}, save_latest=True, exclude_frozen_parameters=True
            )
        finally:
            writer.restore()
        problem = problem or (writer.error and write_problem(writer.error, self.staging, local))
        try:
            self.write_trainable(engine, local / "trainable")  # collective gather; rank 0 writes
        except Exception as err:
            problem = problem or write_problem(err, self.staging, local)
        if problem is None:
            self.staged_bytes = sum(path.stat().st_size for path in local.rglob("*") if path.is_file())
        return problem

    def _short_of_disk(self, engine) -> str | None:
        """Whether the staging disk lacks room for this save, as agreed by all ranks before anything is
        written: the ranks sharing a filesystem (one node's local disk, or a network filesystem every
        node mounts) need room for all of their files together."""
        need = max(self.staged_bytes, partition_bytes(engine)) * 1.2
        mine = (filesystem_group(self.staging), need, free_bytes(self.staging))
        needs: dict[str, float] = {}
        free: dict[str, int] = {}
        for group, group_need, group_free in gather(mine):
            needs[group] = needs.get(group, 0.0) + group_need
            free[group] = min(free.get(group, group_free), group_free)
        short = [group for group in needs if free[group] < needs[group]]
        if not short:
            return None
        return (
            f"no space left on {self.staging} for a checkpoint (about {needs[short[0]] / 2**30:.2f} GiB for the "
            f"ranks sharing that disk, {free[short[0]] / 2**30:.2f} GiB free)"
        )

    def _wait_committed(self, step: int, timeout_s: float | None = None) -> bool:
        """Collective: whether rank 0 committed everything queued (within `timeout_s`). Without it a rank
        could exit (and its launcher kill rank 0) mid-commit."""
        ok = self.committer.drain(timeout_s)
        if all_reduce([1.0 if ok else 0.0], self.dist.device, op="min")[0]:
            return True
        if not self.stop_reason():
            self._staging_failure = f"checkpoint {checkpoint_name(step)} was not committed" + (
                f" within {timeout_s:.0f} s" if timeout_s is not None else ""
            )
        return False

    def finish_uploads(self, timeout_s: float) -> str:
        """Collective: wait up to `timeout_s` for the checkpoints queued or uploading to commit (a stop
        with no save due lets an upload that is nearly done finish). Returns what happened, for the
        stop's message; empty when nothing was pending on any rank."""
        pending = self.committer.pending()
        if not any_rank([bool(pending)], self.dist.device)[0]:
            return ""
        started = time.monotonic()
        ok = self.committer.drain(timeout_s)
        committed = all_reduce([1.0 if ok else 0.0], self.dist.device, op="min")[0] > 0
        names = ", ".join(pending) or "its checkpoint"
        if committed:
            return f"waited {time.monotonic() - started:.1f} s for the upload of {names} to commit"
        return f"the upload of {names} did not commit within storage.stop_grace_s={timeout_s:g} s and was abandoned"

    def last_committed(self) -> str:
        """Rank 0: the newest committed checkpoint of this run's line, as a URI (or "none")."""
        name = self.committer.last_committed or self.resumed_from
        return checkpoint_uri(self.store.uri, name) if name else "none"

    def stop_reason(self) -> str | None:
        """Why this rank can no longer checkpoint (store down past the limit, staging disk full)."""
        return self._staging_failure or self.committer.failure()

    def close(self, abandon: bool = False) -> None:
        """Stop uploading (after the queue, or at once) and remove this run's staging (collective)."""
        self.committer.close(abandon=abandon)
        barrier()
        remove_owned(self.staging, self.dist.rank)
        barrier()
        if self.dist.is_main:
            shutil.rmtree(self.staging, ignore_errors=True)

    # --- restoring -------------------------------------------------------------------------------

    def restore(
        self, engine, resume: str, overwrite: bool, data_pin: dict | None = None, new_data: bool = False
    ) -> Restored | None:
        """Restore the engine and this rank's RNG from the chosen checkpoint; None when starting fresh.
        Rank 0 chooses; every rank checks the manifest it reads is the one rank 0 chose; a failure on
        any rank stops all of them with its message. Only then is a newer branch rolled aside.
        `data_pin` is the training data's (`data_pin()` of its records): a checkpoint whose loader
        position pinned other data is refused, unless `new_data` continues its weights on these data
        from a new data order (checked before any weight is loaded)."""
        chosen = on_main(lambda: self._choose(resume, overwrite))
        if chosen is None:
            log.info(f"starting fresh (no committed checkpoint in {self.store.uri})")
            return None
        run_uri, name, sha256 = chosen
        store = self.store if run_uri == self.store.uri else open_store(run_uri, self.spec.storage.to_settings())
        committed = agreed(lambda: self._read_chosen(store, name, sha256))
        self._check_compatible(committed)
        resharded = committed.manifest["world_size"] != self.dist.world_size
        local = self._fetch(store, committed, resharded)
        agreed(lambda: self._show_diff(local / "spec.json", new_data))
        position = agreed(lambda: self._position(local, committed, resharded, data_pin, new_data))
        # Hashes were verified by fetch(); no file is unpickled beyond tensors (DeepSpeed's loads included).
        engine.checkpoint_engine.load = load_weights_only
        with weights_only_loads():
            agreed(lambda: self._load(engine, local, committed, resharded))
        barrier()
        if not resharded or self.dist.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
        self.last_saved_step = committed.step
        self.resumed_from = committed.name if store is self.store else None
        on_main(lambda: self._roll_back(committed, store is self.store))
        uri = checkpoint_uri(store.uri, committed.name)
        log.info(f"resuming from {uri} at step {committed.step} (manifest sha256 {committed.manifest_sha256})")
        return Restored(committed.step, uri, position, committed.manifest.get("tracking") or {})

    def _load(self, engine, local: Path, committed: Committed, resharded: bool) -> None:
        """Load the engine's state and this rank's RNG."""
        if resharded:
            log.info(
                f"re-partitioning {committed.name} from {committed.manifest['world_size']} ranks to "
                f"{self.dist.world_size} (universal checkpoint)"
            )
            reshard.load_universal(engine, local)
            torch.manual_seed(hash((self.spec.run.seed, committed.step, self.dist.rank)) & 0x7FFFFFFF)
            return
        engine.load_checkpoint(str(local), tag=ZERO_TAG, load_module_strict=False)
        set_rng_state(json.loads((local / f"rank_{self.dist.rank:05d}.json").read_text())["rng"])

    def _choose(self, resume: str, overwrite: bool) -> tuple[str, str, str] | None:
        """Rank 0: (run URI, checkpoint name, manifest sha256) to resume from, or None."""
        committed_here = list_committed(self.store)
        if resume == "never":
            if committed_here and not overwrite:
                raise CheckpointError(
                    f"{self.store.uri} already has checkpoints (newest: step {committed_here[-1].step}); "
                    "use --resume auto to continue or --overwrite to start over"
                )
            if committed_here:
                keys = self.store.list(PREFIX + "/")
                self.store.delete_many([k for k in keys if k.endswith(MANIFEST)])  # uncommit first
                self.store.delete_many(keys)
            return None
        if resume == "auto":
            store, chosen = self.store, (committed_here[-1] if committed_here else None)
        elif split_checkpoint_uri(resume)[1] is None:
            raise CheckpointError(f"--resume {resume}: expected auto, never or RUN/checkpoints/step_NNNNNNNN")
        else:
            store, chosen = resolve_checkpoint(resume, self.spec.storage.to_settings())
        return None if chosen is None else (store.uri, chosen.name, chosen.manifest_sha256)

    def _roll_back(self, resumed: Committed, in_output: bool) -> None:
        """Rank 0, after every rank restored `resumed`: move the output store's committed checkpoints
        newer than it aside (a new line starts from it; the old branch is kept, listed as abandoned)."""
        newer = [c for c in list_committed(self.store) if c.step > resumed.step]
        if newer:
            aside = move_aside(self.store, newer, resumed.name if in_output else None)
            log.info(
                f"rolled back to step {resumed.step}: moved {', '.join(c.name for c in newer)} aside to "
                f"{self.store.uri}/{aside} (that branch is kept, no longer resumed or retained)"
            )

    def _read_chosen(self, store: ObjectStore, name: str, sha256: str) -> Committed:
        committed = read_manifest(store, name)
        if committed is None or committed.manifest_sha256 != sha256:
            raise CheckpointError(
                f"{checkpoint_uri(store.uri, name)}: the manifest this rank reads is not the one "
                "rank 0 chose (changed or removed meanwhile)"
            )
        return committed

    def _fetch(self, store: ObjectStore, committed: Committed, resharded: bool) -> Path:
        """This rank's files (same world size), or, on the node's first rank, every file converted to
        the universal form (another world size); verified against the manifest on the way."""
        if not resharded:
            local = self.staging / f"restore_rank{self.dist.rank}"
            agreed(lambda: fetch(store, committed, local, rank=self.dist.rank))
            return local
        local = self.staging / f"restore_node{self.dist.node}"

        def fetch_and_convert() -> None:
            if self.dist.local_rank == 0:
                fetch(store, committed, local)
                reshard.convert_to_universal(local / ZERO_TAG, local)

        agreed(fetch_and_convert)
        return local

    def _check_compatible(self, committed: Committed) -> None:
        manifest = committed.manifest
        if manifest.get("stage") != self.spec.stage:
            raise CheckpointError(
                f"checkpoint {committed.name} is from stage {manifest.get('stage')!r}, not {self.spec.stage!r}"
            )

    def _show_diff(self, saved_spec: Path, new_data: bool) -> None:
        diff = spec_diff(json.loads(saved_spec.read_text()), spec_to_dict(self.spec))
        if not diff:
            return
        log.info("the spec differs from the checkpoint's:")
        for key, old, new in diff:
            log.info(f"  {key}: {old!r} -> {new!r}")
        allowed = RESUMABLE_CHANGES + (NEW_DATA_CHANGES if new_data else ())
        blocking = [k for k, _, _ in diff if not k.startswith(allowed)]
        if blocking:
            data_only = all(k.startswith(NEW_DATA_CHANGES) for k in blocking)
            raise CheckpointError(
                f"cannot resume with changed {', '.join(blocking)}: they change the model, the optimisation "
                "or the data order; " + (NEW_DATA_WAY if data_only else "start a new run instead")
            )

    def _position(
        self, local: Path, committed: Committed, resharded: bool, data_pin: dict | None, new_data: bool
    ) -> dict | None:
        """This rank's loader position in the checkpoint, if it continues on these data; None when it
        goes on with other data from a new data order (`new_data`); refused when the data changed."""
        rank_file = local / ("rank_00000.json" if resharded else f"rank_{self.dist.rank:05d}.json")
        position = json.loads(rank_file.read_text())["loader"]
        saved = position.get("data")
        if data_pin is None:
            return position
        if saved is None:
            log.info(f"{committed.name} predates data pins in checkpoints: its training data are not checked")
            return position
        if saved == data_pin:
            return position
        change = (
            f"{committed.name} was trained on other data ({saved['records']} records, data key "
            f"{saved['key'][:12]}; now {data_pin['records']} records, {data_pin['key'][:12]})"
        )
        if not new_data:
            raise CheckpointError(f"{change}: its data order would repeat or skip samples; {NEW_DATA_WAY}")
        log.info(f"{change}: continuing its weights from the start of a new data order (--new-data)")
        return None


NEW_DATA_WAY = "to continue these weights on the new data from a new data order on purpose, add --new-data"


def _num_nodes(dist_info: Dist) -> int:
    return max(1, dist_info.world_size // max(1, dist_info.local_world_size))


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
