"""``slidepipe tile``: find tissue and lay the patch grid on every slide; write coords, h5, GeoJSON, overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import (
    CONFIG_HELP,
    ClusterConfigOption,
    ClusterOption,
    apply_cluster,
    console,
    fail,
    resolve_config,
    setup_logging,
)


def command(
    slides: Annotated[
        list[str] | None, typer.Argument(help="slide files, directories or glob patterns (quote globs)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory (default: tiles)")] = None,
    mpp: Annotated[float | None, typer.Option(help="patch resolution, µm/px (default: 0.5)")] = None,
    size: Annotated[int | None, typer.Option(help="patch side in px at --mpp (default: 256)")] = None,
    overlap: Annotated[int | None, typer.Option(help="overlap between neighbouring patches, px (default: 0)")] = None,
    min_tissue: Annotated[
        float | None, typer.Option(help="minimum tissue fraction per patch, 0..1 (default: 0.5)")
    ] = None,
    slide_mpp: Annotated[
        float | None, typer.Option(help="µm/px of level 0 to use when a file has none in its metadata")
    ] = None,
    tissue_mpp: Annotated[
        float | None, typer.Option(help="resolution of the tissue-detection thumbnail, µm/px (default: 8)")
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="slide reader: auto (openslide, then tiffslide), openslide, tiffslide")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="reader threads per slide for --save-patches (default: 1)")] = None,
    save_patches: Annotated[
        str | None, typer.Option(help="also write each patch as an image: none, png or jpeg (default: none)")
    ] = None,
    skip_corrupt_tiles: Annotated[
        bool | None,
        typer.Option(
            "--skip-corrupt-tiles/--no-skip-corrupt-tiles",
            help="drop patches whose pixels cannot be decoded instead of failing the slide",
        ),
    ] = None,
    stain: Annotated[
        str | None,
        typer.Option(help="stain-normalise saved patches (or a preview): none, macenko, reinhard, vahadane"),
    ] = None,
    stain_target: Annotated[
        Path | None, typer.Option(help="reference RGB image or a saved fit (JSON) for --stain")
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option(
            "--overwrite/--no-overwrite",
            help="replace slides that OUT holds under the same slide id from another file",
        ),
    ] = None,
    cluster: ClusterOption = None,
    cluster_config: ClusterConfigOption = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Detect tissue and lay the patch grid on every slide.

    Per slide, OUT holds coords/<slide>.zarr (Zarr v3: coords, tissue), patches/<slide>_patches.h5
    (CLAM/TRIDENT), geojson/<slide>.geojson (QuPath) and overlays/<slide>.png; plus config.yaml
    (the resolved config) and summary.json. A bad slide is reported and the batch goes on. A
    slide that OUT holds from another file of the same name is not replaced without --overwrite.
    Exit code 1 if any slide failed, 2 for a usage or config error.
    """
    from pipelines.config import TileJob

    setup_logging(verbose)
    overrides = {
        "slides": slides or None,
        "out": out,
        "tiling": {
            "mpp": mpp, "patch_size": size, "overlap": overlap, "min_tissue": min_tissue,
            "slide_mpp": slide_mpp, "tissue_mpp": tissue_mpp, "backend": backend,
        },
        "stain": {"method": stain, "target": stain_target},
        "workers": workers,
        "save_patches": save_patches,
        "skip_corrupt_tiles": skip_corrupt_tiles,
    }
    overrides["overwrite"] = overwrite
    job = resolve_config(TileJob, config, overrides)
    apply_cluster(job, cluster, cluster_config)
    if not job.slides:
        raise fail("no slides given. Fix: slidepipe tile SLIDES... --out DIR (files, directories or globs)")
    if job.tiling.overlap >= job.tiling.patch_size:
        raise fail(f"--overlap {job.tiling.overlap} must be smaller than --size {job.tiling.patch_size}")
    run(job)


def run(job) -> None:
    """Run with a rich progress bar; print the summary table; exit 1 if any slide failed."""
    from pipelines.cluster import ClusterProgress
    from pipelines.inputs import InputError
    from pipelines.tile import check_job, run_tile  # OutputConflictError is an InputError
    from wsi.errors import StainError

    try:
        n = len(check_job(job))
    except (InputError, StainError) as err:
        raise fail(str(err)) from err
    if n == 0:
        raise fail(f"no slide files in {', '.join(job.slides)}. Fix: check the paths (suffixes: .svs, .tif, ...)")
    try:
        with ClusterProgress(n, title="tiling", console=console) as progress:
            summary = run_tile(job, progress=progress)
    except (InputError, StainError) as err:
        raise fail(str(err)) from err
    console.print(summary.table())
    console.print(f"outputs: {job.out}  ({summary.n_patches} patches; summary.json, config.yaml)")
    if summary.n_failed:
        raise typer.Exit(1)
