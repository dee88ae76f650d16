"""The communication of a data-parallel ZeRO step: bytes each collective moves per optimizer step, the
time they take at a link bandwidth, and which ZeRO stage moves less (`cosctl plan`).

What DeepSpeed 0.19.8 moves, as counted on the real engine (`bench/comm_volume.py`, bench/RESULTS.md):

    ZeRO-3  all-gather      what its parameter coordinator gathers, replayed on the model's module trace
                            (`cosctl.plan.gathers`): every partitioned parameter at its forward use in each
                            micro-batch (frozen ones included), again for the backward when it was released
                            in between (stage3_max_reuse_distance and the prefetch decide: a 7B LLM keeps
                            only its last blocks gathered), and the persistent ones (at most
                            stage3_param_persistence_threshold elements each) once after the step
            reduce-scatter  the gradients of the trainable parameters, once per micro-batch
    ZeRO-2  all-reduce      the gradients of the trainable parameters, once per micro-batch (its default
                            use_multi_rank_bucket_allreduce all-reduces buckets instead of reducing them
                            to their owners)
            all-gather      the updated trainable parameters, once per step

Sizes are logical: the full gathered buffer, the full reduced tensor. In a ring of W ranks each rank
sends (and receives) (W-1)/W of an all-gather's or reduce-scatter's size and 2(W-1)/W of an
all-reduce's. Frozen parameters cost ZeRO-3 a gather every micro-batch (two for a frozen LLM that
back-propagates and is re-gathered) and ZeRO-2 nothing (each rank keeps them whole), which is why a
frozen LLM moves far less under ZeRO-2 when it fits in memory.

Bandwidth: a run that fits on one node talks over the node's GPU links, a larger one is limited by each
rank's share of the inter-node network (NCCL builds one ring per NIC, so every rank's inter-node link
carries its full ring traffic). Both figures are `cosctl plan` options with the defaults below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .gathers import GatherCounts

# Per-rank inter-node bandwidth (Gb/s): one 100 Gb/s InfiniBand link (EDR, HDR100) per GPU, or an HDR
# 200 Gb/s port shared by two; nodes with a 400 Gb/s NDR link per GPU should say so (--bandwidth-gbps 400).
DEFAULT_INTER_NODE_GBPS = 100.0
# Within a node (Gb/s): a conservative all-gather bus bandwidth for 8-GPU NVLink/NVSwitch nodes (300 GB/s;
# NVLink 4 on H100/H200 offers 450 GB/s per direction, NVLink 3 on A100 300 GB/s).
DEFAULT_INTRA_NODE_GBPS = 2400.0
ZERO_STAGES = {"zero2": 2, "zero3": 3, "zero3_offload": 3}


@dataclass(frozen=True)
class ParamCounts:
    """What the communication depends on: every parameter, the ones ZeRO-3 keeps whole on every rank
    (numel at most the persistence threshold), and the trainable ones."""

    total: int
    persistent: int
    trainable: int


def param_counts(parameters, persistence_threshold: int, extra_trainable: int = 0) -> ParamCounts:
    """Counts over `parameters` (a model's, possibly on the meta device); `extra_trainable` adds weights
    the model does not hold yet (LoRA adapters). Reads a ZeRO-3 parameter's full size, not its shard."""
    total = persistent = trainable = 0
    for param in parameters:
        numel = getattr(param, "ds_numel", param.numel())
        total += numel
        persistent += numel if numel <= persistence_threshold else 0
        trainable += numel if param.requires_grad else 0
    return ParamCounts(total + extra_trainable, persistent, trainable + extra_trainable)


@dataclass(frozen=True)
class StepVolume:
    """Logical bytes per optimizer step (see the module docstring) of one ZeRO stage."""

    stage: int
    all_gather: float
    reduce_scatter: float
    all_reduce: float
    backward_all_gather: float = 0.0  # the part of all_gather gathered again for the backward (ZeRO-3)

    def per_rank(self, world_size: int) -> float:
        """Bytes each rank sends per step in ring collectives."""
        share = (world_size - 1) / world_size
        return share * (self.all_gather + self.reduce_scatter) + 2 * share * self.all_reduce

    def seconds(self, world_size: int, gbps: float) -> float:
        return self.per_rank(world_size) * 8 / (gbps * 1e9)

    def to_dict(self, world_size: int) -> dict:
        return {**asdict(self), "per_rank": self.per_rank(world_size)}


def step_volume(
    stage: int, counts: ParamCounts, micro_batches: int, bytes_per_param: int, gathers: GatherCounts | None = None
) -> StepVolume:
    """Bytes a ZeRO `stage` (2 or 3) moves per step with `micro_batches` micro-batches per rank; parameters
    and gradients travel in the training dtype (`bytes_per_param`: 2 for bf16, 4 for fp32). ZeRO-3's
    all-gather is `gathers` (`cosctl.plan.gathers.zero3_gathers` of the model at these micro-batches);
    without it, the floor of every partitioned parameter once per micro-batch, none re-gathered."""
    if stage == 3:
        if gathers is None:
            partitioned = counts.total - counts.persistent
            gathers = GatherCounts(forward=micro_batches * partitioned, persistent=counts.persistent)
        return StepVolume(
            3,
            all_gather=gathers.total * bytes_per_param,
            reduce_scatter=micro_batches * counts.trainable * bytes_per_param,
            all_reduce=0.0,
            backward_all_gather=gathers.backward * bytes_per_param,
        )
    if stage == 2:
        return StepVolume(
            2,
            all_gather=counts.trainable * bytes_per_param,
            reduce_scatter=0.0,
            all_reduce=micro_batches * counts.trainable * bytes_per_param,
        )
    raise ValueError(f"no communication model for ZeRO stage {stage}")


def link_gbps(world_size: int, ranks_per_node: int, inter_node_gbps: float, intra_node_gbps: float) -> float:
    """The bandwidth a rank's ring traffic runs at: the node's links when all ranks share a node."""
    return intra_node_gbps if world_size <= ranks_per_node else inter_node_gbps


def memory_gib(
    stage: int, counts: ParamCounts, world_size: int, bytes_per_param: int, adam_bytes_per_param: int = 12
) -> dict[str, float]:
    """Per-rank weights and optimizer state at rest: ZeRO-3 partitions the weights, ZeRO-2 keeps them
    whole; both partition the fp32 master weights, Adam moments and gradient partitions. Activations and
    ZeRO-3's gathered working set come on top."""
    weights = counts.total * bytes_per_param / (world_size if stage == 3 else 1)
    optimizer = counts.trainable * (adam_bytes_per_param + bytes_per_param) / world_size
    return {"weights": weights / 2**30, "optimizer": optimizer / 2**30}


__all__ = [
    "DEFAULT_INTER_NODE_GBPS",
    "DEFAULT_INTRA_NODE_GBPS",
    "ZERO_STAGES",
    "ParamCounts",
    "StepVolume",
    "link_gbps",
    "memory_gib",
    "param_counts",
    "step_volume",
]
