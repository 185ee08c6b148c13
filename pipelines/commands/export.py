"""``slidepipe export-h5``: write CLAM/TRIDENT-compatible ``<slide>.h5`` files from a feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import CONFIG_HELP, console, fail, resolve_config, setup_logging


def command(
    store: Annotated[Path | None, typer.Argument(help="feature store written by `slidepipe extract`")] = None,
    outdir: Annotated[Path | None, typer.Argument(help="directory for the <slide>.h5 files")] = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """One ``<slide>.h5`` per slide with ``features`` (N, D) float32 and ``coords`` (N, 2) plus the
    attrs CLAM and TRIDENT readers expect (patch_size, patch_level, downsample, patch_size_level0 ...).
    Exit code 1 if any slide failed."""
    from pipelines.config import ExportJob
    from pipelines.export import run_export
    from wsi.errors import StoreError

    setup_logging(verbose)
    job = resolve_config(ExportJob, config, {"store": store, "out": outdir})
    if job.store is None:
        raise fail("no store given. Fix: slidepipe export-h5 STORE OUTDIR")
    try:
        summary = run_export(job)
    except (StoreError, ValueError) as err:
        raise fail(str(err)) from err
    console.print(summary.table())
    console.print(f"h5 files: {job.out}")
    if summary.n_failed:
        raise typer.Exit(1)
