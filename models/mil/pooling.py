"""Baselines: mean pooling of instance embeddings and max pooling of instance scores."""

from __future__ import annotations

import torch
from torch import nn

from models.mil.base import MILHead, MILOutput, masked_mean, mlp_embed
from models.mil.registry import register_mil


@register_mil("mean", description="mean of embedded instances, then a linear classifier")
class MeanPool(MILHead):
    """Mean pooling. ``attention`` is the uniform weight ``1/n`` of each real instance."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def _forward(self, x, mask, labels) -> MILOutput:
        h = self.embed(x)
        logits = self.classifier(masked_mean(h, mask))
        n = mask.sum(1, keepdim=True).clamp_min(1).to(h.dtype)
        return MILOutput(logits, mask.to(h.dtype) / n, None)


@register_mil("max", description="feature-wise max of embedded instances, then a linear classifier")
class MaxPool(MILHead):
    """Max pooling of instance embeddings (Ilse et al. 2018's max baseline).

    The max is taken before the ReLU (the same result, without ties at zero). ``attention`` is
    each instance's share of the pooled features it supplies (the argmax), summing to 1.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = nn.Linear(in_dim, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def _forward(self, x, mask, labels) -> MILOutput:
        h = self.embed(x).masked_fill(~mask.unsqueeze(-1), torch.finfo(x.dtype).min)
        pooled, arg = h.max(1)  # (B, H)
        share = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        share.scatter_add_(1, arg, torch.full_like(pooled, 1.0 / pooled.shape[1]))
        return MILOutput(self.head(pooled), share.masked_fill(~mask, 0.0), None)
