"""How every `cosctl` command ends on a user's mistake: one `error:` line on stderr and exit code 1."""

from __future__ import annotations

import typer


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)
