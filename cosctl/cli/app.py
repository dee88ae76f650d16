"""The `cosctl` command line: thin commands that load a spec and call one library function. Every command
is registered here; the groups live in their own modules (`training`, `evaluate`, `data`, `ckpt`,
`slurm`) and share their options (`options`).

User mistakes (bad spec, bad data, missing or corrupt checkpoint, unreachable storage) end with one
clear message on stderr and exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.errors import SpecError, UserError
from . import evaluate, training
from .ckpt import ckpt_app
from .console import fail
from .data import data_app
from .options import SetOpt, SpecArg, load_spec_for
from .slurm import slurm_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Chain-of-Sight MLLM training: pretrain (32 tokens) -> inflate -> finetune (528, LoRA).",
)
spec_app = typer.Typer(no_args_is_help=True, help="Run-spec utilities.")


def validate(
    spec: SpecArg,
    set_: SetOpt = None,
    skip_paths: Annotated[
        bool,
        typer.Option(
            "--skip-paths",
            help="Check the spec alone, not the data, tokenizer and model folders it names "
            "(for a spec written on a machine that does not have them).",
        ),
    ] = False,
) -> None:
    """Check a run spec and the local files it names; print OK or every problem (exit 1)."""
    from ..spec.paths import check_paths

    try:
        loaded = load_spec_for(spec, set_)
    except SpecError as err:
        fail(str(err))
    problems = [] if skip_paths else check_paths(loaded)
    if problems:
        fail("\n".join(f"{spec}: {problem}" for problem in problems))
    typer.echo(f"OK: {spec} is a valid {loaded.stage} spec" + (" (paths not checked)" if skip_paths else ""))


def plan(
    spec: SpecArg,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    world_size: Annotated[int, typer.Option(help="Ranks the run will use.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    peak_tflops: Annotated[
        Optional[float],
        typer.Option(
            help="Per-rank dense peak for predictions (default: COSCTL_PEAK_TFLOPS, else this machine's GPU).",
        ),
    ] = None,
    bandwidth_gbps: Annotated[
        float, typer.Option(help="Inter-node bandwidth per rank, Gb/s (100: one EDR/HDR100 InfiniBand link per GPU).")
    ] = 100.0,
    intra_node_gbps: Annotated[
        float, typer.Option(help="Bandwidth between the ranks of one node, Gb/s (2400 = 300 GB/s, NVLink).")
    ] = 2400.0,
    ranks_per_node: Annotated[
        Optional[int], typer.Option(help="Ranks per node (default: the spec's slurm section).")
    ] = None,
    gpu_memory_gib: Annotated[float, typer.Option(help="GPU memory per rank, for the ZeRO advice.")] = 80.0,
) -> None:
    """Show tokens, scales, parameters, FLOPs (model and hardware), step time, communication per step,
    a ZeRO-2/ZeRO-3 recommendation, memory, DeepSpeed config and resume point."""
    from ..plan.summary import build_plan, format_plan

    try:
        result = build_plan(
            load_spec_for(spec, set_),
            world_size=world_size,
            device_type=device,
            peak=peak_tflops,
            bandwidth_gbps=bandwidth_gbps,
            intra_node_gbps=intra_node_gbps,
            ranks_per_node=ranks_per_node,
            gpu_memory_gib=gpu_memory_gib,
        )
    except (UserError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(result, indent=1) if as_json else format_plan(result))


def report(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders: the --run-dir of training stages "
            "(metrics.jsonl, summary.json; metrics.json of cosctl eval).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.md and the PNG plots.")] = Path("report"),
) -> None:
    """Plots (loss against step and time, samples/s, LR, eval metrics) and report.md for runs, side by side."""
    from ..report.write import write_report

    try:
        written = write_report(runs, out)
    except UserError as err:
        fail(str(err))
    typer.echo(
        f"wrote {written['report']} and {len(written['figures'])} plot(s): "
        + ", ".join(Path(f).name for f in written["figures"])
    )


def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, runs and summary.json.")] = Path("demo_out"),
    num_samples: Annotated[int, typer.Option(help="Synthetic samples.")] = 1200,
    compare: Annotated[
        bool, typer.Option(help="Also train a model with 336 tokens throughout and compare (~3x as long).")
    ] = False,
) -> None:
    """The whole tiny pipeline on CPU: synth data -> pretrain 32 -> inflate 528 -> finetune LoRA."""
    from ..demo.pipeline import print_summary, run_demo

    try:
        if compare:
            from ..demo.compare import print_comparison, run_compare

            print_comparison(run_compare(out, num_samples=num_samples))
            return
        summary = run_demo(out, num_samples=num_samples)
    except UserError as err:
        fail(str(err))
    print_summary(summary, out.resolve())


def spec_schema(out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout.")] = None) -> None:
    """The JSON schema of run specs (for editor completion)."""
    from ..spec.specs import json_schema

    text = json.dumps(json_schema(), indent=1)
    if out:
        out.write_text(text)
    else:
        typer.echo(text)


app.command()(validate)
app.command()(plan)
app.command()(training.pretrain)
app.command()(training.finetune)
app.command()(training.inflate)
app.command()(evaluate.export)
app.command("eval")(evaluate.eval_)
app.command()(report)
app.command()(demo)
spec_app.command("schema")(spec_schema)
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(slurm_app, name="slurm")


def _quiet_progress_bars() -> None:
    """No per-file "Loading weights" bars (our own progress is enough), without importing transformers
    (and torch) for commands that never load weights: transformers reads the setting when it loads."""
    if "transformers.utils.logging" in sys.modules or "huggingface_hub.constants" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    """Run the `cosctl` app (warnings that bury real output off, no per-file progress bars)."""
    # torch 2.13 deprecates collectives that DeepSpeed calls every step; the warnings bury real output.
    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_progress_bars()
    app()
