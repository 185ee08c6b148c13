"""Device and precision helpers for running encoders (CPU tested; CUDA paths real, untested here)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal

import torch

logger = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` if available, else ``cpu``; other values are checked and returned."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(dev)!r} asked for but CUDA is not available; use cpu or auto"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(dev)!r}: only {torch.cuda.device_count()} CUDA devices")
    return dev


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """Compute dtype: ``auto`` is bf16 on CUDA (fp16 if the GPU lacks bf16), fp32 elsewhere."""
    dev = resolve_device(device)
    if precision == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"unknown precision {precision!r}; use auto, bf16, fp16 or fp32")
    return _DTYPES[precision]


@contextlib.contextmanager
def autocast_context(device: str | torch.device, precision: str = "auto") -> Iterator[torch.dtype]:
    """Mixed-precision context for encoder forwards; yields the resolved dtype.

    fp32 → no autocast; bf16/fp16 → ``torch.autocast`` on the device type.
    """
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if dtype == torch.float32:
        yield dtype
        return
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield dtype


def prepare_for_inference(
    encoder: torch.nn.Module,
    *,
    channels_last: bool | Literal["auto"] = "auto",
    compile: bool = False,
) -> torch.nn.Module:
    """Tune an :class:`~models.encoders.Encoder` for throughput, in place.

    ``channels_last="auto"`` turns it on for CNN trunks (where cuDNN profits); ``compile``
    wraps the trunk with ``torch.compile`` (first batches are slow while it compiles).
    """
    spec = getattr(encoder, "spec", None)
    if channels_last == "auto":
        channels_last = spec is not None and spec.family == "cnn"
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    if compile:
        encoder.trunk.compile(dynamic=False)
        logger.info("compiled trunk of %s", getattr(spec, "name", type(encoder).__name__))
    return encoder
