"""Engine step: the lower bound a stage-speed row of the product (bench/stage_speed.py) is compared
with: the DeepSpeed engine alone, on the same rows, model and machine.

For each row (the same options as stage_speed.py; rows and shapes: bench/rows.py) it builds the model in
this process (`cosctl.stages.pretrain.build_pretrain_model` from the row's spec, on the GPU in the training
dtype, or on the host as `cosctl pretrain` does with `--build-on cpu`), wraps it with
`cosctl.train.engine.build_engine` (the spec's template: ZeRO-3, bf16 + nccl on GPU, fp32 + gloo on CPU)
and times `cosctl.train.loop.train_step` (forward -> backward -> step, loss and counts all-reduced) on
one synthetic micro-batch (`cosctl.train.autobatch.synthetic_micro_batch`: random pixels and token ids)
built once and fed every step: no data loading, no padding, no loop around the step. A micro-batch
holds what the token budget holds at `--text-tokens` per sample; one micro-batch is one step.

`--match JSON` (a stage_speed.py report) sizes each row as the product row of the same TOKENS/RESOLUTION:
its LLM vocabulary, its mean text tokens per sample (rounded) and its samples per micro-batch, so both
count the same model FLOPs per sample; "/ product" is then the product's samples/s per rank over this
row's: how close the product comes to its engine. Figures: the median step time of the timed steps, and
from it samples/s, tokens/s, TFLOP/s, MFU and HFU (`cosctl.plan.flops.sample_flops`); peak GiB is
the process's peak as the product counts it (reserved GPU memory, or peak RSS on CPU).

    python bench/stage_speed.py --shape 1b --rows 32/224,336/448 --json product.json
    python bench/engine_step.py --shape 1b --rows 32/224,336/448 --match product.json --json engine.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import common
import rows
import torch

from cosctl.common.dist import init_distributed
from cosctl.plan.flops import sample_flops
from cosctl.plan.resolve import samples_per_micro_batch
from cosctl.stages.base import run_dtype
from cosctl.stages.pretrain import build_pretrain_model, pretrain_config
from cosctl.train.autobatch import MemoryMeter, synthetic_micro_batch
from cosctl.train.engine import build_engine
from cosctl.train.loop import train_step

COLUMNS = [*rows.COLUMNS, ("/ product", "product_over_engine", ".2f")]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(engine, batch: dict, args: argparse.Namespace, device: torch.device) -> tuple[list, list]:
    """Seconds of each timed step (after the warm-up ones) and every step's loss."""
    seconds, losses = [], []
    engine.train()
    for _ in range(args.warmup + args.steps):
        synchronize(device)
        start = time.perf_counter()
        losses.append(train_step(engine, [batch], device).loss)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds[args.warmup :], losses


def run_row(shape: rows.Shape, num_tokens: int, grid: int, args, dist_info, peak, product: dict | None) -> dict:
    """Build, wrap and time one row; free everything before returning its figures."""
    spec, device = rows.row_spec(shape, num_tokens, args, grid), dist_info.device
    vocab = product["vocab_size"] if product else shape.vocab_size
    text = max(1, round(product["text_tokens"])) if product else args.text_tokens
    config = pretrain_config(spec, vocab_size=vocab, image_token_id=vocab - 1)
    budget = spec.batch.tokens_per_micro_batch
    micro = max(1, round(product["micro_batch"])) if product else samples_per_micro_batch(num_tokens, text, budget)
    if micro < 1:
        raise SystemExit(f"--tokens-per-micro-batch {budget} holds no sample of {num_tokens} + {text} tokens")
    meter = MemoryMeter(device)
    meter.reset()
    start = time.perf_counter()
    with device if args.build_on == "device" else torch.device("cpu"):
        model = build_pretrain_model(spec, vocab, vocab - 1, run_dtype(spec, device.type))
    built, engine = time.perf_counter() - start, None
    try:
        engine, _, _ = build_engine(model, spec, dist_info, micro)
        batch = {**synthetic_micro_batch(config, micro, text), "num_samples": micro}
        seconds, losses = time_steps(engine, batch, args, device)
        peak_mem = meter.peak_gib()
    finally:  # also after an out-of-memory error, so the next row starts from an empty device
        if engine is not None:
            engine.destroy()
        common.forget_module(model)
        del engine, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # The median, not the mean: a step slowed by another process on a shared machine should not count.
    step_s = statistics.median(seconds)
    flops = sample_flops(config, text, spec.model.trainable, gradient_checkpointing=spec.model.gradient_checkpointing)
    tflops, hardware = micro * flops.model / step_s / 1e12, micro * flops.hardware / step_s / 1e12
    row = {
        "tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "resolution": rows.resolution_of(grid),
        "vocab_size": vocab,
        "text_tokens": text,
        "seq_len": config.num_visual_tokens + text,
        "micro_batch": micro,
        "samples_per_step": micro,
        "micro_batches": 1,
        "s_per_step": step_s,
        "s_per_step_mean": statistics.fmean(seconds),
        "step_times_s": seconds,
        "samples_per_s": micro / step_s,
        "tokens_per_s": micro * (config.num_visual_tokens + text) / step_s,
        "flops_per_sample": flops.model,
        "hardware_flops_per_sample": flops.hardware,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "hfu": hardware / peak if peak else None,
        "peak_mem_gib": peak_mem,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "build_s": built,
        **rows.prediction(micro, flops.model, peak),
    }
    if product:
        row["product_over_engine"] = product["samples_per_s"] / product.get("nproc", 1) / row["samples_per_s"]
    return row


def row_line(row: dict) -> str:
    return (
        f"micro {row['micro_batch']} ({row['text_tokens']} text tokens, vocab {row['vocab_size']}), "
        f"{row['s_per_step']:.4g} s/step, {row['samples_per_s']:.4g} samples/s, loss {row['first_loss']:.3f} -> "
        f"{row['last_loss']:.3f}, build {row['build_s']:.1f} s"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows.add_row_arguments(parser)
    parser.add_argument("--match", type=Path, metavar="JSON", help="size each row as this stage_speed report's row")
    parser.add_argument(
        "--build-on", choices=["device", "cpu"], default="device", help="where the model is built (default device)"
    )
    args = rows.finish_row_arguments(parser, parser.parse_args(argv))
    if args.tokens_per_micro_batch == "auto" and not args.match and not args.report:
        parser.error("an auto budget needs --match (the product probes it; its rows carry the micro-batch)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report = json.loads(args.report.read_text())
        rows.print_report(report, COLUMNS)
        return report
    products = {}
    if args.match:
        matched = json.loads(args.match.read_text())
        if matched.get("shape") != args.shape:
            raise SystemExit(f"--match {args.match}: rows of the {matched.get('shape')} shape, not {args.shape}")
        products = {(r["tokens"], r["image_size"]): r for r in matched["rows"] if "error" not in r}
    # Before DeepSpeed's first import, which otherwise guesses the accelerator and warns about it.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    dist_info = init_distributed()  # one rank of its own
    common.quiet_logs()
    peak, peak_source = rows.resolve_peak(args, dist_info.device)
    build_on = "cpu" if dist_info.device.type == "cpu" else args.build_on
    report = rows.new_report(
        args, dist_info.device, peak, peak_source, match=args.match and str(args.match), build_on=build_on
    )

    def time_row(shape: rows.Shape, num_tokens: int, grid: int) -> dict:
        image_size = rows.layout(shape, num_tokens, grid)[0]
        product = products.get((num_tokens, image_size))
        if args.match and product is None:
            return {"tokens": num_tokens, "image_size": image_size, "error": f"no product row in {args.match}"}
        try:
            return run_row(shape, num_tokens, grid, args, dist_info, peak, product)
        except torch.OutOfMemoryError as err:
            return {"tokens": num_tokens, "image_size": image_size, "error": str(err).splitlines()[0]}

    return rows.record_rows(args, report, time_row, row_line, COLUMNS)


if __name__ == "__main__":
    main()
