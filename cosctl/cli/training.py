"""`cosctl pretrain`, `finetune` and `inflate`: a stage run from its spec, on this process, on local ranks
(`--nproc`), or as one rank of a launcher (SLURM's torchrun).

Before any rank starts, rank 0 checks the spec's files and the output store (`launch.preflight`), so a
mistake is one line, not one per rank. A training run that stops (a preemption warning, SIGTERM, a
store that stayed down) ends with its exit code and the command that continues it.
"""

from __future__ import annotations

import json
import sys

import typer

from ..common.errors import UserError
from ..launch.local import STOP_CODES, is_rank0, launch_local_ranks, report, under_launcher
from .console import fail
from .options import (
    NewDataOpt,
    NprocOpt,
    OutputOpt,
    ResumeOpt,
    RunDirOpt,
    SaveOnStopOpt,
    SetOpt,
    SpecArg,
    argv_without_nproc,
    fail_in_rank,
    load_spec_for,
    run_dir_of,
)


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


def inflate(spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None) -> None:
    """Grow a pre-trained model's visual tokens (e.g. 32 -> 528) by parameter inflation."""
    from ..stages.inflate import run_inflate

    try:
        loaded = load_spec_for(spec, set_, "inflate")
        summary = run_inflate(loaded, run_dir=run_dir_of(run_dir, loaded), output=output or loaded.run.output)
    except (UserError, ValueError) as err:
        fail(str(err))
    typer.echo(json.dumps(summary, indent=1))


def _train(
    stage: str, spec_path, overrides, run_dir, output, resume, overwrite, nproc, save_on_stop, new_data=False
) -> None:
    try:
        spec = load_spec_for(spec_path, overrides, stage)
        if is_rank0():
            from ..launch.preflight import preflight

            preflight(spec, output or spec.run.output, resume)
    except UserError as err:
        fail_in_rank(err)
    if nproc > 1 and not under_launcher():
        raise typer.Exit(launch_local_ranks(nproc, argv_without_nproc(), sys.argv[1:]))

    from ..train.loop import Stopped, run_training

    try:
        summary = run_training(
            spec,
            run_dir=run_dir_of(run_dir, spec),
            output=output or spec.run.output,
            resume=resume,
            overwrite=overwrite,
            save_on_stop=save_on_stop,
            new_data=new_data,
        )
    except UserError as err:
        fail_in_rank(err)
    except Stopped as stop:
        if stop.exit_code == 75:
            from ..launch.slurm import ask_for_requeue

            ask_for_requeue(run_dir_of(run_dir, spec), f"[{stage}] {stop}")
        report(stop.exit_code, f"[{stage}] {stop}", continue_hint=stop.exit_code in STOP_CODES)
        raise typer.Exit(stop.exit_code) from None
    from ..common.dist import leave_process_group

    leave_process_group()
    if is_rank0():
        typer.echo(json.dumps(summary, indent=1))
