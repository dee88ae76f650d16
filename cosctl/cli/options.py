"""The options and arguments commands share, with one help text each, and the few steps every command
that loads a spec or starts ranks takes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.errors import SpecError

SpecArg = Annotated[Path, typer.Argument(help="YAML run spec.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a spec key: a.b=value (repeatable).")]
RunDirOpt = Annotated[
    Optional[Path],
    typer.Option(help="Local working folder (logs, metrics, staging, SLURM job files); default runs/<run name>."),
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


def load_spec_for(spec_path: Path, overrides: list[str] | None, stage: str | None = None):
    """The spec at `spec_path` with `--set` overrides; a `SpecError` when it is not for `stage`."""
    from ..spec.specs import load_spec

    spec = load_spec(spec_path, overrides or [])
    if stage is not None and spec.stage != stage:
        raise SpecError(f"{spec_path}: stage: is {spec.stage!r}, but this command runs {stage!r}")
    return spec


def run_dir_of(run_dir: Path | None, spec) -> Path:
    """The run's local working folder: `--run-dir`, else runs/<run name>."""
    return run_dir or Path("runs") / spec.run.name


def argv_without_nproc() -> list[str]:
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


def fail_in_rank(err: Exception) -> None:
    """A user error inside a rank: said once (rank 0, or through the launcher), exit 1."""
    from ..launch.local import report

    report(1, f"error: {err}")
    raise typer.Exit(1)
