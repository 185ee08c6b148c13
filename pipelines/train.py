"""Cross-validated MIL training on a feature store for every study design: ``train_mil(store, labels,
...) -> Results``.

The study design is a ``Task`` (``pipelines/tasks``): classification of one or several label
columns, regression of numeric columns, or survival (time and event). The task supplies targets,
loss, predictions and metrics; the epoch runner here knows nothing else about it. Bags are
slides, or with ``level: patient`` all slides of a patient pooled into one bag.

Bags are loaded from the store once, kept in memory as float16 and batched with padding and
masks (``pipelines/batching.py``: length-bucketed; on GPU prepared ahead by a background thread,
on CPU just in time in one reused buffer). A batch above the token budget (``max_batch_tokens``)
runs as several forward/backward passes whose gradients add up to the whole batch's, with one
optimizer step per batch (a loss that does not split over bags, Cox's, runs every pass of a
batch before one backward). Features are standardised with statistics of the training part of
each fold only, and so are regression targets. AdamW with a cosine schedule and early stopping
on a validation part split off each training fold; the reported checkpoint is fixed by
``CHECKPOINT_RULE``. On CPU a run is repeatable bit-for-bit for a given seed; on CUDA it uses
mixed precision.

Run directory: ``config.yaml`` (resolved), ``labels.csv`` (the cohort used), ``splits.json`` /
``splits.csv``, ``<fold>.pt`` checkpoints (with the task and the identity of the features),
``log.csv`` (one row per epoch and fold), ``predictions.csv``, ``metrics.json`` (``folds`` and
``summary``) and a short ``README.md``; with ``tensorboard: true`` also ``tensorboard/<fold>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.mil import create_mil
from models.mil.checkpoint import load_checkpoint, save_checkpoint
from pipelines.batching import (
    CPU_PASS_BYTES,
    PassBuffer,
    Prefetch,
    as_tensors,
    batch_token_budget,
    collate,
    length_batches,
    standardization_stats,
    token_chunks,
)
from pipelines.cohort import Cohort, build_cohort, pool_patients
from pipelines.config import TrainJob, save_resolved_config
from pipelines.features import features_identity
from pipelines.labels import LabelTableError, UnknownSlidesError, read_label_table
from pipelines.metrics import json_safe, summarize
from pipelines.splits import Fold, SplitError, Splits, make_splits
from pipelines.tasks import Task, create_task
from wsi.store import FeatureStore

log = logging.getLogger(__name__)

CHECKPOINT_RULE = (
    "best validation: the epoch with the lowest validation loss of the task (cross-entropy, class-weighted "
    "when balance=loss; MSE or Huber of standardised targets; Cox partial likelihood or discrete-time NLL) on "
    "the validation part split off each training fold (earliest epoch on ties); the test fold and the held-out "
    "set are never used for training, early stopping or checkpoint selection"
)
Progress = Callable[[dict[str, Any]], None]
FoldRunner = Callable[[Callable[..., "FoldResult"], list[dict[str, Any]]], Sequence["FoldResult"]]


class TensorBoardUnavailableError(ImportError):
    """``tensorboard`` logging was asked for but the package is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "TensorBoard logging (tensorboard: true / --tensorboard) needs the 'tensorboard' package, "
            'which is not installed. Fix: pip install "slidepipe[tensorboard]" (or turn the option off)'
        )


# --------------------------------------------------------------------------- one fold
@dataclass
class FoldResult:
    """What one fold produced (picklable: safe to return from a Dask task)."""

    repeat: int
    fold: int
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    log: list[dict[str, Any]]
    checkpoint: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    bags: Sequence[torch.Tensor],
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Head outputs ``(n, C)`` (logits) for ``bags`` in their given order (model in eval mode).

    ``max_tokens`` bounds the padded instances per forward pass (see ``token_chunks``).
    """
    model.eval()
    device = torch.device(device)
    out = [None] * len(bags)
    for batch in length_batches([len(b) for b in bags], batch_size):
        for pos in token_chunks([len(bags[i]) for i in batch], max_tokens):
            idx = [batch[p] for p in pos]
            x, mask = collate([bags[i] for i in idx], mean, std)
            with _autocast(device):
                logits = model(x.to(device), mask.to(device)).logits.float().cpu()
            for j, i in enumerate(idx):
                out[i] = logits[j]
    return torch.stack(out) if out else torch.zeros(0)


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _fold_seed(seed: int, repeat: int, fold: int) -> int:
    return (seed * 1_000_003 + repeat * 1009 + fold) % (2**63)


def train_fold(
    source: str | Path | Mapping[str, np.ndarray] | Mapping[str, torch.Tensor],
    split: Fold,
    cohort: Cohort,
    job: TrainJob,
    run_dir: str | Path,
    *,
    heldout: Sequence[str] = (),
    progress: Progress | None = None,
    features: dict[str, Any] | None = None,
) -> FoldResult:
    """Train, select and evaluate one fold; write its checkpoint and epoch log.

    ``source`` is a store path (only this fold's bags are loaded; pooled per patient when the
    cohort is patient-level) or an in-memory mapping of bags. ``features`` (the store's feature
    identity) goes into the checkpoint. A plain picklable function: folds can run as Dask tasks.
    """
    run_dir = Path(run_dir)
    bags = _fold_bags(source, cohort, [*split.train, *split.val, *split.test, *heldout])
    device = resolve_device(job.device)
    seed = _fold_seed(job.seed, split.repeat, split.fold)
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    if job.torch_threads is not None:
        torch.set_num_threads(job.torch_threads)
    writer = _tensorboard_writer(run_dir / "tensorboard" / split.name) if job.tensorboard else None
    try:
        trainer = _FoldTrainer(bags, split, cohort, job, device, seed, features)
        return trainer.run(run_dir, heldout, progress, writer)
    finally:
        if writer is not None:
            writer.close()
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _fold_bags(source, cohort: Cohort, needed: Sequence[str]) -> dict[str, torch.Tensor]:
    """The fold's bags as float16 tensors, from a store path or a mapping."""
    if isinstance(source, (str, Path)):
        slides = [s for bag in needed for s in cohort.members.get(bag, [bag])]
        loaded = as_tensors(FeatureStore(source, mode="r").load_bags(slides))
        if cohort.level == "patient":
            return {b: torch.cat([loaded[s] for s in cohort.members[b]]) for b in needed}
        return {b: loaded[b] for b in needed}
    wanted = set(needed)
    return {k: v if isinstance(v, torch.Tensor) else as_tensors({k: v})[k] for k, v in source.items() if k in wanted}


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or ``TensorBoardUnavailableError``."""
    try:
        import tensorboard  # noqa: F401  (torch's module imports it lazily and may be cached)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TensorBoardUnavailableError() from err
    return SummaryWriter


def _tensorboard_writer(log_dir: Path):
    return _summary_writer_class()(log_dir=str(log_dir))


def _log_scalars(writer, row: dict[str, Any], monitor: str) -> None:
    """One epoch's scalars (step = epoch); a missing or undefined value (e.g. AUC) is skipped."""
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), (f"val/{monitor}", f"val_{monitor}"),
                     ("train/lr", "lr")):  # fmt: skip
        value = row.get(key)
        if value is not None and np.isfinite(value):
            writer.add_scalar(tag, float(value), row["epoch"])
    writer.flush()


class _FoldTrainer:
    """One fold: the task fitted on its training part, the model, optimiser and batches.

    The epoch loop talks to the task only through its interface (loss, denominators, predictions,
    the monitored validation metric), so every study design trains the same way.
    """

    def __init__(self, bags, split: Fold, cohort: Cohort, job: TrainJob, device: torch.device, seed: int,
                 features: dict[str, Any] | None) -> None:  # fmt: skip
        torch.manual_seed(seed)
        self.g_batches = torch.Generator().manual_seed(seed + 1)
        self.g_sub = torch.Generator().manual_seed(seed + 2)
        self.bags, self.split, self.cohort, self.job, self.device = bags, split, cohort, job, device
        self.features = features
        labels = cohort.labels
        self.train_bags = [bags[s] for s in split.train]
        train_y = np.stack([labels[s] for s in split.train])
        self.task: Task = cohort.task.fit(train_y)
        self.ytrain = torch.as_tensor(train_y, dtype=torch.float32)
        self.sample_p = torch.as_tensor(self.task.sample_weights(train_y), dtype=torch.float32)
        self.in_dim = int(self.train_bags[0].shape[1])
        self.mean, self.std = standardization_stats(self.train_bags) if job.standardize else (None, None)
        self.model = create_mil(job.model, self.in_dim, self.task.n_outputs, **job.model_kwargs).to(device)
        self.batch_size = job.batch_size or self.task.default_batch_size
        steps = max(1, -(-len(self.train_bags) // self.batch_size))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=job.epochs * steps,
                                                                eta_min=job.lr * 0.01)  # fmt: skip
        self.scaler = None
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.scaler = torch.amp.GradScaler("cuda")
        self.val_bags = [bags[s] for s in split.val]
        self.val_y = np.stack([labels[s] for s in split.val])
        self.lengths = [len(b) for b in self.train_bags]
        self.budget = batch_token_budget(job, device=device, in_dim=self.in_dim)
        # On CPU, each pass is made just before it runs, on this thread (~0.4 ms per 4,000 x 768 bag),
        # into one reused buffer. A thread making batches ahead would run torch ops in a second OpenMP
        # team, and with more OpenMP threads than cores the compute team's barriers slow down: TransMIL
        # epochs took 15-25 % longer with such a thread alive, even while it was idle. A loss that needs
        # every pass of a batch before its backward (Cox) keeps each pass's input: a buffer per pass then.
        self.inline = device.type == "cpu"
        self.buffers: list[PassBuffer] = []

    # ------------------------------------------------------------------ batches
    def epoch_batches(self) -> Iterator[Any]:
        job, cap = self.job, self.job.max_instances
        n = len(self.train_bags)
        if job.balance == "sampler":
            draw = torch.multinomial(self.sample_p, n, replacement=True, generator=self.g_batches).tolist()
        else:
            draw = list(range(n))
        batches = [[draw[i] for i in b] for b in length_batches([self.lengths[i] for i in draw], self.batch_size,
                                                                 generator=self.g_batches)]  # fmt: skip

        def make(k: int):
            """Batch ``k``: its passes (each ``(x, mask)``, or on CPU a function making them when
            the pass runs) with their positions in the batch, and the batch's targets."""
            idx = batches[k]
            passes = []
            sizes = [self.lengths[i] if cap is None else min(self.lengths[i], cap) for i in idx]
            for j, pos in enumerate(token_chunks(sizes, self.budget)):
                group = [self.train_bags[idx[p]] for p in pos]

                def prepare(group=group, j=j):
                    return collate(group, self.mean, self.std, max_instances=cap, generator=self.g_sub,
                                   out=self._buffer(j))  # fmt: skip

                passes.append((prepare if self.inline else prepare(), torch.tensor(pos)))
            return passes, self.ytrain[idx]

        return (make(k) for k in range(len(batches))) if self.inline else Prefetch(make, len(batches))

    def _buffer(self, j: int) -> PassBuffer | None:
        """The reused memory of pass ``j`` of a batch (CPU): one buffer when each pass's graph is
        freed before the next is made; one per pass when a loss needs them all (Cox)."""
        if not self.inline:
            return None
        j = j if not self.task.decomposable else 0
        while len(self.buffers) <= j:
            self.buffers.append(PassBuffer())
        return self.buffers[j]

    # ------------------------------------------------------------------ one epoch
    def _forward(self, data, y: torch.Tensor):
        wait = 0.0
        if callable(data):  # made now, into the buffer the previous pass is done with
            tw = time.perf_counter()
            data = data()
            wait = time.perf_counter() - tw
        x, mask = data[0].to(self.device, non_blocking=True), data[1].to(self.device)
        with _autocast(self.device):
            out = self.model(x, mask, labels=self.task.head_labels(y))
        return out, wait

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _step_passes(self, passes, y: torch.Tensor) -> tuple[float, float]:
        """Decomposable loss: each pass adds its share of the batch's mean loss (its sums over the
        batch's denominators; aux loss by its share of bags), so the accumulated gradient is the
        whole batch's."""
        den = self.task.loss_den(y).clamp_min(1e-12)
        batch_loss, wait = 0.0, 0.0
        for data, pos in passes:
            yp = y if len(passes) == 1 else y[pos.to(self.device)]
            out, w = self._forward(data, yp)
            wait += w
            loss = (self.task.loss_sums(out.logits, yp) / den).sum()
            if out.aux_loss is not None:
                loss = loss + out.aux_loss.float() * (len(yp) / len(y))
            self._backward(loss)
            batch_loss += float(loss.detach())
            del out, loss, data  # free this pass's graph (and buffer view) before the next one is built
        return batch_loss, wait

    def _step_joint(self, passes, y: torch.Tensor) -> tuple[float, float]:
        """A loss over the whole batch (Cox): every pass forward, then one backward."""
        outs, order, aux, wait = [], [], [], 0.0
        for data, pos in passes:
            yp = y[pos.to(self.device)]
            out, w = self._forward(data, yp)
            wait += w
            outs.append(out.logits.float())
            order.append(pos)
            if out.aux_loss is not None:
                aux.append(out.aux_loss.float() * (len(yp) / len(y)))
        loss = self.task.loss(torch.cat(outs), y[torch.cat(order).to(self.device)])
        if aux:
            loss = loss + torch.stack(aux).sum()
        self._backward(loss)
        return float(loss.detach()), wait

    def train_epoch(self, it) -> tuple[float, float]:
        """One pass over the training part: mean training loss and seconds spent waiting for data."""
        self.model.train()
        step = self._step_passes if self.task.decomposable else self._step_joint
        total, n_seen, wait = 0.0, 0, 0.0
        while True:
            tw = time.perf_counter()
            try:
                passes, y = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - tw
            y = y.to(self.device)
            self.opt.zero_grad(set_to_none=True)
            batch_loss, w = step(passes, y)
            wait += w
            if self.scaler is not None:
                self.scaler.step(self.opt)
                self.scaler.update()
            else:
                self.opt.step()
            self.sched.step()
            total += batch_loss * len(y)
            n_seen += len(y)
        return total / max(n_seen, 1), wait

    def outputs(self, ids: Sequence[str]) -> torch.Tensor:
        return predict(self.model, [self.bags[s] for s in ids], self.mean, self.std, batch_size=max(16, self.batch_size),
                       device=self.device, max_tokens=self.budget)  # fmt: skip

    def validate(self) -> tuple[float, float]:
        out = self.outputs(self.split.val)
        loss = float(self.task.loss(out, torch.as_tensor(self.val_y, dtype=torch.float32)))
        return loss, self.task.val_monitor(self.val_y, self.task.predict(out))

    # ------------------------------------------------------------------ the fold
    def run(self, run_dir: Path, heldout: Sequence[str], progress: Progress | None, writer) -> FoldResult:
        split, job, monitor = self.split, self.job, self.task.monitor
        if progress:
            progress({"kind": "fold_start", "repeat": split.repeat, "fold": split.fold, "epochs": job.epochs})
        best_loss, best_epoch, best_state, stale = float("inf"), -1, {}, 0
        rows: list[dict[str, Any]] = []
        it = self.epoch_batches()
        for epoch in range(job.epochs):
            t0 = time.perf_counter()
            train_loss, wait = self.train_epoch(it)
            train_seconds = time.perf_counter() - t0
            it = self.epoch_batches() if epoch + 1 < job.epochs else None  # prepared during validation
            val_loss, val_monitor = self.validate()
            improved = val_loss < best_loss
            if improved:
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            row = {
                "repeat": split.repeat, "fold": split.fold, "epoch": epoch, "lr": self.opt.param_groups[0]["lr"],
                "train_loss": train_loss, "val_loss": val_loss, f"val_{monitor}": val_monitor,
                "best": improved, "train_seconds": train_seconds, "data_wait_seconds": wait,
            }  # fmt: skip
            rows.append(row)
            if writer is not None:
                _log_scalars(writer, row, monitor)
            if progress:
                progress({"kind": "epoch", **row, "epochs": job.epochs})
            if stale >= job.patience:
                break
        if it is not None:
            it.close()
        if not best_state:  # validation loss never finite: keep the last weights, say so
            log.warning("%s: validation loss was never finite; keeping the last epoch", split.name)
            best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            best_loss, best_epoch = float("nan"), len(rows) - 1
        self.model.load_state_dict(best_state)
        ckpt = self.save(run_dir / f"{split.name}.pt", best_state, best_epoch, best_loss)
        metrics: dict[str, Any] = {
            "repeat": split.repeat, "fold": split.fold, "best_epoch": best_epoch, "epochs_run": len(rows),
            "val_loss": best_loss, "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
        }  # fmt: skip
        predictions = self.evaluate(heldout, metrics)
        if progress:
            progress({"kind": "fold_end", "repeat": split.repeat, "fold": split.fold, **metrics})
        return FoldResult(split.repeat, split.fold, metrics, predictions, rows, str(ckpt))

    def save(self, path: Path, state: dict[str, torch.Tensor], best_epoch: int, val_loss: float) -> Path:
        job, task = self.job, self.task
        return save_checkpoint(path, {
            "model": job.model, "model_kwargs": dict(job.model_kwargs), "in_dim": self.in_dim,
            "n_outputs": task.n_outputs, "task": task.to_dict(), "features": self.features,
            "level": self.cohort.level, "classes": self.cohort.classes, "target": job.target,
            "mean": self.mean, "std": self.std, "state_dict": {k: v.cpu() for k, v in state.items()},
            "best_epoch": best_epoch, "val_loss": val_loss, "repeat": self.split.repeat, "fold": self.split.fold,
            "checkpoint_rule": CHECKPOINT_RULE,
        })  # fmt: skip

    def evaluate(self, heldout: Sequence[str], metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """Predictions and metrics of the test fold and the held-out set (``heldout_`` metrics)."""
        labels, rows = self.cohort.labels, []
        extra = {"fold": self.split.fold, "repeat": self.split.repeat}
        for part, ids in (("test", self.split.test), ("heldout", list(heldout))):
            if not ids:
                continue
            pred = self.task.predict(self.outputs(ids))
            y = np.stack([labels[s] for s in ids])
            prefix = "" if part == "test" else "heldout_"
            metrics.update({prefix + k: v for k, v in self.task.metrics(y, pred).items()})
            rows += prediction_rows(self.cohort.id_columns, self.task, ids, pred, y=y, extra=extra, part=part)
        return rows


def prediction_rows(
    id_columns: Callable[[str], dict[str, Any]],
    task: Task,
    ids: Sequence[str],
    pred: np.ndarray,
    *,
    y: np.ndarray | None = None,
    extra: Mapping[str, Any] | None = None,
    part: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of a predictions table: id columns, ``extra``, the truth (when known), the task's
    prediction columns, columns derived from them (predicted class) and ``part``."""
    truth = task.label_columns(y) if y is not None else {}
    derived = task.derived_columns(pred)
    rows = []
    for i, bag in enumerate(ids):
        row = {**id_columns(bag), **(extra or {})}
        row.update({k: v[i] for k, v in truth.items()})
        row.update({c: float(pred[i, j]) for j, c in enumerate(task.prediction_columns)})
        row.update({k: v[i] for k, v in derived.items()})
        if part is not None:
            row["part"] = part
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- the run
@dataclass
class Results:
    """A finished run: per-fold metrics, their summary, predictions and where it all is."""

    run_dir: Path
    classes: list[str]
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float | None]]
    predictions: pd.DataFrame
    splits: Splits
    config: TrainJob
    checkpoints: list[Path] = field(default_factory=list)
    task: str = "classification"

    def table(self):
        """A rich table of the summary (mean ± sd over folds)."""
        from rich.table import Table

        t = Table(title=f"{self.config.model} on {self.config.target_name} ({self.task}): {len(self.folds)} folds")
        t.add_column("metric")
        t.add_column("mean ± sd", justify="right")
        for k, v in self.summary.items():
            cell = "n/a" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"
            t.add_row(k, cell)
        return t


def _job_from(job: TrainJob | None, values: dict[str, Any]) -> TrainJob:
    data = job.model_dump() if job is not None else {}
    data.update({k: v for k, v in values.items() if v is not None})
    return TrainJob.model_validate(data)


def load_cohort(fs: FeatureStore, labels: str | Path | pd.DataFrame, job: TrainJob) -> tuple[Cohort, dict[str, torch.Tensor]]:
    """The job's cohort and its bags in memory (slides without patches left out; pooled per patient
    with ``level: patient``)."""
    t0 = time.time()
    name = str(labels) if not isinstance(labels, pd.DataFrame) else "label table"
    table = read_label_table(labels, target=job.targets, drop_empty="any" if job.task == "survival" else "all")
    cohort = build_cohort(table, fs.slide_ids(), task=create_task(job), allow_missing=job.allow_missing,
                          table_name=name, store_name=f"store {fs.path}")  # fmt: skip
    log.info("loading %d bags from %s", len(cohort.slide_ids), fs.path)
    bags = as_tensors(fs.load_bags(cohort.slide_ids))
    empty = [s for s in cohort.slide_ids if len(bags[s]) == 0]
    if empty:
        log.warning("%d slide(s) have no patches and are left out: %s", len(empty), ", ".join(empty[:10]))
        cohort = cohort.subset([i for i, s in enumerate(cohort.slide_ids) if len(bags[s])])
    if job.level == "patient":
        cohort, bags = pool_patients(cohort, bags)
    log.info("loaded %d bags in %.1f s", len(bags), time.time() - t0)
    return cohort, bags


def _splits_for(job: TrainJob, cohort: Cohort) -> Splits:
    if job.splits is None:
        return make_splits(cohort.slide_ids, cohort.strata, cohort.patients, folds=job.folds, repeats=job.repeats,
                           test_frac=job.test_frac, val_frac=job.val_frac, seed=job.seed)  # fmt: skip
    splits = Splits.load(job.splits)
    unknown = sorted(splits.slide_ids() - set(cohort.slide_ids))
    if unknown:
        raise UnknownSlidesError(
            f"{job.splits}: {len(unknown)} bag(s) of the splits file are not in this cohort: "
            f"{', '.join(unknown[:20])}. Fix: train on the same store, labels and level, or drop --splits",
            unknown,
        )
    unused = sorted(set(cohort.slide_ids) - splits.slide_ids())
    if unused:
        log.warning("%d labelled bag(s) are not in the splits file and are not used: %s",
                    len(unused), ", ".join(unused[:10]))  # fmt: skip
    splits.check(cohort.patient_of)
    return splits


def train_mil(
    store: str | Path | FeatureStore,
    labels: str | Path | pd.DataFrame,
    *,
    model: str | None = None,
    target: str | list[str] | None = None,
    task: str | None = None,
    folds: int | None = None,
    repeats: int | None = None,
    out: str | Path | None = None,
    job: TrainJob | None = None,
    progress: Progress | None = None,
    fold_runner: FoldRunner | None = None,
    **options: Any,
) -> Results:
    """Cross-validated training of MIL head ``model`` on ``store`` with labels from ``labels``.

    ``task`` is ``classification`` (default; ``target`` one column or a list trained jointly),
    ``regression`` (numeric ``target`` columns) or ``survival`` (``time`` and ``event`` columns,
    ``loss="cox"`` or ``"discrete"``); ``level="patient"`` pools each patient's slides into one bag.
    ``job`` supplies defaults (e.g. from ``configs/train/*.yaml``); keyword arguments override it,
    ``options`` are any other ``TrainJob`` fields (``epochs``, ``lr``, ``seed``, ``splits`` ...).
    ``fold_runner(train_fold, calls)`` runs the folds elsewhere (e.g. as Dask tasks): ``calls``
    is a list of keyword dicts for ``train_fold`` whose ``source`` is the store path, so each
    worker loads only its fold's bags; it returns the ``FoldResult`` list.
    """
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    job = _job_from(
        job,
        {"store": fs.path, "labels": None if isinstance(labels, pd.DataFrame) else Path(labels),
         "model": model, "target": target, "task": task, "folds": folds, "repeats": repeats,
         "out": Path(out) if out is not None else None, **options},
    )  # fmt: skip
    create_task(job)  # fail fast on a bad loss
    create_mil(job.model, 4, 2, **job.model_kwargs)  # fail fast on a bad model name or option
    if job.tensorboard:
        _summary_writer_class()  # fail fast without the package
    final = Path(job.out)
    t0 = time.time()
    cohort, bags = load_cohort(fs, labels, job)  # label-table errors first: they say more
    check_run_dir(final, overwrite=job.overwrite)
    with _staged_run(final, overwrite=job.overwrite) as run_dir:
        results = _train_cohort(fs, cohort, bags, job, run_dir, progress, fold_runner, t0)
    results.run_dir = final
    results.checkpoints = [final / p.name for p in results.checkpoints]
    return results


class RunDirectoryError(ValueError):
    """``--out`` cannot take this run; the message names the path, the reason and the fix."""


def check_run_dir(path: Path, *, overwrite: bool) -> None:
    """A run directory is owned: refuse a file, or a non-empty directory unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"{path}: --out is a file, not a directory. Fix: pass a new directory for the run")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        what = "holds another run" if (path / "metrics.json").exists() else "is not empty"
        raise RunDirectoryError(
            f"{path}: the run directory {what}; its checkpoints would be mixed with this run's. "
            "Fix: pass a new --out, or --overwrite to replace it (done only once the new run is complete)"
        )


@contextlib.contextmanager
def _staged_run(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Write the run into a hidden sibling directory and rename it into place when complete; a
    failed or interrupted run leaves nothing under ``final`` (an older run there stays intact)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    check_run_dir(final, overwrite=overwrite)  # another process may have written there meanwhile
    old = final.parent / f".{final.name}.replaced-{os.getpid()}"
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _train_cohort(fs: FeatureStore, cohort: Cohort, bags: dict[str, torch.Tensor], job: TrainJob, run_dir: Path,
                  progress: Progress | None, fold_runner: FoldRunner | None, t0: float) -> Results:  # fmt: skip
    features = features_identity(fs, dim=int(next(iter(bags.values())).shape[1]) if bags else None)
    job = job.model_copy(update={"features": features})
    splits = _splits_for(job, cohort)
    splits.save(run_dir, cohort.patient_of)
    save_resolved_config(job, run_dir)
    cohort.table().to_csv(run_dir / "labels.csv", index=False)
    if fold_runner is None and job.cluster is not None:
        fold_runner = _cluster_runner(job, progress)
    if fold_runner is not None:
        calls = [dict(source=str(fs.path), split=f, cohort=cohort, job=job, run_dir=str(run_dir),
                      heldout=list(splits.heldout), features=features) for f in splits.folds]  # fmt: skip
        results = list(fold_runner(train_fold, calls))
    else:
        results = [
            train_fold(bags, f, cohort, job, run_dir, heldout=splits.heldout, progress=progress, features=features)
            for f in splits.folds
        ]
    return write_results(results, cohort, splits, job, run_dir, seconds=time.time() - t0)


def _cluster_runner(job: TrainJob, progress: Progress | None) -> FoldRunner:
    """Folds as parallel Dask tasks on ``job.cluster`` (local, SLURM/PBS or an address)."""
    from pipelines.cluster import gpu_resources, run_calls

    def on_result(_: int, res: FoldResult) -> None:
        if progress:
            progress({"kind": "fold_end", "repeat": res.repeat, "fold": res.fold, **res.metrics})

    def runner(fn, calls):
        return run_calls(fn, [((), c) for c in calls], job.cluster, names=[c["split"].name for c in calls],
                         resources=gpu_resources(job.cluster), on_result=on_result)  # fmt: skip

    return runner


def write_results(
    results: Sequence[FoldResult], cohort: Cohort, splits: Splits, job: TrainJob, run_dir: Path, *, seconds: float
) -> Results:
    """Gather fold results into ``metrics.json``, ``predictions.csv``, ``log.csv``, ``README.md``."""
    results = sorted(results, key=lambda r: (r.repeat, r.fold))
    task = cohort.task
    fold_metrics = [r.metrics for r in results]
    keys = list(task.metric_names) + [f"heldout_{m}" for m in task.metric_names if splits.heldout]
    summary = summarize(fold_metrics, keys)
    predictions = pd.DataFrame([p for r in results for p in r.predictions])
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    if job.log_csv:
        pd.DataFrame([row for r in results for row in r.log]).to_csv(run_dir / "log.csv", index=False)
    metrics = {
        "model": job.model, "model_kwargs": job.model_kwargs, "task": task.name, "loss": task.loss_name,
        "target": job.target, "targets": task.columns, "level": cohort.level, "classes": cohort.classes,
        "n_bags": len(cohort.slide_ids), "n_slides": sum(len(cohort.members.get(s, [s])) for s in cohort.slide_ids),
        "n_patients": len(set(cohort.patients)), "n_heldout": len(splits.heldout), "features": job.features,
        "checkpoint_rule": CHECKPOINT_RULE, "seconds": round(seconds, 2),
        "folds": fold_metrics, "summary": summary,
    }  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    what = f"classes {cohort.classes}" if cohort.classes else task.describe()
    lines = [f"# slidepipe train: {job.model}, {task.name} of `{job.target_name}`", "",
             f"{len(cohort.slide_ids)} {cohort.level}s, {len(set(cohort.patients))} patients, {what}; "
             f"{job.folds} folds x {job.repeats} repeat(s), seed {job.seed}.", "",
             f"Checkpoint rule: {CHECKPOINT_RULE}.", "", "| metric | mean ± sd |", "|---|---|"]  # fmt: skip
    for k, v in summary.items():
        cell = "n/a" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"
        lines.append(f"| {k} | {cell} |")
    lines += ["", "Files: config.yaml, labels.csv, splits.json/.csv, <fold>.pt, log.csv, predictions.csv, metrics.json"
              + (", tensorboard/<fold>/ (tensorboard --logdir tensorboard)." if job.tensorboard else ".")]
    (run_dir / "README.md").write_text("\n".join(lines) + "\n")
    if job.report:
        write_train_report(cohort, job, run_dir, predictions, fold_metrics, summary)
    return Results(run_dir, cohort.classes, fold_metrics, summary, predictions, splits, job,
                   [Path(r.checkpoint) for r in results], task.name)  # fmt: skip


def out_of_fold(cohort: Cohort, predictions: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Pooled out-of-fold predictions of the first repeat: bag ids, targets, predictions, folds."""
    task = cohort.task
    rows = predictions[(predictions["part"] == "test") & (predictions["repeat"] == 0)]
    key = "patient_id" if cohort.level == "patient" else "slide_id"
    ids = rows[key].astype(str).tolist()
    labels = cohort.labels
    y = np.stack([labels[s] for s in ids]) if ids else np.zeros((0, 1))
    return ids, y, rows[task.prediction_columns].to_numpy(np.float64), rows["fold"].to_numpy()


def write_train_report(cohort: Cohort, job: TrainJob, run_dir: Path, predictions: pd.DataFrame,
                       fold_metrics: list[dict[str, Any]], summary: dict[str, Any]) -> Path:  # fmt: skip
    """``report.html`` of a run: pooled out-of-fold metrics with bootstrap CIs over patients, mean ±
    sd over folds, the per-fold table and the task's plots (``pooled_metrics.json`` too)."""
    from pipelines.predict import metrics_with_ci
    from pipelines.report import task_plots, write_task_report

    task = cohort.task
    ids, y, pred, fold = out_of_fold(cohort, predictions)
    pooled = None
    if ids:
        patients = np.asarray([cohort.patient_of[s] for s in ids])
        pooled = metrics_with_ci(task, y, pred, patients, n_boot=job.n_boot, seed=job.seed)
        (run_dir / "pooled_metrics.json").write_text(json.dumps(json_safe(pooled), indent=2))
    plots = task_plots(task, y, pred, fold) if ids else {}
    folds = pd.DataFrame(fold_metrics)
    return write_task_report(
        run_dir / "report.html", title=f"slidepipe train: {job.model}, {task.name} of {job.target_name}",
        subtitle=f"{len(cohort.slide_ids)} {cohort.level}s, {len(set(cohort.patients))} patients; {job.folds} folds x "
        f"{job.repeats} repeat(s); metrics on the pooled out-of-fold predictions of repeat 0",
        task=task, metrics=pooled, predictions=predictions, plots=plots, fold_metrics=folds, summary=summary,
        notes=[f"Checkpoint rule: {CHECKPOINT_RULE}."],
        commands=[f"slidepipe predict --run {job.out} --store OTHER_COHORT.zarr --labels LABELS.csv --out predictions"],
    )  # fmt: skip


__all__ = [
    "CHECKPOINT_RULE", "Cohort", "FoldResult", "LabelTableError", "Results", "SplitError",
    "CPU_PASS_BYTES", "TensorBoardUnavailableError", "UnknownSlidesError", "as_tensors", "batch_token_budget",
    "build_cohort", "collate", "length_batches", "load_checkpoint", "load_cohort", "PassBuffer", "predict",
    "prediction_rows", "Prefetch", "read_label_table", "standardization_stats", "token_chunks", "train_fold",
    "train_mil",
]  # fmt: skip
