"""Starting a command's local ranks, and ending it the way a user reads: one line, one exit code.

`launch_local_ranks(nproc, argv)` runs torchrun's launcher in this process (not as a child that prints
its own 40-line `ChildFailedError`): the rendezvous store listens on loopback only, and the ranks run
`python -m cosctl ARGV`. A rank that ends on purpose (a user error, a stop) does not print; it leaves
`report(...)` in the run's report folder and exits with its code, and the launcher prints rank 0's
report (else the lowest rank's) once, then exits with that code. In a single in-process rank, `report`
prints directly.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import tempfile
import uuid
from pathlib import Path

REPORT_DIR_ENV = "COSCTL_REPORT_DIR"
STOP_CODES = (75, 130, 143)  # requeue, SIGINT, SIGTERM: the run can continue from its checkpoint
SHUTDOWN_TIMEOUT_S = 600  # a step + a stop save (train.STOP_SAVE_TIMEOUT_S) fit in it


def under_launcher() -> bool:
    """Whether this process is one rank of a launcher (ours, or SLURM's torchrun): it has a RANK."""
    return "RANK" in os.environ


def is_rank0() -> bool:
    """Whether this process speaks for the job: rank 0 of a launcher, or a process started alone. Usable
    before any process group exists (it reads the launcher's environment)."""
    return int(os.environ.get("RANK", "0")) == 0


def report(code: int, message: str, continue_hint: bool = False) -> None:
    """How this rank ends: left for our launcher to print once, or printed here by rank 0."""
    folder = os.environ.get(REPORT_DIR_ENV)
    if folder:
        Path(folder, f"rank_{int(os.environ.get('RANK', '0')):05d}.json").write_text(
            json.dumps({"code": code, "message": message, "continue": continue_hint})
        )
        return
    if not is_rank0():  # another launcher (SLURM's torchrun): rank 0 says it
        return
    print(message, file=sys.stderr, flush=True)
    if continue_hint:
        print(continue_command(sys.argv[1:]), file=sys.stderr, flush=True)


def continue_command(argv: list[str]) -> str:
    """The command line that continues this run from its newest committed checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--resume",):
            skip = True
        elif not arg.startswith("--resume=") and arg != "--overwrite":
            kept.append(arg)
    return "continue with: cosctl " + " ".join(shlex.quote(a) for a in [*kept, "--resume", "auto"])


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_local_ranks(nproc: int, argv: list[str], user_argv: list[str]) -> int:
    """Run `cosctl ARGV` as `nproc` local ranks; print the ranks' report once (with how to continue
    the user's own command, `user_argv`, after a stop); return the exit code."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The launcher's own progress and shutdown notes bury the one line that matters.
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="cosctl-ranks-") as folder:
        os.environ[REPORT_DIR_ENV] = folder
        args = get_args_parser().parse_args(
            [
                "--nnodes=1",
                f"--nproc-per-node={nproc}",
                "--rdzv-backend=c10d",
                # Ranks stop on SIGTERM / Ctrl-C at a step boundary and may commit a checkpoint first: the
                # launcher must not kill them 30 s after forwarding the signal (its default).
                f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
                f"--rdzv-endpoint=127.0.0.1:{_free_loopback_port()}",
                f"--rdzv-id={uuid.uuid4()}",
                "--module",
                "cosctl",
                *argv,
            ]
        )
        code = 0
        try:
            run(args)
        except ChildFailedError as err:
            code = min((f.exitcode for f in err.failures.values() if f.exitcode > 0), default=1)
        except SignalException as err:  # the launcher was interrupted; the ranks stopped on its signal
            code = 128 + int(err.sigval)
        return _print_reports(Path(folder), code, user_argv)


def _print_reports(folder: Path, code: int, argv: list[str]) -> int:
    reports = sorted(folder.glob("rank_*.json"))
    if not reports:
        return code
    first = json.loads(reports[0].read_text())  # rank 0's when it wrote one
    print(first["message"], file=sys.stderr, flush=True)
    if first["continue"]:
        print(continue_command(argv), file=sys.stderr, flush=True)
    return first["code"]
