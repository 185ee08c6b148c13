"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018): plain and gated attention."""

from __future__ import annotations

import torch
from torch import nn

from models.mil.base import MILHead, MILOutput, attention_pool, masked_softmax, mlp_embed
from models.mil.registry import register_mil


class Attention(nn.Module):
    """``w_k = softmax(W tanh(V h))`` or, gated, ``softmax(W (tanh(V h) * sigmoid(U h)))``.

    Returns raw scores ``(B, N, heads)``; the caller applies the masked softmax.
    """

    def __init__(self, dim: int, attn_dim: int, heads: int = 1, *, gated: bool, dropout: float = 0.0):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = (
            nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout)) if gated else None
        )
        self.w = nn.Linear(attn_dim, heads)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.v(h)
        if self.u is not None:
            a = a * self.u(h)
        return self.w(a)


@register_mil("abmil", description="attention MIL (tanh attention)", reference="Ilse et al. 2018")
class ABMIL(MILHead):
    """Embed instances, attention-pool them (one branch), classify the pooled vector."""

    gated = False

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.embed = mlp_embed(in_dim, hidden, dropout)
        self.attention = Attention(hidden, attn_dim, 1, gated=self.gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def _forward(self, x, mask, labels) -> MILOutput:
        h = self.embed(x)  # (B, N, H)
        a = masked_softmax(self.attention(h).squeeze(-1), mask)  # (B, N)
        z = attention_pool(a.unsqueeze(1), h, mask).squeeze(1)  # (B, H)
        return MILOutput(self.classifier(z), a, None)


@register_mil(
    "gated-abmil", description="attention MIL with gated attention", reference="Ilse et al. 2018"
)
class GatedABMIL(ABMIL):
    """ABMIL with the gated attention branch ``tanh(V h) * sigmoid(U h)``."""

    gated = True
