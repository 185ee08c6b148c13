"""Classification of one or several label columns (binary or multi-class each).

Several columns (``--target a --target b``) are trained jointly: the head has one group of
outputs per target (its classes' logits), each target's cross-entropy is averaged over the bags
that have a value for it (a missing value is masked out of that target's loss only), and the
loss is the sum over targets. With one target everything is as it always was: columns
``label``, ``prob_<class>``, ``pred`` and metrics ``auc``, ``accuracy``, ``balanced_accuracy``,
``f1``; with several, each is prefixed by its target (``grade.auc``, ``grade_prob_g1``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pipelines.labels import LabelTableError
from pipelines.metrics import METRICS, classification_metrics
from pipelines.tasks.base import Targets, Task


class ClassificationTask(Task):
    name = "classification"
    monitor = "auc"
    losses = ("cross_entropy",)

    @property
    def classes(self) -> list[list[str]]:
        """Class names per target (sorted values of the label table, as text)."""
        return self.state["classes"]

    @property
    def multi(self) -> bool:
        return len(self.columns) > 1

    def _prefix(self, j: int, sep: str = ".") -> str:
        return f"{self.columns[j]}{sep}" if self.multi else ""

    def encode(self, table: pd.DataFrame, *, name: str = "label table", learn: bool = True) -> Targets:
        if not learn:
            return self._encode_known(table, name)
        y = np.full((len(table), len(self.columns)), np.nan)
        classes: list[list[str]] = []
        for j, col in enumerate(self.columns):
            values = table[col]
            order = sorted(values.dropna().unique().tolist())
            names = [str(v) for v in order]
            if len(names) < 2:
                raise LabelTableError(
                    f"{name}: target {col!r} has {len(names)} class(es) {names}; need at least 2. "
                    "Fix: check the target column (for a numeric target use --task regression)"
                )
            index = {v: i for i, v in enumerate(order)}
            y[:, j] = [np.nan if pd.isna(v) else index[v] for v in values]
            classes.append(names)
        self.state["classes"] = classes
        strata = np.nan_to_num(y[:, 0], nan=0.0).astype(np.int64)  # a missing first target joins class 0
        return Targets(y, strata)

    def _encode_known(self, table: pd.DataFrame, name: str) -> Targets:
        """Labels coded with the classes the model was trained on; another class is an error."""
        y = np.full((len(table), len(self.columns)), np.nan)
        for j, col in enumerate(self.columns):
            index = {c: i for i, c in enumerate(self.classes[j])}
            values = table[col]
            unknown = sorted({str(v) for v in values.dropna()} - set(index))
            if unknown:
                raise LabelTableError(
                    f"{name}: target {col!r} has classes {unknown} the model was not trained on "
                    f"(trained: {self.classes[j]}). Fix: map the labels to the training classes"
                )
            y[:, j] = [np.nan if pd.isna(v) else index[str(v)] for v in values]
        return Targets(y, np.nan_to_num(y[:, 0], nan=0.0).astype(np.int64))

    @property
    def n_outputs(self) -> int:
        return sum(len(c) for c in self.classes)

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for c in self.classes:
            out.append(slice(start, start + len(c)))
            start += len(c)
        return out

    def fit(self, y_train: np.ndarray) -> ClassificationTask:
        task = super().fit(y_train)
        weights = []
        for j, names in enumerate(self.classes):
            col = y_train[:, j]
            counts = np.bincount(col[~np.isnan(col)].astype(np.int64), minlength=len(names)).astype(np.float64)
            weights.append((counts.sum() / (len(names) * np.maximum(counts, 1))).tolist())
        task.state["class_weights"] = weights
        return task

    def sample_weights(self, y_train: np.ndarray) -> np.ndarray:
        w = np.asarray(self.fit(y_train).state["class_weights"][0])
        col = y_train[:, 0]
        return np.where(np.isnan(col), 1.0, w[np.nan_to_num(col).astype(np.int64)])

    def decode(self, y: np.ndarray) -> dict[str, list[Any]]:
        return {c: [None if np.isnan(v) else self.classes[j][int(v)] for v in y[:, j]]
                for j, c in enumerate(self.columns)}  # fmt: skip

    # ------------------------------------------------------------------ loss
    def _weights(self, j: int, device: torch.device) -> torch.Tensor | None:
        if self.balance != "loss" or "class_weights" not in self.state:
            return None
        return torch.tensor(self.state["class_weights"][j], dtype=torch.float32, device=device)

    def loss_sums(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sums = []
        for j, sl in enumerate(self._slices()):
            ok = ~torch.isnan(y[:, j])
            target = y[ok, j].long()
            sums.append(F.cross_entropy(out[ok, sl].float(), target, weight=self._weights(j, out.device),
                                        reduction="sum"))  # fmt: skip
        return torch.stack(sums)

    def loss_den(self, y: torch.Tensor) -> torch.Tensor:
        dens = []
        for j in range(len(self.columns)):
            ok = ~torch.isnan(y[:, j])
            w = self._weights(j, y.device)
            target = y[ok, j].long()
            dens.append(w[target].sum() if w is not None else ok.sum().to(torch.float32))
        return torch.stack(dens)

    def head_labels(self, y: torch.Tensor) -> torch.Tensor | None:
        if self.multi or torch.isnan(y[:, 0]).any():
            return None
        return y[:, 0].long()

    # ------------------------------------------------------------------ predictions
    def predict(self, out: torch.Tensor) -> np.ndarray:
        out = out.float()
        return torch.cat([torch.softmax(out[:, sl], 1) for sl in self._slices()], 1).numpy()

    @property
    def prediction_columns(self) -> list[str]:
        return [f"{self._prefix(j, '_')}prob_{c}" for j, names in enumerate(self.classes) for c in names]

    def label_columns(self, y: np.ndarray) -> dict[str, list[Any]]:
        key = "label" if not self.multi else None
        return {key or c: v for c, v in self.decode(y).items()}

    def derived_columns(self, pred: np.ndarray) -> dict[str, list[Any]]:
        out = {}
        for j, sl in enumerate(self._slices()):
            names = self.classes[j]
            out[f"{self._prefix(j, '_')}pred"] = [names[int(i)] for i in pred[:, sl].argmax(1)]
        return out

    @property
    def metric_names(self) -> list[str]:
        return [f"{self._prefix(j)}{m}" for j in range(len(self.columns)) for m in METRICS]

    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        for j, sl in enumerate(self._slices()):
            ok = ~np.isnan(y[:, j])
            if not ok.any():
                m = {k: float("nan") for k in METRICS}
            else:
                m = classification_metrics(y[ok, j].astype(np.int64), pred[ok, sl])
            out.update({f"{self._prefix(j)}{k}": v for k, v in m.items()})
        return out

    def val_monitor(self, y: np.ndarray, pred: np.ndarray) -> float:
        m = self.metrics(y, pred)
        values = [m[f"{self._prefix(j)}auc"] for j in range(len(self.columns))]
        values = [v for v in values if v == v]
        return float(np.mean(values)) if values else float("nan")
