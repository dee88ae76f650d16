"""SLURM launch: the rendered batch script (golden file, pure render, CLI), and real jobs on the
single-node cluster of `.ci/slurm.sh`: a 2-rank run to completion, and a run preempted with USR1 that
requeues itself, resumes from the committed step and ends with exactly the uninterrupted run's losses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cosctl.checkpoint.layout import list_committed
from cosctl.cli.slurm import slurm_app
from cosctl.launch.slurm import SlurmError, render_sbatch, submit, time_limit_s, write_spec_snapshot
from cosctl.spec.specs import SpecError, load_spec
from cosctl.storage import open_store
from tests.harness import REPO

GOLDEN = REPO / "tests" / "golden" / "vicuna7b_4x8.sbatch"
TINY = REPO / "recipes" / "tiny" / "pretrain.yaml"
VICUNA = REPO / "recipes" / "vicuna7b" / "pretrain.yaml"
NUM_STEPS = 60  # long enough that the preempted run is mid-run when warned
SIGNAL_AFTER_STEPS = 5
runner = CliRunner()


def vicuna_4x8():
    return load_spec(VICUNA, ["slurm.nodes=4"])


def golden_argv() -> tuple[list[str], str]:
    run_dir = "/scratch/runs/vicuna7b-pretrain"
    return ["pretrain", f"{run_dir}/slurm/spec.yaml"], run_dir


# --- the rendered script -------------------------------------------------------------------------


def test_vicuna7b_4x8_script_matches_golden(update_golden):
    """The 4-node x 8-GPU script is exactly the reviewed golden file."""
    argv, run_dir = golden_argv()
    script = render_sbatch(vicuna_4x8(), argv, run_dir)
    if update_golden:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), "run with --update-golden (or COSCTL_UPDATE_GOLDEN=1) and review the diff"


def test_rendered_script_is_valid_bash(tmp_path):
    """bash parses the script (a quoting slip would only show on the cluster)."""
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(vicuna_4x8(), *golden_argv()))
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_render_depends_only_on_run_name_and_slurm_section():
    """Changing training keys leaves the script alone; changing a slurm key changes it."""
    argv, run_dir = golden_argv()
    base = render_sbatch(vicuna_4x8(), argv, run_dir)
    other_training = load_spec(VICUNA, ["slurm.nodes=4", "optim.lr=3e-4", "data.num_workers=2"])
    assert render_sbatch(other_training, argv, run_dir) == base
    assert render_sbatch(load_spec(VICUNA, ["slurm.nodes=2"]), argv, run_dir) != base


def test_cpu_job_requests_no_gpus_and_runs_ranks_per_node():
    """gpus_per_node 0 drops --gpus-per-node; torchrun gets ranks_per_node processes per node."""
    spec = load_spec(VICUNA, ["slurm.gpus_per_node=0", "slurm.ranks_per_node=2", "slurm.rendezvous_port=29411"])
    script = render_sbatch(spec, ["pretrain", "x.yaml"], "/r")
    assert "--gpus-per-node" not in script
    assert "--nproc_per_node=2 " in script and "port=29411\n" in script


def test_finetune_spec_renders_a_finetune_job():
    """A finetune spec launches `cosctl finetune` on its own SLURM shape."""
    spec = load_spec(REPO / "recipes" / "vicuna7b" / "finetune.yaml")
    script = render_sbatch(spec, ["finetune", "/r/slurm/spec.yaml"], "/r")
    assert "-m cosctl finetune /r/slurm/spec.yaml --run-dir /r &" in script
    assert f"#SBATCH --job-name={spec.run.name}" in script


def test_ranks_per_node_defaults_to_gpus_then_one():
    """Without ranks_per_node: one rank per GPU, or one rank on a CPU node."""
    assert load_spec(VICUNA).slurm.num_ranks_per_node() == 8
    assert load_spec(VICUNA, ["slurm.gpus_per_node=0"]).slurm.num_ranks_per_node() == 1


def test_more_ranks_than_gpus_is_a_spec_error():
    """ranks_per_node above gpus_per_node is refused, naming the key."""
    with pytest.raises(SpecError, match="slurm.ranks_per_node: is 9"):
        load_spec(VICUNA, ["slurm.ranks_per_node=9"])


def test_optional_options_setup_and_extra_lines_are_rendered():
    """partition/account/qos, extra #SBATCH lines and setup lines all reach the script."""
    spec = load_spec(
        VICUNA,
        [
            "slurm.partition=gpu",
            "slurm.account=vision",
            "slurm.qos=high",
            "slurm.extra_sbatch=['--exclusive', '#SBATCH --constraint=h100']",
            "slurm.setup=['module load cuda/12.8', 'source /venv/bin/activate']",
        ],
    )
    script = render_sbatch(spec, ["pretrain", "x.yaml"], "/r")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --qos=high",
        "#SBATCH --exclusive",
        "#SBATCH --constraint=h100",
        "module load cuda/12.8\nsource /venv/bin/activate\n",
    ):
        assert line in script
    assert script.index("source /venv/bin/activate") < script.index("srun ")


def test_warning_lead_must_fit_in_the_time_limit():
    """A signal lead as long as the time limit is refused instead of warning at the start."""
    spec = load_spec(VICUNA, ["slurm.time=00:10:00", "slurm.signal_lead_s=600"])
    with pytest.raises(SlurmError, match="signal_lead_s"):
        render_sbatch(spec, ["pretrain", "x.yaml"], "/r")


@pytest.mark.parametrize(
    "limit, seconds",
    [("30", 1800), ("05:30", 330), ("48:00:00", 172800), ("2-12", 216000), ("1-00:30", 88200), ("1-0:0:5", 86405)],
)
def test_time_limit_formats(limit, seconds):
    """Every sbatch --time format converts to the right number of seconds."""
    assert time_limit_s(limit) == seconds


def test_spec_snapshot_reloads_to_the_same_spec(tmp_path):
    """The snapshot a job trains from is the resolved spec, overrides included."""
    spec = load_spec(TINY, ["optim.lr=1e-3", "slurm.gpus_per_node=0"])
    assert load_spec(write_spec_snapshot(spec, tmp_path)) == spec


# --- the CLI and sbatch --------------------------------------------------------------------------


def test_render_prints_the_script_for_the_snapshot(tmp_path):
    """`slurm render` prints the script; the stage reads the spec snapshot in the run folder."""
    result = runner.invoke(
        slurm_app,
        [
            "render",
            str(VICUNA),
            "--set",
            "slurm.nodes=4",
            "--run-dir",
            str(tmp_path),
            "--output",
            "s3://bucket/x",
            "--",
            "--overwrite",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=4" in result.stdout
    assert (
        f"-m cosctl pretrain {tmp_path}/slurm/spec.yaml --output s3://bucket/x --overwrite --run-dir {tmp_path} &"
        in result.stdout
    )
    assert not (tmp_path / "slurm").exists()


def test_submit_dry_run_prints_and_submits_nothing(tmp_path, monkeypatch):
    """--dry-run prints the script and never calls sbatch."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch reachable
    result = runner.invoke(slurm_app, ["submit", str(VICUNA), "--run-dir", str(tmp_path / "run"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("#!/bin/bash\n")


def fake_sbatch(folder: Path, body: str) -> None:
    path = folder / "sbatch"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_submit_writes_script_and_snapshot_and_prints_job_id(tmp_path, monkeypatch):
    """submit writes job.sbatch + spec.yaml into <run dir>/slurm and prints sbatch's job id."""
    fake_sbatch(tmp_path, f'echo "$@" > {tmp_path}/args; echo "4242;ci"')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    run_dir = tmp_path / "run"
    result = runner.invoke(slurm_app, ["submit", str(TINY), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "4242"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(run_dir / "slurm" / "job.sbatch")]
    assert load_spec(run_dir / "slurm" / "spec.yaml") == load_spec(TINY)


def test_sbatch_missing_is_one_clear_error(tmp_path, monkeypatch):
    """Without sbatch, submit exits 1 with one message that says so."""
    monkeypatch.setenv("PATH", str(tmp_path))
    result = runner.invoke(slurm_app, ["submit", str(TINY), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: sbatch is not on PATH")


def test_sbatch_refusal_is_reported_with_its_message(tmp_path, monkeypatch):
    """sbatch's own error reaches the user as a SlurmError."""
    fake_sbatch(tmp_path, 'echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SlurmError, match="invalid partition specified: gpu"):
        submit("#!/bin/bash\n", tmp_path / "run")


@pytest.mark.parametrize(
    "args, message",
    [
        ([str(REPO / "recipes/tiny/inflate.yaml")], "runs as one process"),
        ([str(TINY), "--", "--resume", "never"], "--resume cannot be passed"),
        ([str(TINY), "--set", "optim.lr=-1"], "optim.lr"),
    ],
)
def test_user_mistakes_are_one_error_line(args, message):
    """Inflate specs, script-owned flags and bad specs end with one message and exit 1."""
    result = runner.invoke(slurm_app, ["render", *args])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and message in result.stderr


# --- real jobs on the single-node cluster --------------------------------------------------------


def tiny_job_overrides(data: Path) -> list[str]:
    """The tiny recipe as a 2-rank CPU job on the 2-core CI node."""
    venv_bin = Path(sys.executable).parent
    return [
        f"data.root={data}",
        f"model.tokenizer={data}/tokenizer",
        f"optim.num_steps={NUM_STEPS}",
        "checkpoint.every_steps=1000",
        "eval.every_steps=null",
        "batch.tokens_per_micro_batch=1024",
        "slurm.gpus_per_node=0",
        "slurm.ranks_per_node=2",
        "slurm.cpus_per_task=2",
        "slurm.time=00:20:00",
        "slurm.signal_lead_s=60",
        f'slurm.setup=["export PATH={venv_bin}:$PATH"]',
        "storage.path_style=true",
    ]


def submit_tiny(data: Path, run_dir: Path, output: str) -> str:
    result = runner.invoke(
        slurm_app,
        [
            "submit",
            str(TINY),
            *sum((["--set", s] for s in tiny_job_overrides(data)), []),
            "--run-dir",
            str(run_dir),
            "--output",
            output,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def job_log(run_dir: Path, job_id: str) -> str:
    out, err = run_dir / "slurm" / f"{job_id}.out", run_dir / "slurm" / f"{job_id}.err"
    return "".join(p.read_text(errors="replace") for p in (out, err) if p.exists())


def metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records; a step logged twice keeps the later record (the resumed run's)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_cluster, tiny_data, tmp_path_factory) -> dict:
    """The tiny 2-rank job, submitted through the rendered script and run to the end."""
    root = tmp_path_factory.mktemp("slurm_uninterrupted")
    run_dir, output = root / "run", f"file://{root}/out"
    started = time.monotonic()
    job_id = submit_tiny(tiny_data, run_dir, output)
    job = slurm_cluster.wait_final(job_id, timeout_s=600)
    return {"id": job_id, "job": job, "run_dir": run_dir, "output": output, "seconds": time.monotonic() - started}


@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_job_runs_to_completion(uninterrupted_job):
    """A 2-rank job runs the tiny recipe to the end: COMPLETED, exit 0, summary with world_size 2."""
    job, run_dir = uninterrupted_job["job"], uninterrupted_job["run_dir"]
    log = job_log(run_dir, uninterrupted_job["id"])
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == NUM_STEPS
    assert "starting fresh" in log and "cosctl-slurm: training finished" in log
    print(
        f"\nuninterrupted job {uninterrupted_job['id']}: {uninterrupted_job['seconds']:.1f} s, "
        f"final_loss {summary['final_loss']!r}"
    )


class Timeline:
    """First-seen times of job events, for the report printed with -s."""

    def __init__(self):
        self.start = time.time()
        self.events: list[tuple[float, str]] = []

    def mark(self, event: str, when: float | None = None) -> None:
        self.events.append((when or time.time(), event))

    def render(self) -> str:
        rows = sorted(self.events)
        return "\n".join(
            f"  +{t - self.start:6.1f} s  {time.strftime('%H:%M:%S', time.localtime(t))}  {e}" for t, e in rows
        )


def watch_preemption(slurm, job_id: str, run_dir: Path, timeline: Timeline) -> dict:
    """Follow the job: warn it after a few steps, record each event until it ends."""
    patterns = {
        "batch shell trapped USR1": r"cosctl-slurm: got SIGUSR1",
        "ranks stopped: 'stopped at step K'": r"stopped at step \d+: SIGUSR1",
        "checkpoint committed": r"checkpoint step_\d+ committed",
        "batch shell requeues the job": r"requeueing job",
        "rerun started (SLURM_RESTART_COUNT=1)": r"restart 1 \(SLURM_RESTART_COUNT\)",
        "rerun resumed: 'resuming from ... at step K'": r"resuming from \S+ at step \d+",
        "batch shell: training finished": r"cosctl-slurm: training finished",
    }
    seen: set[str] = set()
    warned, running, requeued = False, False, False
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        job, log = slurm.job(job_id), job_log(run_dir, job_id)
        for event, pattern in patterns.items():
            if event not in seen and re.search(pattern, log):
                seen.add(event)
                timeline.mark(event)
        if not running and job.get("JobState") == "RUNNING":
            running = True
            timeline.mark("job RUNNING")
        if not requeued and job.get("Restarts") == "1":
            requeued = True
            timeline.mark(f"scontrol: Restarts=1, JobState={job['JobState']}")
        if not warned and len(metrics(run_dir)) >= SIGNAL_AFTER_STEPS:
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
            warned = True
            timeline.mark(f"test: scancel --signal=USR1 --batch (metrics show {len(metrics(run_dir))} steps)")
        if job.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} and requeued:
            timeline.mark(f"job {job['JobState']} (ExitCode {job['ExitCode']})")
            return job
        if job.get("JobState") in {"FAILED", "CANCELLED", "TIMEOUT"}:
            pytest.fail(f"job {job_id} ended {job['JobState']} without a requeue:\n{log[-4000:]}")
        time.sleep(0.25)
    pytest.fail(f"job {job_id} did not finish in time: {slurm.job(job_id)}\n{job_log(run_dir, job_id)[-4000:]}")


@pytest.fixture
def preempt_output(tmp_path, monkeypatch) -> Iterator[str]:
    """The preempted job's output: a bucket on a moto server in this process, which the job reaches
    over loopback with the credentials exported from this environment (moto is a test dependency: a
    missing one fails the test rather than falling back to a folder)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    for name, value in {
        "AWS_ACCESS_KEY_ID": "slurm-test",
        "AWS_SECRET_ACCESS_KEY": "slurm-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    boto3.client("s3").create_bucket(Bucket="slurm-preempt")
    yield "s3://slurm-preempt/tiny-pretrain"
    server.stop()


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(
    slurm_cluster, tiny_data, uninterrupted_job, preempt_output, tmp_path
):
    """USR1 mid-run: checkpoint at step K, self-requeue, resume at K, same per-step losses as without it."""
    run_dir = tmp_path / "run"
    timeline = Timeline()
    job_id = submit_tiny(tiny_data, run_dir, preempt_output)
    timeline.mark(f"test: submitted job {job_id}", timeline.start)
    job = watch_preemption(slurm_cluster, job_id, run_dir, timeline)
    log = job_log(run_dir, job_id)

    resumed = [
        (uri, int(name), int(step))
        for uri, name, step in re.findall(r"resuming from (\S+)/checkpoints/step_(\d+) at step (\d+)", log)
    ]
    stopped = re.findall(r"stopped at step (\d+): SIGUSR1", log)
    store = open_store(preempt_output, load_spec(run_dir / "slurm" / "spec.yaml").storage.to_settings())
    manifests = {c.step: c.manifest for c in list_committed(store)}
    for step, manifest in manifests.items():
        if step != NUM_STEPS:
            timeline.mark(f"checkpoint step {step} manifest created", manifest["created"])
    print(
        f"\npreemption timeline of job {job_id}, output {preempt_output} (total {time.time() - timeline.start:.1f} s;"
        f" uninterrupted job {uninterrupted_job['seconds']:.1f} s):\n{timeline.render()}"
    )

    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert len(set(stopped)) == 1, f"ranks stopped at steps {stopped}"
    step_k = int(stopped[0])
    evidence = "\n".join(
        line
        for line in log.splitlines()
        if re.search(r"NOT committed|exitcode|closing signal|starting fresh|resuming from", line)
    )
    assert step_k in manifests, f"step {step_k} was not committed (committed: {sorted(manifests)}):\n{evidence}"
    assert log.count("starting fresh") == 1 and resumed == [(preempt_output, step_k, step_k)], evidence

    reference = metrics(uninterrupted_job["run_dir"])
    preempted = metrics(run_dir)
    assert sorted(preempted) == sorted(reference) == list(range(1, NUM_STEPS + 1))
    diffs = {
        s: preempted[s]["loss"] - reference[s]["loss"]
        for s in reference
        if preempted[s]["loss"] != reference[s]["loss"]
    }
    print(
        f"resumed at step {step_k}; steps whose loss differs from the uninterrupted run: "
        + (", ".join(f"{s}: {d:+.3e}" for s, d in sorted(diffs.items())) or "none (bit-identical)")
    )
    assert not {s: d for s, d in diffs.items() if abs(d) > 1e-6}, f"loss differs after resuming at {step_k}: {diffs}"
    final = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted_job["run_dir"] / "summary.json").read_text())
    assert final["steps"] == NUM_STEPS and final["world_size"] == 2
    assert final["final_loss"] == pytest.approx(expected["final_loss"], abs=1e-6)
