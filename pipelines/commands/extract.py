"""``slidepipe extract``: embed every tissue patch of every slide into a Zarr feature store."""

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


class _RichProgress:
    """Slides done, patches/s and ETA on stderr."""

    def __init__(self, progress, n_slides: int) -> None:
        self.p = progress
        self.slides = progress.add_task("slides", total=n_slides)
        self.patches = progress.add_task("patches", total=0)

    def slide_started(self, slide_id: str, n_patches: int) -> None:
        total = self.p.tasks[self.patches].total or 0
        self.p.update(self.patches, total=total + n_patches, description=f"patches [{slide_id}]")

    def patches_done(self, n: int) -> None:
        self.p.advance(self.patches, n)

    def slide_finished(self, result) -> None:
        self.p.advance(self.slides, 1)  # failures are logged by the extractor and listed at the end


def command(
    slides: Annotated[list[str] | None, typer.Argument(help="slide files, directories or glob patterns")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="feature store (.zarr directory)")] = None,
    encoder: Annotated[str | None, typer.Option(help="encoder name (see models.encoders.list_encoders)")] = None,
    weights: Annotated[
        str | None, typer.Option(help="weights: local file/dir, 'hf-hub:org/name', or 'random' (tests only)")
    ] = None,
    mpp: Annotated[float | None, typer.Option(help="patch resolution, µm/px")] = None,
    size: Annotated[int | None, typer.Option(help="patch side in px at --mpp")] = None,
    overlap: Annotated[int | None, typer.Option(help="overlap between patches, px")] = None,
    min_tissue: Annotated[float | None, typer.Option(help="minimum tissue fraction per patch")] = None,
    slide_mpp: Annotated[float | None, typer.Option(help="µm/px to assume when a file has none")] = None,
    stain: Annotated[
        str | None, typer.Option(help="stain normalisation: none, macenko, reinhard, vahadane")
    ] = None,
    stain_target: Annotated[Path | None, typer.Option(help="reference image or saved fit for --stain")] = None,
    batch_size: Annotated[int | None, typer.Option(help="patches per encoder batch")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    precision: Annotated[str | None, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")] = None,
    workers: Annotated[int | None, typer.Option(help="reader threads per slide")] = None,
    reader: Annotated[
        str | None,
        typer.Option(help="process: read patches in a child process (default; no GIL contention with the "
                     "encoder); thread: in threads of this process"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (default: torch's, all cores; 1 for bit-reproducible CPU runs; with a "
                     "small encoder on CPU, one below the core count leaves the reader a core)"),
    ] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the trunk")] = None,
    overwrite: Annotated[
        bool | None, typer.Option("--overwrite/--no-overwrite", help="replace slides / a store of another identity")
    ] = None,
    wait: Annotated[
        bool | None,
        typer.Option("--wait/--no-wait", help="also wait for slides other processes sharing the store are writing "
                     "(taking over any whose process dies): the store is complete when this exits"),
    ] = None,
    skip_corrupt_tiles: Annotated[
        bool | None, typer.Option("--skip-corrupt-tiles/--no-skip-corrupt-tiles", help="drop undecodable patches")
    ] = None,
    cluster: ClusterOption = None,
    cluster_config: ClusterConfigOption = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Embed every tissue patch of every slide with a patch encoder into a resumable Zarr store.

    Complete slides with the same identity are skipped; several processes may share one store.
    Exit code 1 if any slide failed, 2 for a usage or store-identity error. Slides another live
    process is writing are left to it (listed as such) unless --wait.
    """
    from pipelines.config import ExtractJob

    setup_logging(verbose)
    overrides = {
        "slides": slides or None, "out": out, "encoder": encoder, "weights": weights,
        "tiling": {"mpp": mpp, "patch_size": size, "overlap": overlap, "min_tissue": min_tissue,
                   "slide_mpp": slide_mpp},
        "stain": {"method": stain, "target": stain_target},
        "batch_size": batch_size, "device": device, "precision": precision, "workers": workers,
        "reader": reader, "torch_threads": threads, "compile": compile, "overwrite": overwrite, "wait": wait,
        "skip_corrupt_tiles": skip_corrupt_tiles,
    }
    job = resolve_config(ExtractJob, config, overrides)
    apply_cluster(job, cluster, cluster_config)
    if not job.slides:
        raise fail("no slides given. Fix: slidepipe extract SLIDES... --out features.zarr")
    run(job)


def run(job) -> None:
    """Run the job with a rich progress display; exit non-zero if any slide failed."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    from models.encoders import EncoderError
    from pipelines.extract import load_encoder, run_extract
    from pipelines.inputs import InputError, expand_slides
    from wsi.errors import StoreError

    try:
        n_slides = len(expand_slides(job.slides))
    except InputError as err:
        raise fail(str(err)) from err
    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:8.1f}/s", style="cyan")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    try:
        encoder = load_encoder(job)  # before the progress bars: a weights error is one clean line
        with Progress(*columns, console=console, transient=False) as p:
            summary = run_extract(job, progress=_RichProgress(p, n_slides), encoder=encoder)
    except (StoreError, EncoderError, InputError, ValueError) as err:
        raise fail(str(err)) from err
    console.print(summary.table())
    console.print(f"store: {job.out}  ({summary.n_patches} patches)")
    if summary.n_failed:
        raise typer.Exit(1)
    if summary.n_busy:  # this process's share is done: not an error (e.g. one of several array jobs)
        console.print(
            f"[yellow]{summary.n_busy} slide(s) are still being written by another process sharing this "
            "store (see their claims in .claims/), so the store is not complete yet: pass --wait to wait "
            "for them, or rerun this command later (it skips what is done and takes over what was abandoned)"
        )
