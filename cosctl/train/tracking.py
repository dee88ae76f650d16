"""Experiment trackers of a training run (the spec's `tracking:`, docs/design.md §6): TensorBoard, MLflow
and W&B, one small class each behind `Backend` (composer's loggers), fed on rank 0 beside metrics.jsonl.

    tracker = open_tracker(spec, run_dir, resume_ids)   # rank 0; resume_ids: the checkpoint's `tracking`
    tracker.log_metrics(record)                         # every record MetricsSink writes (steps, evals)
    tracker.ids()                                       # {"mlflow": run id, "wandb": id}: each checkpoint's
                                                        # manifest keeps them, so a resume (a SLURM requeue)
                                                        # continues the same tracked runs
    tracker.close(summary, run_dir)                     # summary.json and the report's PNGs, then flush

What each tracked run holds: the resolved spec flattened into params (`optim.lr`, `model.scales`, ...)
when it is created, every numeric value of every record at its step (metrics.jsonl's keys), and at the
end summary.json and the figures `cosctl report` draws for the run (written to the run folder's
report/). TensorBoard keeps today's scalars (`<stage>/<key>`).

A tracker never stops or slows training. Each backend runs on its own thread (`_Delivery`) behind a
bounded queue: a call that fails is retried with backoff (1 s doubling to a minute) while records wait
in the queue (the oldest are dropped past MAX_PENDING); the first failure logs one warning, a
recovery one info line. `close` waits at most `tracking.flush_timeout_s` for what is queued and says
what was left out. Credentials come from the environment only (the spec refuses them), and nothing
from the environment is sent.
"""

from __future__ import annotations

import secrets
import string
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path

from ..common.errors import UserError
from ..common.log import log
from ..spec.specs import TrainingSpec, spec_to_dict

MAX_PENDING = 100_000  # queued calls per backend; the oldest are dropped past this
FIRST_BACKOFF_S = 1.0  # after a failed call; doubles per failure up to MAX_BACKOFF_S
MAX_BACKOFF_S = 60.0
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value (longer ones are cut, marked)
REPORT_FOLDER = "report"


class Backend(ABC):
    """One tracker. Calls come from its delivery thread, one at a time, in order; any may raise (the
    delivery retries it). `start` opens the tracked run, or reopens `resume_id`, and returns its id."""

    name: str
    keeps_files = True  # whether the summary and report figures are sent to it
    run_id: str | None = None  # the tracked run's, once known (a checkpoint keeps it)

    @abstractmethod
    def where(self) -> str:
        """Where it reports, for log lines (no credentials)."""

    @abstractmethod
    def start(self, resume_id: str | None, params: dict[str, str]) -> None:
        """Open the tracked run (`params` when it is new), or reopen `resume_id`; set `run_id`."""

    @abstractmethod
    def log_metrics(self, step: int, metrics: dict[str, float], timestamp: float) -> None: ...

    @abstractmethod
    def log_summary(self, summary: dict, path: Path) -> None:
        """The run's summary (`path`: summary.json)."""

    @abstractmethod
    def log_image(self, path: Path) -> None:
        """A report figure."""

    @abstractmethod
    def finish(self, completed: bool) -> None:
        """Close the tracked run: completed, or stopped early (it continues on resume)."""


class TensorBoard(Backend):
    """Scalars under `run_dir`/tensorboard, tagged `<label>/<key>` (a local file: it does not fail)."""

    name, keeps_files = "tensorboard", False

    def __init__(self, run_dir: Path, label: str):
        self.folder, self.label, self.writer = run_dir / "tensorboard", label, None

    def where(self) -> str:
        return str(self.folder)

    def start(self, resume_id, params):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.folder))

    def log_metrics(self, step, metrics, timestamp):
        for key, value in metrics.items():
            self.writer.add_scalar(f"{self.label}/{key}", value, step)

    def log_summary(self, summary, path):
        pass  # summary.json and report/ lie beside tensorboard/ already

    def log_image(self, path):
        pass

    def finish(self, completed):
        self.writer.close()


class Mlflow(Backend):
    """An MLflow run in the spec's experiment, through `MlflowClient` (no global active run)."""

    name = "mlflow"

    def __init__(self, spec, run_name: str):
        import os

        import mlflow

        # The delivery thread retries with its own backoff: MLflow's (7 retries, minutes per call) would
        # only hold records back. A user's own MLFLOW_HTTP_REQUEST_* settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.spec, self.run_name = spec, run_name
        self.client = mlflow.MlflowClient(tracking_uri=spec.tracking_uri)

    def where(self) -> str:
        return f"MLflow at {self.spec.tracking_uri}"

    def start(self, resume_id, params):
        from mlflow.entities import Param, RunStatus
        from mlflow.exceptions import MlflowException

        if resume_id is not None:
            try:
                self.client.update_run(resume_id, status=RunStatus.to_string(RunStatus.RUNNING))
                self.run_id = resume_id
                return
            except MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.info(f"tracking: {self.where()} has no run {resume_id}: starting a new one")
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.spec.experiment)
        run = self.client.create_run(experiment_id, run_name=self.run_name)
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        self.run_id = run.info.run_id

    def log_metrics(self, step, metrics, timestamp):
        from mlflow.entities import Metric

        millis = int(timestamp * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, millis, step) for k, v in metrics.items()])

    def log_summary(self, summary, path):
        self.client.log_artifact(self.run_id, str(path))

    def log_image(self, path):
        self.client.log_artifact(self.run_id, str(path), artifact_path=REPORT_FOLDER)

    def finish(self, completed):
        self.client.set_terminated(self.run_id, "FINISHED" if completed else "KILLED")


class Wandb(Backend):
    """A W&B run (online or offline under `run_dir`/wandb); its id is chosen here, so a checkpoint
    can keep it before the first call reaches the server. Values are plotted against our `step`
    (W&B's own step only grows; a resume logs again the steps after its checkpoint)."""

    name = "wandb"

    def __init__(self, spec, run_name: str, run_dir: Path, resume_id: str | None):
        self.spec, self.run_name, self.dir = spec, run_name, run_dir
        # W&B's own form of id (8 lowercase letters and digits), made here: it moved between releases.
        self.run_id = resume_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self.run = None

    def where(self) -> str:
        return f"W&B project {self.spec.project} ({self.spec.mode})"

    def start(self, resume_id, params):
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.spec.project,
            entity=self.spec.entity,
            name=self.run_name,
            id=self.run_id,
            # Offline, W&B cannot look the id up; the same id in a new offline folder is the resume.
            resume="allow" if self.spec.mode == "online" else None,
            mode=self.spec.mode,
            dir=str(self.dir),
            config=params if resume_id is None else None,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log_metrics(self, step, metrics, timestamp):
        self.run.log({**metrics, "step": step})

    def log_summary(self, summary, path):
        import shutil

        self.run.summary.update(summary)
        shutil.copy(path, Path(self.run.dir) / path.name)  # the run's files/ (wandb.save would symlink it)

    def log_image(self, path):
        import wandb

        self.run.log({f"{REPORT_FOLDER}/{path.stem}": wandb.Image(str(path))})

    def finish(self, completed):
        import wandb

        self.run.finish(exit_code=0 if completed else 1)
        wandb.teardown()  # its service writes out what it still buffers (offline: the run file's end)


class _Delivery:
    """One backend's calls on its own thread, in order: `start` first, then each call retried with
    backoff until it goes through or the close's deadline passes; one warning for the first failure."""

    def __init__(self, backend: Backend, resume_id: str | None, params: dict[str, str]):
        self.backend, self.resume_id, self.params = backend, resume_id, params
        self.pending: deque[tuple[str, tuple]] = deque()
        self.dropped = 0
        self.failing = self.warned = False
        self.deadline: float | None = None  # set by close: past it the thread gives up
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._deliver, name=f"tracking-{backend.name}", daemon=True)
        self.thread.start()

    def submit(self, method: str, *args) -> None:
        with self.wake:
            if len(self.pending) >= MAX_PENDING:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append((method, args))
            self.wake.notify()

    def _deliver(self) -> None:
        started, delay = False, FIRST_BACKOFF_S
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.pending)
                method, args = self.pending[0]
            try:
                if not started:
                    self.backend.start(self.resume_id, self.params)
                    started = True
                    continue
                getattr(self.backend, method)(*args)
            except Exception as err:  # whatever a tracker raises: keep the call, retry it later
                self._failed(err)
                if not self._wait(delay):
                    return
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
            with self.wake:
                self.pending.popleft()
            if self.failing:
                log.info(f"tracking: {self.backend.where()} answers again")
            self.failing, delay = False, FIRST_BACKOFF_S
            if method == "finish":
                return

    def _failed(self, err: Exception) -> None:
        self.failing = True
        if not self.warned:
            self.warned = True
            text = " ".join(str(err).split())[:300]
            log.warning(
                f"tracking: {self.backend.where()} failed ({type(err).__name__}: {text}); training goes on, "
                "its records are kept and retried"
            )

    def _wait(self, seconds: float) -> bool:
        """Back off for `seconds` (less when the close's deadline comes first); False past it."""
        end = time.monotonic() + seconds
        with self.wake:
            while (now := time.monotonic()) < (limit := min(end, self.deadline or end)):
                self.wake.wait(limit - now)
            return self.deadline is None or time.monotonic() < self.deadline

    def close(self, completed: bool, deadline: float) -> None:
        self.submit("finish", completed)
        with self.wake:
            self.deadline = deadline
            self.wake.notify()

    def join(self) -> None:
        self.thread.join(max(0.0, self.deadline - time.monotonic()))
        left = len(self.pending) + self.dropped
        if left:
            log.info(
                f"tracking: {self.backend.where()} did not take {left} call(s) within "
                "tracking.flush_timeout_s; they are left out"
            )


class Tracker:
    """Every configured backend, fed the same calls (rank 0 only)."""

    def __init__(self, backends: list[Backend], resume_ids: dict, params: dict[str, str], flush_timeout_s: float):
        self.deliveries = [_Delivery(b, resume_ids.get(b.name), params) for b in backends]
        self.flush_timeout_s = flush_timeout_s

    def ids(self) -> dict[str, str]:
        """The tracked runs' ids known so far, by backend (what a checkpoint keeps)."""
        return {d.backend.name: d.backend.run_id for d in self.deliveries if d.backend.run_id}

    def log_metrics(self, record: dict) -> None:
        """A metrics.jsonl record: its numeric values (None, text and flags left out) at its step."""
        values = {
            key: float(value)
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if values:
            for delivery in self.deliveries:
                delivery.submit("log_metrics", record["step"], values, record.get("time") or time.time())

    def close(self, summary: dict | None = None, run_dir: Path | None = None) -> None:
        """End every tracked run: completed with `summary` (run_dir/summary.json and the report
        figures sent first), or stopped early without; waits at most `flush_timeout_s`."""
        filing = [d for d in self.deliveries if d.backend.keeps_files]
        if summary is not None and run_dir is not None and filing:
            for path in report_figures(run_dir):
                for delivery in filing:
                    delivery.submit("log_image", path)
            for delivery in filing:
                delivery.submit("log_summary", summary, run_dir / "summary.json")
        deadline = time.monotonic() + self.flush_timeout_s
        for delivery in self.deliveries:
            delivery.close(summary is not None, deadline)
        for delivery in self.deliveries:
            delivery.join()


def report_figures(run_dir: Path) -> list[Path]:
    """`cosctl report`'s figures of this run, drawn into run_dir/report/ (none, with a warning, when
    drawing fails: the figures are a courtesy to the tracker)."""
    from ..report.write import write_report

    try:
        written = write_report([run_dir], run_dir / REPORT_FOLDER)
    except Exception as err:
        log.warning(f"tracking: the report figures of {run_dir} could not be drawn ({err}); left out")
        return []
    return sorted((run_dir / REPORT_FOLDER).glob("*.png")) if written else []


def spec_params(spec: TrainingSpec) -> dict[str, str]:
    """The resolved spec as flat tracker params: `section.key` -> its value as text (long ones cut)."""
    from ..report.write import flatten

    params = {}
    for key, value in flatten(spec_to_dict(spec)).items():
        text = str(value)
        params[key] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return params


def open_tracker(spec: TrainingSpec, run_dir: Path, resume_ids: dict | None = None) -> Tracker:
    """Rank 0's tracker for `spec.tracking`, reopening the tracked runs of `resume_ids` (a checkpoint's);
    a configured tracker whose package is missing is a UserError (preflight checks it first)."""
    tracking = spec.tracking
    missing = tracking.missing_packages()
    if missing:
        raise UserError(missing[0])
    resume_ids = dict(resume_ids or {})
    run_name = spec.run.name
    backends: list[Backend] = []
    if tracking.tensorboard:
        backends.append(TensorBoard(run_dir, spec.stage))
    if tracking.mlflow is not None:
        backends.append(Mlflow(tracking.mlflow, tracking.mlflow.run_name or run_name))
    if tracking.wandb is not None:
        backends.append(Wandb(tracking.wandb, tracking.wandb.run_name or run_name, run_dir, resume_ids.get("wandb")))
    for backend in backends:
        if resume_ids.get(backend.name):
            log.info(f"tracking: continuing {backend.name} run {resume_ids[backend.name]} ({backend.where()})")
    return Tracker(backends, resume_ids, spec_params(spec), tracking.flush_timeout_s)
