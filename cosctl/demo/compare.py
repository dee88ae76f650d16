"""`cosctl demo --compare`: Chain-of-Sight against 336 tokens throughout, on the built-in set.

    cos         the demo: pretrain 32 tokens at 64 px -> inflate 32to528 -> finetune 528 at 128 px
    tokens336   pretrain 336 tokens at 128 px (recipes/tiny-compare/pretrain.yaml) -> finetune 336 at 128 px

Both arms train on the same synthetic data with the same seed, samples per step, steps and learning
rates; only the visual tokens (and so the cost of a sample) differ. Both are scored by `cosctl eval`
beside the image-free baseline and plotted together by `cosctl report`. OUT/compare.json holds the
figures; the table printed at the end is the one the README shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..evaluate.command import format_value
from ..report.write import write_report
from .pipeline import STAGE_KEYS, TRAINED_STAGES, run_demo, run_folder, score_stages, swap_gap, train_stage

ARMS = ("cos", "tokens336")


def run_compare(out: Path, num_samples: int = 1200, seed: int = 0) -> dict:
    """Both arms (Chain-of-Sight 32 -> 528, and 336 tokens throughout) on the same data, seed and steps,
    scored and reported together under `out`; returns (and writes) `compare.json`."""
    started = time.monotonic()
    out = Path(out).resolve()
    cos = run_demo(out / "cos", num_samples=num_samples, seed=seed)
    data = Path(cos["data"]["root"])
    arm = out / "tokens336"
    on_data = [f"data.root={data}", f"run.seed={seed}"]
    pre = train_stage(
        "tiny-compare/pretrain.yaml", "pretrain", arm, [*on_data, f"model.tokenizer={data / 'tokenizer'}"]
    )
    fin = train_stage("tiny/finetune.yaml", "finetune", arm, [*on_data, f"model.source={arm / 'runs' / 'pretrain'}"])
    trained = {"pretrain": pre, "finetune": fin}
    scores = score_stages({name: stage["artefact"] for name, stage in trained.items()}, data, arm)
    tokens336 = {name: {key: stage[key] for key in (*STAGE_KEYS, "artefact")} for name, stage in trained.items()}
    runs = [run_folder(out / name, stage) for name in ARMS for stage in TRAINED_STAGES]
    report = write_report(runs, out / "report")  # each run folder holds its stage's eval too
    comparison = {
        "data": cos["data"],
        "cos": {stage: cos[stage] for stage in TRAINED_STAGES} | {"scores": cos["scores"]["stages"]},
        "tokens336": tokens336 | {"scores": scores["stages"]},
        "image_free_baseline": scores["baseline"],
        "report": report["report"],
        "total_time_s": time.monotonic() - started,
    }
    (out / "compare.json").write_text(json.dumps(comparison, indent=1))
    return comparison


# Per trained stage: the row's label and how a stage summary fills its cell.
STAGE_ROWS = (
    ("visual tokens / px", lambda stage: f"{stage['visual_tokens']} / {stage['image_size']}"),
    ("wall-clock s", lambda stage: f"{stage['train_time_s']:.0f}"),
    ("samples/s", lambda stage: f"{stage['samples_per_s']:.1f}"),
    ("eval loss", lambda stage: f"{stage['final_eval_loss']:.3f}"),
    ("swap gap", lambda stage: f"{swap_gap(stage):.4f}"),
)


def comparison_rows(comparison: dict) -> list[tuple[str, str, str, str]]:
    """(what, Chain-of-Sight, 336 tokens throughout, image-free baseline) rows of the closing table."""
    arms = (comparison["cos"], comparison["tokens336"])
    rows = [
        (f"{stage}: {label}", *(cell(arm[stage]) for arm in arms), "")
        for stage in TRAINED_STAGES
        for label, cell in STAGE_ROWS
    ]
    free = comparison["image_free_baseline"]
    for task, values in arms[0]["scores"]["finetune"].items():
        for name in (name for name in values if name != "num"):
            unit = "" if name in ("cider", "mean_iou") else " %"
            cells = [arm["scores"]["finetune"].get(task, {}).get(name) for arm in arms]
            cells.append(free.get(task, {}).get(name))
            rows.append((f"{task} {name}{unit}", *("-" if v is None else format_value(name, v) for v in cells)))
    return rows


def print_comparison(comparison: dict, console=None) -> None:
    """The end of `cosctl demo --compare`: the table, the pre-training time ratio, the report's path."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 100))
    pre = comparison["cos"]["pretrain"]["train_time_s"] / comparison["tokens336"]["pretrain"]["train_time_s"]
    title = f"Chain-of-Sight vs 336 tokens throughout ({comparison['total_time_s']:.0f} s in all)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("", "Chain-of-Sight 32->528", "336 tokens", "image-free"):
        table.add_column(column, justify="left" if not column else "right")
    for row in comparison_rows(comparison):
        table.add_row(*row)
    console.print(table)
    console.print(f"pre-training wall-clock: Chain-of-Sight took {100 * pre:.0f}% of the 336-token arm's")
    console.print(f"  report       {comparison['report']}", soft_wrap=True, highlight=False)
