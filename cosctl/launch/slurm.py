"""SLURM launch (docs/design.md §7): `render_sbatch` writes a run's batch script (pure), `submit` hands it to sbatch.

The job runs one `srun` task per node; each task runs torchrun with `ranks_per_node` training ranks,
rendezvousing on the first node. The script's real work is the warning/requeue protocol:

    SLURM's --signal=B:USR1@<lead>, or `scancel --signal=USR1 --batch JOB`   -> batch-shell trap
      -> `scancel --signal=USR1 $SLURM_JOB_ID` (no --batch): every process of the training step on
         every node. The task shell ignores USR1 before exec'ing torchrun, so torchrun (which would
         die of it, and does not forward it) ignores it, and so do the ranks until they install
         their own handler; the trap repeats the signal until the step ends, so a warning that lands
         while ranks are still starting (or loading a checkpoint) is not lost.
      -> the ranks agree at the next step boundary, commit a checkpoint and exit 75 (torchrun
         reports any failed rank as 1, so the script goes by the warning it saw, not the code)
      -> the step ended non-zero after a warning: `scontrol requeue $SLURM_JOB_ID`
      -> the rerun (SLURM_RESTART_COUNT=1, 2, ...) resumes from the newest committed checkpoint,
         because `--resume auto` is the stages' default.

A run that stops for a requeue on its own (the store down past storage.max_outage_minutes, the staging
disk full: exit 75 with no warning) leaves `<run dir>/slurm/requeue` from rank 0; the script requeues
on it the same way.

SIGTERM (scancel, time limit, SLURM's own preemption) is forwarded the same way but never requeues
from the script: SLURM is ending the job on purpose, and requeueing would undo a user's `scancel`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from ..common.errors import SlurmError
from ..spec.sections import SlurmSpec
from ..spec.specs import TrainingSpec, spec_to_dict

TRAIN_STAGES = ("pretrain", "finetune")
JOB_SCRIPT = "job.sbatch"
REQUEUE_MARKER = "slurm/requeue"  # under the run dir: a run that stopped with exit 75 asks for a requeue
SPEC_SNAPSHOT = "spec.yaml"


# Commented on purpose: the right values depend on the cluster's fabric; they document the knobs.
_CLUSTER_ENV = """\
# Cluster environment: uncomment and adapt what your fabric needs.
# export NCCL_DEBUG=WARN                      # INFO to debug hangs and topology
# export NCCL_SOCKET_IFNAME=ib0               # interface for NCCL's bootstrap sockets
# export NCCL_IB_HCA=mlx5                     # InfiniBand adapters NCCL may use
# export NCCL_IB_DISABLE=0                    # 1 forces TCP (no InfiniBand/RoCE)
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1    # a dead rank fails the job instead of hanging it
# export OMP_NUM_THREADS=8                    # CPU threads per rank (torchrun sets 1 otherwise)
"""

# The warning/requeue protocol (see the module docstring); static, so the golden file pins it.
_PROTOCOL = r"""
# --- warning and requeue (cosctl/slurm.py explains the protocol) ---
log() { echo "$(date '+%F %T') cosctl-slurm: $*"; }
warned=""; terminating=""; resender=""

forward_warning() {  # no --batch: every process of the job's steps, on every node, not this shell
  scancel --signal=USR1 "$SLURM_JOB_ID" || log "scancel --signal=USR1 failed"
}

on_signal() {
  log "got SIG$1; forwarding USR1 to the training ranks"
  if [ "$1" = USR1 ]; then warned=1; else terminating=1; fi
  forward_warning
  # A rank ignores USR1 until it installs its handler, so repeat the warning until the step ends.
  if [ -z "$resender" ]; then
    (while sleep 30; do forward_warning; done) &
    resender=$!
  fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

wait_step() {  # wait_step PID: its exit code; a trapped signal interrupts `wait`, so wait again
  local rc
  while :; do
    wait "$1"; rc=$?
    kill -0 "$1" 2>/dev/null || break
  done
  # The step may have been reaped while a trap ran (rc > 128 from the interruption); bash keeps its
  # status for one more `wait`, which older bash answers with 127 instead.
  if [ "$rc" -gt 128 ]; then wait "$1"; local again=$?; [ "$again" -ne 127 ] && rc=$again; fi
  return "$rc"
}

finish() {  # finish RC: done, requeue after a warning, or report the failure
  [ -n "$resender" ] && kill "$resender" 2>/dev/null
  if [ "$1" -eq 0 ]; then
    log "training finished"; exit 0
  fi
  if [ -n "$terminating" ]; then
    log "training stopped (exit $1) after SIGTERM: SLURM is ending the job, no requeue from here" \
        "(if this was the time limit, raise slurm.signal_lead_s so the checkpoint fits before it)"
    exit "$1"
  fi
  asked=""  # rank 0 leaves this file when it stopped for a requeue on its own (a store outage, a full disk)
  if [ -f "$requeue_marker" ]; then asked=1; log "$(cat "$requeue_marker")"; rm -f "$requeue_marker"; fi
  if [ -n "$warned" ] || [ -n "$asked" ]; then
    log "training stopped (exit $1) for a requeue; requeueing job $SLURM_JOB_ID"
    trap '' TERM USR1  # the requeue SIGTERMs this shell and scontrol itself
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    log "scontrol requeue failed; resubmit the job to resume from the newest committed checkpoint"
    exit 75
  fi
  log "training failed (exit $1)"; exit "$1"
}
"""


def time_limit_s(limit: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S."""
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-H, D-H:M
    else:
        parts = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    hours, minutes, seconds = parts
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def _sbatch_options(slurm: SlurmSpec, name: str, run_dir: str) -> list[str]:
    logs = f"{run_dir}/slurm"
    options = [f"--job-name={name}", f"--nodes={slurm.nodes}", "--ntasks-per-node=1"]
    if slurm.gpus_per_node > 0:
        options.append(f"--gpus-per-node={slurm.gpus_per_node}")
    options += [f"--cpus-per-task={slurm.cpus_per_task}", f"--mem={slurm.mem}", f"--time={slurm.time}"]
    options += [
        f"--{key}={value}"
        for key, value in (("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos))
        if value
    ]
    # B: signals only the batch shell, whose trap forwards the warning; append keeps the log of
    # every requeued run in one file; storage credentials come from the submitter's environment.
    options += [
        "--requeue",
        f"--signal=B:USR1@{slurm.signal_lead_s}",
        "--open-mode=append",
        "--export=ALL",
        f"--output={logs}/%j.out",
        f"--error={logs}/%j.err",
    ]
    lines = [f"#SBATCH {shlex.quote(option)}" for option in options]
    lines += [line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in slurm.extra_sbatch]
    return lines


def _launch(slurm: SlurmSpec, argv: list[str], run_dir: str) -> str:
    port = str(slurm.rendezvous_port) if slurm.rendezvous_port else "$((20000 + SLURM_JOB_ID % 20000))"
    stage_cmd = " ".join(shlex.quote(arg) for arg in [*argv, "--run-dir", run_dir])
    return f"""requeue_marker={shlex.quote(run_dir + "/" + REQUEUE_MARKER)}
rm -f "$requeue_marker"
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Without slurm.rendezvous_port the port comes from the job id, so jobs sharing a node do not collide.
port={port}
restarts=${{SLURM_RESTART_COUNT:-0}}
log "job $SLURM_JOB_ID, restart $restarts (SLURM_RESTART_COUNT), $SLURM_NNODES node(s), rendezvous $head:$port"

# One task per node runs torchrun. Its shell ignores USR1 before exec'ing it (ignored dispositions
# survive exec and fork): torchrun would die of the warning, the ranks catch it once they are ready.
srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task={slurm.cpus_per_task} --kill-on-bad-exit=1 \\
  bash -c 'trap "" USR1; exec python -m torch.distributed.run --node_rank="$SLURM_NODEID" "$@"' torchrun \\
  --nnodes="$SLURM_NNODES" --nproc_per_node={slurm.num_ranks_per_node()} \\
  --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \\
  -m cosctl {stage_cmd} &
wait_step $!
finish $?
"""


def render_sbatch(spec: TrainingSpec, argv: list[str], run_dir: str) -> str:
    """The batch script that runs `cosctl <argv> --run-dir <run_dir>` on the spec's SLURM shape.

    Pure: depends only on `spec.run.name`, `spec.slurm` and the arguments."""
    slurm = spec.slurm
    if slurm.signal_lead_s >= time_limit_s(slurm.time):
        raise SlurmError(
            f"slurm.signal_lead_s: {slurm.signal_lead_s} s is not shorter than slurm.time "
            f"({slurm.time}); the warning would come at the start"
        )
    setup = "\n".join(["# Setup (slurm.setup in the spec)", *slurm.setup, "", ""]) if slurm.setup else ""
    header = [
        "#!/bin/bash",
        f"# cosctl {spec.stage} job for run {spec.run.name}: rendered from its spec by `cosctl slurm`.",
        *_sbatch_options(slurm, spec.run.name, run_dir),
    ]
    return "\n".join(header) + "\n\n" + _CLUSTER_ENV + _PROTOCOL + "\n" + setup + _launch(slurm, argv, run_dir)


def write_spec_snapshot(spec: TrainingSpec, run_dir: Path) -> Path:
    """Freeze the resolved spec (overrides applied) next to the job, so every requeued run trains
    exactly what was submitted even if the YAML file changes later."""
    path = Path(run_dir) / "slurm" / SPEC_SNAPSHOT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    return path


def submit(script: str, run_dir: Path) -> str:
    """Write `<run_dir>/slurm/job.sbatch` and submit it; return the job id."""
    folder = Path(run_dir) / "slurm"
    folder.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    path = folder / JOB_SCRIPT
    path.write_text(script)
    if shutil.which("sbatch") is None:
        raise SlurmError(f"sbatch is not on PATH: submit from a SLURM login node (the script is in {path})")
    result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SlurmError(f"sbatch refused {path} (exit {result.returncode}): {result.stderr.strip()}")
    job_id = result.stdout.strip().split(";", 1)[0]  # --parsable prints "id" or "id;cluster"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {result.stdout.strip()!r}")
    return job_id


# The script sets these itself; a requeued run must resume from its newest checkpoint (`auto`).
_SCRIPT_OWNED = ("--resume", "--run-dir", "--nproc", "--set")


def _check_extra(extra: list[str]) -> None:
    for arg in extra:
        if arg.split("=", 1)[0] in _SCRIPT_OWNED:
            raise SlurmError(
                f"{arg.split('=', 1)[0]} cannot be passed to a SLURM job: the job script owns it "
                "(--set goes before `--`; requeued runs always resume with --resume auto)"
            )


def job_command(
    spec: TrainingSpec, spec_path: Path, run_dir: Path, output: str | None, extra: list[str] | None
) -> tuple[list[str], Path]:
    """The stage command line a job runs for `spec` and the (absolute) run folder of its job."""
    if spec.stage not in TRAIN_STAGES:
        raise SlurmError(f"{spec_path}: stage: {spec.stage} runs as one process; run `cosctl {spec.stage}` directly")
    _check_extra(extra or [])
    folder = Path(run_dir).resolve()  # the job may start elsewhere
    argv = [spec.stage, str(folder / "slurm" / SPEC_SNAPSHOT)]
    if output:
        argv += ["--output", output]
    return argv + list(extra or []), folder


def ask_for_requeue(run_dir: Path, message: str) -> None:
    """A run inside a SLURM job stopped for a requeue on its own (exit 75 with no warning): rank 0
    leaves `REQUEUE_MARKER` for the job script, which then requeues as after a warning. Outside SLURM
    and on other ranks, nothing."""
    from .local import is_rank0

    if not os.environ.get("SLURM_JOB_ID") or not is_rank0():
        return
    marker = Path(run_dir) / REQUEUE_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(message)
