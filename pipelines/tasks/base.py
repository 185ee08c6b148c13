"""The ``Task`` interface: everything the trainer needs to know about a study design.

A task turns label-table columns into a float target matrix ``y (n, k)`` (NaN = missing) and
split strata, says how many outputs the MIL head needs, computes the loss from the head's
outputs, turns outputs into predictions in the user's units (class probabilities, values,
risks), computes metrics and writes prediction columns. The epoch runner in
``pipelines/train.py`` knows nothing else about the task.

A task is first ``encode``-d on the whole cohort (class names, column checks), then ``fit`` on
the training part of each fold (class weights, target standardisation, survival time bins): the
fitted copy is what a fold trains and predicts with, and ``to_dict()`` of it goes into the fold's
checkpoint, so ``task_from_dict`` rebuilds exactly the task a model was trained for.

The checkpoint rule is the same for every task: the epoch with the lowest validation loss.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch


@dataclass
class Targets:
    """Encoded labels of a cohort: ``y (n, k)`` float64 (NaN = missing) and split strata ``(n,)``."""

    y: np.ndarray
    strata: np.ndarray


class Task(ABC):
    """One study design. Subclasses register with ``pipelines.tasks.register_task``."""

    name: ClassVar[str]
    #: metric logged on the validation part every epoch (``val_<monitor>`` in log.csv)
    monitor: ClassVar[str]
    #: losses this task offers, the first is the default
    losses: ClassVar[tuple[str, ...]]
    #: a loss that is a sum over bags (divided by a denominator that depends on labels only) can be
    #: accumulated over several passes of a batch; the Cox partial likelihood cannot
    decomposable: ClassVar[bool] = True
    #: bags per optimizer step when the job does not say (``TrainJob.batch_size``)
    default_batch_size: ClassVar[int] = 1

    def __init__(self, columns: Sequence[str], *, loss: str | None = None, balance: str = "none",
                 **options: Any) -> None:  # fmt: skip
        self.columns = list(columns)
        self.loss_name = loss or self.losses[0]
        if self.loss_name not in self.losses:
            raise ValueError(f"task {self.name!r} has no loss {self.loss_name!r}; choose one of {list(self.losses)}")
        self.balance = balance
        self.options = dict(options)
        self.state: dict[str, Any] = {}

    # ------------------------------------------------------------------ labels
    @abstractmethod
    def encode(self, table: pd.DataFrame, *, name: str = "label table", learn: bool = True) -> Targets:
        """Targets of every row of ``table``; with ``learn`` the task learns class names etc. from
        the whole cohort, without it (applying a trained model) it codes labels as it was trained."""

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Outputs the MIL head needs."""

    def fit(self, y_train: np.ndarray) -> Task:
        """A copy with statistics of the training part of a fold (default: none)."""
        return copy.deepcopy(self)

    def sample_weights(self, y_train: np.ndarray) -> np.ndarray:
        """Weights of a balanced sampler (``balance: sampler``); uniform unless a task balances."""
        return np.ones(len(y_train))

    def decode(self, y: np.ndarray) -> dict[str, list[Any]]:
        """Label-table columns from targets (for the run's ``labels.csv``)."""
        return {c: y[:, j].tolist() for j, c in enumerate(self.columns)}

    # ------------------------------------------------------------------ loss
    def loss_sums(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-target sums of the loss over the bags of ``out`` ``(T,)`` (decomposable tasks)."""
        raise NotImplementedError

    def loss_den(self, y: torch.Tensor) -> torch.Tensor:
        """Per-target denominators ``(T,)`` of the mean loss of the bags with labels ``y``."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (the sum over targets of each target's mean)."""
        return (self.loss_sums(out, y) / self.loss_den(y).clamp_min(1e-12)).sum()

    def head_labels(self, y: torch.Tensor) -> torch.Tensor | None:
        """Class indices for heads that use labels in training (CLAM's instance loss), or None."""
        return None

    # ------------------------------------------------------------------ predictions
    @abstractmethod
    def predict(self, out: torch.Tensor) -> np.ndarray:
        """Predictions ``(n, m)`` in the user's units (probabilities, values, risks)."""

    @property
    @abstractmethod
    def prediction_columns(self) -> list[str]:
        """Names of the ``m`` prediction columns (averaged over folds by ``predict``)."""

    @abstractmethod
    def label_columns(self, y: np.ndarray) -> dict[str, list[Any]]:
        """The truth as prediction-table columns (label names, values, time and event)."""

    def derived_columns(self, pred: np.ndarray) -> dict[str, list[Any]]:
        """Columns computed from (possibly averaged) predictions, e.g. the predicted class."""
        return {}

    @property
    @abstractmethod
    def metric_names(self) -> list[str]:
        """Keys of ``metrics``, in report order."""

    @abstractmethod
    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        """Metrics of predictions ``pred`` against targets ``y`` (NaN where undefined)."""

    def val_monitor(self, y: np.ndarray, pred: np.ndarray) -> float:
        """The value logged as ``val_<monitor>`` every epoch."""
        return float(self.metrics(y, pred).get(self.monitor, float("nan")))

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Json-able description (fold statistics included) for checkpoints and run configs."""
        return {"name": self.name, "columns": self.columns, "loss": self.loss_name, "balance": self.balance,
                "options": self.options, "state": _plain(self.state)}  # fmt: skip

    def describe(self) -> str:
        return f"{self.name} of {', '.join(self.columns)} ({self.loss_name} loss)"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def quantile_strata(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins of ``values`` as integer strata (NaN joins bin 0)."""
    out = np.zeros(len(values), dtype=np.int64)
    ok = ~np.isnan(values)
    if ok.sum() and n_bins > 1:
        edges = np.unique(np.quantile(values[ok], np.linspace(0, 1, n_bins + 1)[1:-1]))
        out[ok] = np.searchsorted(edges, values[ok], side="right")
    return out
