"""Survival (overall / progression-free survival): a time column and an event column (1 = event
observed, 0 = censored).

Losses:

* ``cox`` (default): the negative Cox partial log-likelihood with Breslow's handling of ties,
  averaged over the events of a batch; the head has one output, the log relative risk. The
  partial likelihood of a batch compares every bag with the batch's risk sets, so it does not
  split into per-pass sums: a batch over the pass budget runs all its passes before one
  backward (memory of the whole batch).
* ``discrete``: the discrete-time negative log-likelihood over quantile bins of the event times
  of the training part (Zadeh & Schmid 2020; as in the Porpoise / MCAT line of work); the head has
  one output (a logit hazard) per bin and the risk is minus the sum of the survival function.

Metrics come from scikit-survival (``pipelines.metrics.survival_metrics``): Harrell's C, Uno's
censoring-weighted C and the log-rank p-value of a median split of the risk. Splits are
stratified by event and, like every task, grouped by patient.

The Cox loss is the one piece of survival statistics written here: it has to be a differentiable
torch expression. It is four lines, and ``tests/test_tasks.py`` checks that its minimiser is
scikit-survival's ``CoxPHSurvivalAnalysis`` (Breslow ties) coefficient on the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.labels import LabelTableError
from pipelines.tasks.base import Targets, Task

SURVIVAL_METRICS = ("c_index", "uno_c", "logrank_p")
_EVENT_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "dead": 1, "alive": 0,
                "deceased": 1, "event": 1, "censored": 0}  # fmt: skip


def cox_breslow_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), mean over events; 0 without events.

    ``risk`` are log relative risks ``(n,)``; the risk set of an event at ``t`` is every bag with
    ``time >= t`` (ties included, Breslow).
    """
    risk = risk.float()
    at_risk = time[None, :] >= time[:, None]  # (i, j): j is at risk when i has its event
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    events = event > 0.5
    if not events.any():
        return risk.sum() * 0.0
    return -(risk[events] - log_denominator[events]).mean()


def discrete_nll(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Per-bag negative log-likelihood of a discrete-time hazard model ``(n,)``."""
    hazard = torch.sigmoid(logits.float()).clamp(1e-7, 1 - 1e-7)
    surv = torch.cumprod(1 - hazard, dim=1)
    surv_before = torch.cat([torch.ones_like(surv[:, :1]), surv[:, :-1]], 1)
    k = bins.long().unsqueeze(1)
    observed = -torch.log(surv_before.gather(1, k)) - torch.log(hazard.gather(1, k))
    censored = -torch.log(surv.gather(1, k))
    return torch.where(event.unsqueeze(1) > 0.5, observed, censored).squeeze(1)


class SurvivalTask(Task):
    name = "survival"
    monitor = "c_index"
    losses = ("cox", "discrete")

    def __init__(self, columns, *, loss=None, balance="none", **options) -> None:
        super().__init__(columns, loss=loss, balance=balance, **options)
        if len(self.columns) != 2:
            raise ValueError(f"survival needs a time and an event column, got {self.columns}")
        self.decomposable = self.loss_name != "cox"
        self.default_batch_size = 16 if self.loss_name == "cox" else 1  # a Cox batch is a set of risk sets

    def encode(self, table: pd.DataFrame, *, name: str = "label table", learn: bool = True) -> Targets:
        tcol, ecol = self.columns
        time = pd.to_numeric(table[tcol], errors="coerce")
        if time.isna().any() or (time < 0).any():
            bad = table.loc[time.isna() | (time < 0), "slide_id"].tolist()
            raise LabelTableError(f"{name}: survival time {tcol!r} is not a non-negative number for {bad[:10]}. "
                                  "Fix: times in days/months, >= 0, one per slide")  # fmt: skip
        raw = table[ecol]
        if raw.dtype == bool or pd.api.types.is_numeric_dtype(raw):
            event = pd.to_numeric(raw).astype(float)
        else:
            event = raw.astype(str).str.strip().str.lower().map(_EVENT_WORDS).astype(float)
        if event.isna().any() or not set(event.unique()) <= {0.0, 1.0}:
            bad = table.loc[event.isna() | ~event.isin([0.0, 1.0]), "slide_id"].tolist()
            raise LabelTableError(f"{name}: event {ecol!r} must be 1 (event) or 0 (censored) for {bad[:10]}. "
                                  "Fix: code the event column as 0/1 or true/false")  # fmt: skip
        if learn and event.sum() < 2:
            raise LabelTableError(f"{name}: {int(event.sum())} event(s) in {ecol!r}; survival needs events. "
                                  "Fix: check the event column (1 = event observed)")  # fmt: skip
        y = np.stack([time.to_numpy(np.float64), event.to_numpy(np.float64)], 1)
        return Targets(y, y[:, 1].astype(np.int64))

    @property
    def n_bins(self) -> int:
        return int(self.options.get("bins", 4))

    @property
    def n_outputs(self) -> int:
        return 1 if self.loss_name == "cox" else self.n_bins

    def fit(self, y_train: np.ndarray) -> SurvivalTask:
        task = super().fit(y_train)
        if self.loss_name == "discrete":
            times = y_train[y_train[:, 1] > 0.5, 0]
            if len(times) == 0:
                times = y_train[:, 0]
            task.state["bin_edges"] = np.quantile(times, np.linspace(0, 1, self.n_bins + 1)[1:-1]).tolist()
        return task

    def _bins(self, time: torch.Tensor) -> torch.Tensor:
        edges = torch.tensor(self.state["bin_edges"], dtype=time.dtype, device=time.device)
        return torch.bucketize(time.contiguous(), edges, right=True)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "cox":
            return cox_breslow_loss(out[:, 0], y[:, 0], y[:, 1])
        return super().loss(out, y)

    def loss_sums(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return discrete_nll(out, self._bins(y[:, 0]), y[:, 1]).sum().reshape(1)

    def loss_den(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(len(y))], device=y.device)

    def predict(self, out: torch.Tensor) -> np.ndarray:
        out = out.float().cpu()
        if self.loss_name == "cox":
            return out[:, :1].numpy()
        surv = torch.cumprod(1 - torch.sigmoid(out), dim=1)
        return (-surv.sum(1, keepdim=True)).numpy()

    @property
    def prediction_columns(self) -> list[str]:
        return ["risk"]

    def label_columns(self, y: np.ndarray) -> dict[str, list[Any]]:
        return {self.columns[0]: y[:, 0].tolist(), self.columns[1]: y[:, 1].astype(int).tolist()}

    def decode(self, y: np.ndarray) -> dict[str, list[Any]]:
        return self.label_columns(y)

    @property
    def metric_names(self) -> list[str]:
        return list(SURVIVAL_METRICS)

    def metrics(self, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
        from pipelines.metrics import survival_metrics

        m = survival_metrics(y[:, 0], y[:, 1].astype(bool), pred[:, 0])
        return {k: float(m[k]) for k in SURVIVAL_METRICS}

    def val_monitor(self, y: np.ndarray, pred: np.ndarray) -> float:
        from pipelines.metrics import survival_metrics

        return float(survival_metrics(y[:, 0], y[:, 1].astype(bool), pred[:, 0])["c_index"])


__all__ = ["SURVIVAL_METRICS", "SurvivalTask", "cox_breslow_loss", "discrete_nll"]
