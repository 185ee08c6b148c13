"""CLAM (Lu et al., Nat. Biomed. Eng. 2021): gated attention plus instance-level clustering.

``clam-sb`` has one attention branch, ``clam-mb`` one per class. With ``labels`` the head
returns the instance clustering loss: for each class the ``k_sample`` most attended instances
are pseudo-labelled in-class and the ``k_sample`` least attended out-of-class (for the bag's
own class; with ``subtyping`` also the top instances of the other classes as out-of-class),
scored by a per-class binary instance classifier with the smooth top-1 SVM loss used by CLAM.

CLAM trains on ``bag_weight * bag_loss + (1 - bag_weight) * instance_loss``. The trainer adds
``aux_loss`` to the bag loss, so ``aux_loss = (1 - bag_weight) / bag_weight * instance_loss``:
the same objective scaled by ``1 / bag_weight``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.mil.abmil import Attention
from models.mil.base import MILHead, MILOutput, attention_pool, masked_softmax, mlp_embed
from models.mil.registry import register_mil


def smooth_top1_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Smooth top-1 multiclass SVM loss (Berrada et al. 2018), mean over rows.

    ``tau * logsumexp((s + alpha * [j != y] - s_y) / tau)``; tends to the hinge loss as tau -> 0.
    """
    margin = alpha * (1.0 - nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype))
    shifted = logits + margin - logits.gather(1, target[:, None])
    return (tau * torch.logsumexp(shifted / tau, dim=1)).mean()


class _CLAMBase(MILHead):
    branches: int = 1

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if not 0 < bag_weight <= 1:
            raise ValueError(f"bag_weight must be in (0, 1], got {bag_weight}")
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.embed = mlp_embed(in_dim, hidden, dropout)
        heads = n_classes if self.branches > 1 else 1
        self.attention = Attention(hidden, attn_dim, heads, gated=True, dropout=dropout)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def _bag_logits(self, pooled: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward(self, x, mask, labels) -> MILOutput:
        h = self.embed(x)  # (B, N, H)
        a = masked_softmax(self.attention(h).transpose(1, 2), mask.unsqueeze(1))  # (B, K, N)
        logits = self._bag_logits(attention_pool(a, h, mask))
        aux = None
        if labels is not None and self.bag_weight < 1:
            aux = self._instance_loss(a, h, mask, labels)
            aux = aux * ((1 - self.bag_weight) / self.bag_weight)
        if a.shape[1] == 1:
            attention = a[:, 0]
        else:  # the branch of the predicted class
            pred = logits.argmax(1)
            attention = a[torch.arange(a.shape[0], device=a.device), pred]
        return MILOutput(logits, attention, aux)

    def _instance_loss(self, a, h, mask, labels) -> torch.Tensor:
        total = h.new_zeros(())
        for b in range(h.shape[0]):
            n_real = int(mask[b].sum())
            k = min(self.k_sample, n_real // 2)
            if k < 1:
                continue
            loss_b = h.new_zeros(())
            for c, clf in enumerate(self.instance_classifiers):
                w = a[b, c if a.shape[1] > 1 else 0]
                top = w.masked_fill(~mask[b], -1.0).topk(k).indices
                if int(labels[b]) == c:
                    bottom = w.masked_fill(~mask[b], 2.0).topk(k, largest=False).indices
                    inst = torch.cat([h[b, top], h[b, bottom]])
                    target = torch.cat([labels.new_ones(k), labels.new_zeros(k)])
                elif self.subtyping:
                    inst, target = h[b, top], labels.new_zeros(k)
                else:
                    continue
                loss_b = loss_b + smooth_top1_svm_loss(clf(inst), target)
            if self.subtyping:
                loss_b = loss_b / self.n_classes
            total = total + loss_b
        return total / h.shape[0]


@register_mil("clam-sb", description="CLAM single-branch", reference="Lu et al. 2021")
class CLAMSB(_CLAMBase):
    """One gated attention branch and a linear bag classifier."""

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7,
                 subtyping: bool = False) -> None:  # fmt: skip
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, bag_weight, subtyping)
        self.classifier = nn.Linear(hidden, n_classes)

    def _bag_logits(self, pooled):
        return self.classifier(pooled[:, 0])


@register_mil("clam-mb", description="CLAM multi-branch (one attention branch per class)",
              reference="Lu et al. 2021")  # fmt: skip
class CLAMMB(_CLAMBase):
    """One attention branch and one scalar bag classifier per class."""

    branches = 2

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 512, attn_dim: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7,
                 subtyping: bool = False) -> None:  # fmt: skip
        super().__init__(in_dim, n_classes, hidden, attn_dim, dropout, k_sample, bag_weight, subtyping)
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def _bag_logits(self, pooled):
        return torch.cat([clf(pooled[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)
