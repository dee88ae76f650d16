"""The DeepSpeed engine around a stage's model: the resolved config (`cosctl.plan.resolve`), ZeRO-3
fetching whole transformer blocks, torch AdamW with per-module learning rates, and the cosine schedule.
The model itself is the stage's (`cosctl.stages`); under ZeRO-3 the stage builds it already
partitioned (`zero3_partition`), so no rank ever holds the whole model.

Everything here is collective-safe: every rank runs the same calls in the same order. CPU runs use the
gloo backend and fp32 with torch's AdamW (nothing JIT-compiles); GPU runs use nccl and bf16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..common.dist import Dist
from ..plan.deepspeed_config import load_template, resolve_deepspeed
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
    module costs nothing that matters. A trained block fed by no input that needs a gradient gets one
    that does (`_input_needs_grad`).
    """
    return sorted(name for name in block_classes(model) if not name.endswith("Embeddings"))


def fetch_whole_blocks(model: nn.Module) -> None:
    """Make each transformer block a ZeRO-3 leaf: its parameters are gathered in one go when the block
    runs, and its sub-modules get no hooks of their own.

    NOTE: per-module fetching puts a pre- and post-hook pair and a gather on every Linear and norm
    (~10 per block); that Python overhead is paid every forward and backward, on every rank.
    """
    from deepspeed.utils import set_z3_leaf_modules

    leaves = set_z3_leaf_modules(model, leaf_classes(model), raise_if_not_found=False)
    for leaf in leaves:
        if any(p.requires_grad for p in leaf.parameters()):
            leaf.register_forward_pre_hook(_input_needs_grad)


def _input_needs_grad(module: nn.Module, args: tuple):
    """Forward pre-hook of a trainable ZeRO-3 leaf: when none of its positional tensor inputs needs a
    gradient (LoRA on an LLM whose embeddings and bridge are frozen: its first block reads constant
    hidden states), the first one is made to need one.

    NOTE: DeepSpeed releases a leaf's parameters from its full backward hook, which torch fires on the
    output's gradient when no input needs one: before the block's own weight gradients are computed,
    which then meet the released (size-0) partitions ("size of tensor a (0) must match", or "0 != N
    Cannot reduce scatter"). With an input that needs a gradient the hook fires after them, as in
    every run where something before the block trains. The extra cost is the gradient of that one
    input.
    """
    if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
        return None
    if not args[0].is_floating_point() or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def param_groups(model: nn.Module, lr_by_module: Mapping[str, float]) -> list:
    """The trained parameters for the optimizer: a plain list, or with `lr_by_module` one group at the
    spec's lr followed by a group per named top-level module at its own peak lr (empty groups left
    out). The step log's lr is the first group's.

    NOTE: the group layout is in every optimizer checkpoint; without lr_by_module it stays the single
    group that checkpoints written before the option existed hold.
    """
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not lr_by_module:
        return [p for _, p in trained]
    by_module: dict[str | None, list] = {None: [], **{module: [] for module in sorted(lr_by_module)}}
    for name, param in trained:
        top = name.removeprefix("base_model.model.").split(".")[0]  # peft wraps the whole model
        by_module[top if top in lr_by_module else None].append(param)
    groups = [{"params": by_module.pop(None)}]
    groups += [{"params": params, "lr": lr_by_module[module]} for module, params in by_module.items()]
    return [group for group in groups if group["params"]]


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
        model_parameters=param_groups(model, spec.optim.lr_by_module),
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine, scheduler, ds_config


class ZeroPartition:
    """A `cos_model.building.Partitioner` for ZeRO-3: each parameter becomes a DeepSpeed ZeRO-3 parameter
    that holds only this rank's flat slice (`ds_tensor`), filled straight from the checkpoint reader, so
    the whole tensor never exists on the rank.

    `deepspeed.zero.Init`, made from the run's DeepSpeed config and never entered, does the conversion
    (`_convert_to_deepspeed_param`: the partition group, sizes, the gather and partition methods
    `deepspeed.initialize` and `GatheredParameters` use); only the partition's contents come from the
    reader instead of being copied from a whole tensor (`_partition_param` copies nothing into a
    partition that exists). The slice is `Init`'s: elements [rank * size, (rank + 1) * size) of the
    flattened tensor, `size` = ceil(numel / ranks), the last one zero-padded.
    """

    def __init__(self, ds_config: dict):
        import deepspeed

        self.init = deepspeed.zero.Init(config_dict_or_path=ds_config)
        if self.init.mem_efficient_linear:
            # As `Init` does for a module it converts itself: ZeRO-3's linear saves the parameter for
            # backward, not the gathered storage, which torch's would keep alive until the backward.
            self.init._enable_mem_efficient_linear()

    def __call__(self, name: str, shape: torch.Size, dtype: torch.dtype, read) -> nn.Parameter:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

        init = self.init
        # The shape without the storage: DeepSpeed records it (ds_shape, ds_numel), then frees the data.
        param = nn.Parameter(torch.empty((), dtype=dtype, device=init.local_device).expand(shape), requires_grad=False)
        init._convert_to_deepspeed_param(param)
        aligned = init._aligned_size(param)
        size = aligned // init._partition_world_size(param)
        start = min(size * init._partition_rank(param), param.ds_numel)
        stop = min(start + size, param.ds_numel)
        device = init.local_device if param.ds_persist else init.remote_device
        local = torch.zeros(size, dtype=dtype, device=device)
        if stop > start:
            read(start, stop, local[: stop - start])
        if init.pin_memory and local.device.type == "cpu":
            local = get_accelerator().pin_memory(local)
        local.requires_grad = False
        local.ds_numel, local.status, local.final_location = size, PartitionedParamStatus.AVAILABLE, None
        param.ds_tensor, param.ds_numel_aligned = local, aligned
        param.partition()  # the partition exists: this only frees the stand-in and marks it NOT_AVAILABLE
        return param


def zero3_partition(spec: TrainingSpec, dist_info: Dist) -> ZeroPartition | None:
    """The partitioner the stage builds its model with when the run trains under ZeRO-3 (each rank reads
    and keeps only its part); None otherwise (ZeRO-2 or none: every rank holds the model whole), and for
    the ZeRO-3 features it does not cover (NVMe offload, hpZ secondary partitions, quantised weights),
    where DeepSpeed partitions the whole model in `deepspeed.initialize` as before.

    The config is the spec's template resolved for this world with a provisional micro-batch: what
    `Init` reads of it (the ZeRO section, the dtype) is the engine's; bucket sizes are left to DeepSpeed."""
    config = resolve_deepspeed(
        load_template(spec.deepspeed.template),
        spec,
        world_size=dist_info.world_size,
        micro_batch_size=1,
        device_type=dist_info.device.type,
    )
    zero = config.get("zero_optimization", {})
    if zero.get("stage") != 3 or zero.get("offload_param", {}).get("device") == "nvme":
        return None
    if zero.get("zero_hpz_partition_size", 1) > 1 or zero.get("zero_quantized_weights"):
        return None
    if zero.get("zero_quantized_nontrainable_weights"):
        return None
    return ZeroPartition(config)
