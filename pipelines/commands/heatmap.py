"""``slidepipe heatmap``: per-patch attention of a trained run on one slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import CONFIG_HELP, console, fail, resolve_config, setup_logging


def command(
    run: Annotated[Path | None, typer.Option("--run", "-r", help="run directory of `slidepipe train`")] = None,
    store: Annotated[Path | None, typer.Option("--store", "-s", help="feature store holding the slide")] = None,
    slide: Annotated[Path | None, typer.Option("--slide", help="the slide file (for the thumbnail)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    fold: Annotated[int | None, typer.Option(help="use this fold's checkpoint (default: average of folds)")] = None,
    thumb_mpp: Annotated[float | None, typer.Option(help="µm/px of the overlay thumbnail")] = None,
    cmap: Annotated[str | None, typer.Option(help="matplotlib colour map")] = None,
    alpha: Annotated[float | None, typer.Option(help="overlay opacity, 0..1")] = None,
    slide_mpp: Annotated[float | None, typer.Option(help="µm/px to assume when the file has none")] = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Write <slide>_attention.csv, <slide>_attention.geojson (QuPath) and <slide>_heatmap.png.

    Exit code 2 for a usage error, a slide missing from the store or an unreadable slide.
    """
    from pipelines.config import HeatmapJob

    setup_logging(verbose)
    overrides = {"run": run, "store": store, "slide": slide, "out": out, "fold": fold,
                 "thumb_mpp": thumb_mpp, "cmap": cmap, "alpha": alpha, "slide_mpp": slide_mpp}  # fmt: skip
    job = resolve_config(HeatmapJob, config, overrides)
    if job.run is None or job.store is None or job.slide is None:
        raise fail("--run, --store and --slide are required. Fix: slidepipe heatmap --run RUN --store S --slide F")
    from pipelines.heatmap import HeatmapError, run_heatmap
    from wsi.errors import SlideError, StoreError

    try:
        res = run_heatmap(job)
    except (HeatmapError, StoreError, SlideError) as err:
        raise fail(str(err)) from err
    probs = ", ".join(f"{k}={v:.3f}" for k, v in res.probs.items())
    console.print(f"{res.slide_id}: {res.n_patches} patches; {probs}")
    console.print(f"wrote {res.csv}, {res.geojson}, {res.png}")
