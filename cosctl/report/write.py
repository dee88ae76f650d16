"""`cosctl report`: PNG plots and a Markdown summary of one or several training runs, side by side.

A run is the local `--run-dir` of a training stage:

    metrics.jsonl   per step: {step, loss, lr, grad_norm, samples, tokens, ..., step_time_s, samples_per_s, ...},
                    eval loss {step, eval_loss[, eval_loss_swapped_images]},
                    generation eval {step, "eval/<task>/<metric>": value}
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
from pathlib import Path

from ..common.errors import DataError
from .plots import (
    eval_final_figure,
    eval_metrics_figure,
    loss_figure,
    lr_figure,
    pyplot,
    throughput_figure,
    time_unit,
)
from .runs import RunFolder, load_run, run_names

IMPORTANT_SETTINGS = (
    "stage",
    "run.seed",
    "model.image_size",
    "optim.lr",
    "optim.num_steps",
    "optim.warmup_ratio",
    "optim.min_lr_ratio",
    "batch.samples_per_step",
    "batch.tokens_per_micro_batch",
    "deepspeed.template",
    "lora.r",
    "lora.alpha",
)


# -------------------------------------------------------------------------------------------- plots


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "-"
    unit, scale = time_unit(seconds)
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


def final_figures(run: RunFolder) -> dict[str, str]:
    """The rows of a run's column in the report's summary table."""
    summary = run.summary or {}
    losses = run.series("loss")[1]
    evals = list(zip(*run.series("eval_loss"), strict=True))
    swapped = run.series("eval_loss_swapped_images")[1]
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
        "final eval loss, swapped images": _fmt(swapped[-1] if swapped else None),
        "best eval loss (step)": f"{_fmt(best[1])} ({best[0]})" if best else "-",
        **{f"final {key}": _fmt(run.series(key)[1][-1]) for key in run.eval_keys},
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _settings_rows(runs: list[RunFolder]) -> list[list[str]]:
    flat = [flatten(run.spec) if run.spec else {} for run in runs]
    keys = [key for key in IMPORTANT_SETTINGS if any(key in f for f in flat)]
    differing = sorted({key for f in flat for key in f if len({_fmt(g.get(key)) for g in flat}) > 1} - set(keys))
    return [[key, *[_fmt(f.get(key)) for f in flat]] for key in keys + differing]


def _eval_result_lines(run: RunFolder) -> list[str]:
    result = run.eval_result
    baseline = result.get("baseline", {}).get("tasks", {})
    rows = []
    for task, values in result.get("tasks", {}).items():
        for metric, value in values.items():
            if metric != "num":
                reference = baseline.get(task, {}).get(metric)
                rows.append(
                    [
                        task,
                        _fmt(values.get("num")),
                        metric,
                        f"{value:.4f}",
                        "-" if reference is None else f"{reference:.4f}",
                    ]
                )
    fallback = result.get("fallback_tasks") or []
    lines = [
        f"### {run.name}: `cosctl eval` of {result.get('model', '?')}",
        "",
        f"Data: `{result.get('data', '?')}`, {result.get('num_records', '?')} records; baseline answers from "
        f"{result.get('baseline', {}).get('source', '?')}.",
        "",
    ]
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
    plt = pyplot()
    builders = {
        "loss.png": ("Loss", loss_figure),
        "throughput.png": ("Throughput", throughput_figure),
        "lr.png": ("Learning rate", lr_figure),
        "eval_metrics.png": ("Generation eval", eval_metrics_figure),
        "eval_final.png": ("cosctl eval", eval_final_figure),
    }
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
    lines = [
        f"# Training report: {', '.join(run.name for run in runs)}",
        "",
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} from:",
        "",
    ]
    lines += [
        f"- **{run.name}**: `{run.path}`"
        + (f" ({run.bad_lines} unreadable metrics line(s) skipped)" if run.bad_lines else "")
        for run in runs
    ]
    columns = [final_figures(run) for run in runs]
    names = list(dict.fromkeys(key for column in columns for key in column))
    lines += ["", "## Runs", ""]
    lines += _table(["", *[run.name for run in runs]], [[name, *[c.get(name, "-") for c in columns]] for name in names])
    lines += [
        "",
        "Training time sums the logged step times (evals, checkpoints and work lost to restarts "
        "excluded); a resumed run's repeated steps count once, with their last values.",
        "",
    ]
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
