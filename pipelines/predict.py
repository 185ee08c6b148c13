"""Apply a trained run to a cohort: ``predict_mil(run, store, labels=None) -> Prediction``.

The run's fold checkpoints form an ensemble: each fold model predicts every bag (probabilities,
values or risks, in the task's units) and the ensemble's prediction is their mean; the per-fold
columns are kept (``fold0_prob_pos`` ...). Before anything is scored, the store's features are
checked against the identity the checkpoints recorded (encoder, weights, dim, patch size, mpp,
stain): other features are a ``FeatureMismatchError`` naming both sides.

With a label table, ``metrics.json`` holds each metric's point estimate and a 95 % bootstrap
confidence interval over patients (``{"auc": {"value": .., "ci95": [lo, hi]}}``), with the
task's plots (ROC and calibration, Kaplan-Meier of the median risk split, predicted vs observed)
and a self-contained ``report.html``. ``heatmaps=K`` draws attention heatmaps of the K highest-
and K lowest-scoring slides whose files are still where the store says.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.mil.checkpoint import CheckpointError, load_checkpoint
from pipelines.batching import as_tensors, batch_token_budget
from pipelines.config import TrainJob
from pipelines.features import check_features, features_identity
from pipelines.labels import LabelTableError, read_label_table
from pipelines.metrics import bootstrap_ci, json_safe
from pipelines.splits import Fold
from pipelines.tasks import Task, legacy_task, task_from_dict
from wsi.errors import StoreError
from wsi.store import FeatureStore

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A run cannot be applied; the message names the file, the reason and the fix."""


@dataclass
class FoldModel:
    """One fold checkpoint ready to predict: the model, its fitted task and standardisation."""

    name: str
    model: torch.nn.Module
    task: Task
    ckpt: dict[str, Any]

    @property
    def features(self) -> dict[str, Any] | None:
        return self.ckpt.get("features")

    @property
    def level(self) -> str:
        return self.ckpt.get("level", "slide")


def fold_checkpoints(run_dir: str | Path, folds: Sequence[int] | None = None) -> list[Path]:
    """The fold checkpoints of a finished training run: those its ``metrics.json`` lists (never a
    glob, so stray checkpoints of another run are not used); only ``folds`` of repeat 0 when given."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PredictError(f"{run_dir}: run directory not found. Fix: pass the --out of `slidepipe train`")
    try:
        listed = json.loads((run_dir / "metrics.json").read_text())["folds"]
    except (OSError, ValueError, KeyError) as err:
        raise PredictError(
            f"{run_dir}: not a finished training run (no readable metrics.json listing its folds: {err}). "
            "Fix: pass the --out of a `slidepipe train` that completed"
        ) from err
    names = [Fold(int(f["repeat"]), int(f["fold"]), [], [], []).name for f in listed]
    if folds is not None:
        names = [n for n in names if n in {f"fold{k}" for k in folds}]
    paths = [run_dir / f"{n}.pt" for n in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise PredictError(f"{run_dir}: checkpoint(s) {missing} listed in metrics.json are missing. "
                           "Fix: restore the run directory or train again")  # fmt: skip
    if not paths:
        what = "checkpoint " + ", ".join(f"fold{k}.pt" for k in folds) if folds is not None else "fold checkpoints (*.pt)"
        raise PredictError(f"{run_dir}: no {what}. Fix: check --run (and --fold)")
    return paths


def load_fold_models(run_dir: str | Path, *, folds: Sequence[int] | None = None,
                     device: str | torch.device = "cpu") -> list[FoldModel]:  # fmt: skip
    """Every fold model of a run; checkpoints of different tasks or features are refused."""
    models = []
    for path in fold_checkpoints(run_dir, folds):
        try:
            model, ckpt = load_checkpoint(path, device)
        except CheckpointError as err:
            raise PredictError(str(err)) from err
        task = task_from_dict(ckpt["task"]) if "task" in ckpt else legacy_task(ckpt["classes"], ckpt.get("target", "label"))
        models.append(FoldModel(path.stem, model, task, ckpt))
    first = models[0]
    for m in models[1:]:
        same = (m.task.name, m.task.columns, m.ckpt["in_dim"], m.features) == (
            first.task.name, first.task.columns, first.ckpt["in_dim"], first.features)  # fmt: skip
        if not same:
            raise PredictError(
                f"{run_dir}: {m.name}.pt and {first.name}.pt were trained for different tasks or features "
                "(checkpoints of two runs in one directory). Fix: train into a fresh --out"
            )
    return models


def fold_outputs(fm: FoldModel, bags: Sequence[torch.Tensor], *, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """One fold model's predictions ``(n, m)`` in the task's units."""
    from pipelines.train import predict

    job = TrainJob(model=fm.ckpt["model"])
    budget = batch_token_budget(job, device=device, in_dim=fm.ckpt["in_dim"])
    out = predict(fm.model, bags, fm.ckpt["mean"], fm.ckpt["std"], batch_size=batch_size, device=device,
                  max_tokens=budget)  # fmt: skip
    return fm.task.predict(out)


def ensemble(per_fold: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's prediction: the mean over fold models (probabilities, values, risks)."""
    return np.mean(np.stack(per_fold), axis=0)


@dataclass
class Prediction:
    """Predictions of a run on a cohort, with metrics and CIs when labels were given."""

    predictions: pd.DataFrame
    task: Task
    metrics: dict[str, dict[str, Any]] | None = None
    out: Path | None = None
    checkpoints: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def _bags_for(fs: FeatureStore, ids: list[str], level: str, table: pd.DataFrame | None):
    """Bag ids, their patients, id columns and bags (patient level: slides pooled per patient)."""
    bags = as_tensors(fs.load_bags(ids))
    if level != "patient":
        patient = dict(zip(table["slide_id"], table["patient_id"], strict=True)) if table is not None else {}
        pats = [patient.get(s, s) for s in ids]
        cols = {s: {"slide_id": s, "patient_id": p} for s, p in zip(ids, pats, strict=True)}
        return ids, pats, cols, [bags[s] for s in ids]
    if table is None:
        raise PredictError("the run is patient-level: pass --labels with slide_id and patient_id to pool slides")
    groups: dict[str, list[str]] = {}
    for s, p in zip(table["slide_id"], table["patient_id"], strict=True):
        if s in bags:
            groups.setdefault(p, []).append(s)
    pids = list(groups)
    cols = {p: {"patient_id": p, "slide_ids": ";".join(sorted(groups[p]))} for p in pids}
    return pids, pids, cols, [torch.cat([bags[s] for s in sorted(groups[p])]) for p in pids]


def _targets(task: Task, table: pd.DataFrame, bag_ids: list[str], level: str, name: str) -> np.ndarray:
    """Targets of each bag from the label table, coded with the training run's classes."""
    key = "patient_id" if level == "patient" else "slide_id"
    first = table.drop_duplicates(key).set_index(key)
    present = [b for b in bag_ids if b in first.index]
    y = np.full((len(bag_ids), len(task.columns) if task.name != "survival" else 2), np.nan)
    if present:
        enc = task.encode(first.loc[present].reset_index(), name=name, learn=False).y
        pos = {b: i for i, b in enumerate(bag_ids)}
        for row, b in zip(enc, present, strict=True):
            y[pos[b]] = row
    return y


def predict_mil(
    run: str | Path,
    store: str | Path | FeatureStore,
    labels: str | Path | pd.DataFrame | None = None,
    *,
    out: str | Path | None = None,
    slides: Sequence[str] | None = None,
    folds: Sequence[int] | None = None,
    device: str = "auto",
    n_boot: int = 1000,
    seed: int = 0,
    heatmaps: int = 0,
) -> Prediction:
    """Apply the fold ensemble of ``run`` to ``store`` (every slide, or ``slides``); see the module doc."""
    from pipelines.train import prediction_rows, resolve_device

    t0 = time.time()
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise PredictError(f"{out}: --out is a file, not a directory. Fix: pass a directory for the predictions")
    dev = resolve_device(device)
    models = load_fold_models(run, folds=folds, device=dev)
    task, level = models[0].task, models[0].level
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    ids = list(slides) if slides else fs.slide_ids()
    unknown = sorted(set(ids) - set(fs.slide_ids()))
    if unknown:
        raise StoreError(f"{fs.path}: slide(s) {unknown[:10]} are not in the store. Fix: check --slides or extract them")
    if not ids:
        raise StoreError(f"{fs.path}: the store holds no complete slides. Fix: extract the cohort first")
    dim = int(fs.read(ids[0]).features.shape[1])
    check_features(models[0].features, features_identity(fs, dim=dim), model=f"run {run}", store=str(fs.path))
    if dim != models[0].ckpt["in_dim"]:
        raise PredictError(f"{fs.path}: {dim}-d features, the run's models expect {models[0].ckpt['in_dim']}-d. "
                           "Fix: extract with the run's encoder")  # fmt: skip
    table = None
    if labels is not None:
        table = read_label_table(labels, target=task.columns, drop_empty="any" if task.name == "survival" else "all")
        if level != "patient":
            table = table[table["slide_id"].isin(ids)]
    bag_ids, patients, id_cols, bags = _bags_for(fs, ids, level, table)
    per_fold = [fold_outputs(m, bags, device=dev) for m in models]
    pred = ensemble(per_fold)
    y = _targets(task, table, bag_ids, level, str(labels)) if table is not None else None
    rows = prediction_rows(id_cols.__getitem__, task, bag_ids, pred, y=y)
    for m, p in zip(models, per_fold, strict=True):
        for j, col in enumerate(task.prediction_columns):
            for row, v in zip(rows, p[:, j], strict=True):
                row[f"{m.name}_{col}"] = float(v)
    result = Prediction(pd.DataFrame(rows), task, checkpoints=[m.name for m in models])
    if y is not None:
        result.metrics = metrics_with_ci(task, y, pred, np.asarray(patients), n_boot=n_boot, seed=seed)
    if out is not None:
        _write_outputs(result, Path(out), run=Path(run), store=fs, models=models, y=y, pred=pred,
                       heatmaps=heatmaps, bag_ids=bag_ids, seconds=time.time() - t0)  # fmt: skip
    return result


def metrics_with_ci(task: Task, y: np.ndarray, pred: np.ndarray, patients: np.ndarray, *, n_boot: int,
                     seed: int) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each metric of ``task`` with a percentile bootstrap CI over patients (bags with labels only)."""
    known = ~np.all(np.isnan(y), axis=1)
    if not known.any():
        raise LabelTableError("no slide of the label table is in the store. Fix: check the slide ids of --labels")

    def fn(y, pred):
        return task.metrics(y, pred)

    stats = bootstrap_ci(fn, {"y": y[known], "pred": pred[known]}, patients[known], n_boot=n_boot, seed=seed)
    stats["n"] = {"value": int(known.sum()), "ci95": None}
    stats["n_patients"] = {"value": len(set(patients[known].tolist())), "ci95": None}
    return stats


def _write_outputs(result: Prediction, out: Path, *, run: Path, store: FeatureStore, models: list[FoldModel],
                   y: np.ndarray | None, pred: np.ndarray, heatmaps: int, bag_ids: list[str], seconds: float) -> None:  # fmt: skip
    from pipelines.report import task_plots, write_task_report

    out.mkdir(parents=True, exist_ok=True)
    result.out = out
    result.predictions.to_csv(out / "predictions.csv", index=False)
    result.files["predictions"] = out / "predictions.csv"
    plots = task_plots(result.task, y, pred) if y is not None else {}
    for name, png in plots.items():
        (out / f"{name}.png").write_bytes(png)
        result.files[name] = out / f"{name}.png"
    if result.metrics is not None:
        doc = {"run": str(run), "store": str(store.path), "task": result.task.name, "targets": result.task.columns,
               "checkpoints": result.checkpoints, "features": models[0].features, "seconds": round(seconds, 2),
               "metrics": result.metrics}  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(json_safe(doc), indent=2))
        result.files["metrics"] = out / "metrics.json"
    maps = _heatmaps(run, store, result, pred, bag_ids, out / "heatmaps", heatmaps) if heatmaps else {}
    result.files["report"] = write_task_report(
        out / "report.html", title=f"slidepipe predict: {run.name} on {store.path.name}",
        subtitle=f"{result.task.describe()}; ensemble of {len(models)} fold model(s); {len(bag_ids)} bags",
        task=result.task, metrics=result.metrics, predictions=result.predictions, plots=plots, heatmaps=maps,
        commands=[f"slidepipe predict --run {run} --store {store.path} --out {out}"],
    )  # fmt: skip


def _score_column(task: Task, pred: np.ndarray) -> np.ndarray:
    """One number per bag to rank by: the last class's probability, the value, the risk."""
    return pred[:, -1] if task.name == "classification" else pred[:, 0]


def _heatmaps(run: Path, store: FeatureStore, result: Prediction, pred: np.ndarray, bag_ids: list[str],
              out: Path, k: int) -> dict[str, Path]:  # fmt: skip
    from pipelines.heatmap import heatmap_slide

    if "slide_id" not in result.predictions.columns:
        log.warning("heatmaps are drawn per slide; this run is patient-level, none drawn")
        return {}
    order = np.argsort(_score_column(result.task, pred), kind="stable")
    chosen = list(dict.fromkeys([bag_ids[i] for i in order[::-1][:k]] + [bag_ids[i] for i in order[:k]]))
    maps = {}
    for sid in chosen:
        src = (store.slide_attrs(sid) or {}).get("source", {}).get("path")
        if not src or not Path(src).is_file():
            log.warning("%s: slide file %s not found; no heatmap", sid, src)
            continue
        maps[sid] = heatmap_slide(run, store, src, out).png
    return maps


__all__ = ["FoldModel", "PredictError", "Prediction", "ensemble", "fold_checkpoints", "fold_outputs",
           "load_fold_models", "metrics_with_ci", "predict_mil"]  # fmt: skip
