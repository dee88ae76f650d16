"""The FLOP model (docs/design.md §8): what a training step computes per sample, the device peaks it is
measured against, and the step time `cosctl plan` predicts from it. Used by the resolver, the training
loop's MFU/HFU and the benchmarks.

The FLOP model counts what a training step computes, per sample, module by module, in the order data
flows (vision tower -> resampler -> projector -> LLM). A module's forward costs 2·N per token (N its
weights) plus its attention; its backward costs 2·N more for the gradients of its activations, needed
when anything below it trains, and 2·N for its weight gradients, needed when it trains itself:

    trained                           6·N   (forward, activation and weight gradients)
    frozen, something below trains    4·N   (a frozen LLM under a trained bridge: gradients flow through it)
    frozen, nothing below trains      2·N   (the frozen ViT: forward only)

Attention has no weights: its backward is 2x its forward whenever the backward runs at all. LoRA adds
6·N of its adapters to a frozen LLM that back-propagates. These are the *model* FLOPs, which MFU
counts. *Hardware* FLOPs add what the device recomputes: with gradient checkpointing the LLM's forward
runs again in the backward (+2·N and its attention), which HFU counts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cos_model import CosConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; COSCTL_PEAK_TFLOPS overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}

# The model-FLOPs utilisation every step-time prediction assumes (`cosctl plan`, bench/stage_speed.py).
# Counted with the model above (a frozen LLM at 4·N), the single-H100/H200 runs of bench/RESULTS.md reached
# 19-35% with the trained 1.1B LLM and 31-43% with the frozen 7B one; 0.35 sits between the two.
# Small models on CPU reach far less: there the prediction is a floor on the step time, not an estimate.
ASSUMED_MFU = 0.35

# The top-level modules in the order data flows through them (the spec's `model.trainable` names).
MODULE_ORDER = ("vision_tower", "resampler", "projector", "language_model")
# What `flops_per_sample` assumes without a trainable set: the bridge and the LLM train, the ViT is frozen.
DEFAULT_TRAINABLE = ("resampler", "projector", "language_model")


def passes(trainable: Iterable[str], lora: bool = False) -> dict[str, int]:
    """Forward-FLOP multiples of each module's linear layers: 3 trained, 2 frozen under something that
    trains (its activation gradients are needed), 1 forward only. A LoRA-adapted LLM counts as frozen
    and back-propagating (its adapters are counted separately)."""
    trainable = set(trainable)
    unknown = trainable - set(MODULE_ORDER)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}; modules are {MODULE_ORDER}")
    out, below = {}, False
    for module in MODULE_ORDER:
        trained = module in trainable
        needs_grad = below or (lora and module == "language_model")
        out[module] = 3 if trained else (2 if needs_grad else 1)
        below = below or trained or (lora and module == "language_model")
    return out


def llm_params(text_config) -> int:
    """Weights of a decoder LLM's matmuls: attention and MLP projections of every layer + the LM head
    (embedding lookups and norms cost no matmul FLOPs)."""
    h, layers = text_config.hidden_size, text_config.num_hidden_layers
    inter = text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    per_layer = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter  # q, o, k, v, gate/up/down
    return layers * per_layer + h * text_config.vocab_size


def llm_attention_forward_flops(text_config, seq_len: int) -> float:
    """Forward FLOPs per token of causal attention (QK^T and AV, averaged over positions)."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return 2.0 * text_config.num_hidden_layers * heads * head_dim * seq_len


def vit_forward_flops(vision_config, num_blocks: int) -> float:
    """Forward FLOPs of the ViT up to the deepest feature block, per image: 2·N per patch token (CLS
    included) plus full attention, plus the patch embedding."""
    h, inter = vision_config.hidden_size, vision_config.intermediate_size
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    per_block = 2 * tokens * (4 * h * h + 2 * h * inter) + 4 * tokens * tokens * h
    patch_embed = 2 * tokens * 3 * vision_config.patch_size**2 * h
    return num_blocks * per_block + patch_embed


def resampler_chain_forward_flops(config: CosConfig) -> float:
    """Forward FLOPs of the resampler chain per image (every scale, every feature level)."""
    c = config.vision_config.hidden_size
    total = 0.0
    grid = config.grid_size
    for scale in config.scales:
        q, k = scale.num_tokens(grid), scale.window**2 * scale.num_windows(grid)
        per_level = 2 * q * c * c * 2 + 2 * k * 2 * c * c + 4 * q * scale.window**2 * c
        per_level += 2 * q * 2 * config.resampler_mlp_ratio * c * c
        total += len(config.feature_layers) * per_level
    return total


def projector_forward_flops(config: CosConfig) -> float:
    """Forward FLOPs of the projector (vision width -> LLM width) per image."""
    return 2.0 * config.num_visual_tokens * config.vision_config.hidden_size * config.text_config.hidden_size


@dataclass(frozen=True)
class SampleFlops:
    """FLOPs of one training sample by part. `model` is what MFU counts; `hardware` adds the
    recomputation of gradient checkpointing, which HFU counts."""

    vision: float
    resampler: float
    projector: float
    llm: float  # the LLM's matmuls (and LoRA adapters)
    llm_attention: float
    recompute: float

    @property
    def model(self) -> float:
        return self.vision + self.resampler + self.projector + self.llm + self.llm_attention

    @property
    def hardware(self) -> float:
        return self.model + self.recompute

    def to_dict(self) -> dict:
        return {
            "vision": self.vision,
            "resampler": self.resampler,
            "projector": self.projector,
            "llm": self.llm,
            "llm_attention": self.llm_attention,
            "recompute": self.recompute,
            "model": self.model,
            "hardware": self.hardware,
        }


def sample_flops(
    config: CosConfig,
    num_text_tokens: int,
    trainable: Iterable[str] = DEFAULT_TRAINABLE,
    *,
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> SampleFlops:
    """FLOPs of one training sample of `num_text_tokens` text tokens (see the module docstring), with
    `trainable` the trained top-level modules, `lora_params` the LoRA adapter weights on the LLM and
    `gradient_checkpointing` whether the LLM's forward is recomputed in the backward."""
    mult = passes(trainable, lora=lora_params > 0)
    seq = config.num_visual_tokens + num_text_tokens
    llm_mult = mult["language_model"]
    backward = llm_mult > 1
    linear = 2.0 * llm_params(config.text_config) * seq
    adapters = 2.0 * lora_params * seq
    attention = llm_attention_forward_flops(config.text_config, seq) * seq
    return SampleFlops(
        vision=vit_forward_flops(config.vision_config, max(config.feature_layers) + 1) * mult["vision_tower"],
        resampler=resampler_chain_forward_flops(config) * mult["resampler"],
        projector=projector_forward_flops(config) * mult["projector"],
        llm=linear * llm_mult + adapters * 3,
        llm_attention=attention * (3 if backward else 1),
        recompute=(linear + adapters + attention) if gradient_checkpointing and backward else 0.0,
    )


def flops_per_sample(
    config: CosConfig,
    num_text_tokens: int,
    trainable: Iterable[str] = DEFAULT_TRAINABLE,
    *,
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> float:
    """Model FLOPs of one training sample (`sample_flops(...).model`); without `trainable`, the bridge and
    the LLM train and the ViT is frozen."""
    return sample_flops(
        config, num_text_tokens, trainable, lora_params=lora_params, gradient_checkpointing=gradient_checkpointing
    ).model


def predict_step_seconds(
    flops_per_step: float, peak_tflops_per_rank: float | None, world_size: int = 1, mfu: float = ASSUMED_MFU
) -> float | None:
    """Seconds per optimizer step if all ranks together sustain `mfu` of their peak; None when the peak
    is unknown. `flops_per_step` counts every rank's samples (`flops_per_sample` x samples per step)."""
    if not peak_tflops_per_rank:
        return None
    return flops_per_step / (peak_tflops_per_rank * 1e12 * world_size * mfu)


def peak_tflops(device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU without COSCTL_PEAK_TFLOPS)."""
    if os.environ.get("COSCTL_PEAK_TFLOPS"):
        return float(os.environ["COSCTL_PEAK_TFLOPS"])
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
