"""The module trace of a training step as DeepSpeed's ZeRO-3 hooks see it (`cosctl.plan.gathers` replays its
parameter coordinator on it): which modules of `cos_model.CosForConditionalGeneration` (optionally inside
peft's LoRA wrappers) run in a training forward, in which order, which parameters each one fetches, and
which take part in the backward.

    call_tree(model)          the modules the forward calls, nested as they call each other
    micro_batch_events(tree)  the hooks of one micro-batch in the order they fire: each module's fetch
                              and release in the forward (pre- and post-forward hooks), then in the
                              backward those whose output carries a gradient, in the reverse order of
                              the hooks' creation (a module whose positional input carries none is never
                              released by its own hook: DeepSpeed releases it after the backward)

What the forward calls is `CosForConditionalGeneration.forward`'s own order (the LLM's input embeddings,
the vision tower's parts, the resampler chain, the projector, the LLM), checked against the trace DeepSpeed
records by `bench/comm_volume.py` and tests/test_comm.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .resolve import block_classes


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


__all__ = ["CallNode", "call_tree", "micro_batch_events"]
