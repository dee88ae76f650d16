"""`cosctl plan`: what a spec will do before it runs — tokens, scales, parameters, DeepSpeed config,
memory and FLOP estimates, predicted step time and samples/s, the communication per step at the given
world size, a ZeRO-2 / ZeRO-3 recommendation, and the checkpoint it would resume from. Builds the model
on the meta device (no weights, no memory), reads at most config.json and the tokenizer from local
folders.

The batch geometry, DeepSpeed config and FLOP model are the resolver's (`cosctl.plan.resolve`), on the
prepared training split's lengths as the run measures them: what `cosctl pretrain` logs at start. The
compute prediction is the model FLOPs (what MFU counts) over the per-rank peak times
`cosctl.plan.flops.ASSUMED_MFU`; without a known peak (`--peak-tflops`,
COSCTL_PEAK_TFLOPS, or this machine's GPU) it is null. Hardware FLOPs (HFU) add gradient
checkpointing's recomputation. The communication is `cosctl.plan.comm`'s model of what DeepSpeed moves,
ZeRO-3's gathers replayed on the meta model at the spec's thresholds (`cosctl.plan.gathers`; a ZeRO-2 spec
is compared with the zero3 template's).
"""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint.layout import find_latest
from ..stages import stage_for
from ..stages.base import scale_table
from ..storage import join_uri, open_store
from .comm import (
    DEFAULT_INTER_NODE_GBPS,
    DEFAULT_INTRA_NODE_GBPS,
    ZERO_STAGES,
    link_gbps,
    memory_gib,
    param_counts,
    step_volume,
)
from .deepspeed_config import bucket_sizes, load_template
from .flops import ASSUMED_MFU, passes, peak_tflops, predict_step_seconds
from .gathers import Zero3Settings, zero3_gathers
from .resolve import World, model_shape, resolve

# ZeRO-2 is recommended only when its whole weights and optimizer state leave at least half of a GPU to
# activations and buffers.
ZERO2_MEMORY_SHARE = 0.5
DEFAULT_GPU_MEMORY_GIB = 80.0


def device_peak_tflops(device_type: str, given: float | None = None) -> float | None:
    """Per-rank peak for predictions: `given` (--peak-tflops), else COSCTL_PEAK_TFLOPS, else this
    machine's GPU if it has one (a plan made on a login node for `--device cuda` has no GPU to name, so
    no peak)."""
    if given:
        return given
    if os.environ.get("COSCTL_PEAK_TFLOPS") or (device_type == "cuda" and torch.cuda.is_available()):
        return peak_tflops(torch.device(device_type))
    return None


def _speed(flops, samples_per_step: int, world_size: int, peak: float | None) -> dict:
    """Predicted step time and samples/s from the FLOP model (independent of how a step is split into
    micro-batches); the HFU the assumed MFU implies."""
    step_s = predict_step_seconds(flops.model * samples_per_step, peak, world_size)
    return {
        "peak_tflops": peak,
        "assumed_mfu": ASSUMED_MFU,
        "implied_hfu": ASSUMED_MFU * flops.hardware / flops.model,
        "predicted_step_s": step_s,
        "predicted_samples_per_s": samples_per_step / step_s if step_s else None,
    }


def training_lengths(spec, stage, num_visual_tokens: int) -> tuple[object | None, int | None]:
    """The training split's lengths and record count as the run measures them: its prepared token store
    (prepared now, in this process, when missing: the run then maps the same one). (None, None) when the
    data or the tokenizer is not on this machine: the plan then assumes lengths and says so."""
    from ..common.errors import StorageError, UserError
    from ..data.prepare import load_split, split_source
    from ..data.records import length_stats, load_tokenizer

    try:
        tokenizer = load_tokenizer(stage.tokenizer_folder())
        records = load_split(
            split_source(spec.data, spec.data.train, spec.storage.to_settings()),
            tokenizer,
            num_visual_tokens=num_visual_tokens,
            max_bad_fraction=spec.data.max_bad_fraction,
            workers=spec.data.num_workers,
        )
    except (UserError, StorageError):
        return None, None
    return length_stats(records), len(records)


def build_plan(
    spec,
    world_size: int = 1,
    device_type: str = "cpu",
    *,
    peak: float | None = None,
    bandwidth_gbps: float = DEFAULT_INTER_NODE_GBPS,
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS,
    ranks_per_node: int | None = None,
    gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB,
) -> dict:
    """What `cosctl plan` prints for a spec (module docstring): the resolved numbers and what follows
    from them at `world_size` ranks on `device_type`."""
    if world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {world_size}")
    stage = stage_for(spec)
    if not stage.trains:
        return stage.describe()
    model, lora = stage.plan_model()  # the meta model carries the LoRA adapters the run adds
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lengths, num_records = training_lengths(spec, stage, config.num_visual_tokens)
    shape = model_shape(model, config, spec, lora)
    resolved = resolve(spec, shape, World(world_size, device_type), lengths, num_records)
    flops, ds_config = resolved.flops, resolved.deepspeed
    bytes_per_param = 2 if resolved.bf16 else 4
    samples_per_step = spec.batch.samples_per_step
    speed = _speed(flops, samples_per_step, world_size, device_peak_tflops(device_type, peak))
    threshold = ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold")
    if threshold is None:  # a ZeRO-2 config has none: what ZeRO-3 would use for this model
        threshold = 10 * config.text_config.hidden_size
    counts = param_counts(model.parameters(), threshold)
    gathers = zero3_gathers(
        model,
        zero3_settings(ds_config, config.text_config.hidden_size, shape.block_numel),
        resolved.micro_batches_per_step or 1,
        embedding_grads=spec.model.gradient_checkpointing,
    )
    communication = communication_plan(
        counts,
        spec.deepspeed.template,
        world_size,
        resolved.micro_batches_per_step,
        bytes_per_param,
        ranks_per_node or _ranks_per_node(spec),
        bandwidth_gbps,
        intra_node_gbps,
        gpu_memory_gib,
        speed["predicted_step_s"],
        zero3=gathers,
    )
    store = open_store(spec.run.output, spec.storage.to_settings())
    latest = find_latest(store)
    return {
        "stage": spec.stage,
        "visual_tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "scales": scale_table(config),
        "trainable_params": trainable,
        "total_params": total,
        "world_size": world_size,
        "samples_per_step": resolved.samples_per_step,
        "samples_per_micro_batch": resolved.samples_per_micro_batch,
        "micro_batches_per_step": resolved.micro_batches_per_step,
        "steps_per_epoch": resolved.steps_per_epoch,
        "assumed_text_tokens": None if resolved.lengths_measured else resolved.mean_text_tokens,
        "mean_text_tokens": resolved.mean_text_tokens,
        "flop_passes": passes(spec.model.trainable, lora=lora > 0),
        "lora_params": lora,
        "gradient_checkpointing": spec.model.gradient_checkpointing,
        "flops_per_sample": flops.model,
        "hardware_flops_per_sample": flops.hardware,
        "flops_by_part": flops.to_dict(),
        "flops_per_step": flops.model * samples_per_step,
        "hardware_flops_per_step": flops.hardware * samples_per_step,
        **speed,
        "memory_per_rank_gib": communication["stages"][communication["current"]]["memory_gib"],
        "communication": communication,
        "resume": ({"uri": join_uri(store.uri, "checkpoints", latest.name), "step": latest.step} if latest else None),
        "deepspeed": ds_config,
        "resolved": resolved.to_dict(),
    }


def zero3_settings(ds_config: dict, hidden_size: int, block_numel: int | None) -> Zero3Settings:
    """The ZeRO-3 thresholds of the run's config, or, for a ZeRO-2 spec, those the zero3 template would
    give this model (what the comparison with ZeRO-3 assumes)."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3:
        zero = {**load_template("zero3")["zero_optimization"], **bucket_sizes(hidden_size, block_numel)}
    return Zero3Settings.from_config(zero)


def _ranks_per_node(spec) -> int:
    return spec.slurm.num_ranks_per_node()


def communication_plan(
    counts,
    template: str,
    world_size: int,
    micro_batches: int | None,
    bytes_per_param: int,
    ranks_per_node: int,
    inter_node_gbps: float,
    intra_node_gbps: float,
    gpu_memory_gib: float,
    compute_s: float | None,
    zero3=None,
) -> dict:
    """Bytes per step per rank for ZeRO-3 and ZeRO-2 at this world size, the time they take on the link
    the ranks share, and which stage the model says to use (the spec is never changed). `zero3`: what
    ZeRO-3 gathers per step (`cosctl.plan.gathers.GatherCounts`; default: every parameter once per
    micro-batch)."""
    assumed = micro_batches is None  # an `auto` budget: the micro-batch is probed at start
    micro_batches = micro_batches or 1
    gbps = link_gbps(world_size, ranks_per_node, inter_node_gbps, intra_node_gbps)
    stages = {}
    for name, stage in (("zero3", 3), ("zero2", 2)):
        volume = step_volume(stage, counts, micro_batches, bytes_per_param, zero3 if stage == 3 else None)
        stages[name] = {
            **volume.to_dict(world_size),
            "seconds": volume.seconds(world_size, gbps),
            "memory_gib": memory_gib(stage, counts, world_size, bytes_per_param),
        }
    current = "zero3" if ZERO_STAGES[template] == 3 else "zero2"
    zero2_memory = sum(stages["zero2"]["memory_gib"].values())
    zero2_fits = zero2_memory <= ZERO2_MEMORY_SHARE * gpu_memory_gib
    cheaper = stages["zero2"]["per_rank"] <= stages["zero3"]["per_rank"]
    best = "zero2" if zero2_fits and cheaper else "zero3"
    if best == "zero2":
        why = (
            f"ZeRO-2 moves {_gb(stages['zero2']['per_rank'])} per rank per step against ZeRO-3's "
            f"{_gb(stages['zero3']['per_rank'])}, and its whole weights + optimizer state ({zero2_memory:.1f} GiB "
            f"per rank) leave over half of a {gpu_memory_gib:g} GiB GPU to activations"
        )
        if world_size == 1:
            why = (
                f"one rank moves nothing either way; ZeRO-2 skips ZeRO-3's gather/release of every block and "
                f"its weights + optimizer state ({zero2_memory:.1f} GiB) fit in half of a "
                f"{gpu_memory_gib:g} GiB GPU"
            )
    elif not zero2_fits:
        why = (
            f"ZeRO-2's whole weights + optimizer state ({zero2_memory:.1f} GiB per rank) would take more than "
            f"half of a {gpu_memory_gib:g} GiB GPU"
        )
    else:
        why = (
            f"ZeRO-3 moves {_gb(stages['zero3']['per_rank'])} per rank per step against ZeRO-2's "
            f"{_gb(stages['zero2']['per_rank'])}"
        )
    seconds = stages[current]["seconds"]
    return {
        "world_size": world_size,
        "ranks_per_node": ranks_per_node,
        "nodes": -(-world_size // ranks_per_node),
        "link": "intra-node" if world_size <= ranks_per_node else "inter-node",
        "gbps": gbps,
        "micro_batches_per_step": micro_batches,
        "micro_batches_assumed": assumed,
        "bytes_per_param": bytes_per_param,
        "params": counts.__dict__,
        "stages": stages,
        "current": current,
        "predicted_comm_s": seconds,
        "compute_s": compute_s,
        "bound": None if compute_s is None else ("communication" if seconds > compute_s else "compute"),
        "recommended": best,
        "reason": why,
    }


def _gb(value: float) -> str:
    return f"{value / 1e9:.3g} GB"


def format_plan(plan: dict) -> str:
    """`build_plan`'s result as the lines `cosctl plan` prints."""
    lines = [
        f"stage          {plan['stage']}",
        f"visual tokens  {plan['visual_tokens']} per image at {plan['image_size']} px",
    ]
    for s in plan["scales"]:
        lines.append(
            f"  scale        window {s['window']:>3}: {s['windows']:>4} windows x "
            f"{s['queries_per_window']} queries = {s['tokens']} tokens"
        )
    if plan["stage"] == "inflate":
        lines.append(f"from           {plan['source_visual_tokens']} tokens at {plan['source_image_size']} px")
        lines.append(f"output         {plan['output']}")
        return "\n".join(lines)
    memory = plan["memory_per_rank_gib"]
    resume = plan["resume"]
    resume_line = f"{resume['uri']} (step {resume['step']})" if resume else "nothing: starts fresh"
    lines += [
        f"parameters     {plan['trainable_params']:,} trainable of {plan['total_params']:,}",
        _format_micro_batch(plan),
        *_format_flops(plan),
        f"step time      {_format_speed(plan)}",
        f"memory/rank    {memory['weights']:.2f} GiB weights + {memory['optimizer']:.2f} GiB optimizer (+ activations)"
        f" at {plan['world_size']} rank{'s' if plan['world_size'] > 1 else ''}",
        *_format_communication(plan["communication"]),
        f"resume from    {resume_line}",
        "deepspeed      " + json.dumps(plan["deepspeed"], sort_keys=True),
    ]
    return "\n".join(lines)


def _format_micro_batch(plan: dict) -> str:
    epoch = f", {plan['steps_per_epoch']} steps per epoch" if plan["steps_per_epoch"] is not None else ""
    step = f"step           {plan['samples_per_step']} samples (all ranks){epoch}\n"
    if plan["samples_per_micro_batch"] is None:
        return step + "micro-batch    auto: probed on the device at start to fill its memory"
    lengths = (
        f"assuming {plan['assumed_text_tokens']} text tokens: the training data is not on this machine"
        if plan["assumed_text_tokens"] is not None
        else f"{plan['mean_text_tokens']} text tokens on average, measured on the prepared training split"
    )
    return step + (
        f"micro-batch    ~{plan['samples_per_micro_batch']} samples, ~{plan['micro_batches_per_step']} "
        f"per step per rank ({lengths})"
    )


_PASS_WORDS = {3: "trained", 2: "frozen, back-propagated", 1: "frozen, forward only"}


def _format_flops(plan: dict) -> list[str]:
    """Model FLOPs (what MFU counts) and hardware FLOPs (what HFU counts), and how each module is counted."""
    llm = plan["flop_passes"]["language_model"]
    counted = [f"LLM {2 * llm}·N ({_PASS_WORDS[llm]}{', + LoRA 6·N' if plan['lora_params'] else ''})"]
    for module, label in (("vision_tower", "ViT"), ("resampler", "resampler"), ("projector", "projector")):
        counted.append(f"{label} {2 * plan['flop_passes'][module]}·N")
    recompute = (
        "+ the LLM forward recomputed by gradient checkpointing (+2·N)"
        if plan["gradient_checkpointing"]
        else "= model FLOPs: no gradient checkpointing"
    )
    return [
        f"FLOPs          model {plan['flops_per_sample']:.3g} per sample, {plan['flops_per_step']:.3g} per step: "
        f"what MFU counts ({', '.join(counted)} per token, + attention)",
        f"               hardware {plan['hardware_flops_per_sample']:.3g} per sample, "
        f"{plan['hardware_flops_per_step']:.3g} per step: what HFU counts ({recompute})",
    ]


def _format_speed(plan: dict) -> str:
    if plan.get("predicted_samples_per_s") is None:
        return (
            "unknown: no device peak (--peak-tflops, COSCTL_PEAK_TFLOPS, or plan on the GPU machine with --device cuda)"
        )
    step = f"~{plan['predicted_step_s']:.3g} s/step of compute, " if plan["predicted_step_s"] is not None else ""
    return (
        f"{step}~{plan['predicted_samples_per_s']:.4g} samples/s (FLOP model at {plan['assumed_mfu']:.0%} MFU "
        f"= {plan['implied_hfu']:.0%} HFU of {plan['peak_tflops']:g} TFLOP/s per rank)"
    )


def _format_communication(comm: dict) -> list[str]:
    names = {"zero3": "ZeRO-3", "zero2": "ZeRO-2"}
    micro = f"{comm['micro_batches_per_step']} micro-batch{'es' if comm['micro_batches_per_step'] > 1 else ''}"
    if comm["micro_batches_assumed"]:
        micro += " per step assumed (auto budget: more if the probe finds less memory)"
    else:
        micro += " per step per rank"
    where = (
        f"{comm['world_size']} rank{'s' if comm['world_size'] > 1 else ''} on {comm['nodes']} "
        f"node{'s' if comm['nodes'] > 1 else ''} ({comm['ranks_per_node']} per node), "
        f"{comm['link']} link {comm['gbps']:g} Gb/s per rank, {micro}"
    )
    lines = [f"communication  per step per rank at {where}; logical sizes per step:"]
    for name in ("zero3", "zero2"):
        stage = comm["stages"][name]
        parts = [
            f"{kind.replace('_', '-')} {_gb(stage[kind])}"
            + (
                f" ({_gb(stage['backward_all_gather'])} of it again for the backward)"
                if kind == "all_gather" and stage.get("backward_all_gather")
                else ""
            )
            for kind in ("all_gather", "reduce_scatter", "all_reduce")
            if stage[kind]
        ]
        marker = " (the spec's)" if name == comm["current"] else ""
        lines.append(
            f"  {names[name]}{marker:<13} {', '.join(parts) or 'nothing'} -> {_gb(stage['per_rank'])} "
            f"per rank, ~{stage['seconds']:.3g} s"
        )
    if comm["compute_s"] is not None:
        lines.append(
            f"  bound        {comm['bound']}: ~{comm['predicted_comm_s']:.3g} s of communication against "
            f"~{comm['compute_s']:.3g} s of compute per step (overlapped at best: the step takes at least "
            f"the larger)"
        )
    advice = (
        "keep it"
        if comm["recommended"] == comm["current"]
        else f"set deepspeed.template: {comm['recommended']} (the spec says {comm['current']})"
    )
    lines.append(f"recommend      {names[comm['recommended']]}: {advice}; {comm['reason']}")
    return lines
