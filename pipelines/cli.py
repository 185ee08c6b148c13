"""The ``slidepipe`` command: a typer app assembling one module per verb from ``pipelines.commands``.

Nothing imports this module; verb modules import heavy libraries inside their functions so
``slidepipe --help`` stays fast.
"""

from __future__ import annotations

import signal
import sys

import typer

from pipelines.commands import demo, export, extract, heatmap, info, predict, tile, train, verify

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
app.command("verify")(verify.command)
app.command("demo")(demo.command)


_SIGNAL: dict[str, int | None] = {"number": None}


def _interrupt(signum: int, frame) -> None:
    """SIGTERM and SIGHUP (what SLURM, Docker and systemd send) act like Ctrl-C: the running job
    cleans up (partial slides removed, claims released) exactly as on KeyboardInterrupt."""
    _SIGNAL["number"] = signum
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main() -> None:
    """Console-script entry point. Interrupted runs exit with 128 + the signal's number (130 for
    Ctrl-C, 143 for SIGTERM, 129 for SIGHUP) after their cleanup."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        app()
    except SystemExit:
        if _SIGNAL["number"] is not None:
            name = signal.Signals(_SIGNAL["number"]).name
            sys.stderr.write(f"slidepipe: interrupted by {name}; partial outputs were removed\n")
            sys.exit(128 + _SIGNAL["number"])
        raise


if __name__ == "__main__":
    main()
