"""`slidepipe info` (placeholder until its issue lands)."""

import typer


def command() -> None:
    """Not implemented yet."""
    raise typer.Exit(3)
