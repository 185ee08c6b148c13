"""DSMIL (Li, Li & Eliceiri, CVPR 2021): dual-stream MIL with a critical-instance query.

Stream 1 scores every instance and takes the max per class. Stream 2 finds each class's
critical (highest-scoring) instance, uses its query to attend over all instances and
classifies the attended bag embedding. The bag logits are the mean of both streams, as in
DSMIL's inference. ``attention`` is stream 2's weight for the predicted class.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.mil.base import MILHead, MILOutput, masked_max, masked_softmax, mlp_embed
from models.mil.registry import register_mil


@register_mil("dsmil", description="dual-stream MIL (max instance + critical-query attention)",
              reference="Li et al. 2021")  # fmt: skip
class DSMIL(MILHead):
    """Instance classifier + critical-instance attention; logits = mean of the two streams."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        query_dim: int = 128,
        dropout: float = 0.25,
        passing_v: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.instance_classifier = nn.Linear(hidden, n_classes)
        self.q = nn.Sequential(
            nn.Linear(hidden, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.v = (
            nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
            if passing_v
            else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden)
        self.scale = 1.0 / math.sqrt(query_dim)

    def _forward(self, x, mask, labels) -> MILOutput:
        h = self.embed(x)  # (B, N, H)
        c = self.instance_classifier(h)  # (B, N, C)
        max_logits = masked_max(c, mask)  # (B, C)
        critical = c.masked_fill(~mask.unsqueeze(-1), torch.finfo(c.dtype).min).argmax(1)  # (B, C)
        crit_h = h.gather(1, critical.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # (B, C, H)
        q = self.q(h)  # (B, N, Q)
        q_max = self.q(crit_h)  # (B, C, Q)
        a = masked_softmax(q @ q_max.transpose(1, 2) * self.scale, mask.unsqueeze(-1), dim=1)
        v = self.v(h).masked_fill(~mask.unsqueeze(-1), 0.0)
        bag = a.transpose(1, 2) @ v  # (B, C, H)
        bag_logits = self.bag_classifier(bag).squeeze(-1)  # (B, C)
        logits = 0.5 * (max_logits + bag_logits)
        pred = logits.argmax(1)
        attention = a.gather(2, pred[:, None, None].expand(-1, a.shape[1], 1)).squeeze(2)
        return MILOutput(logits, attention, None)
