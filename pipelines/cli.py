"""The ``slidepipe`` command: a typer app assembling one module per verb from ``pipelines.commands``.

Nothing imports this module; verb modules import heavy libraries inside their functions so
``slidepipe --help`` stays fast.
"""

from __future__ import annotations

import typer

from pipelines.commands import demo, export, extract, heatmap, info, predict, tile, train

app = typer.Typer(
    name="slidepipe",
    help="Whole-slide images to slide-level classifiers: tile, extract features, train MIL heads.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("info")(info.command)
app.command("tile")(tile.command)
app.command("extract")(extract.command)
app.command("train")(train.command)
app.command("predict")(predict.command)
app.command("heatmap")(heatmap.command)
app.command("export-h5")(export.command)
app.command("demo")(demo.command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
