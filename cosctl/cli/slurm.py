"""`cosctl slurm render|submit`: a pretrain or finetune spec as a SLURM batch job that requeues itself on
preemption (the script and its protocol are `launch.slurm`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.errors import SlurmError, SpecError
from ..launch.slurm import job_command, render_sbatch, submit, write_spec_snapshot
from .console import fail
from .options import OutputOpt, RunDirOpt, SetOpt, SpecArg, load_spec_for, run_dir_of

slurm_app = typer.Typer(
    no_args_is_help=True, help="Run pretrain/finetune as a SLURM job that requeues itself on preemption."
)
ExtraArg = Annotated[Optional[list[str]], typer.Argument(help="Extra stage arguments, after `--`.", show_default=False)]


def _job(spec_path: Path, overrides, run_dir, output, extra):
    spec = load_spec_for(spec_path, overrides)
    argv, folder = job_command(spec, spec_path, run_dir_of(run_dir, spec), output, extra)
    return spec, argv, folder


@slurm_app.command("render")
def render_cmd(
    spec: SpecArg, set_: SetOpt = None, run_dir: RunDirOpt = None, output: OutputOpt = None, extra: ExtraArg = None
) -> None:
    """Print the batch script for a spec (nothing is written or submitted)."""
    try:
        loaded, argv, folder = _job(spec, set_, run_dir, output, extra)
        typer.echo(render_sbatch(loaded, argv, str(folder)), nl=False)
    except (SpecError, SlurmError) as err:
        fail(str(err))


@slurm_app.command("submit")
def submit_cmd(
    spec: SpecArg,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    output: OutputOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print the script instead of submitting it.")] = False,
    extra: ExtraArg = None,
) -> None:
    """Submit a spec as a batch job; print the job id (the log is <run dir>/slurm/<job id>.out)."""
    try:
        loaded, argv, folder = _job(spec, set_, run_dir, output, extra)
        script = render_sbatch(loaded, argv, str(folder))
        if dry_run:
            typer.echo(script, nl=False)
            return
        write_spec_snapshot(loaded, folder)
        typer.echo(submit(script, folder))
    except (SpecError, SlurmError) as err:
        fail(str(err))
