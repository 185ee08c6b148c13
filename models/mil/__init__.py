"""Slide-level MIL aggregators: ``create_mil(name, in_dim, n_classes, **kw)``, ``list_mil()``.

Every head takes ``x (B, N, D)`` and ``mask (B, N)`` (True = real instance) and returns
``MILOutput(logits, attention, aux_loss)``.
"""

from models.mil import abmil, clam, dsmil, pooling, transmil  # noqa: F401  (registers the heads)
from models.mil.base import MILHead, MILOutput, masked_softmax
from models.mil.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from models.mil.registry import MILSpec, create_mil, get_mil_spec, list_mil, register_mil

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "MILHead",
    "MILOutput",
    "MILSpec",
    "create_mil",
    "get_mil_spec",
    "list_mil",
    "masked_softmax",
    "register_mil",
]
