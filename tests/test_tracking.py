"""Experiment trackers (`cosctl.train.tracking`, the spec's `tracking:`): the section is strict and keeps
credentials out; a tracker that fails warns once, keeps its records and delivers them when it answers
again, and gives up at the flush timeout; a real `mlflow server` on loopback (MlflowClient as the judge)
holds metrics.jsonl, the spec, summary.json and the report figures, and a killed run resumes the same
MLflow run; W&B offline keeps the records in its run folder and a resume keeps the id; a dead MLflow
port never stops training."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cosctl.common.errors import SpecError
from cosctl.common.log import setup_logging
from cosctl.spec.specs import load_spec
from cosctl.train import tracking
from cosctl.train.tracking import Backend, Tracker
from tests.extras import require
from tests.harness import RECIPES, env, kill_tree, kill_when, run, steps, tiny_spec, train_command

TINY = RECIPES / "tiny" / "pretrain.yaml"


# ------------------------------------------------------------------------------------------ the spec


def test_the_tracking_section_is_strict_and_keeps_credentials_out():
    """Defaults: TensorBoard alone. Unknown keys, a missing W&B project, an unknown W&B mode and a
    tracking URI with a password are one spec error naming the key."""
    spec = load_spec(TINY, ["tracking.mlflow.tracking_uri=http://127.0.0.1:5000"])
    assert spec.tracking.tensorboard and spec.tracking.wandb is None
    assert spec.tracking.mlflow.experiment == "cosctl" and spec.tracking.mlflow.run_name is None
    for override, key in (
        ("tracking.mlflow.tracking_uri=https://me:secret@mlflow.example.com", "tracking.mlflow.tracking_uri"),
        ("tracking.mlflow.experment=x", "tracking.mlflow.experment"),
        ("tracking.wandb.mode=offline", "tracking.wandb.project"),
        ("tracking.wandb={project: p, mode: dryrun}", "tracking.wandb.mode"),
    ):
        with pytest.raises(SpecError) as err:
            load_spec(TINY, [override])
        assert key in str(err.value) and "secret" not in str(err.value)


# ------------------------------------------------------------------------------------------ delivery


class Flaky(Backend):
    """A tracker that fails its first `failures` calls (or every call), recording what it took."""

    name = "flaky"

    def __init__(self, failures: float):
        self.failures, self.calls, self.taken = failures, 0, []

    def where(self) -> str:
        return "the flaky tracker"

    def _call(self, *what) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"refused (call {self.calls})")
        self.taken.append(what)

    def start(self, resume_id, params):
        self._call("start", resume_id, dict(params))
        self.run_id = resume_id or "run-1"

    def log_metrics(self, step, metrics, timestamp):
        self._call("metrics", step, metrics)

    def log_summary(self, summary, path):
        self._call("summary", summary)

    def log_image(self, path):
        self._call("image", path.name)

    def finish(self, completed):
        self._call("finish", completed)


def test_a_failing_tracker_warns_once_keeps_its_records_and_delivers_them_later(capsys, monkeypatch):
    """Three failed calls (the start among them): one warning, training's calls return at once, and
    every record arrives in order once the tracker answers again, then the run ends stopped early."""
    monkeypatch.setattr(tracking, "FIRST_BACKOFF_S", 0.05)
    setup_logging(0, "pretrain")
    backend = Flaky(failures=3)
    tracker = Tracker([backend], {"flaky": "run-0"}, {"optim.lr": "0.001"}, flush_timeout_s=30)
    started = time.monotonic()
    for step in range(1, 6):
        tracker.log_metrics({"step": step, "loss": 1.0 / step, "lr": 0.1, "grad_norm": None, "note": "x"})
    assert time.monotonic() - started < 0.5
    tracker.close()
    assert backend.taken == [
        ("start", "run-0", {"optim.lr": "0.001"}),
        *[("metrics", step, {"loss": 1.0 / step, "lr": 0.1}) for step in range(1, 6)],
        ("finish", False),
    ]
    assert tracker.ids() == {"flaky": "run-0"}
    captured = capsys.readouterr()
    assert captured.err.count("tracking: the flaky tracker failed (ConnectionError: refused (call 1))") == 1
    assert len(captured.err.strip().splitlines()) == 1 and "the flaky tracker answers again" in captured.out


def test_a_tracker_that_never_answers_is_left_behind_at_the_flush_timeout(capsys):
    """A tracker that fails every call: one warning, close returns at the flush timeout saying how
    many calls were left out, and its thread stops."""
    setup_logging(0, "pretrain")
    backend = Flaky(failures=float("inf"))
    tracker = Tracker([backend], {}, {}, flush_timeout_s=1.5)
    for step in range(1, 4):
        tracker.log_metrics({"step": step, "loss": 1.0})
    started = time.monotonic()
    tracker.close({"steps": 3}, None)
    assert 1.0 < time.monotonic() - started < 3.0
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "flaky tracker failed" in captured.err
    assert "did not take 4 call(s)" in captured.out  # 3 records + the finish; the start was being retried
    tracker.deliveries[0].thread.join(2.0)
    assert not tracker.deliveries[0].thread.is_alive() and backend.taken == []


# ------------------------------------------------------------------------------------------ MLflow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, a temporary SQLite store and artifact folder; its URI."""
    require("mlflow", "mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env(root, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        import urllib.request

        while True:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer within 300 s"
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        yield uri
    finally:
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
        for child in children:
            if child.is_running():
                child.kill()
        log.close()


def manifest(output: Path, step: int) -> dict:
    return json.loads((output / "checkpoints" / f"step_{step:08d}" / "manifest.json").read_text())


def last_logged(client, run_id: str, key: str) -> dict[int, float]:
    """Each step's value of `key` as last logged (a resumed run logs again the steps after its checkpoint)."""
    latest: dict[int, tuple[int, float]] = {}
    for metric in client.get_metric_history(run_id, key):
        if metric.step not in latest or metric.timestamp >= latest[metric.step][0]:
            latest[metric.step] = (metric.timestamp, metric.value)
    return {step: value for step, (_, value) in latest.items()}


@pytest.mark.slow
def test_mlflow_run_holds_the_metrics_log_and_a_killed_run_continues_it(tiny_data, tmp_path, mlflow_server):
    """A tiny pretrain reporting to a real MLflow server is killed after its step-3 checkpoint and
    resumed: one MLflow run, whose id every checkpoint keeps (before and after the kill), finished,
    with the spec as params, every value of metrics.jsonl at its step, summary.json and the report
    figures."""
    mlflow = require("mlflow", "mlflow")
    output, run_dir = tmp_path / "out", tmp_path / "run"
    cmd = train_command(
        tiny_data, run_dir, output, 6, 1,
        f"tracking.mlflow.tracking_uri={mlflow_server}", "tracking.mlflow.experiment=resumed", "eval.every_steps=2",
    )  # fmt: skip
    cmd[cmd.index("--nproc") + 1] = "1"
    latest = output / "checkpoints" / "latest"
    kill_when(cmd, tmp_path, lambda: latest.exists() and latest.read_text() == "step_00000003")
    before = manifest(output, 3)["tracking"]["mlflow"]
    run(cmd, tmp_path)
    after = manifest(output, 6)["tracking"]["mlflow"]
    print(f"MLflow run id before the kill: {before}; after the resume: {after}")
    assert after == before

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("resumed")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_id == before and tracked.info.status == "FINISHED"
    assert tracked.info.run_name == "tiny-pretrain"
    assert tracked.data.params["optim.lr"] == "0.002" and tracked.data.params["optim.num_steps"] == "6"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
    assert {"loss", "lr", "eval_loss", "eval_loss_swapped_images", "samples_per_s"} <= keys
    assert set(tracked.data.metrics) == keys
    for key in keys:
        expected = {r["step"]: float(r[key]) for r in records if r.get(key) is not None}
        assert last_logged(client, before, key) == expected, key
    assert {a.path for a in client.list_artifacts(before)} == {"summary.json", "report"}
    assert "report/loss.png" in {a.path for a in client.list_artifacts(before, "report")}
    summary = json.loads(Path(client.download_artifacts(before, "summary.json", str(tmp_path))).read_text())
    assert summary == json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_dead_mlflow_port_neither_stops_nor_stalls_training(tiny_data, tmp_path, in_process, capfd):
    """MLflow at a port where nothing listens: the run trains and publishes, with one warning."""
    require("mlflow", "mlflow")
    setup_logging(0, "pretrain")
    dead = f"http://127.0.0.1:{free_port()}"
    spec = tiny_spec(
        tiny_data, tmp_path / "out", 3, f"tracking.mlflow.tracking_uri={dead}", "tracking.flush_timeout_s=3"
    )
    summary = in_process(spec, tmp_path / "run")
    assert summary["steps"] == 3 and (tmp_path / "out" / "model" / "manifest.json").is_file()
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "tracking:" in line]
    assert len(warnings) == 1 and f"MLflow at {dead} failed" in warnings[0], err[-3000:]
    assert "mlflow" not in manifest(tmp_path / "out", 3)["tracking"]  # it never started a run


# ------------------------------------------------------------------------------------------ W&B


WANDB_BLOCK = 32768


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file, whose layout is LevelDB's log (wandb-core writes it; the Python
    reader left the package): a 7-byte header (":W&B", magic, version), then 32 KiB blocks of chunks,
    each after a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        if WANDB_BLOCK - offset % WANDB_BLOCK < 7:  # a block's tail too short for a header is padding
            offset += WANDB_BLOCK - offset % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0:
            break
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def wandb_runs(run_dir: Path) -> list[tuple[str, list[dict], dict, dict]]:
    """Each offline run folder under run_dir/wandb, oldest first, its records parsed with wandb's own
    protobuf classes: (run id, history rows, config, summary)."""
    from wandb.proto import wandb_internal_pb2

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    found = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        history, config, summary, run_id = [], {}, {}, None
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = run_id or record.run.run_id  # later run records may only update
                config.update({key(i): json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                history.append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
        found.append((run_id, history, config, summary))
    return found


@pytest.mark.slow
def test_wandb_offline_holds_the_metrics_and_a_resume_keeps_the_run_id(tiny_data, tmp_path, in_process):
    """W&B offline: the run folder's records hold every step's loss of metrics.jsonl and the spec;
    resuming from the step-3 checkpoint to step 5 logs to the same run id (the checkpoint's)."""
    require("wandb", "wandb")
    output, run_dir = tmp_path / "out", tmp_path / "run"
    extra = ("tracking.wandb.project=cosctl-tests", "tracking.wandb.mode=offline", "tracking.tensorboard=false")
    in_process(tiny_spec(tiny_data, output, 3, *extra), run_dir)
    first_id = manifest(output, 3)["tracking"]["wandb"]
    in_process(tiny_spec(tiny_data, output, 5, *extra), run_dir)
    assert manifest(output, 5)["tracking"]["wandb"] == first_id
    runs = wandb_runs(run_dir)
    assert [run_id for run_id, *_ in runs] == [first_id, first_id]
    logged = {row["step"]: row["loss"] for _, history, _, _ in runs for row in history if "loss" in row}
    assert logged == {step: record["loss"] for step, record in steps(run_dir).items()}
    config = runs[0][2]
    assert config["optim.lr"] == "0.002" and config["tracking.wandb.mode"] == "offline"
    assert runs[1][3]["steps"] == 5 and runs[1][3]["final_loss"] is not None
    assert not (run_dir / "tensorboard").exists()
