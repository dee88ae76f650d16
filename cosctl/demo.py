"""`cosctl demo`: the whole Chain-of-Sight pipeline on CPU with tiny random models, in minutes.

    data synth -> pretrain (32 visual tokens, 64 px) -> inflate (32to528, 128 px) -> finetune (528, LoRA)

Runs the same code as the stage commands, on `recipes/tiny/*.yaml`, one rank in this process. Every
stage says what it did; the end is a table per trained stage (loss, eval loss with each record's own
image and with another record's, samples/s) and where to look next. `OUT/summary.json` holds the same
figures and the artefacts' paths.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .log import log, setup_logging
from .spec import load_spec
from .stages import run_inflate
from .synth import synthesize
from .train import run_training

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"
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


def run_demo(out: Path, num_samples: int = 1200, seed: int = 0) -> dict:
    started = time.monotonic()
    out = Path(out).resolve()
    data = out / "data"
    outputs = {stage: out / "runs" / stage for stage in ("pretrain", "inflate", "finetune")}

    setup_logging(0, "data")
    synth = synthesize(data, num_samples=num_samples, seed=seed, image_size=128)
    log.info(
        f"{synth['num_train']} train + {synth['num_eval']} eval synthetic scenes (128 px; tasks "
        f"{', '.join(f'{task} {count}' for task, count in synth['tasks']['train'].items())}) and a "
        f"{synth['tokenizer_vocab_size']}-token tokenizer in {data} ({time.monotonic() - started:.1f} s)"
    )
    pretrain = load_spec(
        RECIPES / "pretrain.yaml",
        [
            f"data.root={data}",
            f"model.tokenizer={data / 'tokenizer'}",
            f"run.output={outputs['pretrain']}",
            f"run.seed={seed}",
        ],
    )
    pre = run_training(
        pretrain, run_dir=out / "work" / "pretrain", output=str(outputs["pretrain"]), resume="never", overwrite=True
    )
    setup_logging(0, "inflate")
    inflate = load_spec(RECIPES / "inflate.yaml", [f"source={outputs['pretrain']}", f"run.output={outputs['inflate']}"])
    inf = run_inflate(inflate, run_dir=out / "work" / "inflate", output=str(outputs["inflate"]))
    finetune = load_spec(
        RECIPES / "finetune.yaml",
        [
            f"data.root={data}",
            f"model.source={outputs['inflate']}",
            f"run.output={outputs['finetune']}",
            f"run.seed={seed}",
        ],
    )
    fin = run_training(
        finetune, run_dir=out / "work" / "finetune", output=str(outputs["finetune"]), resume="never", overwrite=True
    )

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
        "total_time_s": time.monotonic() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def swap_gap(stage: dict) -> float | None:
    """Final eval loss with swapped images minus with the records' own: > 0 when the model uses the image."""
    own, swapped = stage.get("final_eval_loss"), stage.get("final_eval_loss_swapped_images")
    return None if own is None or swapped is None else swapped - own


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
    runs = [str(out / "work" / stage) for stage in TRAINED_STAGES]
    finetune, data = out / "runs" / "finetune", summary["data"]["root"]
    for label, where in (
        ("summary", str(out / "summary.json")),
        ("metrics", "  ".join(f"{run}/metrics.jsonl" for run in runs)),
        ("TensorBoard", f"tensorboard --logdir {out / 'work'}"),
        ("plots", f"cosctl report {' '.join(runs)} --out {out / 'report'}"),
        ("scores", f"cosctl eval {finetune} --data {data}/eval.json --images {data}"),
        ("export", f"cosctl export {finetune} --out {out / 'export'}"),
    ):
        console.print(f"  {label:<12} {where}", soft_wrap=True, highlight=False)
