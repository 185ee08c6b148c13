"""``slidepipe train``: cross-validated MIL training on a feature store."""

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


class _RichFolds:
    """One progress bar per fold (epochs, losses) on stderr."""

    def __init__(self, progress) -> None:
        self.p = progress
        self.tasks: dict[tuple[int, int], int] = {}

    def __call__(self, event: dict) -> None:
        key = (event["repeat"], event["fold"])
        kind = event["kind"]
        if kind == "fold_start" or key not in self.tasks:  # folds on a cluster only report their end
            name = f"repeat {key[0]} fold {key[1]}" if key[0] else f"fold {key[1]}"
            self.tasks[key] = self.p.add_task(name, total=event.get("epochs", 1), info="")
        if kind == "epoch":
            info = f"train {event['train_loss']:.3f}  val {event['val_loss']:.3f}"
            self.p.update(self.tasks[key], completed=event["epoch"] + 1, info=info)
        elif kind == "fold_end":
            name = next((k for k in ("auc", "c_index", "pearson_r") if k in event),
                        next((k for k in event if k.endswith(".auc") or k.endswith(".pearson_r")), None))  # fmt: skip
            value = event.get(name) if name else None
            shown = "n/a" if value is None or value != value else f"{value:.3f}"
            self.p.update(self.tasks[key], completed=self.p.tasks[self.tasks[key]].total,
                          info=f"best epoch {event['best_epoch']}  test {name or 'metric'} {shown}")  # fmt: skip


def command(
    store: Annotated[Path | None, typer.Option("--store", "-s", help="feature store (.zarr)")] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", "-l", help="CSV/TSV/parquet: slide_id, optional patient_id, target column")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="MIL head: abmil, gated-abmil, clam-sb, clam-mb, "
                                 "transmil, dsmil, mean, max")  # fmt: skip
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory")] = None,
    task: Annotated[
        str | None, typer.Option(help="study design: classification, regression or survival  [default: classification]")
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(help="label column to predict; repeat for several targets trained jointly  [default: label]"),
    ] = None,
    time: Annotated[str | None, typer.Option(help="survival: follow-up time column  [default: time]")] = None,
    event: Annotated[str | None, typer.Option(help="survival: event column, 1 = event, 0 = censored  [default: event]")] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="classification: cross_entropy; regression: mse (default) or huber; survival: cox "
                     "(default, Breslow ties) or discrete (quantile time bins)"),  # fmt: skip
    ] = None,
    bins: Annotated[int | None, typer.Option(help="survival --loss discrete: time bins  [default: 4]")] = None,
    level: Annotated[
        str | None, typer.Option(help="slide: a bag per slide (default); patient: a patient's slides pooled in one bag")
    ] = None,
    folds: Annotated[int | None, typer.Option(help="cross-validation folds")] = None,
    repeats: Annotated[int | None, typer.Option(help="repeats of the k-fold split (new seed each)")] = None,
    test_frac: Annotated[float | None, typer.Option(help="held-out test share (0: none)")] = None,
    val_frac: Annotated[float | None, typer.Option(help="validation share inside each training fold")] = None,
    splits: Annotated[Path | None, typer.Option(help="reuse splits.json from an earlier run")] = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs per fold")] = None,
    patience: Annotated[int | None, typer.Option(help="early-stopping patience (epochs)")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay")] = None,
    batch_size: Annotated[int | None, typer.Option(help="bags per batch (per optimizer step)")] = None,
    max_batch_tokens: Annotated[
        str | None,
        typer.Option(help="most padded patches per forward/backward pass; bigger batches accumulate "
                     "gradients over passes. 'auto' (the head's default: TransMIL 4096, others no "
                     "limit; on CPU at most 16 MiB of float32 features per pass), a number, or 'none'"),  # fmt: skip
    ] = None,
    max_instances: Annotated[int | None, typer.Option(help="subsample larger bags to this size in training")] = None,
    balance: Annotated[str | None, typer.Option(help="class balance: loss, sampler or none")] = None,
    standardize: Annotated[
        bool | None, typer.Option("--standardize/--no-standardize", help="standardise features (train stats)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of splits, initialisation and batches")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    allow_missing: Annotated[
        bool | None, typer.Option("--allow-missing/--no-allow-missing", help="skip labelled slides not in the store")
    ] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option("--tensorboard/--no-tensorboard",
                     help="also write TensorBoard scalars to OUT/tensorboard/<fold> (needs slidepipe[tensorboard])"),  # fmt: skip
    ] = None,
    overwrite: Annotated[
        bool | None,
        typer.Option("--overwrite/--no-overwrite", help="replace an existing run in --out (swapped in once complete)"),
    ] = None,
    cluster: ClusterOption = None,
    cluster_config: ClusterConfigOption = None,
    config: Annotated[Path | None, typer.Option("--config", help=CONFIG_HELP)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Train a MIL head with patient-grouped, stratified k-fold cross-validation.

    Tasks: classification of one or several label columns (--target a --target b), regression of
    numeric columns (--task regression), survival from time and event columns (--task survival);
    --level patient pools each patient's slides into one bag. Writes config.yaml, splits.json, one checkpoint per fold (best validation loss), log.csv,
    predictions.csv and metrics.json (per fold and mean ± sd) into --out; with --tensorboard
    also tensorboard/<fold>/ (view with: tensorboard --logdir OUT/tensorboard).
    Exit code 2 for a usage, label-table or store error.
    """
    from pipelines.config import TrainJob

    setup_logging(verbose)
    overrides = {
        "store": store, "labels": labels, "model": model, "out": out, "target": target or None,
        "task": task, "time": time, "event": event, "loss": loss, "bins": bins, "level": level,
        "folds": folds, "repeats": repeats, "test_frac": test_frac, "val_frac": val_frac,
        "splits": splits, "epochs": epochs, "patience": patience, "lr": lr,
        "weight_decay": weight_decay, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
        "max_instances": max_instances, "tensorboard": tensorboard,
        "balance": balance, "standardize": standardize, "seed": seed, "device": device,
        "torch_threads": threads, "allow_missing": allow_missing, "overwrite": overwrite,
    }  # fmt: skip
    job = resolve_config(TrainJob, config, overrides)
    apply_cluster(job, cluster, cluster_config)
    if job.store is None or job.labels is None:
        raise fail("--store and --labels are required. Fix: slidepipe train --store S --labels L --out RUN")
    run(job)


def run(job) -> None:
    """Train with rich progress bars and print the summary table."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines.splits import SplitError
    from pipelines.train import LabelTableError, TensorBoardUnavailableError, train_mil
    from wsi.errors import StoreError

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=False) as p:
            results = train_mil(job.store, job.labels, job=job, progress=_RichFolds(p))
    except (LabelTableError, SplitError, StoreError, TensorBoardUnavailableError) as err:
        raise fail(str(err)) from err
    except (ValueError, TypeError) as err:  # bad model name / option
        raise fail(str(err)) from err
    console.print(results.table())
    console.print(f"run: {results.run_dir}  (metrics.json, predictions.csv, {len(results.checkpoints)} checkpoints)")
