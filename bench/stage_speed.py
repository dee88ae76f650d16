"""Stage speed: ZeRO-3 pre-training samples/s at several visual-token counts, same model, same machine,
one run (docs/design.md §8: the 32-token stage against a 336-token one).

Two paths time a row (`--path`; `both` runs the product row, then a direct row matched to it):

product (default)  the product itself: for each row, a pretrain spec YAML (the row's model shape with
    random towers, its scales and image size, `batch.samples_per_step` and `tokens_per_micro_batch`,
    the `--set` overrides; no periodic checkpoint, no eval) and a synthetic set at the row's resolution
    (`cosctl.data.synth.synthesize`, cached per resolution under `--work`), then `python -m cosctl pretrain
    ROW.yaml --nproc N --run-dir .. --output .. --resume never --overwrite` in a subprocess: the same
    spec -> `setup_run` (build on the host, data, engine, `auto` probe) -> `StepLoader` (images read,
    resized and collated, `data.num_workers` workers) -> loop as any run. The row's figures are the
    product's own step records (`metrics.jsonl`): the median over the timed steps after `--warmup` of
    its step_time_s, samples/s, tokens/s, TFLOP/s, MFU and HFU (the peak reaches it as
    `COSCTL_PEAK_TFLOPS`). The run is stopped with SIGTERM after the last timed step, so it saves
    nothing (bench/product_path.py says how and why; `--run-to-end` lets it finish). A step is
    `--samples-per-step` samples over all ranks; by default as many as the token budget holds at
    `--text-tokens` per sample on each rank (the direct row's micro-batch), or 256 per rank with
    `--tokens-per-micro-batch auto`. The synthetic records have their own text lengths (14-53 tokens,
    mean ~28), shorter than the default 64, so such a step is one micro-batch per rank.
direct (the old path, kept until the product path is shown equal on a GPU)  builds the model in this
    process (`cosctl.train.engine.build_pretrain_model` from a `PretrainSpec` made by `parse_spec`), wraps it
    with `cosctl.train.engine.build_engine` (the zero3 template resolved from the spec: ZeRO-3, bf16 + nccl on
    GPU, fp32 + gloo on CPU) and times `cosctl.train.loop.train_step` itself (forward -> engine.backward ->
    engine.step, loss and counts all-reduced) on one synthetic micro-batch
    (`cosctl.train.autobatch.synthetic_micro_batch`: random pixels and token ids, on the host as the loader
    hands it over) built once and fed every step: the engine is measured, not the data pipeline. A
    micro-batch holds as many samples as the token budget allows,
    `samples_per_micro_batch(visual, text, tokens_per_micro_batch)`; with `auto` the budget is what
    `cosctl.train.autobatch` probes on the row's engine. After a product row (`--path both`) the direct row is
    matched to it: the same LLM vocabulary, the product's mean text tokens per sample and its samples
    per micro-batch, so both count the same model FLOPs per sample, and the gap between them is what
    the product does besides: data loading, computing on padding, the model built on the host, the
    loop around `train_step`. The report accounts for the first two (see `gap_accounting`).

`--set KEY=VALUE` changes any key of every row's spec (the way variants such as
`deepspeed.template=zero2` or `data.num_workers=2` are compared).

Rows are TOKENS/RESOLUTION (`--rows`, default 32/224,336/224,336/448,528/448): visual tokens, and the
resolution named as ViT-L/14 has it (224 px = a 16x16 patch grid, 336 = 24x24, 448 = 32x32); the other
shapes keep the grid at their own patch size (the tiny shape's 224 is 64 px). `--tokens 32,336` is
short for each count at its default resolution (32 at 224, 576 at 336, the rest at 448). Layouts
(windows in patches; docs/design.md §3): the 32-token chain runs at the pre-training grid of 16x16
patches; 80/336/528 at 448 are the scale lists that `cos_model.inflate_config` makes from it at twice
the resolution (32x32 patches); at 224 they are the same lists with every window halved, so the token
count is the same at a quarter of the ViT's work:

    32   16x16  global 16 -> 1x16 + local 4 -> 16x1                      (the pre-training chain)
    80   32x32  "32to80":  32 -> 1x16 + 4 -> 64x1                        (16x16: 16 -> 1x16 + 2 -> 64x1)
    336  32x32  "32to336": 32 -> 1x16 + 16 -> 4x16 + 2 -> 256x1          (16x16: 16, 8, 1)
    528  32x32  "32to528": 32 -> 1x16 + 8 -> 16x16 + 2 -> 256x1          (16x16: 16, 4, 1)
    576  24x24  one scale, window 1 -> 576x1 (336 px with ViT-L/14, 96 px tiny): one query per patch,
                a plain LLaVA-like 576-token baseline

Shapes (random weights; the ViT is frozen everywhere):
    tiny  ViT width 64, 3 blocks, patch 4 + LLaMA width 128, 2 layers, vocab 512 (CPU/CI-sized); LLM trained
    1b    CLIP ViT-L/14 + TinyLlama-1.1B shape (2048 wide, 22 layers, 32/4 heads, vocab 32000); LLM trained
    7b    CLIP ViT-L/14 + Vicuna-7B shape (vocab 32000); LLM frozen, only the bridge trains (the paper's
          pre-training)

Columns: "text" is the mean text tokens per sample; "samples/step", "micro" (samples per micro-batch)
and "ub" (micro-batches per step per rank); s/step is the median of the timed steps (the JSON keeps each
step and the mean; for the product, `loop_s_per_step` is the whole loop iteration, records apart);
tokens/s counts visual + text tokens (the product: non-padding ones); TFLOP/s and MFU use the model
FLOPs of `cosctl.train.metrics.sample_flops` (LLM 6·N per token trained, 4·N frozen under the trained bridge,
ViT forward, resampler 6·N, attention; docs/design.md §8), HFU the hardware FLOPs (+ the LLM forward
recomputed under `--gradient-checkpointing`); peak memory is, for a direct row, the GPU's max allocated
or, on CPU, the process's peak RSS during the row, and for a product row the peak RSS of the run's
largest process (CPU) or the GPU memory in use above the baseline (nvidia-smi, sampled);
"data s" is rank 0's data loading per step, timed alone in this process after the run
(`StepLoader.next_step()` over the same steps, no workers: what a step with `data.num_workers: 0`
spends loading); "pred s/step" is the model FLOPs over peak x `cosctl.train.metrics.ASSUMED_MFU` (the
prediction `cosctl plan` prints); "x336" is the row's samples/s over the same path's 336-token row at
448 (or, without it, any 336-token row's). The peak is `--peak-tflops`, else a measured matmul peak
with `--measure-peak`, else `cosctl.train.metrics.peak_tflops` (COSCTL_PEAK_TFLOPS or the card's datasheet
bf16 peak; none on CPU).

Direct rows build the model straight on the GPU in the training dtype (`--build-on device`), so the 7b
shape does not initialise 7B fp32 parameters on the host first; `--build-on cpu` builds on the host as
`cosctl pretrain` does (the product path always does). bench/README.md says why `deepspeed.zero.Init`
is not used.

    python bench/stage_speed.py --shape tiny --path both --json tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: product_path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cos_model and cosctl

from product_path import (
    STOP_EXIT,
    STOP_MARGIN,
    child_env,
    log_line,
    log_value,
    prepare_data,
    run_product,
    time_loader,
    timed_figures,
)

from cos_model import DEFAULT_SCALES, PRESETS, CosConfig, inflate_config
from cos_model.configuration import VIT_L14_224
from cosctl.common.dist import init_distributed
from cosctl.plan.flops import ASSUMED_MFU, peak_tflops, predict_step_seconds, sample_flops
from cosctl.plan.resolve import samples_per_micro_batch
from cosctl.spec.specs import PretrainSpec, apply_overrides, parse_spec
from cosctl.stages.base import num_params, run_dtype, trainable_summary
from cosctl.stages.pretrain import build_pretrain_model, pretrain_config
from cosctl.train.autobatch import MemoryMeter, probe_micro_batch, synthetic_micro_batch
from cosctl.train.engine import build_engine
from cosctl.train.loop import train_step

REFERENCE_TOKENS = 336
BASE_GRID = 16  # patches per side of the 32-token pre-training chain
# Token count -> the preset that inflates the 32-token chain to it (on the doubled grid).
INFLATE_PRESETS = {
    sum(scale.num_tokens(2 * BASE_GRID) for scale in preset.scales): name
    for name, preset in PRESETS.items()
    if preset.source_tokens == 32
}
LLAVA_TOKENS, LLAVA_GRID = 576, 24
# Resolutions as ViT-L/14 has them -> patch grids (every shape keeps the grid at its own patch size).
RESOLUTION_GRIDS = {224: 16, 336: 24, 448: 32}
DEFAULT_ROWS = "32/224,336/224,336/448,528/448"
SUPPORTED_ROWS = [(32, 224), *((t, r) for r in (224, 448) for t in INFLATE_PRESETS), (LLAVA_TOKENS, 336)]
PATHS = {"product": ["product"], "direct": ["direct"], "both": ["product", "direct"]}
AUTO_SAMPLES_PER_RANK = 256  # a product step with an `auto` budget: the paper's global batch, per rank
WORK = Path(__file__).resolve().parents[1] / "runs" / "stage_speed"

VIT_L14 = {k: v for k, v in VIT_L14_224.items() if k != "image_size"}  # the row sets the resolution


@dataclass(frozen=True)
class Shape:
    """A model shape and its benchmark defaults."""

    vision: dict  # CLIPVisionConfig fields, without image_size
    text: dict  # causal-LM config fields (random init)
    feature_layers: tuple[int, ...]
    resampler_num_heads: int
    tokens_per_micro_batch: int
    llm_trainable: bool
    warmup: int
    steps: int

    @property
    def vocab_size(self) -> int:
        return self.text["vocab_size"]

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1  # as when a tokenizer appends <image> as its last token


SHAPES = {
    "tiny": Shape(
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "patch_size": 4,
        },
        text={
            "model_type": "llama",
            "vocab_size": 512,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 1024,
        },
        feature_layers=(1, 2),
        resampler_num_heads=4,
        tokens_per_micro_batch=2048,
        llm_trainable=True,
        warmup=3,
        steps=10,
    ),
    "1b": Shape(  # TinyLlama-1.1B: ~192 samples per micro-batch at 32 + 64 tokens
        vision=VIT_L14,
        text={
            "model_type": "llama",
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
        },
        feature_layers=(15, 22),
        resampler_num_heads=16,
        tokens_per_micro_batch=192 * 96,
        llm_trainable=True,
        warmup=3,
        steps=10,
    ),
    "7b": Shape(  # Vicuna-7B: the paper's micro-batches 64 / 16 / 10; this budget gives 64 / 15 / 10
        vision=VIT_L14,
        text={
            "model_type": "llama",
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        feature_layers=(15, 22),
        resampler_num_heads=16,
        tokens_per_micro_batch=64 * 96,
        llm_trainable=False,
        warmup=2,
        steps=6,
    ),
}
SUPPORTED_TOKENS = (32, *INFLATE_PRESETS, LLAVA_TOKENS)


# ---------------------------------------------------------------------------------------------------
# Specs and layouts


def spec_dict(shape: Shape, image_size: int, scales: list[dict], args: argparse.Namespace, name: str) -> dict:
    """A pretrain run spec as YAML would give it; paths are never read (random weights, no data)."""
    trainable = ["resampler", "projector"] + (["language_model"] if args.llm_trainable else [])
    return {
        "stage": "pretrain",
        "run": {"name": name, "output": "bench-unused", "seed": 0},
        "model": {
            "vision": {"config": dict(shape.vision)},
            "text": {"config": dict(shape.text)},
            "tokenizer": "unused-synthetic-token-ids",
            "image_size": image_size,
            "feature_layers": list(shape.feature_layers),
            "scales": scales,
            "resampler_num_heads": shape.resampler_num_heads,
            "trainable": trainable,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "data": {"root": "unused", "max_text_tokens": args.text_tokens},
        # A small lr: random bf16 weights should not diverge within the few steps timed.
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "num_steps": args.warmup + args.steps},
        # One micro-batch per step: the rows time micro-batches of the token budget.
        "batch": {"samples_per_step": 1 << 20, "tokens_per_micro_batch": args.tokens_per_micro_batch},
        "deepspeed": {"template": "zero3"},
    }


def default_grid(num_tokens: int) -> int:
    """The patch grid a token count runs at when no resolution is given."""
    return {32: BASE_GRID, LLAVA_TOKENS: LLAVA_GRID}.get(num_tokens, 2 * BASE_GRID)


def layout(shape: Shape, num_tokens: int, args: argparse.Namespace, grid: int | None = None) -> tuple[int, list[dict]]:
    """(image size in px, scale list) of a row at a patch grid (default: the token count's); see the
    module docstring."""
    patch = shape.vision["patch_size"]
    grid = default_grid(num_tokens) if grid is None else grid
    if num_tokens == LLAVA_TOKENS and grid == LLAVA_GRID:
        return LLAVA_GRID * patch, [{"window": 1, "queries_per_window": 1}]
    if num_tokens == 32 and grid == BASE_GRID:
        return BASE_GRID * patch, [s.to_dict() for s in DEFAULT_SCALES]
    if num_tokens in INFLATE_PRESETS and grid == 2 * BASE_GRID:
        base = pretrain_config(row_spec(shape, 32, args), shape.vocab_size, shape.image_token_id)
        inflated = inflate_config(base, INFLATE_PRESETS[num_tokens])
        return inflated.image_size, [s.to_dict() for s in inflated.scales]
    if num_tokens in INFLATE_PRESETS and grid == BASE_GRID:  # the preset with every window halved
        scales = PRESETS[INFLATE_PRESETS[num_tokens]].scales
        return BASE_GRID * patch, [
            {"window": s.window // 2, "queries_per_window": s.queries_per_window} for s in scales
        ]
    resolution = {g: r for r, g in RESOLUTION_GRIDS.items()}.get(grid, f"a {grid}x{grid} grid")
    supported = ", ".join(f"{t}/{r}" for t, r in SUPPORTED_ROWS)
    raise ValueError(f"--rows: no layout for {num_tokens} tokens at {resolution}; choose from {supported}")


def row_spec(shape: Shape, num_tokens: int, args: argparse.Namespace, grid: int | None = None) -> PretrainSpec:
    image_size, scales = layout(shape, num_tokens, args, grid)
    name = f"stage-speed-{args.shape}-{num_tokens}-{image_size}px"
    raw = apply_overrides(spec_dict(shape, image_size, scales, args, name), args.overrides)
    return parse_spec(raw, source=f"<{name}>")


# ---------------------------------------------------------------------------------------------------
# Model, batch and memory


def build_model(spec: PretrainSpec, vocab_size: int, device: torch.device, build_on: str) -> torch.nn.Module:
    """`build_pretrain_model` in the run's dtype (`run_dtype`: bf16 on a GPU, fp32 on CPU), on the host
    as `cosctl pretrain` builds it, or materialised on the device, which skips initialising billions of
    values on the CPU."""
    dtype = run_dtype(spec, device.type)
    if build_on == "cpu" or device.type == "cpu":
        return build_pretrain_model(spec, vocab_size, vocab_size - 1, dtype)
    with device:
        return build_pretrain_model(spec, vocab_size, vocab_size - 1, dtype)


class RepeatedMicroBatch:
    """Stands in for `cosctl.train.batching.StepLoader`: every step is the same single micro-batch."""

    def __init__(self, batch: dict, num_samples: int):
        self.batch, self.num_samples = batch, num_samples

    def next_step(self) -> list[dict]:
        return [{**self.batch, "num_samples": self.num_samples}]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    MemoryMeter(device).reset()  # CPU: the process's peak RSS, so each row gets its own peak


def peak_memory_gib(device: torch.device) -> float:
    """The row's peak: allocated GPU memory (the column's meaning since round 1; the probe counts
    reserved memory), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return MemoryMeter(device).peak_gib()


def forget_module(module: torch.nn.Module) -> None:
    """Drop DeepSpeed's last reference to a destroyed engine's model.

    NOTE: ZeRO-3 pushes each engine's root module onto the module-level
    `parameter_offload.FWD_MODULE_STACK` and `engine.destroy()` (DeepSpeed 0.19.8) never pops it, so
    without this every row's model, optimizer state included, would stay alive until the process ends.
    """
    from deepspeed.runtime.zero import parameter_offload

    parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if m is not module]


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_matmul_tflops(device: torch.device, trials: int = 5) -> float:
    """Dense matmul throughput in the training dtype (bf16 8192^3 on GPU, fp32 2048^3 on CPU): the best
    of a few short trials, since a peak is what the hardware can do when nothing else competes."""
    cuda = device.type == "cuda"
    n, repeats = (8192, 10) if cuda else (2048, 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12)
    return best


# ---------------------------------------------------------------------------------------------------
# One row


def time_steps(engine, loader: RepeatedMicroBatch, warmup: int, steps: int, device: torch.device):
    """Seconds of each timed step (after `warmup` untimed ones) and every step's loss."""
    seconds, losses = [], []
    engine.train()
    for _ in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        stats = train_step(engine, loader.next_step(), device)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(stats.loss)
    return seconds[warmup:], losses


def print_profile(engine, loader: RepeatedMicroBatch, device: torch.device, num_tokens: int, steps: int = 2) -> None:
    """Where the time of a few more steps goes, by operator: self device time and self host time.
    Run after the timed steps, so the profiler's own overhead never touches the table's figures."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(engine, loader.next_step(), device)
        synchronize(device)
    events = prof.key_averages()
    for key in (["self_device_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
        print(f"[stage_speed] {num_tokens} tokens: profile of {steps} steps by {key}")
        print(events.table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


def run_row(
    shape: Shape,
    num_tokens: int,
    args: argparse.Namespace,
    dist_info,
    peak: float | None,
    grid: int | None = None,
    match: dict | None = None,
) -> dict:
    """Build, wrap and time one direct row; free everything before returning its measurements. With
    `match` (the product row of the same TOKENS/RESOLUTION) the row takes its LLM vocabulary, its mean
    text tokens per sample and its samples per micro-batch, so both rows count the same FLOPs."""
    spec = row_spec(shape, num_tokens, args, grid)
    vocab = match["vocab_size"] if match else shape.vocab_size
    text_tokens = max(1, round(match["text_tokens"])) if match else args.text_tokens
    config = pretrain_config(spec, vocab_size=vocab, image_token_id=vocab - 1)
    budget, device = spec.batch.tokens_per_micro_batch, dist_info.device
    if match:
        micro = max(1, round(match["micro_batch"]))
    else:
        micro = 1 if budget == "auto" else samples_per_micro_batch(config.num_visual_tokens, text_tokens, budget)
    if micro < 1:
        raise SystemExit(
            f"--tokens-per-micro-batch {budget} holds no sample of {config.num_visual_tokens} + {text_tokens} tokens"
        )
    reset_peak_memory(device)
    start = time.perf_counter()
    model = build_model(spec, vocab, device, args.build_on)
    built = time.perf_counter()
    total = num_params(model.parameters())
    engine = None
    try:
        engine, _, _ = build_engine(model, spec, dist_info, micro)
        ready = time.perf_counter()
        if budget == "auto" and not match:
            probe = probe_micro_batch(
                engine,
                config,
                text_tokens,
                memory_fraction=spec.batch.memory_fraction,
                max_tokens=spec.batch.max_tokens_per_micro_batch,
                max_samples=1 << 20,
                device=device,
            )
            print(f"[stage_speed] {num_tokens} tokens: {probe.summary()}", flush=True)
            micro = probe.num_samples
            reset_peak_memory(device)
        probed = time.perf_counter()
        trainable = sum(trainable_summary(engine.module).values())
        loader = RepeatedMicroBatch(synthetic_micro_batch(config, micro, text_tokens), micro)
        seconds, losses = time_steps(engine, loader, args.warmup, args.steps, device)
        if args.profile:
            print_profile(engine, loader, device, num_tokens)
        peak_mem = peak_memory_gib(device)
    finally:  # also after an out-of-memory error, so the next row starts from an empty device
        if engine is not None:
            engine.destroy()
        forget_module(model)
        del engine, model
        release_memory(device)
    return (
        {"path": "direct", "matched": match is not None}
        | row_metrics(config, micro, text_tokens, seconds, peak, peak_mem, spec)
        | {
            "vocab_size": vocab,
            "samples_per_step": micro,
            "micro_batches": 1,
            "trainable_params": trainable,
            "total_params": total,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "build_s": built - start,
            "engine_s": ready - built,
            "probe_s": probed - ready,
            "mem_after_row_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
    )


def row_metrics(
    config: CosConfig,
    micro: int,
    text_tokens: int,
    seconds: list[float],
    peak: float | None,
    peak_mem: float,
    spec: PretrainSpec,
) -> dict:
    # The median, not the mean: a step slowed by another process on a shared machine should not count.
    step_s = statistics.median(seconds)
    flops = sample_flops(
        config, text_tokens, spec.model.trainable, gradient_checkpointing=spec.model.gradient_checkpointing
    )
    tflops = micro * flops.model / step_s / 1e12
    hardware_tflops = micro * flops.hardware / step_s / 1e12
    predicted = predict_step_seconds(micro * flops.model, peak)
    return {
        "tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "scales": [f"{s.window}->{s.num_windows(config.grid_size)}x{s.queries_per_window}" for s in config.scales],
        "text_tokens": text_tokens,
        "micro_batch": micro,
        "seq_len": config.num_visual_tokens + text_tokens,
        "s_per_step": step_s,
        "s_per_step_mean": statistics.fmean(seconds),
        "step_times_s": seconds,
        "samples_per_s": micro / step_s,
        "tokens_per_s": micro * (config.num_visual_tokens + text_tokens) / step_s,
        "flops_per_sample": flops.model,
        "hardware_flops_per_sample": flops.hardware,
        "tflops": tflops,
        "hardware_tflops": hardware_tflops,
        "mfu": tflops / peak if peak else None,
        "hfu": hardware_tflops / peak if peak else None,
        "peak_mem_gib": peak_mem,
        "predicted_s_per_step": predicted,
        "predicted_samples_per_s": micro / predicted if predicted else None,
    }


# ---------------------------------------------------------------------------------------------------
# One product row


def product_spec(
    shape: Shape,
    image_size: int,
    scales: list[dict],
    args: argparse.Namespace,
    name: str,
    row_dir: Path,
    data_root: str,
    tokenizer: str,
    samples_per_step: int,
) -> dict:
    """The row's `cosctl pretrain` spec as YAML gives it: the direct rows' model section (random towers)
    with the synthetic set's tokenizer and data, `samples_per_step`, no periodic checkpoint and no eval
    (their sections' defaults), then the `--set` overrides."""
    raw = spec_dict(shape, image_size, scales, args, name)
    raw["run"]["output"] = str(row_dir / "output")
    raw["model"]["tokenizer"] = tokenizer
    raw["data"] = {"root": data_root, "train": "train.json"}
    last = args.warmup + args.steps
    raw["optim"]["num_steps"] = last if args.run_to_end else last + STOP_MARGIN
    raw["batch"]["samples_per_step"] = samples_per_step
    return apply_overrides(raw, args.overrides)


def default_samples_per_step(args: argparse.Namespace, spec: PretrainSpec, num_visual: int) -> int:
    """`--samples-per-step`, else per rank the samples a micro-batch holds at `--text-tokens` (the
    direct row's micro-batch), or 256 with an `auto` budget; times the ranks."""
    if args.samples_per_step:
        return args.samples_per_step
    budget = spec.batch.tokens_per_micro_batch
    per_rank = (
        AUTO_SAMPLES_PER_RANK if budget == "auto" else samples_per_micro_batch(num_visual, args.text_tokens, budget)
    )
    if per_rank < 1:
        raise SystemExit(
            f"--tokens-per-micro-batch {budget} holds no sample of {num_visual} + {args.text_tokens} tokens"
        )
    return per_rank * args.nproc


def run_product_row(
    shape: Shape, num_tokens: int, args: argparse.Namespace, grid: int | None, peak: float | None, cuda: bool
) -> dict:
    """One `cosctl pretrain` run for the row (bench/product_path.py) and its figures."""
    from cosctl.data.conversation import IMAGE_TOKEN
    from cosctl.data.records import length_stats, load_examples, load_tokenizer

    image_size, scales = layout(shape, num_tokens, args, grid)
    name = f"stage-speed-{args.shape}-{num_tokens}-{image_size}px"
    row_dir = Path(args.work) / "rows" / name
    row_dir.mkdir(parents=True, exist_ok=True)
    draft = parse_spec(
        product_spec(shape, image_size, scales, args, name, row_dir, "unused", "unused", 1), source=f"<{name}>"
    )
    num_visual = pretrain_config(draft, shape.vocab_size, shape.image_token_id).num_visual_tokens
    samples = default_samples_per_step(args, draft, num_visual)
    draft = parse_spec(
        product_spec(shape, image_size, scales, args, name, row_dir, "unused", "unused", samples), source=f"<{name}>"
    )
    # One epoch holds every step the run may take: no loader restart among the timed steps.
    data = prepare_data(
        Path(args.work),
        draft.model.image_size,
        draft.batch.samples_per_step * draft.optim.num_steps,
        int(draft.model.text.config.get("vocab_size", shape.vocab_size)),
        seed=draft.run.seed,
    )
    raw = product_spec(shape, image_size, scales, args, name, row_dir, str(data.root), str(data.tokenizer), samples)
    spec = parse_spec(raw, source=f"<{name}>")
    spec_path = row_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    last = args.warmup + args.steps
    print(
        f"[stage_speed] product {num_tokens} tokens at {image_size} px: cosctl pretrain {spec_path} "
        f"(--nproc {args.nproc}, {spec.batch.samples_per_step} samples/step, steps {args.warmup} + {args.steps})",
        flush=True,
    )
    run = run_product(
        spec_path,
        row_dir,
        nproc=args.nproc,
        last_step=last,
        env=child_env(peak),
        run_to_end=args.run_to_end,
        timeout_s=args.row_timeout,
        cuda=cuda,
    )
    steps_done = max((r["step"] for r in run.records), default=0)
    if run.returncode not in (0, STOP_EXIT) or steps_done < last:
        print(run.log_tail(), flush=True)
        return {
            "path": "product",
            "tokens": num_tokens,
            "image_size": image_size,
            "error": f"cosctl pretrain exited {run.returncode} after {steps_done} steps; see {run.log_path}",
        }
    figures = timed_figures(run.records, args.warmup, args.steps)
    log = run.log_path.read_text(errors="replace")
    budget_line = log_value(log, "steps per epoch;") or ""  # "<N> tokens per micro-batch (from the <origin>)"
    budget = int(budget_line.split()[0]) if budget_line[:1].isdigit() else None
    built = log_value(log, "model built in")

    # The FLOPs per sample as the product's StepMeter counts them: the same function on the same inputs.
    tokenizer = load_tokenizer(data.tokenizer)
    config = pretrain_config(spec, len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    examples, _ = load_examples(
        data.root / spec.data.train,
        data.root,
        tokenizer,
        config.num_visual_tokens,
        spec.data.max_text_tokens,
        spec.data.max_bad_fraction,
    )
    flops = sample_flops(
        config,
        length_stats(examples).mean_text_tokens,
        spec.model.trainable,
        gradient_checkpointing=spec.model.gradient_checkpointing,
    )
    first = next(r for r in run.records if r["step"] == args.warmup + 1)
    logged = first["tflops"] * 1e12 * first["step_time_s"] / first["samples"]
    if abs(logged - flops.model) > 1e-6 * flops.model:
        print(
            f"[stage_speed] warning: the product counted {logged:.4g} FLOPs per sample, this script {flops.model:.4g}",
            flush=True,
        )
    data_s = padded_per_sample = padding = computed = None
    if args.data_probe and budget:
        loaded = time_loader(
            examples,
            data.root,
            config.image_size,
            tokenizer.pad_token_id,
            budget,
            spec.batch.samples_per_step,
            spec.run.seed,
            args.nproc,
            args.warmup,
            args.steps,
        )
        data_s = statistics.median(step["seconds"] for step in loaded)
        padded, real = sum(step["padded_tokens"] for step in loaded), sum(step["tokens"] for step in loaded)
        padded_per_sample = padded / sum(step["samples"] for step in loaded)
        padding = 1 - real / padded
        # What the model computes per sample, padding included (the FLOP model at the padded length).
        computed = sample_flops(
            config,
            padded_per_sample - config.num_visual_tokens,
            spec.model.trainable,
            gradient_checkpointing=spec.model.gradient_checkpointing,
        ).hardware
    samples_per_step = figures["samples_per_step"]
    text_tokens = figures["tokens_per_step"] / samples_per_step - config.num_visual_tokens
    predicted = predict_step_seconds(samples_per_step * flops.model, peak, world_size=args.nproc)
    return {
        "path": "product",
        "tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "scales": [f"{s.window}->{s.num_windows(config.grid_size)}x{s.queries_per_window}" for s in config.scales],
        "vocab_size": config.text_config.vocab_size,
        "tokenizer_vocab_size": data.tokenizer_vocab_size,
        "text_tokens": text_tokens,
        "seq_len": config.num_visual_tokens + text_tokens,
        "micro_batch": samples_per_step / args.nproc / figures["micro_batches"],
        **figures,
        "tokens_per_micro_batch": budget,
        "budget_origin": budget_line.rpartition("from the ")[2].rstrip(")") or None,
        "probe": log_line(log, "tokens_per_micro_batch auto ->"),
        "nproc": args.nproc,
        "num_workers": spec.data.num_workers,
        "flops_per_sample": flops.model,
        "hardware_flops_per_sample": flops.hardware,
        "peak_mem_gib": run.peak_device_gib if cuda else run.peak_host_gib,
        "peak_host_gib": run.peak_host_gib,
        "peak_device_gib": run.peak_device_gib,
        "data_s_per_step": data_s,
        "data_share": data_s / figures["s_per_step"] if data_s is not None else None,
        "padded_tokens_per_sample": padded_per_sample,
        "padding_fraction": padding,
        "computed_flops_per_sample": computed,
        "predicted_s_per_step": predicted,
        "predicted_samples_per_s": samples_per_step / predicted if predicted else None,
        "build_s": float(built.split()[0]) if built else None,
        "first_step_s": run.first_step_s,
        "wall_s": run.wall_s,
        "returncode": run.returncode,
        "stopped": run.stopped,
        "spec": str(spec_path),
        "run_dir": str(run.run_dir),
        # A finished run (--run-to-end) also wrote its summary: samples/s over all steps but the first.
        "summary": json.loads(summary.read_text()) if (summary := run.run_dir / "summary.json").is_file() else None,
    }


# ---------------------------------------------------------------------------------------------------
# Report


def _path(row: dict) -> str:
    return row.get("path", "direct")  # reports written before the product path timed direct rows only


def ratios(rows: list[dict]) -> dict:
    """Per path: fill each row's samples/s relative to that path's 336-token row at the highest
    resolution (`ratio_vs_336`), and return 32 vs 336 tokens at each resolution with a 336 row, measured
    and by the FLOP model (which needs no peak: samples/s at a fixed MFU is peak x MFU / FLOPs)."""
    found = {}
    for path in dict.fromkeys(_path(row) for row in rows):
        done = [row for row in rows if _path(row) == path and "error" not in row]
        references = sorted((r for r in done if r["tokens"] == REFERENCE_TOKENS), key=lambda r: r["image_size"])
        for row in done:
            row["ratio_vs_336"] = row["samples_per_s"] / references[-1]["samples_per_s"] if references else None
        base = next((row for row in done if row["tokens"] == 32), None)
        found[path] = (
            {}
            if base is None
            else {
                str(ref.get("resolution", ref["image_size"])): {
                    "measured": base["samples_per_s"] / ref["samples_per_s"],
                    "flop_model": ref["flops_per_sample"] / base["flops_per_sample"],
                }
                for ref in references
            }
        )
    return found


def _pairs(rows: list[dict]) -> dict[str, dict]:
    """{"TOKENS/RESOLUTION": {"product": row, "direct": row}} for the rows that have both paths."""
    by_row: dict[str, dict] = {}
    for row in rows:
        if "error" not in row:
            by_row.setdefault(f"{row['tokens']}/{row.get('resolution', row['image_size'])}", {})[_path(row)] = row
    return {key: paths for key, paths in by_row.items() if {"product", "direct"} <= set(paths)}


def path_gaps(rows: list[dict]) -> dict:
    """Product samples/s over the direct row's, per TOKENS/RESOLUTION that has both."""
    return {
        key: paths["product"]["samples_per_s"] / paths["direct"]["samples_per_s"] for key, paths in _pairs(rows).items()
    }


def gap_accounting(rows: list[dict]) -> list[dict]:
    """Per TOKENS/RESOLUTION with both paths: the product step next to what the direct row predicts for
    it, rank 0's share of the step's samples at the direct row's time per sample, scaled by the FLOPs
    the padding adds, plus the data loading timed alone (in the step when `data.num_workers` is 0).
    `explained` is that prediction over the product's step time: 1 when padding and data account for
    the whole gap."""
    found = []
    for key, paths in _pairs(rows).items():
        product, direct = paths["product"], paths["direct"]
        if product.get("data_s_per_step") is None:
            continue
        per_sample = direct["s_per_step"] / direct["micro_batch"]
        samples = product["samples_per_step"] / product.get("nproc", 1)
        padding = product["computed_flops_per_sample"] / product["hardware_flops_per_sample"]
        in_step = product["data_s_per_step"] if product.get("num_workers", 0) == 0 else 0.0
        predicted = per_sample * samples * padding + in_step
        found.append(
            {
                "row": key,
                "product_s": product["s_per_step"],
                "direct_s": per_sample * samples,
                "padding_flops": padding,
                "data_s": product["data_s_per_step"],
                "predicted_s": predicted,
                "explained": predicted / product["s_per_step"],
            }
        )
    return found


def update_ratios(report: dict) -> None:
    report["ratios"] = ratios(report["rows"])
    report["product_vs_direct"] = path_gaps(report["rows"])
    report["gap"] = gap_accounting(report["rows"])
    # The first path's 32 vs the 336 row at the highest resolution (the keys every report has had).
    first = next(iter(report["ratios"].values()), {})
    top = first[max(first, key=int)] if first else {}
    report["ratio_32_vs_336"], report["flop_ratio_32_vs_336"] = top.get("measured"), top.get("flop_model")


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| path | tokens | px | text | samples/step | micro | ub | s/step | samples/s | tokens/s | TFLOP/s | MFU | HFU "
        "| peak GiB | data s | pred s/step | x336 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        path = _path(r) + (" (matched)" if r.get("matched") else "")
        if "error" in r:
            lines.append(f"| {path} | {r['tokens']} | {r.get('image_size', '-')} | {r['error']} |" + " |" * 13)
            continue
        lines.append(
            f"| {path} | {r['tokens']} | {r['image_size']} | {_cell(r.get('text_tokens'), '.3g')} | "
            f"{_cell(r.get('samples_per_step', r['micro_batch']), '.4g')} | {r['micro_batch']:.4g} | "
            f"{_cell(r.get('micro_batches', 1), '.3g')} | {r['s_per_step']:.4g} | {r['samples_per_s']:.4g} | "
            f"{r['tokens_per_s']:.4g} | {r['tflops']:.3g} | {_cell(r['mfu'], '.1%')} | {_cell(r.get('hfu'), '.1%')} | "
            f"{_cell(r['peak_mem_gib'], '.2f')} | {_cell(r.get('data_s_per_step'), '.3g')} | "
            f"{_cell(r['predicted_s_per_step'], '.3g')} | {_cell(r.get('ratio_vs_336'), '.2f')} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import deepspeed
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }


def write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------------
# Command line


def token_list(text: str) -> list[int]:
    tokens = [int(part) for part in text.split(",") if part.strip()]
    unknown = sorted(set(tokens) - set(SUPPORTED_TOKENS))
    if not tokens or unknown:
        raise argparse.ArgumentTypeError(f"token counts must come from {list(SUPPORTED_TOKENS)}, got {text!r}")
    return tokens


def row_list(text: str) -> list[tuple[int, int]]:
    """TOKENS/RESOLUTION items -> (tokens, patch grid); a bare TOKENS takes its default resolution."""
    rows = []
    for part in (p.strip() for p in text.split(",")):
        tokens, slash, resolution = part.partition("/")
        if not tokens.isdigit() or (slash and not (resolution.isdigit() and int(resolution) in RESOLUTION_GRIDS)):
            raise argparse.ArgumentTypeError(f"rows are TOKENS/RESOLUTION (resolution 224, 336 or 448), got {part!r}")
        rows.append((int(tokens), RESOLUTION_GRIDS[int(resolution)] if slash else default_grid(int(tokens))))
    return rows


def budget_arg(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or auto, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--path",
        choices=list(PATHS),
        default="product",
        help="product: each row is a `cosctl pretrain` run (default); direct: the model and engine "
        "in this process on one repeated synthetic micro-batch; both: the product row, then a "
        "direct row matched to it",
    )
    parser.add_argument(
        "--rows",
        type=row_list,
        help=f"TOKENS/RESOLUTION rows, comma-separated, run in this order (default {DEFAULT_ROWS})",
    )
    parser.add_argument(
        "--tokens",
        type=token_list,
        help="visual-token counts at their default resolutions (32 at 224, 576 at 336, others at "
        "448), instead of --rows",
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=64,
        help="text tokens per sample of a direct row, and what the default product step is sized "
        "for (default 64; the synthetic records have their own lengths)",
    )
    parser.add_argument(
        "--tokens-per-micro-batch",
        type=budget_arg,
        help="token budget per micro-batch, or auto to probe the largest that fits "
        "(default per shape: tiny 2048, 1b 18432, 7b 6144)",
    )
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default per shape)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default per shape)")
    trains = parser.add_mutually_exclusive_group()
    trains.add_argument(
        "--llm-trainable", dest="llm_trainable", action="store_true", help="train the LLM too (default for tiny and 1b)"
    )
    trains.add_argument(
        "--llm-frozen",
        dest="llm_trainable",
        action="store_false",
        help="train only the bridge (default for 7b, the paper's pre-training)",
    )
    parser.set_defaults(llm_trainable=None)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU and predictions")
    parser.add_argument("--measure-peak", action="store_true", help="measure the matmul peak first and use it")
    parser.add_argument(
        "--build-on",
        choices=["device", "cpu"],
        default="device",
        help="direct rows: materialise the model on the device in its training dtype (default) or on the host",
    )
    parser.add_argument("--nproc", type=int, default=1, help="product rows: local ranks (cosctl --nproc; default 1)")
    parser.add_argument(
        "--samples-per-step",
        type=int,
        help="product rows: samples per optimizer step over all ranks (default: per rank, what the "
        "token budget holds at --text-tokens, or 256 with an auto budget)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=WORK,
        help=f"product rows: specs, runs and the synthetic sets cached per resolution (default {WORK})",
    )
    parser.add_argument(
        "--run-to-end",
        action="store_true",
        help="product rows: let each run finish (final checkpoint, published model, summary.json) "
        "instead of stopping it after the last timed step",
    )
    parser.add_argument(
        "--no-data-probe",
        dest="data_probe",
        action="store_false",
        help="product rows: skip timing the data loading alone after each run",
    )
    parser.add_argument(
        "--row-timeout",
        type=float,
        default=3600.0,
        help="product rows: kill a run after this many seconds (default 3600)",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of every row's spec, as `cosctl --set` does (repeatable), e.g. deepspeed.template=zero2",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="direct rows: after the timed steps, profile two more and print the top operators",
    )
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the table of an earlier --json file (say, of a run cut off by a time limit)",
    )
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    for name in ("tokens_per_micro_batch", "warmup", "steps", "llm_trainable"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    if args.steps < 1 or args.warmup < 0 or args.text_tokens < 1 or args.nproc < 1:
        parser.error("--steps and --nproc must be >= 1, --warmup >= 0 and --text-tokens >= 1")
    if args.samples_per_step is not None and args.samples_per_step < args.nproc:
        parser.error("--samples-per-step must be at least --nproc (one sample per rank)")
    if args.rows is not None and args.tokens is not None:
        parser.error("give --rows or --tokens, not both")
    if args.rows is None:
        args.rows = [(t, default_grid(t)) for t in args.tokens] if args.tokens is not None else row_list(DEFAULT_ROWS)
    for tokens, grid in args.rows:
        try:
            layout(shape, tokens, args, grid)
        except ValueError as err:
            parser.error(str(err))
    return args


def resolve_peak(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "given"
    if args.measure_peak:
        return measure_matmul_tflops(device), "measured matmul"
    peak = peak_tflops(device)
    return peak, ("datasheet or COSCTL_PEAK_TFLOPS" if peak else "unknown")


def quiet_logs() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecated collectives, every step
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _row_line(row: dict) -> str:
    if row["path"] == "product":
        data = row["data_s_per_step"]
        return (
            f"{row['samples_per_step']:.4g} samples/step in {row['micro_batches']:.3g} micro-batches "
            f"(mean text {row['text_tokens']:.1f} tokens), {row['s_per_step']:.4g} s/step "
            f"(loop {_cell(row['loop_s_per_step'], '.4g')} s), {row['samples_per_s']:.4g} samples/s, "
            f"data alone {_cell(data, '.3g')} s/step, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, "
            f"build {_cell(row['build_s'], '.1f')} s, step 1 done {_cell(row['first_step_s'], '.1f')} s "
            f"after launch"
        )
    matched = f" (matched: {row['text_tokens']} text tokens, vocab {row['vocab_size']})" if row["matched"] else ""
    return (
        f"micro {row['micro_batch']}{matched}, {row['s_per_step']:.4g} s/step, {row['samples_per_s']:.4g} "
        f"samples/s, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, build {row['build_s']:.1f} s "
        f"+ engine {row['engine_s']:.1f} s"
    )


def run_rows(args: argparse.Namespace, dist_info, device: torch.device, report: dict) -> None:
    """Every row in order, each path in turn (the product first); a direct row that runs out of
    memory and a product run that fails are recorded, and the next row still runs."""
    shape = SHAPES[args.shape]
    resolutions = {grid: resolution for resolution, grid in RESOLUTION_GRIDS.items()}
    for num_tokens, grid in args.rows:
        size = layout(shape, num_tokens, args, grid)[0]
        product = None
        for path in PATHS[args.path]:
            if path == "product":
                row = run_product_row(shape, num_tokens, args, grid, report["peak_tflops"], device.type == "cuda")
                product = None if "error" in row else row
            else:
                try:
                    row = run_row(shape, num_tokens, args, dist_info, report["peak_tflops"], grid, match=product)
                except torch.OutOfMemoryError as err:
                    row = {
                        "path": "direct",
                        "tokens": num_tokens,
                        "image_size": size,
                        "error": f"out of memory: {str(err).splitlines()[0]}",
                    }
                if "error" in row:
                    release_memory(device)  # after the except block, so its traceback no longer pins the engine
            row["resolution"] = resolutions.get(grid)
            if "error" in row:
                print(f"[stage_speed] {path} {num_tokens} tokens at {size} px: {row['error']}", flush=True)
            else:
                print(f"[stage_speed] {path} {num_tokens} tokens at {size} px: {_row_line(row)}", flush=True)
            report["rows"].append(row)
            update_ratios(report)
            write_report(args.json, report)


def print_report(report: dict) -> None:
    print(format_table(report["rows"]))
    found = report.get("ratios")
    if found is None:  # a report from before the product path
        found = {
            "direct": {"448": {"measured": report["ratio_32_vs_336"], "flop_model": report["flop_ratio_32_vs_336"]}}
        }
    for path, by_resolution in found.items():
        for resolution, pair in by_resolution.items():
            print(
                f"samples/s 32 vs 336 at {resolution} ({path}): {_cell(pair['measured'], '.2f')}x measured, "
                f"{_cell(pair['flop_model'], '.2f')}x by the FLOP model"
            )
    gaps = report.get("product_vs_direct") or {}
    if gaps:
        print("samples/s, product over direct: " + ", ".join(f"{key} {value:.2f}" for key, value in gaps.items()))
    if report.get("gap"):
        print(
            "\n| row | product s/step | direct s/step, same samples | x padding FLOPs | + data alone | = predicted "
            "| predicted / product |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for g in report["gap"]:
            print(
                f"| {g['row']} | {g['product_s']:.4g} | {g['direct_s']:.4g} | {g['padding_flops']:.3f} | "
                f"{g['data_s']:.3g} | {g['predicted_s']:.4g} | {g['explained']:.2f} |"
            )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report = json.loads(args.report.read_text())
        print_report(report)
        return report
    # Before DeepSpeed's first import, which otherwise guesses the accelerator and warns about it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    quiet_logs()
    paths = PATHS[args.path]
    dist_info = None
    if "direct" in paths:  # direct rows run in this process: one rank of its own
        dist_info = init_distributed()
        device = dist_info.device
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peak, peak_source = resolve_peak(args, device)
    release_memory(device)
    report = {
        "shape": args.shape,
        "path": args.path,
        "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "text_tokens": args.text_tokens,
        "tokens_per_micro_batch": args.tokens_per_micro_batch,
        "llm_trainable": args.llm_trainable,
        "build_on": "cpu" if device.type == "cpu" else args.build_on,
        "warmup": args.warmup,
        "steps": args.steps,
        "nproc": args.nproc,
        "samples_per_step": args.samples_per_step,
        "overrides": args.overrides,
        "work": str(args.work),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "assumed_mfu": ASSUMED_MFU,
        "rows": [],
        "ratios": {},
        "product_vs_direct": {},
        "gap": [],
        "ratio_32_vs_336": None,
        "flop_ratio_32_vs_336": None,
        "complete": False,
    }
    print(
        f"[stage_speed] {args.shape} on {report['device']}; peak {_cell(peak, '.4g')} TFLOP/s ({peak_source}); "
        f"path {args.path}",
        flush=True,
    )
    run_rows(args, dist_info, device, report)
    report["complete"] = True
    write_report(args.json, report)
    print_report(report)
    return report


if __name__ == "__main__":
    main()
