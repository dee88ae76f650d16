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
calls it: `call_tree` says which modules run, in which order, and which of them take part in the backward.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .resolve import block_classes


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


@dataclass
class CallNode:
    """A module as ZeRO-3 sees it: its own parameters (indices into the model's parameter list), those of
    its whole subtree, whether it is a ZeRO-3 leaf (fetched whole, no hooks inside), the modules it calls
    (in order), and whether its positional input and its output carry gradients (its backward hooks fire)."""

    name: str
    own: tuple[int, ...]
    subtree: tuple[int, ...]
    leaf: bool
    grad_in: bool = False
    grad_out: bool = False
    children: list[CallNode] = field(default_factory=list)

    @property
    def fetched(self) -> tuple[int, ...]:
        return self.subtree if self.leaf else self.own


class _Tree:
    """Builds `CallNode`s for the modules of one model."""

    def __init__(self, model: nn.Module, leaves: set[str]):
        self.index = {id(p): i for i, p in enumerate(model.parameters())}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.leaves = leaves

    def node(self, module: nn.Module, grad_in: bool, grad_out: bool, children=()) -> CallNode:
        own = tuple(sorted(self.index[id(p)] for p in module.parameters(recurse=False)))
        subtree = tuple(sorted(self.index[id(p)] for p in module.parameters()))
        leaf = type(module).__name__ in self.leaves
        return CallNode(self.names[id(module)], own, subtree, leaf, grad_in, grad_out, list(children))

    def chain(self, modules: Iterable[nn.Module], grad_in: bool) -> tuple[list[CallNode], bool]:
        """Modules applied one after the other: each one's output needs a gradient when its input does
        or it has trainable parameters. Returns the nodes and whether the last output needs one."""
        nodes = []
        for module in modules:
            grad_out = grad_in or any(p.requires_grad for p in module.parameters())
            nodes.append(self.node(module, grad_in, grad_out))
            grad_in = grad_out
        return nodes, grad_in


def call_tree(model: nn.Module, leaves: set[str] | None = None, embedding_grads: bool | None = None) -> CallNode:
    """The modules a training forward of `model` calls, in order, with what takes part in the backward.
    `model` is a `CosForConditionalGeneration`, or peft's LoRA wrapping of one; real or on the meta
    device. `leaves`: the ZeRO-3 leaf classes (default: the transformer blocks but the embeddings, as
    `cosctl.train.engine.leaf_classes` makes them; an empty set for per-module fetching).
    `embedding_grads`: whether the LLM's input embeddings are made to carry a gradient (transformers does
    so when gradient checkpointing is enabled on the LLM; default: whether the model has that hook)."""
    if leaves is None:
        leaves = {name for name in block_classes(model) if not name.endswith("Embeddings")}
    tree = _Tree(model, leaves)
    wrappers = []
    cos = model
    while "vision_tower" not in cos._modules:  # peft: PeftModelForCausalLM -> LoraModel -> the model
        wrappers.append(cos)
        cos = cos.base_model if "base_model" in cos._modules else cos.model
    root = tree.node(cos, False, True, _cos_children(tree, cos, embedding_grads))
    # `get_image_features` reads the patch embedding's weight (its dtype) before the tower runs: DeepSpeed
    # gathers it there and makes it an external parameter of the model's own module, fetched and released
    # with it from then on (forward and backward).
    patch = tree.index[id(_active(cos.vision_tower).embeddings.patch_embedding.weight)]
    root.own = tuple(sorted({*root.own, patch}))
    # peft's model calls its tuner positionally with keywords only; the tuner's own hooks never record
    # (it calls the model from inside its forward); the wrapper and the model do.
    if wrappers:
        root = tree.node(wrappers[0], False, True, [root])
    return root


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _active(module: nn.Module) -> nn.Module:
    """The module that runs: peft's `modules_to_save` wrapper (a trained bridge under LoRA) runs its copy."""
    if "modules_to_save" in module._modules:
        return module.modules_to_save[module.active_adapters[0]]
    return module


def _wrapped(tree: _Tree, module: nn.Module, grad_in: bool, grad_out: bool, children: list[CallNode]) -> CallNode:
    """`module`'s node; under peft's `modules_to_save` the wrapper's node around its copy's."""
    inner = _active(module)
    node = tree.node(inner, grad_in, grad_out, children)
    return node if inner is module else tree.node(module, grad_in, grad_out, [node])


def _has_input_grad_hook(embedding: nn.Module) -> bool:
    return any(
        getattr(hook, "__name__", "") == "make_inputs_require_grads" for hook in embedding._forward_hooks.values()
    )


def _cos_children(tree: _Tree, cos: nn.Module, embedding_grads: bool | None) -> list[CallNode]:
    """`CosForConditionalGeneration.forward`: the LLM's input embeddings, the vision tower's embeddings,
    pre-LN and blocks (its `features`, so the tower itself is never called), the resampler chain and the
    projector (`get_image_features`), then the LLM on the merged embeddings."""
    llm = cos.language_model
    inner = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    embed = llm.get_input_embeddings()
    tower = _active(cos.vision_tower)
    if embedding_grads is None:
        embedding_grads = _has_input_grad_hook(embed)
    nodes = []
    embed_grad = _trains(embed) or embedding_grads
    nodes.append(tree.node(embed, False, embed_grad))
    # The ViT: pixels carry no gradient; its embeddings call the patch and position embeddings.
    embeddings = tower.embeddings
    vision_grad = _trains(embeddings)
    patch = tree.node(embeddings.patch_embedding, False, _trains(embeddings.patch_embedding))
    position = tree.node(embeddings.position_embedding, False, _trains(embeddings.position_embedding))
    nodes.append(tree.node(embeddings, False, vision_grad, [patch, position]))
    blocks, vision_grad = tree.chain([tower.pre_layrnorm, *tower.encoder.layers], vision_grad)
    nodes += blocks
    # The resampler chain: each scale (its queries) runs its levels on the features.
    chain = _active(cos.resampler)
    resampler_grad = vision_grad or _trains(chain)
    scales = []
    for scale in chain.scales:
        levels = [tree.node(level, resampler_grad, resampler_grad) for level in scale.levels]
        scales.append(tree.node(scale, vision_grad, resampler_grad, levels))
    nodes.append(_wrapped(tree, cos.resampler, vision_grad, resampler_grad, scales))
    projector = _active(cos.projector)
    parts, projector_grad = tree.chain([projector.norm, projector.linear], resampler_grad)
    nodes.append(_wrapped(tree, cos.projector, resampler_grad, projector_grad, parts))
    # The LLM, called with keywords (inputs_embeds=...): its blocks, final norm and head take the hidden
    # states positionally. The rotary embedding's output (cos, sin) carries no gradient.
    hidden_grad = embed_grad or projector_grad
    rotary = getattr(inner, "rotary_emb", None)
    inner_children = [tree.node(rotary, False, False)] if rotary is not None else []
    layers, hidden_grad = tree.chain([*inner.layers, inner.norm], hidden_grad)
    inner_children += layers
    head = llm.get_output_embeddings()
    head_grad = hidden_grad or _trains(head)
    llm_children = [tree.node(inner, False, hidden_grad, inner_children), tree.node(head, hidden_grad, head_grad)]
    nodes.append(tree.node(llm, False, head_grad, llm_children))
    return nodes


# ---------------------------------------------------------------------------------------------------
# The coordinator, replayed


def micro_batch_events(root: CallNode) -> list[tuple[str, CallNode, bool]]:
    """("fetch" | "release", module, in the forward) of one micro-batch's forward then backward. Backward hooks fire in
    the reverse order of their creation in the forward: a module's pre-backward hook is made at its
    post-forward (when its output needs a gradient), its post-backward hook at its pre-forward (when its
    positional input carries one; otherwise it never fires and the module is released with the leftovers
    at the end of the backward)."""
    forward: list[tuple[str, CallNode]] = []
    made: list[tuple[str, CallNode]] = []

    def run(node: CallNode) -> None:
        forward.append(("fetch", node))
        if node.grad_in:
            made.append(("release", node))
        if not node.leaf:
            for child in node.children:
                run(child)
        forward.append(("release", node))
        if node.grad_out:
            made.append(("fetch", node))

    run(root)
    backward = [(kind, node) for kind, node in reversed(made)]
    return [(kind, node, True) for kind, node in forward] + [(kind, node, False) for kind, node in backward]


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


__all__ = [
    "CallNode",
    "Coordinator",
    "GatherCounts",
    "Zero3Settings",
    "call_tree",
    "micro_batch_events",
    "zero3_gathers",
]
