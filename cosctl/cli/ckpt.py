"""`cosctl ckpt ls|verify|pull|push`: committed checkpoints inspected and copied between stores, from
the command line; `verify` also re-hashes a run's published `model/` or `adapter/`. Thin commands over
`cosctl.checkpoint.layout`; user errors become one line and exit 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..common.errors import UserError
from .console import fail

ckpt_app = typer.Typer(
    no_args_is_help=True, help="Inspect, verify and copy committed checkpoints (verify: published artefacts too)."
)


TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout-s", help="Give up on an s3:// endpoint that does not answer after this many seconds."),
]


def _store_settings(timeout_s: float):
    from ..storage import StoreSettings

    return StoreSettings(timeout_s=timeout_s)


def _open_existing(uri: str, timeout_s: float):
    """The store at `uri`; a local path that does not exist is an error, not an empty listing."""
    from ..common.errors import StorageError
    from ..storage import open_store

    if "://" not in uri.removeprefix("file://") and not Path(uri.removeprefix("file://")).exists():
        raise StorageError(f"{uri}: no such folder")
    return open_store(uri, _store_settings(timeout_s))


@ckpt_app.command("ls")
def ckpt_ls(uri: Annotated[str, typer.Argument(help="Run output URI.")], timeout_s: TimeoutOpt = 120.0) -> None:
    """List committed checkpoints with step, time and size, and those a rollback moved aside."""
    import datetime

    from ..checkpoint.layout import list_abandoned, list_committed

    def line(c, note: str = "") -> str:
        size = sum(f["size"] for f in c.manifest["files"].values()) / 2**20
        when = datetime.datetime.fromtimestamp(c.manifest.get("created", 0)).isoformat(timespec="seconds")
        return f"{c.name}  step {c.step:>8}  {when}  {size:9.1f} MiB  {len(c.manifest['files'])} files{note}"

    try:
        store = _open_existing(uri, timeout_s)
        committed, abandoned = list_committed(store), list_abandoned(store)
    except UserError as err:
        fail(str(err))
    for c in committed:
        typer.echo(line(c))
    if not committed:
        typer.echo(f"no committed checkpoints under {uri}")
    for prefix, c in abandoned:
        typer.echo(line(c, f"  abandoned ({prefix})"))


@ckpt_app.command("verify")
def ckpt_verify(
    uri: Annotated[
        str,
        typer.Argument(
            help="Checkpoint URI (.../checkpoints/step_N), run output (its newest checkpoint and its published "
            "model/ or adapter/) or a published folder."
        ),
    ],
    timeout_s: TimeoutOpt = 120.0,
) -> None:
    """Re-hash every file of a checkpoint, and of a run's published model/ or adapter/, against its
    manifest (size and sha256); exit 1 naming any missing or altered file."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as scratch:
            checked, problems = _verify_all(uri, timeout_s, Path(scratch))
    except UserError as err:
        fail(str(err))
    if problems:
        fail("; ".join(problems))
    for line in checked:
        typer.echo(f"OK: {line}")


def _verify_all(uri: str, timeout_s: float, scratch: Path) -> tuple[list[str], list[str]]:
    """(what verified, one problem per bad checkpoint or artefact) for `ckpt verify URI`."""
    from ..checkpoint.layout import (
        MANIFEST,
        find_latest,
        resolve_checkpoint,
        split_checkpoint_uri,
        verify,
        verify_published,
    )
    from ..common.errors import CheckpointError

    if split_checkpoint_uri(uri)[1] is not None:
        store, committed = resolve_checkpoint(uri, _store_settings(timeout_s))
        targets, artefacts = [committed], []
    else:
        store = _open_existing(uri, timeout_s)
        newest = find_latest(store)
        targets = [] if newest is None else [newest]
        artefacts = [prefix for prefix in ("model", "adapter") if store.size(f"{prefix}/{MANIFEST}") is not None]
        if not targets and not artefacts and store.size(MANIFEST) is not None:
            artefacts = [""]  # the URI is a published folder itself
    if not targets and not artefacts:
        raise CheckpointError(f"{uri}: no committed checkpoint and no published model/ or adapter/ (no {MANIFEST})")
    checked, problems = [], []
    for committed in targets:
        bad = verify(store, committed, scratch)
        if bad:
            problems.append(f"{committed.name}: {len(bad)} file(s) do not match the manifest: {', '.join(bad)}")
        checked.append(f"{committed.name} (step {committed.step}), {len(committed.manifest['files'])} files verified")
    for prefix in artefacts:
        manifest, bad = verify_published(store, prefix, scratch)
        where = f"{prefix}/" if prefix else uri
        if bad:
            problems.append(f"{where}: {len(bad)} file(s) do not match its manifest: {', '.join(bad)}")
        checked.append(f"{where} (published), {len(manifest['files'])} files verified")
    return checked, problems


def _copy(source: str, destination: str, timeout_s: float) -> None:
    import tempfile

    from ..checkpoint.layout import copy_checkpoint, resolve_checkpoint
    from ..storage import open_store

    try:
        src, committed = resolve_checkpoint(source, _store_settings(timeout_s))
        dst = open_store(destination, _store_settings(timeout_s))
        with tempfile.TemporaryDirectory() as scratch:
            copied = copy_checkpoint(src, committed, dst, Path(scratch))
    except UserError as err:
        fail(str(err))
    typer.echo(
        f"copied {committed.name} (step {committed.step}, {len(copied.manifest['files'])} files) "
        f"to {dst.uri}/checkpoints/{committed.name}"
    )


@ckpt_app.command("pull")
def ckpt_pull(
    source: Annotated[str, typer.Argument(help="Checkpoint or run URI (newest) to copy from, e.g. s3://b/run.")],
    to: Annotated[Path, typer.Option(help="Local run folder to copy into.")],
    timeout_s: TimeoutOpt = 120.0,
) -> None:
    """Copy a committed checkpoint from a store (e.g. a bucket) into a local run folder, verified."""
    _copy(source, str(to), timeout_s)


@ckpt_app.command("push")
def ckpt_push(
    source: Annotated[str, typer.Argument(help="Local checkpoint or run folder (newest).")],
    to: Annotated[str, typer.Option(help="Run URI to copy into, e.g. s3://bucket/run.")],
    timeout_s: TimeoutOpt = 120.0,
) -> None:
    """Copy a committed checkpoint from a local run folder to a store (e.g. a bucket), verified."""
    _copy(source, to, timeout_s)
