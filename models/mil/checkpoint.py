"""MIL checkpoints: written atomically, rebuilt into a model, carrying what they were trained on.

A checkpoint is a ``torch.save`` dict with the head (``model``, ``model_kwargs``, ``in_dim``,
``n_outputs``), its ``state_dict``, the feature standardisation (``mean``, ``std``), the task it
was trained for (``task``: a json-able dict that ``pipelines.tasks.task_from_dict`` rebuilds,
fold statistics included) and the identity of the features (``features``: encoder, weights,
dim, patch size, mpp of the store it was trained on). Classification checkpoints also keep
``classes`` (as before the task abstraction; older checkpoints have only that).

It is written to a temporary name beside the target, flushed to disk and renamed into place, so a
failure (full disk, a killed job) never leaves a truncated ``fold*.pt`` under its final name.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.mil.registry import create_mil

CHECKPOINT_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be read or rebuilt; the message names the file, the reason and the fix."""


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"checkpoint_version": CHECKPOINT_VERSION, **ckpt}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def n_outputs_of(ckpt: dict[str, Any]) -> int:
    """Outputs of the head: recorded, or (older checkpoints) the number of classes."""
    if "n_outputs" in ckpt:
        return int(ckpt["n_outputs"])
    return len(ckpt["classes"])


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict; a missing, truncated or foreign file is a ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Fix: pass a run directory of `slidepipe train`")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {err}). "
            "Fix: the file is truncated or not a slidepipe checkpoint; train the run again"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a slidepipe MIL checkpoint. Fix: pass a fold*.pt of `slidepipe train`")
    return ckpt


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a fold checkpoint (eval mode) and return it with the checkpoint dict."""
    ckpt = read_checkpoint(path, device)
    model = create_mil(ckpt["model"], ckpt["in_dim"], n_outputs_of(ckpt), **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "load_checkpoint", "n_outputs_of", "read_checkpoint",
           "save_checkpoint"]  # fmt: skip
