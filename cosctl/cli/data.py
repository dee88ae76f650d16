"""`cosctl data synth` and `cosctl data prepare`: the built-in synthetic set, and a spec's records
prepared once into the token stores every rank maps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..common.errors import SpecError, UserError
from .console import fail
from .options import SetOpt, SpecArg, load_spec_for

data_app = typer.Typer(no_args_is_help=True, help="Datasets.")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Output folder.")],
    num_samples: Annotated[int, typer.Option(min=1)] = 1000,
    seed: int = 0,
    image_size: Annotated[int, typer.Option(min=16)] = 128,
) -> None:
    """Write the deterministic synthetic multitask set (caption, VQA, OCR, referring expressions)."""
    from ..data.synth import synthesize

    typer.echo(json.dumps(synthesize(out, num_samples=num_samples, seed=seed, image_size=image_size), indent=1))


@data_app.command("prepare")
def data_prepare(
    spec: SpecArg,
    set_: SetOpt = None,
    tokenizer: Annotated[
        Optional[Path],
        typer.Option(help="Tokenizer folder; default: model.tokenizer (pretrain) or the local source model's."),
    ] = None,
    workers: Annotated[Optional[int], typer.Option(min=0, help="Worker processes; default data.num_workers.")] = None,
) -> None:
    """Validate, tokenise and decode-check a spec's train and eval records once, into token stores that
    training maps on every rank (reused while the data file, tokenizer and data settings are unchanged)."""
    from ..data.prepare import prepare_spec
    from ..data.records import load_tokenizer

    try:
        loaded = load_spec_for(spec, set_)
        if not hasattr(loaded, "data"):
            raise SpecError(f"{spec}: stage {loaded.stage!r} reads no data")
        folder = tokenizer or _spec_tokenizer(loaded)
        typer.echo(json.dumps(prepare_spec(loaded, load_tokenizer(folder), workers=workers), indent=1))
    except UserError as err:
        fail(str(err))


def _spec_tokenizer(spec) -> Path:
    """The tokenizer folder the spec's stage would use, when it is on this machine."""
    from ..stages import stage_for

    return stage_for(spec).tokenizer_folder()
