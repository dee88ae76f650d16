"""Padding and training speed with and without `batch.packing` on a realistic length mix.

    python bench/packing.py --samples 400 --steps 12 --json packing.json

The data is the synthetic set rewritten as LLaVA-1.5 files (`tests/llava.py`): a quarter single-turn
image records, a quarter multi-turn, a quarter text-only (ShareGPT-like) and a quarter long multi-turn
ones cut at `data.max_text_tokens`. Each variant trains the tiny pretraining recipe (`recipes/tiny`,
ZeRO-3, one rank, in this process) for `--steps` steps through `cosctl.train.loop.run_training` and reports:

    padding    share of the computed token positions that are padding, over the steps run
               (`cosctl.train.batching.padding_fraction` over this rank's micro-batches)
    passes     micro-batches per step (forward/backward passes)
    samples/s  the run's mean after its first step (summary.json's samples_per_s)

Both variants see the same samples in the same steps (`batch.samples_per_step` is the optimisation;
packing only changes how a step is split). Results for this machine are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import common

REPO = common.REPO


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=400, help="Synthetic samples the data set starts from.")
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per variant.")
    parser.add_argument("--tokens-per-micro-batch", type=int, default=2048)
    parser.add_argument("--samples-per-step", type=int, default=32)
    parser.add_argument("--max-text-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="Folder for data and runs (default: temp).")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def run_variant(data: Path, work: Path, packing: bool, args) -> dict:
    from cosctl.spec.specs import load_spec
    from cosctl.train.loop import run_training

    overrides = [
        f"data.root={data}",
        f"model.tokenizer={data / 'tokenizer'}",
        f"optim.num_steps={args.steps}",
        f"checkpoint.every_steps={args.steps * 10}",
        "eval.every_steps=null",
        f"batch.tokens_per_micro_batch={args.tokens_per_micro_batch}",
        f"batch.samples_per_step={args.samples_per_step}",
        f"data.max_text_tokens={args.max_text_tokens}",
        f"batch.packing={str(packing).lower()}",
        "data.max_bad_fraction=0.1",
    ]
    name = "packed" if packing else "padded"
    for folder in (work / name, work / f"{name}-out"):  # a fresh run each time
        shutil.rmtree(folder, ignore_errors=True)
    spec = load_spec(REPO / "recipes" / "tiny" / "pretrain.yaml", overrides)
    saved = dict(os.environ)
    try:
        summary = run_training(spec, run_dir=work / name, output=str(work / f"{name}-out"), resume="never")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return {
        "variant": name,
        "samples_per_s": summary["samples_per_s"],
        "passes_per_step": sum(r["micro_batches"] for r in steps) / len(steps),
        "tokens_per_step": sum(r["tokens"] for r in steps) / len(steps),
        "final_loss": summary["final_loss"],
        **padding(data, spec, args),
    }


def padding(data: Path, spec, args) -> dict:
    """Padding share over the steps the run took (the loader's plans are a pure function)."""
    from cosctl.data.prepare import load_split, split_source
    from cosctl.data.records import load_tokenizer
    from cosctl.train.batching import padding_fraction
    from cosctl.train.loader import StepLoader

    tokenizer = load_tokenizer(data / "tokenizer")
    records = load_split(
        split_source(spec.data, spec.data.train, None), tokenizer, num_visual_tokens=32, max_bad_fraction=1.0
    )
    loader = StepLoader(
        records,
        image_size=64,
        pad_token_id=0,
        tokens_per_micro_batch=args.tokens_per_micro_batch,
        samples_per_step=args.samples_per_step,
        seed=spec.run.seed,
        rank=0,
        world_size=1,
        packing=spec.batch.packing,
    )
    micro = []
    for step in range(args.steps):
        epoch, index = divmod(step, loader.steps_per_epoch)
        micro += loader.step_micro_batches(epoch, index)[0]
    lengths = records.lengths
    return {
        "padding": padding_fraction(micro, lengths, spec.batch.packing),
        "mean_length": float(lengths.mean()),
        "max_length": int(lengths.max()),
        "text_only": int(records.store.report.num_text_only),
        "records": len(records),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    from cosctl.data.synth import synthesize
    from tests.llava import write_llava_set

    work = args.work or Path(tempfile.mkdtemp(prefix="packing-"))
    synth = work / "synth"
    if not (synth / "train.json").exists():
        synthesize(synth, num_samples=args.samples, seed=0, image_size=64)
    data = work / "data"
    if not (data / "train.json").exists():
        write_llava_set(synth, data)
    rows = [run_variant(data, work, packing, args) for packing in (False, True)]
    lines = [
        [
            row["variant"],
            f"{row['padding']:.1%}",
            f"{row['passes_per_step']:.1f}",
            f"{row['tokens_per_step']:.0f}",
            f"{row['samples_per_s']:.2f}",
            f"{row['final_loss']:.3f}",
        ]
        for row in rows
    ]
    header = ["variant", "padding", "passes/step", "tokens/step", "samples/s", "final loss"]
    print(common.markdown_table(header, lines))
    speedup = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(
        f"{rows[0]['records']} records, {rows[0]['text_only']} text-only, mean {rows[0]['mean_length']:.0f} "
        f"tokens, longest {rows[0]['max_length']}; speed-up {speedup:.2f}x"
    )
    common.write_report(args.json, {"rows": rows, "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
