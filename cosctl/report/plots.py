"""The figures of `cosctl report` (matplotlib, Agg): one line per run and one colour per run in every
figure; loss against step and against training time, samples/s, learning rate, generation-eval metrics
against step, and `cosctl eval` results beside the image-free baseline. See `cosctl.report.write`.
"""

from __future__ import annotations

import math

from .runs import EVAL_PREFIX, RunFolder

LOG_SCALE_RATIO = 10.0  # a loss curve whose max / min exceeds this is drawn on a log axis
SMOOTH_ABOVE = 100  # train-loss curves with more points get an EMA line over a faint raw one


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(runs: list[RunFolder]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {run.name: palette[index % len(palette)] for index, run in enumerate(runs)}


def time_unit(seconds: float) -> tuple[str, float]:
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


def loss_figure(runs: list[RunFolder]):
    """Train (solid) and eval (dashed, dots) loss per run, against step and against training time."""
    plt = pyplot()
    colours = _colours(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    unit, scale = time_unit(max(run.train_time_s for run in runs))
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
                ax.plot(
                    ex, ey, color=colours[run.name], linestyle="--", marker="o", markersize=4, label=f"{run.name} eval"
                )
            sx, sy = run.series("eval_loss_swapped_images", x)
            sx = sx if x == "step" else [v / scale for v in sx]
            if sy:  # the gap to the eval curve is how much the model uses the image
                ax.plot(
                    sx,
                    sy,
                    color=colours[run.name],
                    linestyle=":",
                    marker="x",
                    markersize=4,
                    label=f"{run.name} eval, swapped images",
                )
            values += ys + ey + sy
    log_scale = _spans_decades(values)
    for ax, x in zip(axes, ("step", "time"), strict=True):
        if log_scale:
            ax.set_yscale("log")
        xlabel = "optimizer step" if x == "step" else f"training time ({unit}, summed step times)"
        _finish(
            ax,
            f"Loss against {'step' if x == 'step' else 'training time'}",
            xlabel,
            "loss per label token" + (" (log scale)" if log_scale else ""),
        )
    return fig


def _per_step_figure(runs: list[RunFolder], key: str, title: str, ylabel: str):
    plt = pyplot()
    colours = _colours(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for run in runs:
        xs, ys = run.series(key)
        if ys:
            ax.plot(xs, ys, color=colours[run.name], label=run.name, marker="." if len(ys) < 30 else None)
    _finish(ax, title, "optimizer step", ylabel)
    return fig


def throughput_figure(runs: list[RunFolder]):
    fig = _per_step_figure(runs, "samples_per_s", "Throughput", "samples / s (all ranks)")
    fig.axes[0].set_ylim(bottom=0)
    return fig


def lr_figure(runs: list[RunFolder]):
    fig = _per_step_figure(runs, "lr", "Learning rate", "learning rate")
    fig.axes[0].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def _grid(count: int):
    plt = pyplot()
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), layout="constrained", squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def eval_metrics_figure(runs: list[RunFolder]):
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


def eval_final_figure(runs: list[RunFolder]):
    """`cosctl eval` results: per task and metric, a bar per run (value written on it) and the run's
    image-free baseline as a dotted tick across its bar; one legend for the figure."""
    evaluated = [run for run in runs if run.eval_result]
    pairs = list(
        dict.fromkeys(
            (task, metric)
            for run in evaluated
            for task, values in run.eval_result["tasks"].items()
            for metric in values
            if metric != "num"
        )
    )
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
            ax.annotate(
                f"{value:.3g}", (index, value), xytext=(0, 3), textcoords="offset points", ha="center", fontsize="small"
            )
            if baseline is not None:
                handles["image-free baseline"] = ax.hlines(
                    baseline, index - 0.45, index + 0.45, colors="black", linestyles=":", linewidth=2
                )
            top = max(top, value, baseline or 0.0)
        ax.set_xlim(-0.6, len(evaluated) - 0.4)
        ax.set_ylim(0, top * 1.2 or 1.0)
        ax.set_xticks(range(len(evaluated)), [run.name for run in evaluated], fontsize="small")
        _finish(ax, f"{task}: {metric}", "", metric)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4))
    fig.suptitle("cosctl eval: the model (bars) against the image-free baseline (dotted)")
    return fig


# ------------------------------------------------------------------------------------------ report
