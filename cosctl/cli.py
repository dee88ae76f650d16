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

from .errors import SpecError, UserError
from .slurm import slurm_app

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Chain-of-Sight MLLM training: pretrain (32 tokens) -> inflate -> finetune (528, LoRA).")
spec_app = typer.Typer(no_args_is_help=True, help="Run-spec utilities.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and copy committed checkpoints.")
app.add_typer(spec_app, name="spec")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(slurm_app, name="slurm")


SpecArg = Annotated[Path, typer.Argument(help="YAML run spec.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: a.b=value (repeatable).")]
RunDirOpt = Annotated[Optional[Path], typer.Option(help="Local working folder (logs, metrics, staging); default runs/<run name>.")]
OutputOpt = Annotated[Optional[str], typer.Option(help="Where checkpoints and artefacts go (overrides run.output).")]
ResumeOpt = Annotated[str, typer.Option(help="auto (newest committed checkpoint), never, or a checkpoint URI.")]
NprocOpt = Annotated[int, typer.Option(help="Local ranks to launch through torchrun (1 = in this process).")]


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _load(spec_path: Path, overrides: list[str] | None, stage: str | None = None):
    from .spec import load_spec

    spec = load_spec(spec_path, overrides or [])
    if stage is not None and spec.stage != stage:
        raise SpecError(f"{spec_path}: stage: is {spec.stage!r}, but this command runs {stage!r}")
    return spec


def _relaunch_with_torchrun(nproc: int) -> None:
    """Re-run this very command under `torchrun --standalone` with `nproc` local ranks."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cosctl", *argv]
    os.execvp(command[0], command)


def _train(stage: str, spec_path, overrides, run_dir, output, resume, overwrite, nproc) -> None:
    from .train import Preempted, run_training

    try:
        spec = _load(spec_path, overrides, stage)
        if nproc > 1 and "RANK" not in os.environ:
            _relaunch_with_torchrun(nproc)

        summary = run_training(spec, run_dir=run_dir or Path("runs") / spec.run.name,
                               output=output or spec.run.output, resume=resume, overwrite=overwrite)
    except UserError as err:
        fail(str(err))
    except Preempted as stop:
        typer.echo(f"[{stage}] {stop}", err=True)
        raise typer.Exit(Preempted.exit_code) from None
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps(summary, indent=1))


@app.command()
def validate(spec: SpecArg, set_: SetOpt = None) -> None:
    """Check a run spec; print OK or every problem (exit 1)."""
    try:
        loaded = _load(spec, set_)
    except SpecError as err:
        fail(str(err))
    typer.echo(f"OK: {spec} is a valid {loaded.stage} spec")


@app.command()
def plan(spec: SpecArg, set_: SetOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False,
         world_size: Annotated[int, typer.Option(help="Ranks the run will use.")] = 1,
         device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu") -> None:
    """Show tokens, scales, parameters, memory/FLOP estimates, DeepSpeed config and resume point."""
    from .plan import build_plan, format_plan

    try:
        result = build_plan(_load(spec, set_), world_size=world_size, device_type=device)
    except (UserError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(result, indent=1) if as_json else format_plan(result))


@app.command()
def pretrain(spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None,
             resume: ResumeOpt = "auto", overwrite: bool = False, nproc: NprocOpt = 1) -> None:
    """Pre-train the bridge with the few-token chain (32 visual tokens by default)."""
    _train("pretrain", spec, set_, run_dir, output, resume, overwrite, nproc)


@app.command()
def finetune(spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None,
             resume: ResumeOpt = "auto", overwrite: bool = False, nproc: NprocOpt = 1) -> None:
    """Fine-tune the inflated model (528 tokens) with LoRA on the LLM."""
    _train("finetune", spec, set_, run_dir, output, resume, overwrite, nproc)


@app.command()
def inflate(spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None) -> None:
    """Grow a pre-trained model's visual tokens (e.g. 32 -> 528) by parameter inflation."""
    from .stages import run_inflate

    try:
        loaded = _load(spec, set_, "inflate")
        summary = run_inflate(loaded, run_dir=run_dir or Path("runs") / loaded.run.name,
                              output=output or loaded.run.output)
    except (UserError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=1))


@app.command()
def export(source: Annotated[str, typer.Argument(help="Run output URI (holds adapter/ or model/) or a model folder.")],
           out: Annotated[Path, typer.Option(help="Folder for the self-contained HF model.")]) -> None:
    """Merge LoRA into the base and write one HF folder (model, processor, code) that transformers
    alone loads: Auto*.from_pretrained(OUT, trust_remote_code=True)."""
    from .export import export_merged
    from .remote_code import RemoteCodeError

    try:
        typer.echo(json.dumps(export_merged(source, out), indent=1))
    except (UserError, RemoteCodeError) as err:
        fail(str(err))


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Folder for data, runs and summary.json.")] = Path("demo_out"),
         num_samples: Annotated[int, typer.Option(help="Synthetic samples.")] = 1200) -> None:
    """The whole tiny pipeline on CPU: synth data -> pretrain 32 -> inflate 528 -> finetune LoRA."""
    from .demo import run_demo

    try:
        summary = run_demo(out, num_samples=num_samples)
    except UserError as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=1))


@spec_app.command("schema")
def spec_schema(out: Annotated[Optional[Path], typer.Option(help="Write here instead of stdout.")] = None) -> None:
    """The JSON schema of run specs (for editor completion)."""
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=1)
    if out:
        out.write_text(text)
    else:
        typer.echo(text)


@data_app.command("synth")
def data_synth(out: Annotated[Path, typer.Option(help="Output folder.")],
               num_samples: Annotated[int, typer.Option(min=1)] = 1000,
               seed: int = 0, image_size: Annotated[int, typer.Option(min=16)] = 128) -> None:
    """Write the deterministic synthetic multitask set (caption, VQA, OCR, referring expressions)."""
    from .synth import synthesize

    typer.echo(json.dumps(synthesize(out, num_samples=num_samples, seed=seed, image_size=image_size), indent=1))


@data_app.command("prepare")
def data_prepare(spec: SpecArg, set_: SetOpt = None,
                 tokenizer: Annotated[Optional[Path], typer.Option(
                     help="Tokenizer folder; default: model.tokenizer (pretrain) or the local source model's.")] = None,
                 workers: Annotated[Optional[int], typer.Option(
                     min=0, help="Worker processes; default data.num_workers.")] = None) -> None:
    """Validate, tokenise and decode-check a spec's train and eval records once, into token stores that
    training maps on every rank (reused while the data file, tokenizer and data settings are unchanged)."""
    from .data import load_tokenizer
    from .tokenstore import prepare_spec

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
    from .stages import local_model_folder

    folder = local_model_folder(spec.model.source)
    if folder is None:
        raise SpecError(f"model.source: {spec.model.source} is not a local model folder; pass --tokenizer "
                        "with the model's tokenizer folder")
    return folder


@ckpt_app.command("ls")
def ckpt_ls(uri: Annotated[str, typer.Argument(help="Run output URI.")]) -> None:
    """List committed checkpoints with step, time and size."""
    import datetime

    from .checkpoint import list_committed
    from .storage import open_store

    try:
        committed = list_committed(open_store(uri))
    except UserError as err:
        fail(str(err))
    for c in committed:
        size = sum(f["size"] for f in c.manifest["files"].values()) / 2**20
        when = datetime.datetime.fromtimestamp(c.manifest.get("created", 0)).isoformat(timespec="seconds")
        typer.echo(f"{c.name}  step {c.step:>8}  {when}  {size:9.1f} MiB  {len(c.manifest['files'])} files")
    if not committed:
        typer.echo(f"no committed checkpoints under {uri}")


@ckpt_app.command("verify")
def ckpt_verify(uri: Annotated[str, typer.Argument(help="Checkpoint URI (.../checkpoints/step_N) or run output (newest).")]) -> None:
    """Re-hash every file of a checkpoint against its manifest; exit 1 naming any bad file."""
    import tempfile

    from .checkpoint import resolve_checkpoint, verify

    try:
        store, committed = resolve_checkpoint(uri)
        with tempfile.TemporaryDirectory() as scratch:
            bad = verify(store, committed, Path(scratch))
    except UserError as err:
        fail(str(err))
    if bad:
        fail(f"{committed.name}: {len(bad)} file(s) do not match the manifest: {', '.join(bad)}")
    typer.echo(f"OK: {committed.name} (step {committed.step}), {len(committed.manifest['files'])} files verified")


def _copy(source: str, destination: str) -> None:
    import tempfile

    from .checkpoint import copy_checkpoint, resolve_checkpoint
    from .storage import open_store

    try:
        src, committed = resolve_checkpoint(source)
        dst = open_store(destination)
        with tempfile.TemporaryDirectory() as scratch:
            copied = copy_checkpoint(src, committed, dst, Path(scratch))
    except UserError as err:
        fail(str(err))
    typer.echo(f"copied {committed.name} (step {committed.step}, {len(copied.manifest['files'])} files) "
               f"to {dst.uri}/checkpoints/{committed.name}")


@ckpt_app.command("pull")
def ckpt_pull(source: Annotated[str, typer.Argument(help="Checkpoint or run URI (newest) to copy from, e.g. s3://b/run.")],
              to: Annotated[Path, typer.Option(help="Local run folder to copy into.")]) -> None:
    """Copy a committed checkpoint from a store (e.g. a bucket) into a local run folder, verified."""
    _copy(source, str(to))


@ckpt_app.command("push")
def ckpt_push(source: Annotated[str, typer.Argument(help="Local checkpoint or run folder (newest).")],
              to: Annotated[str, typer.Option(help="Run URI to copy into, e.g. s3://bucket/run.")]) -> None:
    """Copy a committed checkpoint from a local run folder to a store (e.g. a bucket), verified."""
    _copy(source, to)


def main() -> None:
    # torch 2.13 deprecates collectives that DeepSpeed calls every step; the warnings bury real output.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; our own progress is enough
    app()
