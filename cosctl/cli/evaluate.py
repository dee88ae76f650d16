"""`cosctl eval` and `cosctl export`: a trained model's answers scored on held-out records, and the model
as one folder transformers loads alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.errors import UserError
from ..launch.local import under_launcher
from .console import fail
from .options import NprocOpt, argv_without_nproc, fail_in_rank


def export(
    source: Annotated[str, typer.Argument(help="Run output URI (holds adapter/ or model/) or a model folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the self-contained HF model.")],
) -> None:
    """Merge LoRA into the base and write one HF folder (model, processor, code) that transformers
    alone loads: Auto*.from_pretrained(OUT, trust_remote_code=True)."""
    from ..artefacts.export import export_merged
    from ..artefacts.remote_code import RemoteCodeError

    try:
        typer.echo(json.dumps(export_merged(source, out), indent=1))
    except (UserError, RemoteCodeError) as err:
        fail(str(err))


def eval_(
    model: Annotated[
        str,
        typer.Argument(
            help="An export folder, or a run output (model/ or adapter/), local or s3://.", show_default=False
        ),
    ],
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="LLaVA-format eval records (JSON list); the last gpt turn is the reference.", show_default=False
        ),
    ] = None,
    images: Annotated[
        Optional[str], typer.Option(help="Image root, a folder or s3://BUCKET/PREFIX; default: the data file's folder.")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder; default evals/<model name>.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generated tokens per record at most.")] = 32,
    batch_size: Annotated[int, typer.Option(min=1, help="Records generated together per rank.")] = 8,
    nproc: NprocOpt = 1,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate the first N records only.")] = None,
    baseline_from: Annotated[
        Optional[Path],
        typer.Option(
            help="Records (e.g. the training set) whose answers the image-free baseline counts; "
            "default: the eval records."
        ),
    ] = None,
    harness: Annotated[
        str,
        typer.Option(
            help="cosctl (the records of --data) or lmms-eval (its --tasks, e.g. vqav2_val,gqa,pope; "
            "needs the lmms extra)."
        ),
    ] = "cosctl",
    tasks: Annotated[
        Optional[str], typer.Option(help="lmms-eval task names, comma-separated (with --harness lmms-eval).")
    ] = None,
    include_path: Annotated[
        Optional[Path], typer.Option(help="A folder of lmms-eval task YAMLs of your own (with --harness lmms-eval).")
    ] = None,
) -> None:
    """Greedy generation on eval records: predictions.jsonl, metrics.json and per-task metrics beside an
    image-free baseline. With --harness lmms-eval: the same model, prompts and decoding on lmms-eval's
    benchmarks, its results and per-sample logs under --out."""
    from ..evaluate.command import print_table, run_eval

    if harness == "lmms-eval":
        _eval_in_harness(model, tasks, include_path, out, batch_size, max_new_tokens, limit, nproc, data)
        return
    if harness != "cosctl":
        fail(f"--harness: {harness!r} is not cosctl or lmms-eval")
    if data is None:
        fail("--data: give the eval records (or --harness lmms-eval --tasks ...)")
    try:
        if nproc > 1 and not under_launcher():
            # Checked once here, so a mistake is one line rather than one per rank and a launcher trace.
            from ..artefacts.loading import check_source
            from ..evaluate.command import read_inputs

            read_inputs(data, images or data.parent, limit, baseline_from)
            check_source(model)
    except UserError as err:
        fail(str(err))
    if nproc > 1 and not under_launcher():
        from ..launch.local import launch_local_ranks

        raise typer.Exit(launch_local_ranks(nproc, argv_without_nproc(), sys.argv[1:]))
    try:
        metrics = run_eval(
            model,
            data,
            images=images,
            out=out or Path("evals") / Path(model.rstrip("/")).name,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            limit=limit,
            baseline_from=baseline_from,
        )
    except UserError as err:
        fail_in_rank(err)
    if metrics is not None:
        print_table(metrics)


def _eval_in_harness(model, tasks, include_path, out, batch_size, max_new_tokens, limit, nproc, data) -> None:
    """`cosctl eval --harness lmms-eval`: lmms-eval in this process with `--model cosctl`."""
    if not tasks:
        fail("--tasks: name the lmms-eval tasks to run (e.g. --tasks pope,mme)")
    if data is not None or nproc > 1:
        fail(f"--harness lmms-eval: {'--data' if data is not None else '--nproc'} belongs to --harness cosctl")
    try:
        from ..evaluate.lmms import harness_args, run_harness
    except ImportError as err:
        fail(f"--harness lmms-eval needs the lmms extra: pip install 'cosctl[lmms]' ({err})")
    argv = harness_args(
        model,
        tasks,
        out=out or Path("evals") / Path(model.rstrip("/")).name / "lmms-eval",
        include_path=include_path,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        limit=limit,
    )
    try:
        run_harness(argv)
    except UserError as err:
        fail(str(err))
