"""The `cosctl` command line: thin commands that load a spec and call one library function.

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
from ..launch.slurm import slurm_app
from .ckpt import ckpt_app
from .console import fail

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Chain-of-Sight MLLM training: pretrain (32 tokens) -> inflate -> finetune (528, LoRA).",
)
spec_app = typer.Typer(no_args_is_help=True, help="Run-spec utilities.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets.")
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(slurm_app, name="slurm")


SpecArg = Annotated[Path, typer.Argument(help="YAML run spec.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: a.b=value (repeatable).")]
RunDirOpt = Annotated[
    Optional[Path], typer.Option(help="Local working folder (logs, metrics, staging); default runs/<run name>.")
]
OutputOpt = Annotated[Optional[str], typer.Option(help="Where checkpoints and artefacts go (overrides run.output).")]
ResumeOpt = Annotated[str, typer.Option(help="auto (newest committed checkpoint), never, or a checkpoint URI.")]
NprocOpt = Annotated[int, typer.Option(help="Local ranks to launch through torchrun (1 = in this process).")]
SaveOnStopOpt = Annotated[bool, typer.Option(help="Commit a checkpoint when SIGTERM or Ctrl-C stops the run.")]
NewDataOpt = Annotated[
    bool,
    typer.Option(
        help="Resume a checkpoint trained on other data: continue its weights and optimizer on this "
        "spec's data from a new data order (without it such a resume is refused)."
    ),
]


def _load(spec_path: Path, overrides: list[str] | None, stage: str | None = None):
    from ..spec.specs import load_spec

    spec = load_spec(spec_path, overrides or [])
    if stage is not None and spec.stage != stage:
        raise SpecError(f"{spec_path}: stage: is {spec.stage!r}, but this command runs {stage!r}")
    return spec


def _argv_without_nproc() -> list[str]:
    """This command's arguments, for the ranks: everything but --nproc."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    return argv


def _fail_in_rank(err: Exception) -> None:
    """A user error inside a rank: said once (rank 0, or through the launcher), exit 1."""
    from ..launch.local import report

    report(1, f"error: {err}")
    raise typer.Exit(1)


def _train(
    stage: str, spec_path, overrides, run_dir, output, resume, overwrite, nproc, save_on_stop, new_data=False
) -> None:
    from ..launch.local import STOP_CODES, launch_local_ranks, report

    try:
        spec = _load(spec_path, overrides, stage)
        if "RANK" not in os.environ or int(os.environ["RANK"]) == 0:  # under SLURM's torchrun: rank 0
            from ..launch.preflight import preflight

            preflight(spec, output or spec.run.output, resume)
    except UserError as err:
        _fail_in_rank(err)
    if nproc > 1 and "RANK" not in os.environ:
        raise typer.Exit(launch_local_ranks(nproc, _argv_without_nproc(), sys.argv[1:]))

    from ..train.loop import Stopped, run_training

    try:
        summary = run_training(
            spec,
            run_dir=run_dir or Path("runs") / spec.run.name,
            output=output or spec.run.output,
            resume=resume,
            overwrite=overwrite,
            save_on_stop=save_on_stop,
            new_data=new_data,
        )
    except UserError as err:
        _fail_in_rank(err)
    except Stopped as stop:
        if stop.exit_code == 75 and os.environ.get("SLURM_JOB_ID") and int(os.environ.get("RANK", "0")) == 0:
            from ..launch.slurm import REQUEUE_MARKER

            marker = Path(run_dir or Path("runs") / spec.run.name) / REQUEUE_MARKER
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"[{stage}] {stop}")
        report(stop.exit_code, f"[{stage}] {stop}", continue_hint=stop.exit_code in STOP_CODES)
        raise typer.Exit(stop.exit_code) from None
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary, indent=1))


@app.command()
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
    from ..spec.checks import check_paths

    try:
        loaded = _load(spec, set_)
    except SpecError as err:
        fail(str(err))
    problems = [] if skip_paths else check_paths(loaded)
    if problems:
        fail("\n".join(f"{spec}: {problem}" for problem in problems))
    typer.echo(f"OK: {spec} is a valid {loaded.stage} spec" + (" (paths not checked)" if skip_paths else ""))


@app.command()
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
            _load(spec, set_),
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


@app.command()
def pretrain(
    spec: SpecArg,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = "auto",
    overwrite: bool = False,
    nproc: NprocOpt = 1,
    save_on_stop: SaveOnStopOpt = False,
    new_data: NewDataOpt = False,
) -> None:
    """Pre-train the bridge with the few-token chain (32 visual tokens by default)."""
    _train("pretrain", spec, set_, run_dir, output, resume, overwrite, nproc, save_on_stop, new_data)


@app.command()
def finetune(
    spec: SpecArg,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    output: OutputOpt = None,
    resume: ResumeOpt = "auto",
    overwrite: bool = False,
    nproc: NprocOpt = 1,
    save_on_stop: SaveOnStopOpt = False,
    new_data: NewDataOpt = False,
) -> None:
    """Fine-tune the inflated model (528 tokens) with LoRA on the LLM."""
    _train("finetune", spec, set_, run_dir, output, resume, overwrite, nproc, save_on_stop, new_data)


@app.command()
def inflate(spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None) -> None:
    """Grow a pre-trained model's visual tokens (e.g. 32 -> 528) by parameter inflation."""
    from ..stages.stage import run_inflate

    try:
        loaded = _load(spec, set_, "inflate")
        summary = run_inflate(
            loaded, run_dir=run_dir or Path("runs") / loaded.run.name, output=output or loaded.run.output
        )
    except (UserError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=1))


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="Run output URI (holds adapter/ or model/) or a model folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the self-contained HF model.")],
) -> None:
    """Merge LoRA into the base and write one HF folder (model, processor, code) that transformers
    alone loads: Auto*.from_pretrained(OUT, trust_remote_code=True)."""
    from ..export.folder import export_merged
    from ..export.remote_code import RemoteCodeError

    try:
        typer.echo(json.dumps(export_merged(source, out), indent=1))
    except (UserError, RemoteCodeError) as err:
        fail(str(err))


@app.command("eval")
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            help="An export folder, or a run output (model/ or adapter/), local or s3://.", show_default=False
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            help="LLaVA-format eval records (JSON list); the last gpt turn is the reference.", show_default=False
        ),
    ],
    images: Annotated[
        Optional[str], typer.Option(help="Image root, a folder or s3://BUCKET/PREFIX; default: the data file's folder.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default evals/<model name>.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generated tokens per record at most.")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="Records generated together per rank.")] = 8,
    nproc: NprocOpt = 1,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N records only.")] = None,
    baseline_from: Annotated[
        Optional[Path],
        typer.Option(
            help="Records (e.g. the training set) whose answers the image-free baseline counts; "
            "default: the eval records."
        ),
    ] = None,
) -> None:
    """Greedy generation on eval records: predictions.jsonl, metrics.json and per-task metrics beside an
    image-free baseline."""
    from ..evaluate.command import print_table, run_eval

    try:
        if nproc > 1 and "RANK" not in os.environ:
            # Checked once here, so a mistake is one line rather than one per rank and a launcher trace.
            from ..evaluate.command import read_inputs
            from ..evaluate.loading import check_source

            read_inputs(data, images or data.parent, limit, baseline_from)
            check_source(model)
    except UserError as err:
        fail(str(err))
    if nproc > 1 and "RANK" not in os.environ:
        from ..launch.local import launch_local_ranks

        raise typer.Exit(launch_local_ranks(nproc, _argv_without_nproc(), sys.argv[1:]))
    try:
        metrics = run_eval(
            model,
            data,
            images=images,
            out=out or Path("evals") / Path(model.rstrip("/")).name,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=limit,
            baseline_from=baseline_from,
        )
    except UserError as err:
        _fail_in_rank(err)
    if metrics is not None:
        print_table(metrics)


@app.command()
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


@app.command()
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


@spec_app.command("schema")
def spec_schema(out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout.")] = None) -> None:
    """The JSON schema of run specs (for editor completion)."""
    from ..spec.specs import json_schema

    text = json.dumps(json_schema(), indent=1)
    if out:
        out.write_text(text)
    else:
        typer.echo(text)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    num_samples: Annotated[int, typer.Option(min=1)] = 1000,
    seed: int = 0,
    image_size: Annotated[int, typer.Option(min=16)] = 128,
) -> None:
    """Write the deterministic synthetic multitask set (caption, VQA, OCR, referring expressions)."""
    from ..data.synth import synthesize

    typer.echo(json.dumps(synthesize(out, num_samples=num_samples, seed=seed, image_size=image_size), indent=1))


@data_app.command("prepare")
def data_prepare(
    spec: SpecArg,
    set_: SetOpt = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(help="Tokenizer folder; default: model.tokenizer (pretrain) or the local source model's."),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Worker processes; default data.num_workers.")] = None,
) -> None:
    """Validate, tokenise and decode-check a spec's train and eval records once, into token stores that
    training maps on every rank (reused while the data file, tokenizer and data settings are unchanged)."""
    from ..data.prepare import prepare_spec
    from ..data.records import load_tokenizer

    try:
        loaded = _load(spec, set_)
        if not hasattr(loaded, "data"):
            raise SpecError(f"{spec}: stage {loaded.stage!r} reads no data")
        folder = tokenizer or _spec_tokenizer(loaded)
        typer.echo(json.dumps(prepare_spec(loaded, load_tokenizer(folder), workers=workers), indent=1))
    except UserError as err:
        fail(str(err))


def _spec_tokenizer(spec) -> Path:
    """The tokenizer folder a training stage would use, when it is on this machine."""
    if spec.stage == "pretrain":
        return Path(spec.model.tokenizer)
    from ..stages.stage import local_model_folder

    folder = local_model_folder(spec.model.source)
    if folder is None:
        raise SpecError(
            f"model.source: {spec.model.source} is not a local model folder; pass --tokenizer "
            "with the model's tokenizer folder"
        )
    return folder


def _quiet_progress_bars() -> None:
    """No per-file "Loading weights" bars (our own progress is enough), without importing transformers
    (and torch) for commands that never load weights: transformers reads the setting when it loads."""
    if "transformers.utils.logging" in sys.modules or "huggingface_hub.constants" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    # torch 2.13 deprecates collectives that DeepSpeed calls every step; the warnings bury real output.
    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_progress_bars()
    app()
