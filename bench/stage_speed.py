"""Stage speed: ZeRO-3 pre-training samples/s at several visual-token counts, same model, same machine,
one run (docs/design.md §8: the 32-token stage against a 336-token one), timed through the product.

Each row (`--rows` TOKENS/RESOLUTION, default 32/224,336/224,336/448,528/448; `--shape` tiny, 1b or 7b;
layouts and shapes: bench/rows.py) is one run of `python -m cosctl pretrain ROW.yaml --nproc N` in a
subprocess: a pretrain spec (the row's model shape with random towers, its scales and image size,
`batch.samples_per_step` and `tokens_per_micro_batch`, no periodic checkpoint, no eval, then the `--set`
overrides) on a synthetic set at the row's resolution (cached per resolution under `--work`). The run
goes through spec -> `setup_run` (build on the host, data, engine, `auto` probe) -> `StepLoader` ->
loop as any run, and is stopped with SIGTERM after the last timed step, so it saves nothing
(`--run-to-end` lets it finish). A step is `--samples-per-step` samples over all ranks; by default as
many per rank as the token budget holds at `--text-tokens` per sample, or 256 with an `auto` budget.

The row's data (`prepare_data`) is a synthetic set (`cosctl.data.synth.synthesize`) at the row's
resolution, cached per resolution under `--work` (`data/<px>px/`) and made again only when it holds
fewer training records than a row reads in one epoch. The product sizes a random LLM's vocabulary from
`len(tokenizer)`, and the synthetic tokenizer is small (~470-770 entries), so a smaller one is copied to
`data/<px>px/tokenizer-<vocab>/` and padded with unused added tokens `<bench_unused_N>` up to the shape's
vocabulary: no record contains them (every record encodes to the same ids), but the embedding and the
LM head get the shape's rows, so FLOPs and speed mean what they say.

Every figure is the product's own, from the run's `metrics.jsonl`: the median over the timed steps
after `--warmup` of its step_time_s (s/step), samples/s, tokens/s (non-padding tokens), TFLOP/s, MFU
and HFU (the peak reaches it as `COSCTL_PEAK_TFLOPS`) and data_time_s ("data s": the step's wait for
its micro-batches), and the largest peak_mem_gib (the process's peak RSS on CPU, reserved memory on a
GPU; rank 0's). "text" is the mean text tokens per sample, "micro" the samples per micro-batch, "ub"
the micro-batches per step per rank; "pred s/step" is the product's model FLOPs per step over peak x
`ASSUMED_MFU` (the prediction `cosctl plan` prints); "x336" is the row's samples/s over the 336-token
row's at the highest resolution. The peak is `--peak-tflops`, else a measured matmul peak with
`--measure-peak`, else the card's datasheet bf16 peak or COSCTL_PEAK_TFLOPS (none on CPU).

bench/engine_step.py times the engine alone on the same rows: the lower bound a product row is
compared with.

    python bench/stage_speed.py --shape tiny --rows 32/224,336/448 --steps 3 --warmup 1 --json tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import common
import rows
import torch
import yaml

from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from cosctl.plan.resolve import samples_per_micro_batch
from cosctl.spec.specs import PretrainSpec, apply_overrides, parse_spec
from cosctl.stages.pretrain import pretrain_config

AUTO_SAMPLES_PER_RANK = 256  # a step with an `auto` budget: the paper's global batch, per rank
WORK = common.REPO / "runs" / "stage_speed"
UNUSED_TOKEN = "<bench_unused_{}>"


# ---------------------------------------------------------------------------------------------------
# The row's data


@dataclass(frozen=True)
class DataSet:
    """A synthetic set at one resolution and the tokenizer a row's spec names."""

    root: Path
    tokenizer: Path
    image_size: int
    num_train: int
    vocab_size: int  # len(tokenizer) as the product loads it: the LLM's vocabulary
    tokenizer_vocab_size: int  # the synthetic tokenizer's own, before padding


def prepare_data(work: Path, image_size: int, min_train: int, vocab_size: int, seed: int = 0) -> DataSet:
    """The cached synthetic set at `image_size` px with at least `min_train` training records, and a
    tokenizer of at least `vocab_size` entries (padded when the synthetic one is smaller)."""
    root = Path(work) / "data" / f"{image_size}px"
    try:
        meta = json.loads((root / "synth.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("image_size") != image_size or meta.get("num_train", 0) < min_train:
        shutil.rmtree(root, ignore_errors=True)
        num = math.ceil(min_train / 0.9) + 1  # synthesize keeps about a tenth of the records for eval
        for _ in range(3):
            started = time.monotonic()
            meta = synthesize(root, num, seed, image_size)
            print(
                f"[stage_speed] synthesized {meta['num_train']} training records at {image_size} px in "
                f"{time.monotonic() - started:.1f} s: {root}",
                flush=True,
            )
            if meta["num_train"] >= min_train:
                break
            shutil.rmtree(root, ignore_errors=True)
            num += min_train - meta["num_train"] + 1
        else:
            raise RuntimeError(f"could not synthesize {min_train} training records at {image_size} px")
    base = root / "tokenizer"
    base_size = len(load_tokenizer(base))
    tokenizer = base
    if vocab_size > base_size:
        tokenizer = root / f"tokenizer-{vocab_size}"
        if not (tokenizer / "tokenizer.json").is_file() or len(load_tokenizer(tokenizer)) != vocab_size:
            pad_tokenizer(base, tokenizer, vocab_size - base_size)
        if len(load_tokenizer(tokenizer)) != vocab_size:
            raise RuntimeError(f"{tokenizer}: padding did not give {vocab_size} entries")
    return DataSet(root, tokenizer, image_size, meta["num_train"], max(vocab_size, base_size), base_size)


def pad_tokenizer(source: Path, dest: Path, count: int) -> None:
    """A copy of the tokenizer at `source` with `count` more (added, unused) tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    tokenizer.add_tokens([UNUSED_TOKEN.format(i) for i in range(count)])
    shutil.rmtree(dest, ignore_errors=True)
    tokenizer.save_pretrained(dest)


# ---------------------------------------------------------------------------------------------------
# One row


def product_spec(
    shape: rows.Shape,
    num_tokens: int,
    grid: int | None,
    args: argparse.Namespace,
    row_dir: Path,
    data_root: str,
    tokenizer: str,
    samples_per_step: int,
) -> dict:
    """The row's `cosctl pretrain` spec as YAML gives it: the row's model (random towers) with the
    synthetic set's tokenizer and data, `samples_per_step`, steps past the timed ones so the stop comes
    before the final save, no periodic checkpoint and no eval (their sections' defaults), then `--set`."""
    raw = rows.spec_dict(shape, num_tokens, grid, args)
    raw["run"]["output"] = str(row_dir / "output")
    raw["model"]["tokenizer"] = tokenizer
    raw["data"] = {"root": data_root, "train": "train.json"}
    last = args.warmup + args.steps
    raw["optim"]["num_steps"] = last if args.run_to_end else last + common.STOP_MARGIN
    raw["batch"]["samples_per_step"] = samples_per_step
    return apply_overrides(raw, args.overrides)


def default_samples_per_step(args: argparse.Namespace, spec: PretrainSpec, num_visual: int) -> int:
    """`--samples-per-step`, else per rank the samples a micro-batch holds at `--text-tokens`, or 256
    with an `auto` budget; times the ranks."""
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


def write_row_spec(shape: rows.Shape, num_tokens: int, grid: int | None, args: argparse.Namespace, row_dir: Path):
    """The row's data set and its spec, written to `row_dir/spec.yaml`: (spec, its path, the data)."""

    def parsed(data_root: str, tokenizer: str, samples: int) -> tuple[dict, PretrainSpec]:
        raw = product_spec(shape, num_tokens, grid, args, row_dir, data_root, tokenizer, samples)
        return raw, parse_spec(raw, source=f"<{raw['run']['name']}>")

    _, draft = parsed("unused", "unused", 1)
    num_visual = pretrain_config(draft, shape.vocab_size, shape.vocab_size - 1).num_visual_tokens
    _, draft = parsed("unused", "unused", default_samples_per_step(args, draft, num_visual))
    # One epoch holds every step the run may take: no loader restart among the timed steps.
    data = prepare_data(
        Path(args.work),
        draft.model.image_size,
        draft.batch.samples_per_step * draft.optim.num_steps,
        int(draft.model.text.config.get("vocab_size", shape.vocab_size)),
        seed=draft.run.seed,
    )
    raw, spec = parsed(str(data.root), str(data.tokenizer), draft.batch.samples_per_step)
    spec_path = row_dir / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec, spec_path, data


def run_row(shape: rows.Shape, num_tokens: int, grid: int | None, args: argparse.Namespace, peak) -> dict:
    """One `cosctl pretrain` run for the row and its figures, all read from the run's own records and
    log; on failure the row says why."""
    image_size, _ = rows.layout(shape, num_tokens, grid)
    row_dir = Path(args.work) / "rows" / rows.row_name(args, num_tokens, image_size)
    row_dir.mkdir(parents=True, exist_ok=True)
    spec, spec_path, data = write_row_spec(shape, num_tokens, grid, args, row_dir)
    last = args.warmup + args.steps
    print(
        f"[stage_speed] {num_tokens} tokens at {image_size} px: cosctl pretrain {spec_path} (--nproc {args.nproc}, "
        f"{spec.batch.samples_per_step} samples/step, steps {args.warmup} + {args.steps})",
        flush=True,
    )
    run = common.run_product(
        spec_path,
        row_dir,
        nproc=args.nproc,
        last_step=last,
        env=common.product_env(peak),
        run_to_end=args.run_to_end,
        timeout_s=args.row_timeout,
    )
    config = pretrain_config(spec, data.vocab_size, data.vocab_size - 1)
    found = {
        "tokens": config.num_visual_tokens,
        "image_size": config.image_size,
        "resolution": rows.resolution_of(grid),
    }
    steps_done = max((r["step"] for r in run.records), default=0)
    if run.returncode not in (0, common.STOP_EXIT) or steps_done < last:
        print(run.log_tail(), flush=True)
        return found | {
            "error": f"cosctl pretrain exited {run.returncode} after {steps_done} steps; see {run.log_path}"
        }
    figures = common.timed_figures(run.records, args.warmup, args.steps)
    log = run.log_path.read_text(errors="replace")
    budget_line = common.log_value(log, "steps per epoch;") or ""  # "<N> tokens per micro-batch (from the <origin>)"
    built = common.log_value(log, "model built in")
    samples = figures["samples_per_step"]
    text_tokens = figures["tokens_per_step"] / samples - config.num_visual_tokens
    summary = run.run_dir / "summary.json"  # written by a finished run (--run-to-end)
    return (
        found
        | {
            "scales": [f"{s.window}->{s.num_windows(config.grid_size)}x{s.queries_per_window}" for s in config.scales],
            "vocab_size": data.vocab_size,
            "tokenizer_vocab_size": data.tokenizer_vocab_size,
            "text_tokens": text_tokens,
            "seq_len": config.num_visual_tokens + text_tokens,
            "micro_batch": samples / args.nproc / figures["micro_batches"],
        }
        | figures
        | rows.prediction(samples, figures["flops_per_sample"], peak, world_size=args.nproc)
        | {
            "tokens_per_micro_batch": int(budget_line.split()[0]) if budget_line[:1].isdigit() else None,
            "budget_origin": budget_line.rpartition("from the ")[2].rstrip(")") or None,
            "probe": common.log_value(log, "tokens_per_micro_batch auto ->"),
            "nproc": args.nproc,
            "num_workers": spec.data.num_workers,
            "build_s": float(built.split()[0]) if built else None,
            "first_step_s": run.first_step_s,
            "wall_s": run.wall_s,
            "returncode": run.returncode,
            "stopped": run.stopped,
            "spec": str(spec_path),
            "run_dir": str(run.run_dir),
            "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        }
    )


def row_line(row: dict) -> str:
    cell = common.cell
    return (
        f"{row['samples_per_step']:.4g} samples/step in {row['micro_batches']:.3g} micro-batches "
        f"(mean text {row['text_tokens']:.1f} tokens), {row['s_per_step']:.4g} s/step "
        f"(loop {cell(row['loop_s_per_step'], '.4g')} s, data {cell(row['data_s_per_step'], '.3g')} s), "
        f"{row['samples_per_s']:.4g} samples/s, loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}, "
        f"build {cell(row['build_s'], '.1f')} s, step 1 done {cell(row['first_step_s'], '.1f')} s after launch"
    )


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows.add_row_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, help="local ranks per run (cosctl --nproc; default 1)")
    parser.add_argument(
        "--samples-per-step",
        type=int,
        help="samples per optimizer step over all ranks (default: per rank, what the token budget holds at "
        "--text-tokens, or 256 with an auto budget)",
    )
    parser.add_argument(
        "--work", type=Path, default=WORK, help=f"specs, runs and the synthetic sets per resolution (default {WORK})"
    )
    parser.add_argument(
        "--run-to-end",
        action="store_true",
        help="let each run finish (final checkpoint, published model, summary.json) instead of stopping it "
        "after the last timed step",
    )
    parser.add_argument(
        "--row-timeout", type=float, default=3600.0, help="kill a run after this many seconds (default 3600)"
    )
    args = rows.finish_row_arguments(parser, parser.parse_args(argv))
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.samples_per_step is not None and args.samples_per_step < args.nproc:
        parser.error("--samples-per-step must be at least --nproc (one sample per rank)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report:
        report = json.loads(args.report.read_text())
        rows.print_report(report)
        return report
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    # Before DeepSpeed's first import (versions), which otherwise guesses the accelerator and warns.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    peak, peak_source = rows.resolve_peak(args, device)
    settings = {key: getattr(args, key) for key in ("nproc", "samples_per_step", "run_to_end")}
    report = rows.new_report(args, device, peak, peak_source, **settings, work=str(args.work))
    return rows.record_rows(
        args, report, lambda shape, tokens, grid: run_row(shape, tokens, grid, args, peak), row_line
    )


if __name__ == "__main__":
    main()
