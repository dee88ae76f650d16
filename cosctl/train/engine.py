"""The DeepSpeed engine around a stage's model: the resolved config (`cosctl.plan.resolve`), ZeRO-3
fetching whole transformer blocks, torch AdamW and the cosine schedule. The model itself is the stage's
(`cosctl.stages`).

Everything here is collective-safe: every rank runs the same calls in the same order. CPU runs use the
gloo backend and fp32 with torch's AdamW (nothing JIT-compiles); GPU runs use nccl and bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..common.dist import Dist
from ..plan.resolve import World, block_classes, deepspeed_config, model_shape
from ..spec.specs import TrainingSpec


def cosine_schedule(num_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warm-up, then cosine down to `min_lr_ratio`."""
    num_warmup = int(round(warmup_ratio * num_steps))

    def multiplier(step: int) -> float:
        if step < num_warmup:
            return (step + 1) / (num_warmup + 1)
        progress = (step - num_warmup) / max(1, num_steps - num_warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def leaf_classes(model: nn.Module) -> list[str]:
    """The block classes ZeRO-3 may fetch whole: every one but the embeddings (CLIP's patch and
    position embedding).

    NOTE: DeepSpeed releases a leaf's parameters from its full backward hook. For a module none of
    whose inputs needs a gradient (pixels, token ids) that hook fires as soon as the output's gradient
    exists, before the module's own weight gradients are accumulated: a trainable vision tower then
    fails in backward with "size of tensor a (0) must match". Embeddings are small; fetching them per
    module costs nothing that matters.
    """
    return sorted(name for name in block_classes(model) if not name.endswith("Embeddings"))


def fetch_whole_blocks(model: nn.Module) -> None:
    """Make each transformer block a ZeRO-3 leaf: its parameters are gathered in one go when the block
    runs, and its sub-modules get no hooks of their own.

    NOTE: per-module fetching puts a pre- and post-hook pair and a gather on every Linear and norm
    (~10 per block); that Python overhead is paid every forward and backward, on every rank.
    """
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, leaf_classes(model), raise_if_not_found=False)


def build_engine(model: nn.Module, spec: TrainingSpec, dist_info: Dist, micro_batch_size: int):
    """deepspeed.initialize with the config the resolver gives this model, world and micro-batch
    (`cosctl.plan.resolve.deepspeed_config`), torch AdamW and our cosine schedule; returns the engine,
    its scheduler and that config."""
    import deepspeed

    world = World(dist_info.world_size, dist_info.device.type)
    ds_config = deepspeed_config(spec, model_shape(model, model.config, spec), world, micro_batch_size)
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and spec.deepspeed.zero3_fetch == "block":
        fetch_whole_blocks(model)
    schedule = cosine_schedule(spec.optim.num_steps, spec.optim.warmup_ratio, spec.optim.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine, scheduler, ds_config
