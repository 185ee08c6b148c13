"""TransMIL (Shao et al., NeurIPS 2021): Nyström self-attention + PPEG positional encoding.

Written here (no dependency on the unmaintained ``nystrom-attention`` package); the Nyström
attention follows Xiong et al. 2021 with the iterative Moore-Penrose pseudo-inverse, except
that the pseudo-inverse's initial scaling is per bag (the reference scales by a maximum over
the whole batch, which couples the bags of a batch).

Padding: the square PPEG layout and the landmarks depend on the bag length, so masking alone
cannot make TransMIL padding invariant. Each bag is therefore processed at its true length:
bags of a batch are grouped by their number of real instances and each group runs as one
dense batch. A padded bag gives exactly the computation of the unpadded one. Batching
therefore saves no compute, while a training batch holds every bag's activations until the
backward pass (about 0.14 MB per instance at the published width), so the head's default
training budget is ``batch_tokens=4096`` instances per pass (the trainer accumulates the
gradient of a larger batch over several passes). TransMIL is not
permutation invariant (the layout is positional). ``attention`` is the class token's
(Nyström-approximated) attention row in the last layer, averaged over heads.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.mil.base import MILHead, MILOutput
from models.mil.registry import register_mil


def pinv_iterative(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each ``(..., m, m)`` matrix by Newton-Schulz iteration."""
    abs_x = x.abs()
    col = abs_x.sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    row = abs_x.sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    z = x.transpose(-1, -2) / (col * row)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head self-attention approximated with ``landmarks`` Nyström landmarks.

    Sequences no longer than ``landmarks`` use exact softmax attention. Returns the output and
    the attention row of token ``query_index`` ``(B, heads, n)``.
    """

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iters: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.heads, self.landmarks, self.pinv_iters = heads, landmarks, pinv_iters
        self.dim_head = dim // heads
        self.scale = self.dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * self.dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * self.dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1),
                                  padding=(residual_kernel // 2, 0), groups=heads, bias=False)  # fmt: skip

    def forward(self, x: torch.Tensor, query_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        m = self.landmarks
        pad = (m - n % m) % m if n > m else 0
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = (
            t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )
        q = q * self.scale
        qi = query_index + pad
        if n <= m:
            attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            out = attn @ v
            row = attn[:, :, qi]
        else:
            groups = (n + pad) // m
            q_l = q.reshape(b, self.heads, m, groups, self.dim_head).mean(3)
            k_l = k.reshape(b, self.heads, m, groups, self.dim_head).mean(3)
            attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
            attn2_inv = pinv_iterative(torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1), self.pinv_iters)
            attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
            # right to left: (m x m)(m x d) instead of the reference's (n x m)(m x m) product;
            # the same attention, ~18 % less time per bag and training step at the default width
            out = attn1 @ (attn2_inv @ (attn3 @ v))
            row = ((attn1[:, :, qi : qi + 1] @ attn2_inv) @ attn3).squeeze(2)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)
        return self.to_out(out)[:, -n:], row[:, :, -n:]


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention block."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, dropout=dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, row = self.attn(self.norm(x))
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding: depthwise 7/5/3 convolutions over the square token layout."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_mil("transmil", description="TransMIL: Nyström transformer + PPEG",
              reference="Shao et al. 2021", permutation_invariant=False, batch_tokens=4096)  # fmt: skip
class TransMIL(MILHead):
    """Two Nyström transformer layers around a PPEG, classifying the class token."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        dim: int = 512,
        heads: int = 8,
        landmarks: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        landmarks = landmarks or dim // 2
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, landmarks, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, n_classes)

    def _dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags of one common true length ``(G, L, D)`` -> logits ``(G, C)``, attention ``(G, L)``."""
        h = self.fc1(x)
        g, n, _ = h.shape
        side = max(1, math.ceil(math.sqrt(n)))
        extra = side * side - n
        h = torch.cat([h, h[:, :extra]], dim=1)
        h = torch.cat([self.cls_token.expand(g, -1, -1), h], dim=1)
        h, _ = self.layer1(h)
        h = self.ppeg(h, side)
        h, row = self.layer2(h)
        att = row.mean(1)[:, 1:]  # class token -> instances, (G, side*side)
        att_real = att[:, :n].clone()
        att_real[:, :extra] += att[:, n:]  # square-fill copies belong to their originals
        return self.fc2(self.norm(h)[:, 0]), att_real

    def _forward(self, x, mask, labels) -> MILOutput:
        b = x.shape[0]
        lengths = mask.sum(1)
        logits = x.new_zeros(b, self.n_classes)
        attention = x.new_zeros(x.shape[:2])
        for length in torch.unique(lengths).tolist():
            idx = (lengths == length).nonzero().squeeze(1)
            if length == 0:  # an empty bag: one zero instance stands in
                bags = x.new_zeros(len(idx), 1, x.shape[-1])
            elif length == x.shape[1]:  # unpadded bags: no copy
                bags = x[idx] if len(idx) < b else x
            else:
                bags = torch.stack([x[i][mask[i]] for i in idx.tolist()])
            lg, att = self._dense(bags)
            logits = logits.index_put((idx,), lg)
            if length:
                rows = idx.repeat_interleave(length)
                cols = mask[idx].nonzero()[:, 1]
                attention = attention.index_put((rows, cols), att.reshape(-1))
        return MILOutput(logits, attention, None)
