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

Two uses. `sample_flops` is the prediction (`cosctl plan`, the resolver): one sample of the mean length.
`step_flops` is what a training step did, from its micro-batches (the training loop's MFU and HFU):
model FLOPs from each trained sample's own length (attention from the sum of squared lengths, not the
mean's square; a text-only sample without the vision tower and bridge), hardware FLOPs from the
micro-batches as the device ran them (every row at its padded length, filler micro-batches and samples
that train nothing included, every image through the vision tower, blank ones too).

Peaks come from a table of named parts (`DEVICE_PEAKS`), matched on the name the driver reports; a
device not in it gets no peak, so MFU is left out rather than guessed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cos_model import CosConfig


@dataclass(frozen=True)
class DevicePeak:
    """A part's dense bf16 tensor-core peak (TFLOP/s, without sparsity), from its datasheet."""

    part: str
    tflops: float


# Parts by the names `torch.cuda.get_device_name` reports (matched case-insensitively, first match wins:
# the variants before the plain names). A name matching none, a bare "NVIDIA H100" among them (SXM,
# PCIe and NVL differ by 1.3x), has no peak: MFU is then omitted, never guessed. COSCTL_PEAK_TFLOPS
# overrides the table.
DEVICE_PEAKS: tuple[tuple[str, DevicePeak], ...] = (
    (r"\bH100\b.*\bPCIe\b", DevicePeak("H100 PCIe", 756.0)),
    (r"\bH100\b.*\bNVL\b", DevicePeak("H100 NVL", 835.5)),
    (r"\bH100\b.*(\bSXM|\bHBM3\b)", DevicePeak("H100 SXM", 989.4)),  # "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", DevicePeak("H200 NVL", 835.5)),
    (r"\bH200\b", DevicePeak("H200 SXM", 989.4)),
    # A100 SXM4 and PCIe, 40 and 80 GB: one bf16 peak ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB").
    (r"\bA100\b", DevicePeak("A100", 312.0)),
    (r"\bL40S\b", DevicePeak("L40S", 362.05)),
)

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


def _flops(
    config: CosConfig,
    mult: dict[str, int],
    *,
    tokens: int,
    squared_lengths: int,
    images: int,
    lora_params: int,
    gradient_checkpointing: bool,
) -> SampleFlops:
    """FLOPs of `tokens` LLM tokens in sequences whose squared lengths sum to `squared_lengths` (causal
    attention grows with each sequence's square), and `images` images through the vision tower and
    bridge, at the forward multiples `mult` (`passes`)."""
    llm_mult = mult["language_model"]
    backward = llm_mult > 1
    linear = 2.0 * llm_params(config.text_config) * tokens
    adapters = 2.0 * lora_params * tokens
    attention = llm_attention_forward_flops(config.text_config, 1) * squared_lengths
    return SampleFlops(
        vision=vit_forward_flops(config.vision_config, max(config.feature_layers) + 1) * mult["vision_tower"] * images,
        resampler=resampler_chain_forward_flops(config) * mult["resampler"] * images,
        projector=projector_forward_flops(config) * mult["projector"] * images,
        llm=linear * llm_mult + adapters * 3,
        llm_attention=attention * (3 if backward else 1),
        recompute=(linear + adapters + attention) if gradient_checkpointing and backward else 0.0,
    )


def sample_flops(
    config: CosConfig,
    num_text_tokens: int,
    trainable: Iterable[str] = DEFAULT_TRAINABLE,
    *,
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> SampleFlops:
    """FLOPs of one training sample with an image and `num_text_tokens` text tokens (see the module
    docstring), with `trainable` the trained top-level modules, `lora_params` the LoRA adapter weights on
    the LLM and `gradient_checkpointing` whether the LLM's forward is recomputed in the backward."""
    seq = config.num_visual_tokens + num_text_tokens
    return _flops(
        config,
        passes(trainable, lora=lora_params > 0),
        tokens=seq,
        squared_lengths=seq * seq,
        images=1,
        lora_params=lora_params,
        gradient_checkpointing=gradient_checkpointing,
    )


@dataclass(frozen=True)
class PaddedPass:
    """One micro-batch as the device runs it: `rows` token rows of `columns` tokens each (padding
    included; a packed row holds several samples back to back) and `images` images through the vision
    tower and bridge (blank ones included: a failed image, a filler's, the blank image a micro-batch
    without images runs so that ZeRO-3's collectives match)."""

    rows: int
    columns: int
    images: int


@dataclass(frozen=True)
class StepFlops:
    """What a training step computed: `model` counts the samples it trained on, each at its own length
    (what MFU counts); `hardware` the micro-batches as run, padding, fillers and recomputation included
    (what HFU counts)."""

    model: float
    hardware: float


def step_flops(
    config: CosConfig,
    text_tokens: Sequence[int],
    visual_tokens: Sequence[int],
    shapes: Sequence[PaddedPass],
    trainable: Iterable[str] = DEFAULT_TRAINABLE,
    *,
    lora_params: int = 0,
    gradient_checkpointing: bool = False,
) -> StepFlops:
    """FLOPs of a training step (module docstring). `text_tokens` and `visual_tokens` are those of each
    sample the step trains on, in the same order (0 visual tokens: a text-only sample, no vision tower or
    bridge); `shapes` are the step's micro-batches as run. Pure: the loop sums it over ranks."""
    if len(text_tokens) != len(visual_tokens):
        raise ValueError(f"{len(text_tokens)} text lengths but {len(visual_tokens)} visual-token counts")
    mult = passes(trainable, lora=lora_params > 0)
    per_image = config.num_visual_tokens
    lengths = [t + v for t, v in zip(text_tokens, visual_tokens, strict=True)]
    model = _flops(
        config,
        mult,
        tokens=sum(lengths),
        squared_lengths=sum(n * n for n in lengths),
        images=sum(-(-v // per_image) for v in visual_tokens),
        lora_params=lora_params,
        gradient_checkpointing=gradient_checkpointing,
    )
    hardware = _flops(
        config,
        mult,
        tokens=sum(s.rows * s.columns for s in shapes),
        squared_lengths=sum(s.rows * s.columns * s.columns for s in shapes),
        images=sum(s.images for s in shapes),
        lora_params=lora_params,
        gradient_checkpointing=gradient_checkpointing,
    )
    return StepFlops(model.model, hardware.hardware)


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


def device_peak(name: str) -> DevicePeak | None:
    """The part a device name (as `torch.cuda.get_device_name` gives it) names and its bf16 peak, or
    None when the table has no such part."""
    return next((peak for pattern, peak in DEVICE_PEAKS if re.search(pattern, name, re.IGNORECASE)), None)


def device_label(device) -> str:
    """The device's name as the driver reports it ("cpu" for the host)."""
    if getattr(device, "type", "cpu") != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


def peak_tflops(device) -> float | None:
    """COSCTL_PEAK_TFLOPS, else the device's dense bf16 peak from `DEVICE_PEAKS`; None when unknown
    (the host CPU, or a GPU the table does not name)."""
    if os.environ.get("COSCTL_PEAK_TFLOPS"):
        return float(os.environ["COSCTL_PEAK_TFLOPS"])
    if getattr(device, "type", "cpu") != "cuda":
        return None
    peak = device_peak(device_label(device))
    return peak.tflops if peak else None
