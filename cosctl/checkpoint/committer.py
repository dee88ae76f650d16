"""Uploading and committing staged checkpoints off the training thread (docs/design.md §6).

One `Committer` per rank. `submit` queues a staged checkpoint and returns at once; a worker thread
takes them in order, one at a time:

    every rank:  upload the files it owns            (retried with backoff while the store is down)
                 write its receipt parts/<save id>/rank_NNNNN.json (sizes and hashes of those files)
                 delete its staged files
    rank 0:      wait for every rank's receipt -> check each object's size and sha256 against it
                 -> manifest.json -> latest -> retention -> delete the receipts

Training never waits on the store and never dies of it: failures are retried (`backoff_s`, doubling
up to `max_backoff_s`) for as long as the store keeps failing for less than `max_outage_s`; past that,
`failure()` says why, and the training loop stops at the next step boundary so the job is requeued.
Receipts carry a save id drawn at save time, so receipts of an interrupted earlier attempt at the same
step are never mistaken for this one's. An object whose bytes are not the ones uploaded (another
writer on the same output?) is not retried: the checkpoint is not committed and the run stops at the
next step boundary saying which object.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..common.log import log
from ..storage import ObjectStore, StorageError
from .layout import (
    PARTS,
    CheckpointError,
    ContentMismatch,
    apply_retention,
    checkpoint_key,
    commit,
    remove_owned,
    upload_tree,
)


@dataclass
class Staged:
    """A checkpoint written locally by every rank, waiting to be uploaded and committed."""

    name: str
    local_dir: Path
    meta: dict
    save_id: str
    blocked_s: float  # how long training was blocked writing it
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False  # this rank's part is in the store (rank 0: the checkpoint is committed)

    def receipt(self, rank: int, suffix: str = "json") -> str:
        return checkpoint_key(self.name, PARTS, self.save_id, f"rank_{rank:05d}.{suffix}")


class GaveUp(Exception):
    """The store kept failing past the outage limit, or the committer is closing."""


def retrying(action, what: str, max_outage_s: float, backoff_s: float = 1.0, max_backoff_s: float = 30.0):
    """`action()`, retried with backoff while the store fails, for at most `max_outage_s`; then its last
    error is raised. For one-off uploads outside the committer (the stage's published artefact)."""
    started, delay = time.monotonic(), backoff_s
    while True:
        try:
            return action()
        except (StorageError, OSError) as err:
            waited = time.monotonic() - started
            if waited >= max_outage_s:
                raise
            log.warning(f"{what} failed ({err}); retrying in {delay:.0f} s")
            time.sleep(min(delay, max_outage_s - waited))
            delay = min(max_backoff_s, delay * 2)


class Committer:
    def __init__(
        self,
        store: ObjectStore,
        rank: int,
        world_size: int,
        keep_last: int,
        *,
        max_outage_s: float = 1800.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ):
        self.store, self.rank, self.world_size, self.keep_last = store, rank, world_size, keep_last
        self.max_outage_s, self.backoff_s, self.max_backoff_s = max_outage_s, backoff_s, max_backoff_s
        self.queue: queue.Queue[Staged | None] = queue.Queue()
        self.waiting: list[Staged] = []  # submitted, not finished
        self.outage_since: float | None = None
        self.last_committed: str | None = None  # rank 0: the newest checkpoint this run committed
        self._failure: str | None = None
        self._failed_since_drain = False  # a save finished without success since `drain` last looked
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.worker = threading.Thread(target=self._work, name="ckpt-commit", daemon=True)
        self.worker.start()

    def submit(self, staged: Staged) -> None:
        with self._lock:
            self.waiting.append(staged)
        self.queue.put(staged)

    def pending(self) -> list[str]:
        """Names of the checkpoints submitted and not finished (queued or uploading), oldest first."""
        with self._lock:
            return [staged.name for staged in self.waiting]

    def failure(self) -> str | None:
        """Why this rank gave up on the store (it failed for longer than the outage limit), or None."""
        return self._failure

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted is done (at most `timeout_s`); True if every save submitted
        since the last drain succeeded on this rank within the time, including saves that had already
        finished (and failed) before this call."""
        with self._lock:
            pending = list(self.waiting)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for staged in pending:
            if not staged.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        with self._lock:
            failed, self._failed_since_drain = self._failed_since_drain, False
        return not failed

    def close(self, abandon: bool = False) -> None:
        """Stop the worker: after the queue is done, or at once (`abandon`: an upload in flight stops at
        its next file, a request in flight at its timeout)."""
        if abandon:
            self._closing.set()
        self.queue.put(None)
        self.worker.join()

    # --- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while (staged := self.queue.get()) is not None:
            try:
                if not self._closing.is_set() and self._failure is None:
                    staged.ok = self._process(staged)
            except GaveUp:
                staged.ok = False
                self._give_up(staged)
            except Exception as err:  # anything else: this rank can no longer checkpoint, and says so
                self._failure = self._failure or f"checkpoint {staged.name} failed: {type(err).__name__}: {err}"
                log.warning(f"checkpoint {staged.name} was NOT committed: {type(err).__name__}: {err}")
                staged.ok = False
                self._give_up(staged)
            finally:
                remove_owned(staged.local_dir, self.rank)
                with self._lock:
                    self.waiting.remove(staged)
                    self._failed_since_drain |= not staged.ok
                staged.done.set()
        while not self.queue.empty():  # closing: release anyone waiting on what is left
            leftover = self.queue.get_nowait()
            if leftover is not None:
                with self._lock:
                    self.waiting.remove(leftover)
                    self._failed_since_drain = True
                leftover.done.set()

    def _give_up(self, staged: Staged) -> None:
        """Leave a `.failed` receipt (best effort) so rank 0 stops waiting for this rank's part."""
        if self.rank == 0:
            return
        try:
            self.store.put_bytes(b"gave up", staged.receipt(self.rank, "failed"))
        except (StorageError, OSError):
            pass

    def _process(self, staged: Staged) -> bool:
        started = time.monotonic()
        files = self._retrying(
            lambda: upload_tree(
                self.store, staged.local_dir, checkpoint_key(staged.name), self.rank, stop=self._closing.is_set
            ),
            f"upload of {staged.name}",
        )
        self._retrying(
            lambda: self.store.put_bytes(json.dumps(files).encode(), staged.receipt(self.rank)),
            f"receipt of {staged.name}",
        )
        if self.rank != 0:
            return True
        parts = self._await_receipts(staged)
        committed = self._retrying(
            lambda: commit(self.store, staged.name, parts, staged.meta), f"commit of {staged.name}"
        )
        self.last_committed = staged.name
        try:  # the checkpoint is committed: housekeeping that fails is only worth a warning
            removed = apply_retention(self.store, self.keep_last)
            self.store.delete_many(self.store.list(checkpoint_key(staged.name, PARTS) + "/"))
        except (StorageError, CheckpointError, OSError) as err:
            removed = []
            log.warning(f"checkpoint {staged.name} committed, but retention or receipt clean-up failed: {err}")
        size_mb = sum(f["size"] for f in committed.manifest["files"].values()) / 2**20
        log.info(
            f"checkpoint {staged.name} committed to {self.store.uri} ({size_mb:.1f} MiB; training blocked "
            f"{staged.blocked_s:.2f} s, upload + commit {time.monotonic() - started:.2f} s; manifest "
            f"{committed.manifest_sha256[:12]})" + (f"; removed {', '.join(removed)}" if removed else "")
        )
        return True

    def _await_receipts(self, staged: Staged) -> dict[str, dict]:
        """Rank 0: every rank's receipt for this save, merged (waiting is not an outage)."""
        expected = [staged.receipt(rank) for rank in range(self.world_size)]
        while True:
            keys = set(
                self._retrying(
                    lambda: self.store.list(checkpoint_key(staged.name, PARTS, staged.save_id) + "/"),
                    f"receipts of {staged.name}",
                )
            )
            failed = sorted(key for key in keys if key.endswith(".failed"))
            if failed:
                raise GaveUp(f"ranks gave up on {staged.name}: {', '.join(failed)}")
            if all(key in keys for key in expected):
                files: dict[str, dict] = {}
                for key in expected:
                    files.update(json.loads(self._retrying(lambda k=key: self.store.get_bytes(k), f"receipt {key}")))
                return files
            if self._closing.wait(0.2):
                raise GaveUp()

    def _retrying(self, action, what: str):
        """`action()`, retried with backoff while the store fails; raises GaveUp past the outage limit
        (or when closing)."""
        delay = self.backoff_s
        while True:
            if self._closing.is_set():
                raise GaveUp()
            try:
                result = action()
                self.outage_since = None
                return result
            except (StorageError, CheckpointError, OSError) as err:
                if isinstance(err, InterruptedError):  # closing mid-upload
                    raise GaveUp() from err
                if isinstance(err, ContentMismatch):  # the store holds other bytes: retrying cannot help
                    raise
                now = time.monotonic()
                self.outage_since = self.outage_since or now
                down_for = now - self.outage_since
                if down_for >= self.max_outage_s:
                    self._failure = (
                        f"the store {self.store.uri} has been failing for {down_for / 60:.1f} minutes "
                        f"(storage.max_outage_minutes); last error: {err}"
                    )
                    log.warning(f"{what} given up: {self._failure}")
                    raise GaveUp() from err
                log.warning(f"{what} failed ({err}); retrying in {delay:.0f} s, training goes on")
                if self._closing.wait(min(delay, self.max_outage_s - down_for)):
                    raise GaveUp() from err
                delay = min(self.max_backoff_s, delay * 2)
