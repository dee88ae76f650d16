"""DeepSpeed configs: the JSON templates in `deepspeed_configs/` and the one function that fills them.

A template marks every value that comes from the run spec with `"auto"`. `resolve_deepspeed` fills
those from the spec and the launch facts (world size, device, micro-batch estimate), merges the spec's
`deepspeed.overrides`, and refuses to return a config in which any `"auto"` survives or whose batch
sizes disagree (`train_batch_size = micro × accumulation × world`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosctl.spec.sections import OptimSpec
    from cosctl.spec.specs import TrainingSpec

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "deepspeed_configs"
AUTO = "auto"
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def available_templates() -> list[str]:
    """Template names, i.e. the `*.json` stems in `TEMPLATE_DIR`."""
    return sorted(path.stem for path in TEMPLATE_DIR.glob("*.json"))


def load_template(name: str) -> dict:
    """The parsed template `deepspeed_configs/<name>.json` ("zero3", "zero2" or "zero3_offload")."""
    names = available_templates()
    if name not in names:
        raise ValueError(f"unknown DeepSpeed template {name!r}; available: {', '.join(names)}")
    return json.loads((TEMPLATE_DIR / f"{name}.json").read_text())


def resolve_deepspeed(
    template: dict,
    spec: TrainingSpec,
    *,
    world_size: int,
    micro_batch_size: int,
    device_type: str,
    hidden_size: int | None = None,
    block_numel: int | None = None,
) -> dict:
    """A complete DeepSpeed config: `template` filled from `spec`, overrides merged; input untouched.

    `micro_batch_size` is an estimate of samples per micro-batch: the trainer batches by token budget and
    feeds its own batches, so DeepSpeed uses it only for batch-size bookkeeping and throughput reports.
    Accumulation is the trainer's too (it varies per step and marks the last micro-batch of each step
    with `set_gradient_accumulation_boundary`), so DeepSpeed's own count is 1.
    `hidden_size` (the LLM's width) and `block_numel` (parameters of the largest transformer block) size
    the ZeRO buckets.
    """
    if world_size < 1 or micro_batch_size < 1:
        raise ValueError(f"world_size and micro_batch_size must be >= 1, got {world_size} and {micro_batch_size}")
    accumulation = 1
    config = copy.deepcopy(template)
    # The spec is the source of truth: derived keys are written even where a template hard-codes them.
    config.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch_size * accumulation * world_size,
        gradient_clipping=float(spec.optim.grad_clip),  # 0.0 disables clipping in DeepSpeed
    )
    config["bf16"] = {**config.get("bf16", {}), "enabled": spec.deepspeed.trains_in_bf16(device_type)}
    config["optimizer"] = _optimizer(config.get("optimizer", {}), spec.optim, device_type)
    if "zero_optimization" in config:
        zero = config["zero_optimization"]
        if _offloads_optimizer(zero):
            # Lets the trainer pass its own torch optimizer with offload; the ds-config AdamW already
            # bypasses DeepSpeedCPUAdam through torch_adam (no cpu_adam JIT build).
            config["zero_force_ds_cpu_optimizer"] = False
        config["zero_optimization"] = _fill_buckets(zero, hidden_size, block_numel)
    config = deep_merge(config, spec.deepspeed.overrides)
    _check_resolved(config, world_size)
    return config


def _optimizer(block: dict, optim: OptimSpec, device_type: str) -> dict:
    params = {
        **block.get("params", {}),
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
        # torch's AdamW instead of FusedAdam/DeepSpeedCPUAdam: those JIT-compile C++/CUDA on first use,
        # which needs a toolchain and costs ~45 s per fresh machine.
        "torch_adam": True,
    }
    if device_type == "cuda":
        params["foreach"] = True  # multi-tensor kernels: the fast path for torch AdamW on GPU
    return {**block, "type": "AdamW", "params": params}


def _offloads_optimizer(zero: dict) -> bool:
    device = zero.get("offload_optimizer", {}).get("device", "none")
    return device not in ("none", None)


def bucket_sizes(hidden_size: int, block_numel: int | None = None) -> dict[str, int]:
    """ZeRO bucket sizes scaled to the model width (the formulas transformers' DeepSpeed integration
    uses), with a prefetch bucket that holds the next two transformer blocks of `block_numel` parameters.

    NOTE: 0.9·width² alone is smaller than one block (a 2048-wide LLaMA block has 44M parameters, 10x
    that), so ZeRO-3 could never fetch a block ahead of its use; bench/RESULTS.md has the measurement.
    """
    prefetch = int(0.9 * hidden_size * hidden_size)
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": max(prefetch, 2 * block_numel) if block_numel else prefetch,
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


def _fill_buckets(zero: dict, hidden_size: int | None, block_numel: int | None) -> dict:
    """Fill `"auto"` bucket sizes from `hidden_size`; without it drop them so DeepSpeed's defaults apply."""
    sizes = bucket_sizes(hidden_size, block_numel) if hidden_size is not None else {}
    filled = {}
    for key, value in zero.items():
        if key in BUCKET_KEYS and value == AUTO:
            if key not in sizes:
                continue
            value = sizes[key]
        filled[key] = value
    return filled


def deep_merge(base: dict, overrides: dict) -> dict:
    """A new dict: `overrides` merged into `base`, nested dicts key by key, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _auto_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _auto_paths(value, f"{prefix}[{i}]")
    elif node == AUTO:
        yield prefix


def _check_resolved(config: dict, world_size: int) -> None:
    leftover = list(_auto_paths(config))
    if leftover:
        raise ValueError(f'DeepSpeed config still has "auto" at {", ".join(leftover)}; give it a value')
    micro, accumulation = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    if config["train_batch_size"] != micro * accumulation * world_size:
        raise ValueError(
            f"train_batch_size {config['train_batch_size']} != micro {micro} × accumulation {accumulation}"
            f" × world {world_size}"
        )
