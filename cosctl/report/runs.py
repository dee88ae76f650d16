"""Reading a run folder once, for `cosctl report`: what a training stage's `--run-dir` holds (see
`cosctl.report.write` for the layout), as a `RunFolder`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..common.errors import DataError

EVAL_PREFIX = "eval/"  # generation-eval metrics in metrics.jsonl: eval/<task>/<metric>


@dataclass
class RunFolder:
    """What a run folder holds, read once."""

    name: str
    path: Path
    steps: list[dict] = field(default_factory=list)  # one merged record per step, by step
    redone_steps: int = 0
    bad_lines: int = 0
    summary: dict | None = None
    spec: dict | None = None
    eval_result: dict | None = None  # cosctl eval's metrics.json

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x values, `key` values) over the steps that have `key`; x is "step" or "time" (training
        seconds at the end of that step)."""
        xs, ys = [], []
        elapsed = 0.0
        for record in self.steps:
            elapsed += record.get("step_time_s") or 0.0
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                xs.append(record["step"] if x == "step" else elapsed)
                ys.append(float(value))
        return xs, ys

    @property
    def train_time_s(self) -> float:
        return sum(record.get("step_time_s") or 0.0 for record in self.steps)

    @property
    def eval_keys(self) -> list[str]:
        return sorted({key for record in self.steps for key in record if key.startswith(EVAL_PREFIX)})


def read_metrics(path: Path) -> tuple[list[dict], int, int]:
    """(one record per step, last value per key winning; steps whose training record was logged more
    than once; unreadable lines, e.g. a line cut by a crash)."""
    merged: dict[int, dict] = {}
    trained: set[int] = set()
    redone = bad = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if "loss" in record:
            redone += step in trained
            trained.add(step)
        merged.setdefault(step, {}).update(record)
    return [merged[step] for step in sorted(merged)], redone, bad


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    return value if isinstance(value, dict) else None


def _find_spec(run_dir: Path, summary: dict | None) -> dict | None:
    """The run's spec: spec.json or spec.yaml in the run folder, else the final checkpoint's when local."""
    import yaml

    found = _read_json(run_dir / "spec.json")
    if found is None and (run_dir / "spec.yaml").is_file():
        found = yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8"))
    checkpoint = (summary or {}).get("checkpoint")
    if found is None and isinstance(checkpoint, str) and "://" not in checkpoint.removeprefix("file://"):
        found = _read_json(Path(checkpoint.removeprefix("file://")) / "spec.json")
    return found


def load_run(path: Path, name: str | None = None) -> RunFolder:
    """Read a run folder; a folder with none of metrics.jsonl, summary.json, metrics.json is an error."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: run folder not found")
    run = RunFolder(name or path.name, path)
    if (path / "metrics.jsonl").is_file():
        run.steps, run.redone_steps, run.bad_lines = read_metrics(path / "metrics.jsonl")
    run.summary = _read_json(path / "summary.json")
    run.eval_result = _read_json(path / "metrics.json")
    if not run.steps and run.summary is None and run.eval_result is None:
        raise DataError(f"{path}: no metrics.jsonl, summary.json or metrics.json: not a run folder")
    run.spec = _find_spec(path, run.summary)
    return run


def run_names(paths: list[Path]) -> list[str]:
    """Short unique labels: the folder name, with as many parent folders as it takes to tell them apart."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name} ({index})" for index, name in enumerate(names, 1)]
