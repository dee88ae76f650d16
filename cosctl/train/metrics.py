"""Rank 0's per-step outputs of a training run: append-only metrics.jsonl, the experiment trackers
(`cosctl.train.tracking`: TensorBoard scalars, MLflow, W&B), and a rich progress bar on a terminal (plain
log lines otherwise)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .tracking import TensorBoard, Tracker


class MetricsSink:
    """Rank 0's per-step outputs: append-only metrics.jsonl, the trackers, progress. `tracker`: the
    run's (`open_tracker`), closed with the sink; default TensorBoard alone."""

    def __init__(self, run_dir: Path, num_steps: int, first_step: int, label: str, tracker: Tracker | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.tracker = (
            tracker if tracker is not None else Tracker([TensorBoard(run_dir, label)], {}, {}, flush_timeout_s=60.0)
        )
        self.run_dir, self.num_steps, self.label = run_dir, num_steps, label
        self.start, self.first_step = time.monotonic(), first_step
        self.progress = _Progress(label, num_steps, first_step)

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.tracker.log_metrics(record)
        if "loss" in record:
            self.progress.update(record)

    def close(self, summary: dict | None = None) -> None:
        """End the outputs; `summary` (None: the run stopped early) goes to the trackers."""
        self.progress.close()
        self.jsonl.close()
        self.tracker.close(summary, self.run_dir)


class _Progress:
    """A rich progress bar on a terminal; one plain line every ~10% otherwise (logs, CI)."""

    def __init__(self, label: str, num_steps: int, first_step: int):
        self.num_steps, self.label = num_steps, label
        self.every = max(1, num_steps // 10)
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.bar.add_task(label, total=num_steps, completed=first_step, stats="")
            self.bar.start()

    def update(self, record: dict) -> None:
        stats = (
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['samples_per_s']:.1f} samples/s  {record['tokens_per_s']:.0f} tok/s"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], stats=stats)
        elif record["step"] % self.every == 0 or record["step"] in (1, self.num_steps):
            print(f"[{self.label}] step {record['step']}/{self.num_steps}  {stats}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
