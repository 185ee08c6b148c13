"""Baselines: mean pooling of instance embeddings and max pooling of instance scores."""

from __future__ import annotations

from torch import nn

from models.mil.base import MILHead, MILOutput, masked_max, masked_mean, mlp_embed
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


@register_mil("max", description="instance classifier, bag logit = max over instances per class")
class MaxPool(MILHead):
    """Max pooling of instance logits (mi-Net style).

    ``attention`` is each instance's logit for the bag's predicted class (zero on padding);
    it is a score, not normalised.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def _forward(self, x, mask, labels) -> MILOutput:
        inst = self.classifier(self.embed(x))  # (B, N, C)
        logits = masked_max(inst, mask)
        pred = logits.argmax(1)
        score = inst.gather(2, pred[:, None, None].expand(-1, inst.shape[1], 1)).squeeze(2)
        return MILOutput(logits, score.masked_fill(~mask, 0.0), None)

