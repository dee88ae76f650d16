"""Stage speed: ZeRO-3 pre-training samples/s at several visual-token counts, same model, same machine,
one run (docs/design.md §8: the 32-token stage against a 336-token one).

For each token count the script builds the real model with `cosctl.engine.build_pretrain_model` from
a `PretrainSpec` (a dict through `parse_spec`), wraps it with `cosctl.engine.build_engine` (the zero3
template resolved from the spec: ZeRO-3, bf16 + nccl on GPU, fp32 + gloo on CPU) and times
`cosctl.train.train_step` itself (forward -> engine.backward -> engine.step, loss and counts
all-reduced). A micro-batch holds as many samples as the spec's token budget allows,
`samples_per_micro_batch(visual, text, tokens_per_micro_batch)`, so fewer visual tokens mean more
samples per step; with `--tokens-per-micro-batch auto` the budget is what `cosctl.autobatch` probes
on the row's engine, as `cosctl pretrain` does. `--set KEY=VALUE` changes any key of every row's spec
(the way variants such as `deepspeed.template=zero2` are compared). The engine is measured, not the
data pipeline: one synthetic micro-batch (`cosctl.autobatch.synthetic_micro_batch`: random pixels and
token ids, on the host as the loader hands it over) is built once and fed every step.

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
    tiny  ViT width 64, 3 blocks, patch 4 + LLaMA width 128, 2 layers (CPU/CI-sized); LLM trained
    1b    CLIP ViT-L/14 + TinyLlama-1.1B shape (2048 wide, 22 layers, 32/4 heads); LLM trained
    7b    CLIP ViT-L/14 + Vicuna-7B shape; LLM frozen, only the bridge trains (the paper's pre-training)

Columns: s/step is the median of the timed steps (the JSON keeps each step and the mean); tokens/s
counts visual + text tokens; TFLOP/s and MFU use the model FLOPs of `cosctl.metrics.sample_flops` (LLM
6·N per token trained, 4·N frozen under the trained bridge, ViT forward, resampler 6·N, attention;
docs/design.md §8), HFU the hardware FLOPs (+ the LLM forward recomputed under
`--gradient-checkpointing`); peak memory is the GPU's max allocated or, on CPU, the process's peak RSS
during the row; "pred s/step" is the model FLOPs over peak x `cosctl.metrics.ASSUMED_MFU` (the
prediction `cosctl plan` prints); "x336" is the row's samples/s over the 336-token row's at 448 (or,
without it, any 336-token row's). The peak is `--peak-tflops`, else a measured matmul peak with
`--measure-peak`, else `cosctl.metrics.peak_tflops` (the card's datasheet bf16 peak; none on CPU).

Models are built straight on the GPU in the training dtype (`--build-on device`), so the 7b shape does
not initialise 7B fp32 parameters on the host first; `--build-on cpu` is the path `cosctl pretrain`
takes. bench/README.md says why `deepspeed.zero.Init` is not used.

    python bench/stage_speed.py --shape tiny --measure-peak --json tiny.json
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

from cos_model import DEFAULT_SCALES, PRESETS, CosConfig, inflate_config
from cos_model.configuration import VIT_L14_224
from cosctl.autobatch import MemoryMeter, probe_micro_batch, synthetic_micro_batch
from cosctl.batching import samples_per_micro_batch
from cosctl.deepspeed_config import use_bf16
from cosctl.dist import init_distributed
from cosctl.engine import build_engine, build_pretrain_model, num_params, trainable_summary
from cosctl.metrics import ASSUMED_MFU, peak_tflops, predict_step_seconds, sample_flops
from cosctl.spec import PretrainSpec, apply_overrides, parse_spec
from cosctl.train import train_step

REFERENCE_TOKENS = 336
BASE_GRID = 16  # patches per side of the 32-token pre-training chain
# Token count -> the preset that inflates the 32-token chain to it (on the doubled grid).
INFLATE_PRESETS = {
    sum(scale.num_tokens(2 * BASE_GRID) for scale in preset.scales): name
    for name, preset in PRESETS.items() if preset.source_tokens == 32
}
LLAVA_TOKENS, LLAVA_GRID = 576, 24
# Resolutions as ViT-L/14 has them -> patch grids (every shape keeps the grid at its own patch size).
RESOLUTION_GRIDS = {224: 16, 336: 24, 448: 32}
DEFAULT_ROWS = "32/224,336/224,336/448,528/448"
SUPPORTED_ROWS = [(32, 224), *((t, r) for r in (224, 448) for t in INFLATE_PRESETS), (LLAVA_TOKENS, 336)]

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
        vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                "patch_size": 4},
        text={"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 1024},
        feature_layers=(1, 2), resampler_num_heads=4,
        tokens_per_micro_batch=2048, llm_trainable=True, warmup=3, steps=10,
    ),
    "1b": Shape(  # TinyLlama-1.1B: ~192 samples per micro-batch at 32 + 64 tokens
        vision=VIT_L14,
        text={"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
              "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
        feature_layers=(15, 22), resampler_num_heads=16,
        tokens_per_micro_batch=192 * 96, llm_trainable=True, warmup=3, steps=10,
    ),
    "7b": Shape(  # Vicuna-7B: the paper's micro-batches 64 / 16 / 10; this budget gives 64 / 15 / 10
        vision=VIT_L14,
        text={"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        feature_layers=(15, 22), resampler_num_heads=16,
        tokens_per_micro_batch=64 * 96, llm_trainable=False, warmup=2, steps=6,
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
        base = row_spec(shape, 32, args).model.to_config(shape.vocab_size, shape.image_token_id)
        inflated = inflate_config(base, INFLATE_PRESETS[num_tokens])
        return inflated.image_size, [s.to_dict() for s in inflated.scales]
    if num_tokens in INFLATE_PRESETS and grid == BASE_GRID:  # the preset with every window halved
        scales = PRESETS[INFLATE_PRESETS[num_tokens]].scales
        return BASE_GRID * patch, [{"window": s.window // 2, "queries_per_window": s.queries_per_window}
                                   for s in scales]
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


def build_model(spec: PretrainSpec, shape: Shape, device: torch.device, build_on: str) -> torch.nn.Module:
    """`build_pretrain_model`, on the host (as `cosctl pretrain` does) or materialised on the device in
    the training dtype, which skips initialising billions of fp32 values on the CPU."""
    if build_on == "cpu" or device.type == "cpu":
        return build_pretrain_model(spec, shape.vocab_size, shape.image_token_id)
    dtype = torch.bfloat16 if use_bf16(spec.deepspeed.precision, device.type) else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return build_pretrain_model(spec, shape.vocab_size, shape.image_token_id)
    finally:
        torch.set_default_dtype(previous)


class RepeatedMicroBatch:
    """Stands in for `cosctl.batching.StepLoader`: every step is the same single micro-batch."""

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


def run_row(shape: Shape, num_tokens: int, args: argparse.Namespace, dist_info, peak: float | None,
            grid: int | None = None) -> dict:
    """Build, wrap and time one row; free everything before returning its measurements."""
    spec = row_spec(shape, num_tokens, args, grid)
    config = spec.model.to_config(vocab_size=shape.vocab_size, image_token_id=shape.image_token_id)
    budget, device = spec.batch.tokens_per_micro_batch, dist_info.device
    micro = 1 if budget == "auto" else samples_per_micro_batch(config.num_visual_tokens, args.text_tokens, budget)
    if micro < 1:
        raise SystemExit(f"--tokens-per-micro-batch {budget} holds no sample of "
                         f"{config.num_visual_tokens} + {args.text_tokens} tokens")
    reset_peak_memory(device)
    start = time.perf_counter()
    model = build_model(spec, shape, device, args.build_on)
    built = time.perf_counter()
    total = num_params(model.parameters())
    engine = None
    try:
        engine, _, _ = build_engine(model, spec, dist_info, micro)
        ready = time.perf_counter()
        if budget == "auto":
            probe = probe_micro_batch(engine, config, args.text_tokens, memory_fraction=spec.batch.memory_fraction,
                                      max_tokens=spec.batch.max_tokens_per_micro_batch, max_samples=1 << 20,
                                      device=device)
            print(f"[stage_speed] {num_tokens} tokens: {probe.summary()}", flush=True)
            micro = probe.num_samples
            reset_peak_memory(device)
        probed = time.perf_counter()
        trainable = sum(trainable_summary(engine.module).values())
        loader = RepeatedMicroBatch(synthetic_micro_batch(config, micro, args.text_tokens), micro)
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
    return row_metrics(config, micro, args.text_tokens, seconds, peak, peak_mem, spec) | {
        "trainable_params": trainable, "total_params": total, "first_loss": losses[0], "last_loss": losses[-1],
        "build_s": built - start, "engine_s": ready - built, "probe_s": probed - ready,
        "mem_after_row_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def row_metrics(config: CosConfig, micro: int, text_tokens: int, seconds: list[float], peak: float | None,
                peak_mem: float, spec: PretrainSpec) -> dict:
    # The median, not the mean: a step slowed by another process on a shared machine should not count.
    step_s = statistics.median(seconds)
    flops = sample_flops(config, text_tokens, spec.model.trainable,
                         gradient_checkpointing=spec.model.gradient_checkpointing)
    tflops = micro * flops.model / step_s / 1e12
    hardware_tflops = micro * flops.hardware / step_s / 1e12
    predicted = predict_step_seconds(micro * flops.model, peak)
    return {
        "tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "scales": [f"{s.window}->{s.num_windows(config.grid_size)}x{s.queries_per_window}" for s in config.scales],
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
# Report


def ratios(rows: list[dict]) -> tuple[float | None, float | None]:
    """Fill each row's samples/s relative to the 336 row; return (measured, FLOP-model) 32-vs-336."""
    rows = [row for row in rows if "error" not in row]
    # The reference is the 336-token row at the highest resolution (448: the fine-tuning model's).
    references = sorted((row for row in rows if row["tokens"] == REFERENCE_TOKENS), key=lambda r: r["image_size"])
    reference = references[-1] if references else None
    for row in rows:
        row["ratio_vs_336"] = row["samples_per_s"] / reference["samples_per_s"] if reference else None
    base = next((row for row in rows if row["tokens"] == 32), None)
    if reference is None or base is None:
        return None, None
    # FLOP-model samples/s is peak x MFU / FLOPs per sample, so its ratio needs no peak.
    return base["ratio_vs_336"], reference["flops_per_sample"] / base["flops_per_sample"]


def _cell(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| tokens | px | micro | s/step | samples/s | tokens/s | TFLOP/s | MFU | HFU | peak GiB | pred s/step | x336 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r.get('image_size', '-')} | {r['error']} |" + " |" * 9)
            continue
        lines.append(
            f"| {r['tokens']} | {r['image_size']} | {r['micro_batch']} | {r['s_per_step']:.4g} | "
            f"{r['samples_per_s']:.4g} | {r['tokens_per_s']:.4g} | {r['tflops']:.3g} | {_cell(r['mfu'], '.1%')} | "
            f"{_cell(r.get('hfu'), '.1%')} | {r['peak_mem_gib']:.2f} | {_cell(r['predicted_s_per_step'], '.3g')} | "
            f"{_cell(r.get('ratio_vs_336'), '.2f')} |"
        )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def versions() -> dict:
    import deepspeed
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__}


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
    parser.add_argument("--rows", type=row_list,
                        help=f"TOKENS/RESOLUTION rows, comma-separated, run in this order (default {DEFAULT_ROWS})")
    parser.add_argument("--tokens", type=token_list,
                        help="visual-token counts at their default resolutions (32 at 224, 576 at 336, others at "
                             "448), instead of --rows")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (default 64)")
    parser.add_argument("--tokens-per-micro-batch", type=budget_arg,
                        help="token budget per micro-batch, or auto to probe the largest that fits "
                             "(default per shape: tiny 2048, 1b 18432, 7b 6144)")
    parser.add_argument("--warmup", type=int, help="untimed steps per row (default per shape)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default per shape)")
    trains = parser.add_mutually_exclusive_group()
    trains.add_argument("--llm-trainable", dest="llm_trainable", action="store_true",
                        help="train the LLM too (default for tiny and 1b)")
    trains.add_argument("--llm-frozen", dest="llm_trainable", action="store_false",
                        help="train only the bridge (default for 7b, the paper's pre-training)")
    parser.set_defaults(llm_trainable=None)
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU and predictions")
    parser.add_argument("--measure-peak", action="store_true", help="measure the matmul peak first and use it")
    parser.add_argument("--build-on", choices=["device", "cpu"], default="device",
                        help="materialise the model on the device in its training dtype (default) or on the host")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every row's spec, as `cosctl --set` does (repeatable), "
                             "e.g. deepspeed.template=zero2")
    parser.add_argument("--profile", action="store_true",
                        help="after each row's timed steps, profile two more and print the top operators")
    parser.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="only print the table of an earlier --json file (say, of a run cut off by a time limit)")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    for name in ("tokens_per_micro_batch", "warmup", "steps", "llm_trainable"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(shape, name))
    if args.steps < 1 or args.warmup < 0 or args.text_tokens < 1:
        parser.error("--steps must be >= 1, --warmup >= 0 and --text-tokens >= 1")
    if args.rows is not None and args.tokens is not None:
        parser.error("give --rows or --tokens, not both")
    if args.rows is None:
        args.rows = ([(t, default_grid(t)) for t in args.tokens] if args.tokens is not None
                     else row_list(DEFAULT_ROWS))
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


def run_rows(args: argparse.Namespace, dist_info, report: dict) -> None:
    """Every token count in order; an out-of-memory row is recorded and the next one still runs."""
    shape, device = SHAPES[args.shape], dist_info.device
    for num_tokens, grid in args.rows:
        size = layout(shape, num_tokens, args, grid)[0]
        try:
            row = run_row(shape, num_tokens, args, dist_info, report["peak_tflops"], grid)
        except torch.OutOfMemoryError as err:
            row = {"tokens": num_tokens, "image_size": size, "error": f"out of memory: {str(err).splitlines()[0]}"}
        if "error" in row:
            release_memory(device)  # after the except block, so its traceback no longer pins the engine
            print(f"[stage_speed] {num_tokens} tokens at {size} px: {row['error']}", flush=True)
        else:
            print(f"[stage_speed] {num_tokens} tokens at {size} px: micro {row['micro_batch']}, "
                  f"{row['s_per_step']:.4g} s/step, "
                  f"{row['samples_per_s']:.4g} samples/s, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, "
                  f"build {row['build_s']:.1f} s + engine {row['engine_s']:.1f} s", flush=True)
        report["rows"].append(row)
        report["ratio_32_vs_336"], report["flop_ratio_32_vs_336"] = ratios(report["rows"])
        write_report(args.json, report)


def print_report(report: dict) -> None:
    print(format_table(report["rows"]))
    print(f"samples/s 32 vs 336: {_cell(report['ratio_32_vs_336'], '.2f')}x measured, "
          f"{_cell(report['flop_ratio_32_vs_336'], '.2f')}x by the FLOP model")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report = json.loads(args.report.read_text())
        print_report(report)
        return report
    # Before DeepSpeed's first import, which otherwise guesses the accelerator and warns about it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    quiet_logs()
    dist_info = init_distributed()
    device = dist_info.device
    peak, peak_source = resolve_peak(args, device)
    report = {
        "shape": args.shape, "device": device_name(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "versions": versions(), "text_tokens": args.text_tokens,
        "tokens_per_micro_batch": args.tokens_per_micro_batch, "llm_trainable": args.llm_trainable,
        "build_on": "cpu" if device.type == "cpu" else args.build_on, "warmup": args.warmup, "steps": args.steps,
        "peak_tflops": peak, "peak_source": peak_source, "assumed_mfu": ASSUMED_MFU, "rows": [],
        "ratio_32_vs_336": None, "flop_ratio_32_vs_336": None, "complete": False,
    }
    print(f"[stage_speed] {args.shape} on {report['device']}; peak {_cell(peak, '.4g')} TFLOP/s ({peak_source})",
          flush=True)
    run_rows(args, dist_info, report)
    report["complete"] = True
    write_report(args.json, report)
    print_report(report)
    return report


if __name__ == "__main__":
    main()
