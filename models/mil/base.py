"""Shared pieces of the MIL heads: the output record, the base module and masked reductions.

Every head takes a padded batch ``x (B, N, D)`` and a mask ``(B, N)`` (True = real instance).
Padding never influences the output: masked positions get exactly zero attention and are
excluded from means and maxima, so a padded bag gives the same result as the unpadded one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class MILOutput(NamedTuple):
    """What every head returns.

    ``logits (B, C)``; ``attention (B, N)`` per-instance weights or scores (zero on padding)
    or ``None``; ``aux_loss`` a scalar the trainer adds to the bag loss (CLAM's instance
    clustering loss) or ``None``.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None
    aux_loss: torch.Tensor | None


def _neg_large(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).min


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` that gives exactly zero weight where ``mask`` is False.

    Fully masked rows (empty bags) give all zeros instead of NaN.
    """
    filled = scores.masked_fill(~mask, _neg_large(scores))
    return torch.softmax(filled, dim=dim).masked_fill(~mask, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, N, D)`` over real instances -> ``(B, D)``."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max of ``x (B, N, K)`` over real instances -> ``(B, K)``."""
    return x.masked_fill(~mask.unsqueeze(-1), _neg_large(x)).amax(1)


def attention_pool(weights: torch.Tensor, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_n weights[b, k, n] * h[b, n]`` with padding zeroed -> ``(B, K, D)``."""
    h = h.masked_fill(~mask.unsqueeze(-1), 0.0)
    return torch.bmm(weights, h)


class MILHead(nn.Module):
    """Base class: checks inputs and fills a default all-True mask.

    ``n_classes`` is the number of outputs: class logits for classification, but also one output
    (a Cox risk, a regressed value) or several groups of outputs (multi-target, discrete-time
    survival bins); ``n_outputs`` is the same number under its general name.
    """

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1:
            raise ValueError(f"need in_dim >= 1 and n_classes (outputs) >= 1, got {in_dim=}, {n_classes=}")
        self.in_dim = in_dim
        self.n_classes = n_classes

    @property
    def n_outputs(self) -> int:
        return self.n_classes

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, labels: torch.Tensor | None = None
    ) -> MILOutput:
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (B, N, {self.in_dim}), got {tuple(x.shape)}"
            )
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        elif mask.shape != x.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match x {tuple(x.shape[:2])}")
        return self._forward(x, mask.bool(), labels)

    def _forward(
        self, x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None
    ) -> MILOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def mlp_embed(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The instance embedding most heads share: Linear -> ReLU -> Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
