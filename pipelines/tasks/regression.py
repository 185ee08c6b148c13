"""Regression of one or several numeric columns (a biomarker score, tumour purity ...).

Targets are standardised with the mean and sd of the training part of each fold (kept in the
checkpoint, so predictions come back in the column's units); the loss is MSE or Huber on the
standardised values, averaged per target over the bags that have a value. Metrics: Pearson r,
Spearman rho, R², MAE (in the column's units). Splits are stratified by quartile of the first
target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pipelines.labels import LabelTableError
from pipelines.tasks.base import Targets, Task, quantile_strata

REGRESSION_METRICS = ("pearson_r", "spearman_rho", "r2", "mae")


class RegressionTask(Task):
    name = "regression"
    monitor = "pearson_r"
    losses = ("mse", "huber")

    @property
    def multi(self) -> bool:
        return len(self.columns) > 1

    def encode(self, table: pd.DataFrame, *, name: str = "label table", learn: bool = True) -> Targets:
        y = np.full((len(table), len(self.columns)), np.nan)
        for j, col in enumerate(self.columns):
            values = pd.to_numeric(table[col], errors="coerce")
            bad = values.isna() & table[col].notna()
            if bad.any():
                raise LabelTableError(
                    f"{name}: target {col!r} is not numeric (e.g. {table.loc[bad, col].iloc[0]!r} for slide "
                    f"{table.loc[bad, 'slide_id'].iloc[0]}). Fix: a numeric column, or --task classification"
                )
            if learn and values.nunique() < 2:
                raise LabelTableError(f"{name}: target {col!r} has fewer than 2 distinct values. Fix: check the column")
            y[:, j] = values.to_numpy(dtype=np.float64)
        folds = int(self.options.get("folds", 5))
        n_bins = max(1, min(4, int(np.sum(~np.isnan(y[:, 0])) // (2 * folds))))
        return Targets(y, quantile_strata(y[:, 0], n_bins))

    @property
    def n_outputs(self) -> int:
        return len(self.columns)

    def fit(self, y_train: np.ndarray) -> RegressionTask:
        task = super().fit(y_train)
        mean = np.nanmean(y_train, axis=0)
        std = np.nanstd(y_train, axis=0)
        task.state["mean"] = mean.tolist()
        task.state["std"] = np.where(std > 1e-12, std, 1.0).tolist()
        return task

    def _scale(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.state.get("mean", [0.0] * len(self.columns)), dtype=torch.float32, device=device)
        std = torch.tensor(self.state.get("std", [1.0] * len(self.columns)), dtype=torch.float32, device=device)
        return mean, std

    def loss_sums(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, std = self._scale(out.device)
        ok = ~torch.isnan(y)
        target = torch.where(ok, (y - mean) / std, torch.zeros_like(y))
        fn = F.mse_loss if self.loss_name == "mse" else F.huber_loss
        per = fn(out.float(), target, reduction="none")
        return (per * ok).sum(0)

    def loss_den(self, y: torch.Tensor) -> torch.Tensor:
        return (~torch.isnan(y)).sum(0).to(torch.float32)

    def predict(self, out: torch.Tensor) -> np.ndarray:
        mean, std = self._scale(torch.device("cpu"))
        return (out.float().cpu() * std + mean).numpy()

    @property
    def prediction_columns(self) -> list[str]:
        return [f"pred_{c}" for c in self.columns]

    def label_columns(self, y: np.ndarray) -> dict[str, list[Any]]:
        return self.decode(y)

    @property
    def metric_names(self) -> list[str]:
        return [f"{c}.{m}" if self.multi else m for c in self.columns for m in REGRESSION_METRICS]

    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        from pipelines.metrics import regression_metrics

        out: dict[str, float] = {}
        for j, c in enumerate(self.columns):
            m = regression_metrics(y[:, j], pred[:, j])
            out.update({(f"{c}.{k}" if self.multi else k): float(m[k]) for k in REGRESSION_METRICS})
        return out

    def val_monitor(self, y: np.ndarray, pred: np.ndarray) -> float:
        m = self.metrics(y, pred)
        values = [m[f"{c}.pearson_r" if self.multi else "pearson_r"] for c in self.columns]
        values = [v for v in values if v == v]
        return float(np.mean(values)) if values else float("nan")
