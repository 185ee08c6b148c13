"""``slidepipe predict``: apply a trained run (its fold ensemble) to a cohort's feature store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import CONFIG_HELP, console, fail, resolve_config, setup_logging


def command(
    run: Annotated[Path | None, typer.Option("--run", "-r", help="run directory of `slidepipe train`")] = None,
    store: Annotated[Path | None, typer.Option("--store", "-s", help="feature store of the cohort")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory  [default: predictions]")] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", "-l", help="label table: metrics with 95% bootstrap CIs over patients")
    ] = None,
    slides: Annotated[list[str] | None, typer.Option("--slides", help="score only this slide id (repeatable)")] = None,
    fold: Annotated[list[int] | None, typer.Option("--fold", help="use only this fold's checkpoint (repeatable)")] = None,
    heatmaps: Annotated[
        int | None, typer.Option(help="attention heatmaps of the K highest- and K lowest-scoring slides  [default: 0]")
    ] = None,
    n_boot: Annotated[int | None, typer.Option(help="bootstrap replicates for the CIs  [default: 1000]")] = None,
    seed: Annotated[int | None, typer.Option(help="bootstrap seed  [default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda  [default: auto]")] = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Apply the fold ensemble of a training run to every slide of a store (external validation).

    Writes predictions.csv (the ensemble's mean and every fold's column); with --labels also
    metrics.json (each metric with a 95% bootstrap CI over patients) and the task's plots (ROC and
    calibration, Kaplan-Meier, predicted vs observed); report.html always. A store whose encoder,
    weights, feature dim, patch size or mpp differ from the training store's is refused.
    Exit code 2 for a usage, label-table, checkpoint or store error (other features included).
    """
    from pipelines.config import PredictJob

    setup_logging(verbose)
    overrides = {"run": run, "store": store, "out": out, "labels": labels, "slides": slides or None,
                 "folds": fold or None, "heatmaps": heatmaps, "n_boot": n_boot, "seed": seed, "device": device}  # fmt: skip
    job = resolve_config(PredictJob, config, overrides)
    if job.run is None or job.store is None:
        raise fail("--run and --store are required. Fix: slidepipe predict --run RUN --store S --out DIR")
    run_job(job)


def run_job(job) -> None:
    from pipelines.config import save_resolved_config
    from pipelines.labels import LabelTableError
    from pipelines.predict import PredictError, predict_mil
    from wsi.errors import StoreError

    try:
        res = predict_mil(job.run, job.store, job.labels, out=job.out, slides=job.slides or None,
                          folds=job.folds or None, device=job.device, n_boot=job.n_boot, seed=job.seed,
                          heatmaps=job.heatmaps)  # fmt: skip
    except (PredictError, LabelTableError, StoreError, ValueError) as err:
        raise fail(str(err)) from err
    save_resolved_config(job, job.out, name="predict-config.yaml")
    console.print(f"{len(res.predictions)} bags scored by {len(res.checkpoints)} fold model(s) ({res.task.describe()})")
    for name, m in (res.metrics or {}).items():
        ci = m.get("ci95")
        value = m.get("value")
        shown = "n/a" if value is None or value != value else f"{value:.3f}" if isinstance(value, float) else value
        console.print(f"  {name}: {shown}" + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""))
    console.print(f"wrote {job.out}/predictions.csv" + (", metrics.json" if res.metrics else "") + ", report.html")
