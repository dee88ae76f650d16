"""Running `cosctl` as a user would, from tests: the repository, the command line in a subprocess
(`cosctl(...)`), training commands, their environment, and killing ranks. The one place tests start
`python -m cosctl`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


def train_command(data: Path, run_dir: Path, output, num_steps: int, every: int, *extra: str) -> list[str]:
    """A 2-rank tiny pretrain of `num_steps` steps saving every `every` steps; `extra` = more overrides."""
    overrides = [
        f"data.root={data}",
        f"model.tokenizer={data / 'tokenizer'}",
        f"optim.num_steps={num_steps}",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=10",
        "eval.every_steps=null",
        "batch.tokens_per_micro_batch=1024",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "cosctl",
        "pretrain",
        "recipes/tiny/pretrain.yaml",
        "--nproc",
        "2",
        "--run-dir",
        str(run_dir),
        "--output",
        str(output),
        *[a for o in overrides for a in ("--set", o)],
    ]


def env(tmp: Path | None = None, **extra: str) -> dict:
    """The environment of a CPU run: one OpenMP thread per rank, DeepSpeed's CPU accelerator, a private
    extension cache (nothing JIT-builds, but a shared cache would race), no launcher variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cache = {"TORCH_EXTENSIONS_DIR": str(tmp / "ext")} if tmp is not None else {}
    return {
        **base,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONWARNINGS": "ignore::FutureWarning",
        **cache,
        **extra,
    }


def cosctl(
    *args: str, tmp: Path | None = None, timeout: int = 600, env_extra: dict | None = None, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """`python -m cosctl ARGS` in a subprocess, output captured; the exit code is the caller's to check."""
    return _run_tree([sys.executable, "-m", "cosctl", *args], cwd, env(tmp, **(env_extra or {})), timeout)


def _run_tree(cmd: list[str], cwd: Path, environment: dict, timeout: int) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd)` with output captured, except that on a timeout the ranks and any process
    they started are killed too (killing the launcher alone leaves them running, and holding ports)."""
    with subprocess.Popen(
        cmd, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, after asserting it exited 0 (the output's tail is the assertion message)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run(cmd: list[str], tmp: Path, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a full command line (from `train_command`) and require exit 0."""
    return ok(_run_tree(cmd, REPO, env(tmp, **extra_env), 600))


# Appended to two-rank scripts: each rank leaves its process group as the product's ranks do
# (`cosctl.common.dist.leave_process_group`), or gloo may abort it at exit after its work is done.
TEARDOWN = """
import torch.distributed
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
"""


def run_script_on_two_ranks(source: str, tmp: Path, *args: str, timeout: int = 300) -> None:
    """Write `source` to a script under `tmp` and run it on two ranks with torchrun (`args` after the
    script); require exit 0. For tests that compare what DeepSpeed does on two ranks with one process."""
    script = tmp / "two_ranks.py"
    script.write_text(source + TEARDOWN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    ok(_run_tree(cmd, REPO, env(tmp, PYTHONPATH=str(REPO)), timeout))


def steps(run_dir: Path) -> dict[int, dict]:
    """Last record per step in metrics.jsonl (a resumed run appends)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in their own sessions,
    so killing its process group would leave them running)."""
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def kill_when(cmd: list[str], tmp: Path, ready, **extra_env: str) -> None:
    """Start `cmd` and SIGKILL it with all its ranks once `ready()` holds."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(tmp, **extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting to kill"
        time.sleep(0.01)
    kill_tree(proc.pid)
    proc.wait()


def tiny_spec(data: Path, output, num_steps: int, *extra: str):
    """The tiny pretrain recipe on the synthetic set at `data`, saving after every step."""
    from cosctl.spec.specs import load_spec

    return load_spec(
        RECIPES / "tiny" / "pretrain.yaml",
        [
            f"data.root={data}",
            f"model.tokenizer={data / 'tokenizer'}",
            f"run.output={output}",
            f"optim.num_steps={num_steps}",
            "checkpoint.every_steps=1",
            "checkpoint.keep_last=5",
            "eval.every_steps=null",
            "batch.tokens_per_micro_batch=1024",
            *extra,
        ],
    )


def plan_of_run(output: Path, world_size: int, tmp: Path) -> dict:
    """`cosctl plan --json` of the spec a training run recorded (its newest checkpoint's spec.json, every
    override applied; `run.output` where the run wrote) at the run's world size, as a user would plan it."""
    latest = (Path(output) / "checkpoints" / "latest").read_text().strip()
    spec = json.loads((Path(output) / "checkpoints" / latest / "spec.json").read_text())
    spec["run"]["output"] = str(output)  # where the run wrote (its --output), so the plan finds its checkpoints
    path = Path(tmp) / f"planned-{latest}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return json.loads(ok(cosctl("plan", str(path), "--json", "--world-size", str(world_size), tmp=tmp)).stdout)


def assert_plan_equals_run(run_dir: Path, output: Path, world_size: int, tmp: Path) -> dict:
    """What `cosctl plan` resolves for a run's spec equals what the run resolved at start (its
    resolved.json): samples per step and per rank, micro-batches, steps per epoch, DeepSpeed config,
    FLOPs per sample. Returns the plan."""
    plan = plan_of_run(output, world_size, tmp)
    ran = json.loads((Path(run_dir) / "resolved.json").read_text())
    differing = {k: (plan["resolved"].get(k), ran.get(k)) for k in set(plan["resolved"]) | set(ran)}
    assert plan["resolved"] == ran, {k: v for k, v in differing.items() if v[0] != v[1]}
    assert ran["lengths_measured"] and ran["world_size"] == world_size
    return plan
