"""`cosctl report`: PNG plots and a Markdown summary of one or several training runs, side by side.

A run is the local `--run-dir` of a training stage:

    metrics.jsonl   per step: {step, loss, lr, grad_norm, samples, tokens, ..., step_time_s, samples_per_s, ...},
                    eval loss {step, eval_loss}, generation eval {step, "eval/<task>/<metric>": value}
    summary.json    written at the end of the stage (stage, steps, times, losses, artefact, checkpoint)
    metrics.json    optional: the output of `cosctl eval --out RUN_DIR`
    spec.json/.yaml optional; else the resolved spec stored with the final checkpoint, when it is local

A resumed run appends to metrics.jsonl and logs again the steps after its checkpoint: for each step and
key the last value logged wins, and the steps logged more than once are counted as redone. Training
time is the cumulative `step_time_s` of the steps kept (evals, checkpoints and lost work excluded).

Figures (one line per run, one colour per run in every figure): loss.png (train and eval loss against
step and against training time), throughput.png (samples/s), lr.png, eval_metrics.png (generation-eval
metrics against step), eval_final.png (`cosctl eval` results beside the image-free baseline).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

EVAL_PREFIX = "eval/"
IMPORTANT_SETTINGS = (
    "stage", "run.seed", "model.image_size", "optim.lr", "optim.num_steps", "optim.warmup_ratio",
    "optim.min_lr_ratio", "batch.samples_per_step", "batch.tokens_per_micro_batch", "deepspeed.template",
    "lora.r", "lora.alpha",
)
LOG_SCALE_RATIO = 10.0  # a loss curve whose max / min exceeds this is drawn on a log axis
SMOOTH_ABOVE = 100  # train-loss curves with more points get an EMA line over a faint raw one


@dataclass
class Run:
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


def load_run(path: Path, name: str | None = None) -> Run:
    """Read a run folder; a folder with none of metrics.jsonl, summary.json, metrics.json is an error."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: run folder not found")
    run = Run(name or path.name, path)
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


# -------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(runs: list[Run]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {run.name: palette[index % len(palette)] for index, run in enumerate(runs)}


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 120:
        return "s", 1.0
    if seconds < 2 * 3600:
        return "min", 60.0
    return "h", 3600.0


def _ema(values: list[float], span: int) -> list[float]:
    alpha, out, current = 2.0 / (span + 1), [], values[0]
    for value in values:
        current = alpha * value + (1 - alpha) * current
        out.append(current)
    return out


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > LOG_SCALE_RATIO


def _finish(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def loss_figure(runs: list[Run]):
    """Train (solid) and eval (dashed, dots) loss per run, against step and against training time."""
    plt = _pyplot()
    colours = _colours(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    unit, scale = _time_unit(max(run.train_time_s for run in runs))
    values: list[float] = []
    for ax, x in zip(axes, ("step", "time"), strict=True):
        for run in runs:
            xs, ys = run.series("loss", x)
            xs = xs if x == "step" else [v / scale for v in xs]
            if ys and len(ys) > SMOOTH_ABOVE:
                ax.plot(xs, ys, color=colours[run.name], alpha=0.25, linewidth=0.8)
                ax.plot(xs, _ema(ys, max(5, len(ys) // 50)), color=colours[run.name], label=f"{run.name} train (EMA)")
            elif ys:
                ax.plot(xs, ys, color=colours[run.name], label=f"{run.name} train")
            ex, ey = run.series("eval_loss", x)
            ex = ex if x == "step" else [v / scale for v in ex]
            if ey:
                ax.plot(ex, ey, color=colours[run.name], linestyle="--", marker="o", markersize=4,
                        label=f"{run.name} eval")
            values += ys + ey
    log_scale = _spans_decades(values)
    for ax, x in zip(axes, ("step", "time"), strict=True):
        if log_scale:
            ax.set_yscale("log")
        xlabel = "optimizer step" if x == "step" else f"training time ({unit}, summed step times)"
        _finish(ax, f"Loss against {'step' if x == 'step' else 'training time'}", xlabel,
                "loss per label token" + (" (log scale)" if log_scale else ""))
    return fig


def _per_step_figure(runs: list[Run], key: str, title: str, ylabel: str):
    plt = _pyplot()
    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for run in runs:
        xs, ys = run.series(key)
        if ys:
            ax.plot(xs, ys, color=colours[run.name], label=run.name, marker="." if len(ys) < 30 else None)
    _finish(ax, title, "optimizer step", ylabel)
    return fig


def throughput_figure(runs: list[Run]):
    fig = _per_step_figure(runs, "samples_per_s", "Throughput", "samples / s (all ranks)")
    fig.axes[0].set_ylim(bottom=0)
    return fig


def lr_figure(runs: list[Run]):
    fig = _per_step_figure(runs, "lr", "Learning rate", "learning rate")
    fig.axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def _grid(count: int):
    plt = _pyplot()
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def eval_metrics_figure(runs: list[Run]):
    """One panel per generation-eval metric (`eval/<task>/<metric>`), against step; None without any."""
    keys = sorted({key for run in runs for key in run.eval_keys})
    if not keys:
        return None
    colours = _colours(runs)
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for run in runs:
            xs, ys = run.series(key)
            if ys:
                ax.plot(xs, ys, color=colours[run.name], marker="o", markersize=3, label=run.name)
        _, task, metric = key.split("/", 2) if key.count("/") >= 2 else ("", key.removeprefix(EVAL_PREFIX), "")
        _finish(ax, f"{task}: {metric}" if metric else task, "optimizer step", metric or task)
    fig.suptitle("Generation eval during training")
    return fig


def eval_final_figure(runs: list[Run]):
    """`cosctl eval` results: per task and metric, a bar per run (value written on it) and the run's
    image-free baseline as a dotted tick across its bar; one legend for the figure."""
    evaluated = [run for run in runs if run.eval_result]
    pairs = list(dict.fromkeys((task, metric) for run in evaluated for task, values in run.eval_result["tasks"].items()
                               for metric in values if metric != "num"))
    if not pairs:
        return None
    colours = _colours(runs)
    fig, axes = _grid(len(pairs))
    handles: dict[str, object] = {}
    for ax, (task, metric) in zip(axes, pairs, strict=True):
        top = 0.0
        for index, run in enumerate(evaluated):
            value = run.eval_result["tasks"].get(task, {}).get(metric)
            baseline = run.eval_result.get("baseline", {}).get("tasks", {}).get(task, {}).get(metric)
            if value is None:
                continue
            handles[run.name] = ax.bar(index, value, 0.7, color=colours[run.name])
            ax.annotate(f"{value:.3g}", (index, value), xytext=(0, 3), textcoords="offset points", ha="center",
                        fontsize="small")
            if baseline is not None:
                handles["image-free baseline"] = ax.hlines(baseline, index - 0.45, index + 0.45, colors="black",
                                                           linestyles=":", linewidth=2)
            top = max(top, value, baseline or 0.0)
        ax.set_xlim(-0.6, len(evaluated) - 0.4)
        ax.set_ylim(0, top * 1.2 or 1.0)
        ax.set_xticks(range(len(evaluated)), [run.name for run in evaluated], fontsize="small")
        _finish(ax, f"{task}: {metric}", "", metric)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4))
    fig.suptitle("cosctl eval: the model (bars) against the image-free baseline (dotted)")
    return fig


# ------------------------------------------------------------------------------------------ report


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "-"
    unit, scale = _time_unit(seconds)
    return f"{seconds / scale:.1f} {unit}"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists as JSON text."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list) else value
    return flat


def final_figures(run: Run) -> dict[str, str]:
    """The rows of a run's column in the report's summary table."""
    summary = run.summary or {}
    losses = run.series("loss")[1]
    evals = list(zip(*run.series("eval_loss"), strict=True))
    best = min(evals, key=lambda pair: pair[1]) if evals else None
    rates = run.series("samples_per_s")[1][1:] or run.series("samples_per_s")[1]
    steps = [record["step"] for record in run.steps if "loss" in record]
    return {
        "stage": _fmt(summary.get("stage") or (run.spec or {}).get("stage")),
        "steps logged": f"{steps[0]}-{steps[-1]}" if steps else "-",
        "steps redone (resumes)": str(run.redone_steps),
        "world size": _fmt(summary.get("world_size")),
        "visual tokens / image size": f"{_fmt(summary.get('visual_tokens'))} / {_fmt(summary.get('image_size'))}",
        "tokens per micro-batch": f"{_fmt(summary.get('tokens_per_micro_batch'))} "
                                  f"({summary.get('budget_origin', '-')})",
        "trainable parameters": f"{sum((summary.get('trainable_params') or {}).values()):,}" if summary else "-",
        "training time": _duration(run.train_time_s),
        "mean samples/s (after step 1)": _fmt(sum(rates) / len(rates) if rates else None),
        "final train loss": _fmt(losses[-1] if losses else None),
        "final eval loss": _fmt(evals[-1][1] if evals else None),
        "best eval loss (step)": f"{_fmt(best[1])} ({best[0]})" if best else "-",
        **{f"final {key}": _fmt(run.series(key)[1][-1]) for key in run.eval_keys},
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _settings_rows(runs: list[Run]) -> list[list[str]]:
    flat = [flatten(run.spec) if run.spec else {} for run in runs]
    keys = [key for key in IMPORTANT_SETTINGS if any(key in f for f in flat)]
    differing = sorted({key for f in flat for key in f if len({_fmt(g.get(key)) for g in flat}) > 1} - set(keys))
    return [[key, *[_fmt(f.get(key)) for f in flat]] for key in keys + differing]


def _eval_result_lines(run: Run) -> list[str]:
    result = run.eval_result
    baseline = result.get("baseline", {}).get("tasks", {})
    rows = []
    for task, values in result.get("tasks", {}).items():
        for metric, value in values.items():
            if metric != "num":
                reference = baseline.get(task, {}).get(metric)
                rows.append([task, _fmt(values.get("num")), metric, f"{value:.4f}",
                             "-" if reference is None else f"{reference:.4f}"])
    fallback = result.get("fallback_tasks") or []
    lines = [f"### {run.name}: `cosctl eval` of {result.get('model', '?')}", "",
             f"Data: `{result.get('data', '?')}`, {result.get('num_records', '?')} records; baseline answers from "
             f"{result.get('baseline', {}).get('source', '?')}.", ""]
    lines += _table(["task", "n", "metric", "model", "image-free baseline"], rows)
    lines += ["", f"Exact-match fallback (unknown tasks): {', '.join(fallback) if fallback else 'none'}.", ""]
    return lines


def write_report(paths: list[Path], out: Path) -> dict:
    """Read the runs, write the PNGs and report.md into `out`; return {"report": path, "figures": [...]}."""
    if not paths:
        raise DataError("no run folders given")
    runs = [load_run(Path(p), name) for p, name in zip(paths, run_names([Path(p) for p in paths]), strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    builders = {"loss.png": ("Loss", loss_figure), "throughput.png": ("Throughput", throughput_figure),
                "lr.png": ("Learning rate", lr_figure), "eval_metrics.png": ("Generation eval", eval_metrics_figure),
                "eval_final.png": ("cosctl eval", eval_final_figure)}
    figures = []
    trained = [run for run in runs if run.steps]
    for filename, (title, build) in builders.items():
        subjects = runs if filename == "eval_final.png" else trained
        fig = build(subjects) if subjects else None
        if fig is None:
            continue
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
        figures.append((title, filename))
    lines = [f"# Training report: {', '.join(run.name for run in runs)}", "",
             f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from:", ""]
    lines += [f"- **{run.name}**: `{run.path}`" + (f" ({run.bad_lines} unreadable metrics line(s) skipped)"
                                                   if run.bad_lines else "") for run in runs]
    columns = [final_figures(run) for run in runs]
    names = list(dict.fromkeys(key for column in columns for key in column))
    lines += ["", "## Runs", ""]
    lines += _table(["", *[run.name for run in runs]], [[name, *[c.get(name, "-") for c in columns]] for name in names])
    lines += ["", "Training time sums the logged step times (evals, checkpoints and work lost to restarts "
                  "excluded); a resumed run's repeated steps count once, with their last values.", ""]
    settings = _settings_rows(runs)
    if settings:
        lines += ["## Settings", "", "The main settings and every one that differs between the runs.", ""]
        lines += _table(["setting", *[run.name for run in runs]], settings) + [""]
    if figures:
        lines += ["## Plots", ""]
        for title, filename in figures:
            lines += [f"### {title}", "", f"![{title}]({filename})", "", f"[{filename}]({filename})", ""]
    evaluated = [run for run in runs if run.eval_result]
    if evaluated:
        lines += ["## Eval results", ""]
        for run in evaluated:
            lines += _eval_result_lines(run)
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return {"report": str(out / "report.md"), "figures": [str(out / filename) for _, filename in figures]}
