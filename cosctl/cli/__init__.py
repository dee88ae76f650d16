"""The `cosctl` command line (docs/design.md §1): the Typer app (`app`), one module per group of commands,
and the one way a user error ends (`console.fail`). May import every other package; none imports it."""


def main() -> None:
    """The `cosctl` console script."""
    from .app import main as run

    run()
