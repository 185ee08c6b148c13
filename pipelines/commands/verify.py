"""``slidepipe verify``: check that every chunk of every slide of a feature store is there and intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import CONFIG_HELP, console, fail, resolve_config, setup_logging


def command(
    store: Annotated[Path | None, typer.Argument(help="feature store written by `slidepipe extract`")] = None,
    deep: Annotated[
        bool, typer.Option("--deep", help="also read every chunk and check its crc32c checksum (reads the whole store)")
    ] = False,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Check a feature store. Shallow (default): every chunk file of every slide is present, not
    empty and of the size recorded when the slide was committed (a listing: nothing is read).
    --deep: every chunk is also read and its checksum verified.

    Prints one line per bad slide (slide, array, reason) and a summary. `slidepipe extract` into
    the same store redoes the bad slides. Exit code 0 if all slides are intact, 1 if any is bad,
    2 for a usage error (not a store).
    """
    from pipelines.config import VerifyJob
    from wsi.errors import StoreError
    from wsi.store import verify_store

    setup_logging(verbose)
    job = resolve_config(VerifyJob, config, {"store": store, "deep": deep or None})
    if job.store is None:
        raise fail("no store given. Fix: slidepipe verify STORE [--deep]")
    try:
        results = verify_store(job.store, deep=job.deep)
    except StoreError as err:
        raise fail(str(err)) from err
    if _report(job.store, results, deep=job.deep):
        console.print("Fix: `slidepipe extract` into this store redoes the bad slides (or delete them)")
        raise typer.Exit(1)


def _report(store: Path, results, *, deep: bool) -> bool:
    """One line per bad slide and a summary on stdout; True when anything is bad."""
    bad = [r for r in results if not r.ok]
    for r in bad:
        typer.echo(f"BAD {store}: {r}")
    slides = [r for r in results if r.slide_id is not None]
    old = sum(1 for r in slides if not (r.recorded and r.checksummed))
    n_bad = sum(1 for r in bad if r.slide_id is not None)
    note = f"; {old} written before chunk checksums (count and decode checks only)" if old else ""
    typer.echo(f"{store}: {len(slides)} slides checked ({'deep' if deep else 'shallow'}): "
               f"{len(slides) - n_bad} ok, {n_bad} bad{note}")
    return bool(bad)
