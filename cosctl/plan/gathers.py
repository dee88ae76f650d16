"""What DeepSpeed's ZeRO-3 all-gathers in a training step, parameter by parameter: its parameter
coordinator (`deepspeed/runtime/zero/partitioned_param_coordinator.py`, DeepSpeed 0.19.8) replayed on the
model's module trace, so that the live/reuse thresholds and the model's sizes decide, as in the real
engine, which parameters are released after their forward use and gathered again for the backward.

What the coordinator does, and what is replayed here (docs/design.md §8):

    trace        every module's pre-forward and pre-backward hook, in the order they fire, recorded in the
                 first micro-batch (nothing is prefetched or kept then) and fixed from the second on
    fetch        a module's parameters (a ZeRO-3 leaf's whole subtree, else its own) are all-gathered when
                 it runs, unless already gathered; then the next parameters of the trace are prefetched
                 while they fit stage3_prefetch_bucket_size and stage3_max_live_parameters (live: what
                 was gathered in this micro-batch and not released). The prefetch scan steps over
                 parameters already gathered and notes their later use, so they are not released before it
    release      after a module's forward (or backward), its non-persistent parameters are released unless
                 used again within stage3_max_reuse_distance elements of the trace ahead (counted over
                 each later module's own parameters, or its whole subtree when the released module is a
                 leaf: a parent in the trace, the root's backward hook among them, then keeps everything)
                 or noted by a prefetch scan. The decision is cached per (module, trace position) the
                 first time it is made and reused for the rest of the run
    step         the optimizer step releases everything and gathers the persistent parameters (at most
                 stage3_param_persistence_threshold elements each) once; they are never released in a step

So with the templates' 1e9 thresholds a small model stays gathered from its forward to its backward, and
a 7B LLM (202M parameters per block) keeps only its last blocks: the others are gathered once in the
forward and again in the backward of every micro-batch. The trace is that of
`cos_model.CosForConditionalGeneration` (optionally inside peft's LoRA wrappers) as the training loop
calls it: `cosctl.plan.trace` says which modules run, in which order, and which of them take part in the
backward.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .trace import CallNode, call_tree, micro_batch_events


@dataclass(frozen=True)
class Zero3Settings:
    """The ZeRO-3 thresholds that decide gathers (elements)."""

    prefetch_bucket: int
    max_live: int
    max_reuse: int
    persistence_threshold: int

    @classmethod
    def from_config(cls, zero: dict) -> Zero3Settings:
        """From a resolved `zero_optimization` block (DeepSpeed's defaults where a key is absent)."""
        return cls(
            prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 50_000_000)),
            max_live=int(zero.get("stage3_max_live_parameters", 1_000_000_000)),
            max_reuse=int(zero.get("stage3_max_reuse_distance", 1_000_000_000)),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
        )


# ---------------------------------------------------------------------------------------------------
# The coordinator, replayed


@dataclass
class GatherCounts:
    """Elements all-gathered per optimizer step, by pass, and per parameter."""

    forward: int = 0
    backward: int = 0
    persistent: int = 0
    per_param: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> int:
        return self.forward + self.backward + self.persistent


NOT_AVAILABLE, INFLIGHT, AVAILABLE = 0, 1, 2


class Coordinator:
    """DeepSpeed 0.19.8's `PartitionedParameterCoordinator`, reduced to what decides gathers."""

    def __init__(self, events, numels: list[int], settings: Zero3Settings):
        self.events, self.numels, self.settings = events, numels, settings
        self.persist = [n <= settings.persistence_threshold for n in numels]
        self.status = [AVAILABLE if p else NOT_AVAILABLE for p in self.persist]
        self.active: list[set[int]] = [set() for _ in numels]
        self.inflight: set[int] = set()
        self.trace = [node for kind, node, _ in events if kind == "fetch"]
        self.param_order = [(p, step) for step, node in enumerate(self.trace) for p in node.fetched]
        self.release_cache: dict[tuple[int, int], frozenset[int]] = {}
        self.complete = self.recorded = False
        self.counts = GatherCounts()
        self.counting = False

    # The step and the micro-batch

    def step(self, micro_batches: int) -> None:
        """One optimizer step: its micro-batches, then everything released and the persistent
        parameters gathered again."""
        for _ in range(micro_batches):
            self.micro_batch()
        for p in range(len(self.numels)):
            self.active[p].clear()
            self._release(p)
        if self.counting:
            self.counts.persistent += sum(n for n, p in zip(self.numels, self.persist, strict=True) if p)
        self.inflight.clear()
        self.status = [AVAILABLE if p else NOT_AVAILABLE for p in self.persist]

    def micro_batch(self) -> None:
        self._reset()
        backward_active: dict[int, CallNode] = {}
        for kind, node, forward in self.events:
            if kind == "fetch":
                if not forward:
                    backward_active[id(node)] = node
                self._fetch(node, forward)
            else:
                if not forward:
                    backward_active.pop(id(node), None)
                self._release_module(node)
        for node in backward_active.values():  # post-backward hooks that never fired
            for p in node.fetched:
                self.active[p].discard(id(node))
                if not self.persist[p]:
                    self._release(p)
        self.recorded = True

    def _reset(self) -> None:
        for p in list(self.inflight):  # waited for, then released like any other
            self.inflight.discard(p)
            self.status[p] = AVAILABLE
            self._release(p)
        self.complete = self.recorded
        self.queue = deque(self.param_order)
        self.recent: dict[int, int] = defaultdict(lambda: -(10**10))
        self.step_id = 0
        self.live = 0

    # Gathering

    def _gather(self, params: Iterable[int], forward: bool) -> None:
        for p in params:
            if self.status[p] != NOT_AVAILABLE:
                continue
            self.status[p] = INFLIGHT
            self.inflight.add(p)
            self.live += self.numels[p]
            if self.counting:
                self.counts.per_param[p] += 1
                if forward:
                    self.counts.forward += self.numels[p]
                else:
                    self.counts.backward += self.numels[p]

    def _fetch(self, node: CallNode, forward: bool) -> None:
        params = node.fetched
        self._gather(params, forward)
        for p in params:
            self.active[p].add(id(node))
            if p in self.inflight:
                self.inflight.discard(p)
                self.status[p] = AVAILABLE
        if self.complete:
            self._prefetch(params, forward)
        self.step_id += 1

    def _prefetch(self, params: tuple[int, ...], forward: bool) -> None:
        # This module's own entries leave the queue first (they are being fetched now).
        pending = {p for p in params if self.recent[p] < self.step_id}
        taken = set()
        while self.queue and len(taken) < len(pending):
            p, step = self.queue.popleft()
            self.recent[p] = step
            taken.add(p)
        bucket = self.settings.prefetch_bucket
        if bucket <= 0:
            return
        limit = min(self.settings.max_live - self.live, bucket)
        chosen: dict[int, None] = {}  # in scan order
        numel = 0
        while self.queue and numel < limit:
            p, step = self.queue.popleft()
            wanted = self.status[p] == NOT_AVAILABLE and p not in chosen
            self.recent[p] = max(self.recent[p], step)
            if wanted:
                chosen[p] = None
                numel += self.numels[p]
        if numel > 0:
            self._gather(chosen, forward)

    # Releasing

    def _release(self, p: int) -> None:
        if self.status[p] == AVAILABLE and not self.active[p]:
            self.status[p] = NOT_AVAILABLE
            self.live -= self.numels[p]

    def _release_module(self, node: CallNode) -> None:
        if self.complete:
            released = self._to_release(node)
        else:
            released = set(node.fetched)
        for p in node.fetched:
            self.active[p].discard(id(node))
            if p in released:
                self._release(p)

    def _to_release(self, node: CallNode) -> frozenset[int]:
        key = (id(node), self.step_id)
        if key not in self.release_cache:
            released = {p for p in node.fetched if not self.persist[p] and self.recent[p] <= self.step_id}
            traversed = 0
            for later in self.trace[self.step_id :]:
                if traversed >= self.settings.max_reuse:
                    break
                for p in later.subtree if node.leaf else later.own:
                    released.discard(p)
                    traversed += self.numels[p]
            self.release_cache[key] = frozenset(released)
        return self.release_cache[key]


def zero3_gathers(
    model: nn.Module,
    settings: Zero3Settings,
    micro_batches: int,
    leaves: set[str] | None = None,
    embedding_grads: bool | None = None,
) -> GatherCounts:
    """Elements ZeRO-3 all-gathers in one optimizer step of `micro_batches` micro-batches (after the
    first step, which records the trace), by pass (`GatherCounts`); `leaves` and `embedding_grads` as
    `call_tree` takes them."""
    numels = [int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()]
    coordinator = Coordinator(micro_batch_events(call_tree(model, leaves, embedding_grads)), numels, settings)
    coordinator.step(micro_batches)  # the first micro-batch records the trace
    coordinator.counting = True
    coordinator.step(micro_batches)
    return coordinator.counts


__all__ = ["Coordinator", "GatherCounts", "Zero3Settings", "zero3_gathers"]
