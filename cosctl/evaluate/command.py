"""`cosctl eval`: one model, one eval file -> predictions.jsonl, metrics.json and a table of the model's
metric beside an image-free baseline's, per task.

Under torchrun every rank loads the model and generates its share (`generation`); rank 0 writes the
files and prints the table. The model is fetched once (rank 0) into a scratch folder that is removed
once every rank has loaded it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from ..common.errors import DataError
from .records import load_answer_records, load_eval_records
from .scoring import EvalItem, Scores, answer_items, baseline_predictions, eval_items, score, tasks_without_answers

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


def _process_group():
    """(rank, world size, device): joins the process group under a launcher, else one rank here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..common.dist import init_distributed

        info = init_distributed()
        return info.rank, info.world_size, info.device
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return 0, 1, device


def _load(model_uri: str, rank: int, world_size: int, dtype: torch.dtype):
    """Rank 0 fetches the artefact into a scratch folder (an error there is raised on every rank);
    every rank loads it from that folder, which is removed once all have."""
    from ..artefacts.loading import fetch_for_eval, load_fetched

    if world_size == 1:
        with tempfile.TemporaryDirectory(prefix="cosctl-eval-") as scratch:
            return load_fetched(fetch_for_eval(model_uri, Path(scratch)), dtype)
    from ..common.dist import barrier, on_main

    # NOTE: one node (torchrun --standalone), so rank 0's local folder is every rank's.
    scratch = Path(tempfile.mkdtemp(prefix="cosctl-eval-")) if rank == 0 else None
    try:
        fetched = on_main(lambda: fetch_for_eval(model_uri, scratch))
        loaded = load_fetched(fetched, dtype)
        barrier()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return loaded


def read_inputs(
    data: Path, image_root: str | Path, limit: int | None, baseline_from: Path | None
) -> tuple[list[dict], list[EvalItem] | None]:
    """The eval records (checked, images read under `image_root`, a folder or an `s3://` root) and the
    answers the image-free baseline counts from `baseline_from` (None: the eval records' own). Tasks
    are assigned to both files by one rule (`cosctl.evaluate.scoring`); a DataError when `baseline_from` has
    answers for none of the eval records' tasks: the whole baseline would be zero."""
    records = load_eval_records(data, image_root, limit)
    if baseline_from is None:
        return records, None
    source = answer_items(load_answer_records(baseline_from))
    tasks = list(dict.fromkeys(item.task for item in eval_items(records)))
    if tasks_without_answers(eval_items(records), source) == tasks:
        found = Counter(item.task for item in source)
        counts = ", ".join(f"{task} {count}" for task, count in found.most_common()) or "none"
        raise DataError(
            f"{baseline_from}: no answers for the task(s) {', '.join(tasks)} of {data} (answers per task: "
            f"{counts}; a record without `task` takes the one LLaVA's instruction in its question names, else "
            "'unknown'): give the records a `task`, or leave out --baseline-from to count the eval records' own"
        )
    return records, source


def baseline_scores(records: list[dict], source: list[EvalItem] | None) -> Scores:
    """The image-free baseline (`baseline_predictions`) scored like the model: answers counted over
    `source` (e.g. the training set's `answer_items`) when given, else over the eval records themselves."""
    items = eval_items(records)
    return score(items, baseline_predictions(items, source))


def run_eval(
    model_uri: str,
    data: Path,
    *,
    images: str | Path | None,
    out: Path,
    max_new_tokens: int,
    batch_size: int,
    limit: int | None = None,
    baseline_from: Path | None = None,
) -> dict | None:
    """Evaluate `model_uri` on `data`; rank 0 writes `out`/predictions.jsonl and metrics.json and
    returns the metrics (other ranks return None)."""
    from ..common.log import log, setup_logging
    from .generation import generate_and_score

    started = time.monotonic()
    image_root = str(images) if images is not None else str(Path(data).parent)
    records, baseline_source = read_inputs(data, image_root, limit, baseline_from)
    rank, world_size, device = _process_group()
    setup_logging(rank, "eval")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = _load(model_uri, rank, world_size, dtype)
    loaded.model.to(device)
    loaded_at = time.monotonic()
    rows, scores = generate_and_score(
        loaded.model,
        loaded.tokenizer,
        records,
        image_root,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
        rank=rank,
        world_size=world_size,
    )
    if world_size > 1:  # the last collective is behind us
        from ..common.dist import leave_process_group

        leave_process_group()
    if rank != 0:
        return None
    generated_at = time.monotonic()
    baseline = baseline_scores(records, baseline_source)
    unanswered = [] if baseline_source is None else tasks_without_answers(eval_items(records), baseline_source)
    if unanswered:
        log.warning(f"{baseline_from}: no answers for task(s) {', '.join(unanswered)}: their baseline scores 0")
    metrics = {
        "model": model_uri,
        "kind": loaded.kind,
        "base_model": loaded.base_model,
        "data": str(data),
        "images": str(image_root),
        "num_records": len(records),
        "counts": {task: int(values["num"]) for task, values in scores.tasks.items()},
        "tasks": scores.tasks,
        "fallback_tasks": scores.fallback_tasks,
        "baseline": {
            "source": str(baseline_from) if baseline_from else "eval records",
            "tasks": baseline.tasks,
            "tasks_without_answers": unanswered,
        },
        "generation": {
            "greedy": True,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "world_size": world_size,
            "device": device.type,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "wall_clock_s": {
            "load": loaded_at - started,
            "generate": generated_at - loaded_at,
            "total": time.monotonic() - started,
        },
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / PREDICTIONS, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def format_value(metric: str, value: float) -> str:
    """A metric as the tables print it: CIDEr and IoU as they are, the rest in percent."""
    return f"{value:.3f}" if metric in ("cider", "mean_iou") else f"{100 * value:.1f}"


def print_table(metrics: dict, console=None) -> None:
    """Per task and metric: records, the model's value, the image-free baseline's; then the fallback
    line. Accuracies are in percent; CIDEr and mean IoU as they are."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"{metrics['model']} on {metrics['data']}", title_justify="left")
    for column, justify in (
        ("task", "left"),
        ("n", "right"),
        ("metric", "left"),
        ("model", "right"),
        ("image-free baseline", "right"),
    ):
        table.add_column(column, justify=justify)
    for task, values in metrics["tasks"].items():
        baseline = metrics["baseline"]["tasks"].get(task, {})
        names = [name for name in values if name != "num"]
        for position, name in enumerate(names):
            unit = "" if name in ("cider", "mean_iou") else " %"
            table.add_row(
                task if position == 0 else "",
                str(int(values["num"])) if position == 0 else "",
                name + unit,
                format_value(name, values[name]),
                format_value(name, baseline[name]) if name in baseline else "-",
            )
        table.rows[-1].end_section = True
    console.print(table)
    unanswered = metrics["baseline"].get("tasks_without_answers")
    if unanswered:
        console.print(
            f"image-free baseline: {metrics['baseline']['source']} has no answers for {', '.join(unanswered)}"
        )
    fallback = metrics["fallback_tasks"]
    console.print(
        f"exact-match fallback (unknown task): {', '.join(fallback)}"
        if fallback
        else "exact-match fallback: none (every task has its own metric)"
    )
    seconds = metrics["wall_clock_s"]
    console.print(
        f"{metrics['num_records']} records, {metrics['generation']['world_size']} rank(s): "
        f"load {seconds['load']:.1f} s, generate {seconds['generate']:.1f} s, total {seconds['total']:.1f} s"
    )
