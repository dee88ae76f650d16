"""`cosctl demo`: the whole Chain-of-Sight pipeline on CPU with tiny random models, in minutes.

    data synth -> pretrain (32 visual tokens, 64 px) -> inflate (32to528, 128 px) -> finetune (528, LoRA)
               -> eval of both trained stages beside an image-free baseline

Runs the same code as the stage commands, on `recipes/tiny/*.yaml`, one rank in this process. Every
stage says what it did; the end is a table per trained stage (loss, eval loss with each record's own
image and with another record's, samples/s), the held-out scores and where to look next, as commands
that run as printed (`cosctl_command`). Each stage's run folder (`run_folder`: metrics.jsonl,
summary.json) also holds its `cosctl eval` results (metrics.json, predictions.jsonl), so `cosctl report`
of the run folders shows them. `OUT/summary.json` holds the same figures and the artefacts' paths.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from ..common.log import log, setup_logging
from ..data.synth import synthesize
from ..spec.specs import load_spec
from ..stages.inflate import run_inflate
from ..train.loop import run_training

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TRAINED_STAGES = ("pretrain", "finetune")
STAGE_KEYS = (
    "visual_tokens",
    "image_size",
    "steps",
    "first_loss",
    "final_loss",
    "loss_window",
    "first_eval_loss",
    "final_eval_loss",
    "first_eval_loss_swapped_images",
    "final_eval_loss_swapped_images",
    "samples_per_s",
    "train_time_s",
)


def synthesize_data(data: Path, num_samples: int, seed: int) -> dict:
    """The built-in synthetic set at 128 px in `data`, said in one line."""
    started = time.monotonic()
    setup_logging(0, "data")
    synth = synthesize(data, num_samples=num_samples, seed=seed, image_size=128)
    log.info(
        f"{synth['num_train']} train + {synth['num_eval']} eval synthetic scenes (128 px; tasks "
        f"{', '.join(f'{task} {count}' for task, count in synth['tasks']['train'].items())}) and a "
        f"{synth['tokenizer_vocab_size']}-token tokenizer in {data} ({time.monotonic() - started:.1f} s)"
    )
    return synth


def run_folder(out: Path, stage: str) -> Path:
    """A stage's run folder: its --run-dir (metrics.jsonl, summary.json, TensorBoard) and its `cosctl
    eval` results (metrics.json, predictions.jsonl), which is where `cosctl report RUN` reads them."""
    return out / "work" / stage


def train_stage(recipe: str, stage: str, out: Path, overrides: list[str]) -> dict:
    """Train `recipes/<recipe>` with `overrides`: artefact in out/runs/<stage>, run in `run_folder`."""
    output = out / "runs" / stage
    spec = load_spec(RECIPES / recipe, [*overrides, f"run.output={output}"])
    return run_training(spec, run_dir=run_folder(out, stage), output=str(output), resume="never", overwrite=True)


def run_demo(out: Path, num_samples: int = 1200, seed: int = 0) -> dict:
    """The tiny pipeline under `out`: synthetic data, pretrain (32 tokens), inflate (528), finetune (LoRA),
    both trained stages scored; returns (and writes) `summary.json`."""
    started = time.monotonic()
    out = Path(out).resolve()
    data = out / "data"
    synth = synthesize_data(data, num_samples, seed)
    on_data = [f"data.root={data}", f"run.seed={seed}"]
    pre = train_stage("tiny/pretrain.yaml", "pretrain", out, [*on_data, f"model.tokenizer={data / 'tokenizer'}"])
    setup_logging(0, "inflate")
    inflated = out / "runs" / "inflate"
    inflate = load_spec(
        RECIPES / "tiny" / "inflate.yaml", [f"source={out / 'runs' / 'pretrain'}", f"run.output={inflated}"]
    )
    inf = run_inflate(inflate, run_dir=out / "work" / "inflate", output=str(inflated))
    fin = train_stage("tiny/finetune.yaml", "finetune", out, [*on_data, f"model.source={inflated}"])

    scores = score_stages({"pretrain": pre["artefact"], "finetune": fin["artefact"]}, data, out)
    summary = {
        "data": {"root": str(data), "num_samples": num_samples, "seed": seed, "tasks": synth["tasks"]},
        "pretrain": {**{k: pre[k] for k in STAGE_KEYS}, "artefact": pre["artefact"]},
        "inflate": {
            "visual_tokens": inf["visual_tokens"]["to"],
            "image_size": inf["image_size"]["to"],
            "time_s": inf["time_s"],
            "artefact": inf["artefact"],
        },
        "finetune": {**{k: fin[k] for k in STAGE_KEYS}, "artefact": fin["artefact"]},
        "scores": scores,
        "total_time_s": time.monotonic() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def score_stages(artefacts: dict[str, str], data: Path, out: Path) -> dict:
    """`cosctl eval` of each stage's artefact on the held-out split into the stage's `run_folder` under
    `out`, and the image-free baseline (the most common training answer per task and question type):
    {"stages": {stage: tasks}, "baseline": tasks}."""
    from ..evaluate.command import run_eval

    setup_logging(0, "eval")
    stages, baseline = {}, {}
    for stage, artefact in artefacts.items():
        metrics = run_eval(
            artefact,
            data / "eval.json",
            images=data,
            out=run_folder(out, stage),
            max_new_tokens=32,
            batch_size=8,
            baseline_from=data / "train.json",
        )
        stages[stage], baseline = metrics["tasks"], metrics["baseline"]["tasks"]
        log.info(f"{stage}: {metrics['num_records']} held-out records scored in {run_folder(out, stage)}")
    return {"stages": stages, "baseline": baseline}


def swap_gap(stage: dict) -> float | None:
    """Final eval loss with swapped images minus with the records' own: > 0 when the model uses the image."""
    own, swapped = stage.get("final_eval_loss"), stage.get("final_eval_loss_swapped_images")
    return None if own is None or swapped is None else swapped - own


def cosctl_command() -> str:
    """`cosctl` as this process was started, so a printed command runs as printed: `cosctl` when that
    is what the shell finds, else the path typed (`.venv/bin/cosctl` in a venv not activated), or
    `PYTHON -m cosctl`."""
    started = sys.argv[0]
    if Path(started).name == "__main__.py":  # python -m cosctl
        return f"{shlex.quote(_short_path(sys.executable))} -m cosctl"
    on_path = shutil.which("cosctl")
    if on_path and os.path.realpath(on_path) == os.path.realpath(started):
        return "cosctl"
    return shlex.quote(_short_path(started))


def _script(name: str) -> str:
    """A console script of this environment as a shell runs it: bare when on PATH, else its path."""
    return name if shutil.which(name) else shlex.quote(_short_path(str(Path(sys.executable).parent / name)))


def _short_path(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else as it is."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_summary(summary: dict, out: Path, console=None) -> None:
    """The end of `cosctl demo`: one row per trained stage, then where to look next."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 100))  # 80 columns squeeze the table
    title = f"cosctl demo: {summary['total_time_s']:.0f} s in all"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("stage", "tokens", "px", "steps", "loss", "eval loss", "swapped", "gap", "samples/s"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name in TRAINED_STAGES:
        stage = summary[name]
        table.add_row(
            name,
            str(stage["visual_tokens"]),
            str(stage["image_size"]),
            str(stage["steps"]),
            f"{stage['first_loss']:.2f}->{stage['final_loss']:.2f}",
            _number(stage["final_eval_loss"]),
            _number(stage["final_eval_loss_swapped_images"]),
            _number(swap_gap(stage), 4),
            f"{stage['samples_per_s']:.1f}",
        )
    console.print(table)
    console.print(
        "eval loss: held-out answers with each record's own image; swapped: with another record's image; "
        "gap = swapped - own (about 0: the model does not use the image)",
        soft_wrap=True,
    )
    console.print(_scores_table(summary["scores"]))
    runs = [str(run_folder(out, stage)) for stage in TRAINED_STAGES]
    finetune, data, cosctl = out / "runs" / "finetune", summary["data"]["root"], cosctl_command()
    for label, where in (
        ("summary", str(out / "summary.json")),
        ("metrics", "  ".join(f"{run}/metrics.jsonl" for run in runs)),
        ("TensorBoard", f"{_script('tensorboard')} --logdir {out / 'work'}"),
        ("plots", f"{cosctl} report {' '.join(runs)} --out {out / 'report'}"),
        ("scores", f"{cosctl} eval {finetune} --data {data}/eval.json --images {data}"),
        ("export", f"{cosctl} export {finetune} --out {out / 'export'}"),
    ):
        console.print(f"  {label:<12} {where}", soft_wrap=True, highlight=False)


def _scores_table(scores: dict):
    """Generated answers scored per task and stage, beside the image-free baseline."""
    from rich import box
    from rich.table import Table

    from ..evaluate.command import format_value

    table = Table(title="held-out scores (greedy answers)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("task", "metric", *TRAINED_STAGES, "image-free baseline"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, values in scores["stages"][TRAINED_STAGES[-1]].items():
        for name in (name for name in values if name != "num"):
            cells = [scores["stages"][stage].get(task, {}).get(name) for stage in TRAINED_STAGES]
            cells.append(scores["baseline"].get(task, {}).get(name))
            unit = "" if name in ("cider", "mean_iou") else " %"
            table.add_row(task, name + unit, *("-" if v is None else format_value(name, v) for v in cells))
    return table
