"""Measuring a run: the FLOP model (also used by `cosctl plan`), peak throughput, and the per-step
sinks (metrics.jsonl, TensorBoard, a rich progress bar or plain log lines on rank 0)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cos_model import CosConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment; COSCTL_PEAK_TFLOPS overrides.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}

# The model-FLOPs utilisation every step-time prediction assumes (`cosctl plan`, bench/stage_speed.py).
# A plain ZeRO-3 loop on one H200 reached ~31% with a trained 1.1B LLM and ~39% with a frozen 7B one
# (bench/RESULTS.md); 0.35 sits between them. Small models on CPU reach far less: there the prediction is a
# floor on the step time, not an estimate.
ASSUMED_MFU = 0.35


def llm_flops_per_token(text_config, seq_len: int) -> float:
    """Training FLOPs per token of a decoder LLM: 6 x (non-embedding params) + causal attention."""
    h, layers = text_config.hidden_size, text_config.num_hidden_layers
    inter = text_config.intermediate_size
    kv = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // text_config.num_attention_heads
    per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * inter  # q, o, k, v, gate/up/down
    params = layers * per_layer + h * text_config.vocab_size  # + LM head
    attention = 6 * layers * h * seq_len  # QK^T and AV, fwd + bwd, averaged over causal positions
    return 6.0 * params + attention


def vit_forward_flops(vision_config, num_blocks: int) -> float:
    """Forward FLOPs of the frozen ViT up to the deepest feature block, per image."""
    h, inter = vision_config.hidden_size, vision_config.intermediate_size
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    per_block = 2 * tokens * (4 * h * h + 2 * h * inter) + 4 * tokens * tokens * h
    patch_embed = 2 * tokens * 3 * vision_config.patch_size**2 * h
    return num_blocks * per_block + patch_embed


def resampler_flops(config: CosConfig, trainable: bool = True) -> float:
    """FLOPs of the resampler chain + projector per image (x3 when trained)."""
    c = config.vision_config.hidden_size
    total = 0.0
    grid = config.grid_size
    for scale in config.scales:
        q, k = scale.num_tokens(grid), scale.window**2 * scale.num_windows(grid)
        per_level = 2 * q * c * c * 2 + 2 * k * 2 * c * c + 4 * q * scale.window**2 * c
        per_level += 2 * q * 2 * config.resampler_mlp_ratio * c * c
        total += len(config.feature_layers) * per_level
    total += 2 * config.num_visual_tokens * c * config.text_config.hidden_size
    return total * (3 if trainable else 1)


def flops_per_sample(config: CosConfig, num_text_tokens: int) -> float:
    """Model FLOPs of one training sample: LLM 6·N·tokens + attention, ViT forward, resampler."""
    seq = config.num_visual_tokens + num_text_tokens
    num_blocks = max(config.feature_layers) + 1
    return (
        llm_flops_per_token(config.text_config, seq) * seq
        + vit_forward_flops(config.vision_config, num_blocks)
        + resampler_flops(config)
    )


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


class MetricsSink:
    """Rank 0's per-step outputs: append-only metrics.jsonl, TensorBoard scalars, progress."""

    def __init__(self, run_dir: Path, num_steps: int, first_step: int, label: str):
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.num_steps, self.label = num_steps, label
        self.start, self.first_step = time.monotonic(), first_step
        self.progress = _Progress(label, num_steps, first_step)

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                self.tensorboard.add_scalar(f"{self.label}/{key}", value, record["step"])
        if "loss" in record:
            self.progress.update(record)

    def close(self) -> None:
        self.progress.close()
        self.tensorboard.close()
        self.jsonl.close()


class _Progress:
    """A rich progress bar on a terminal; one plain line every ~10% otherwise (logs, CI)."""

    def __init__(self, label: str, num_steps: int, first_step: int):
        self.num_steps, self.label = num_steps, label
        self.every = max(1, num_steps // 10)
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), transient=False,
            )
            self.task = self.bar.add_task(label, total=num_steps, completed=first_step, stats="")
            self.bar.start()

    def update(self, record: dict) -> None:
        stats = (
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['samples_per_s']:.1f} samples/s  {record['tokens_per_s']:.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], stats=stats)
        elif record["step"] % self.every == 0 or record["step"] in (1, self.num_steps):
            print(f"[{self.label}] step {record['step']}/{self.num_steps}  {stats}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
