"""``slidepipe demo``: the whole pipeline on a generated cohort, with an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import CONFIG_HELP, console, resolve_config, setup_logging


def command(
    out: Annotated[Path | None, typer.Option("--out", help="output directory (default demo-out)")] = None,
    slides: Annotated[int | None, typer.Option("--slides", help="number of generated slides (half positive)")] = None,
    encoder: Annotated[str | None, typer.Option("--encoder", help="patch encoder (see `slidepipe extract --help`)")] = None,
    weights: Annotated[str | None, typer.Option("--weights", help="encoder weights: 'random' (default), a file, or hf-hub:org/name")] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="cross-validation folds")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed of the cohort and the training")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="processes/threads for generation and reading")] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="classification (default), regression or survival: labels planted in the "
                     "generated slides (the number of lesions drives the value / the hazard)"),  # fmt: skip
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Generate a cohort (--task: two classes, a value or survival), then tile → extract → ABMIL (k-fold) → heatmaps → report.html."""
    from pipelines.config import DemoJob
    from pipelines.demo import run_demo

    setup_logging(verbose)
    job = resolve_config(
        DemoJob, config,
        {"out": out, "slides": slides, "encoder": encoder, "weights": weights, "folds": folds,
         "seed": seed, "workers": workers, "task": task},
    )  # fmt: skip
    res = run_demo(job, echo=console.print)
    key, name = {"regression": ("pearson_r", "Pearson r"), "survival": ("c_index", "C-index")}.get(job.task, ("auc", "AUC"))
    main = res.summary.get(key, {})
    console.print(
        f"[bold]demo done[/bold]: {len(res.cohort)} slides, {res.n_patches} patches, "
        f"{name} {main.get('mean', float('nan')):.3f} ± {main.get('std', float('nan')):.3f}; "
        f"attention inside clusters {res.attention_inside:.4f} vs outside {res.attention_outside:.4f}"
        if res.attention_inside is not None else "[bold]demo done[/bold]"
    )
    if job.weights == "random":
        console.print(f"[yellow]note:[/yellow] encoder {job.encoder} used RANDOM weights (demo only).")
    console.print(f"report: {res.report}")
