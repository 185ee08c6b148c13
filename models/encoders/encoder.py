"""The :class:`Encoder` module (preprocess + trunk + pooling) and :func:`create_encoder`."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError
from .runtime import resolve_device
from .specs import TIMM_GLOBAL_POOL, EncoderSpec, get_spec
from .weights import (
    cached_hub_weight_file,
    hub_error,
    load_state_dict_strict,
    read_config_json,
    read_state_dict,
    resolve_weight_file,
    sha256_file,
    weights_options,
)

logger = logging.getLogger(__name__)

RANDOM_SEED = 0
"""``weights="random"`` is seeded, so random features are reproducible across processes."""

_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class Encoder(nn.Module):
    """A patch encoder: uint8 RGB patches → ``(B, embed_dim)`` features.

    ``preprocess`` (resize, /255, mean/std) runs on the encoder's device so only uint8
    crosses the bus; ``forward`` takes the preprocessed float batch.
    """

    def __init__(self, spec: EncoderSpec, trunk: nn.Module, *, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.trunk = trunk
        self.weights_id = weights_id
        self.embed_dim = spec.embed_dim
        self.input_size = spec.input_size
        self.num_prefix_tokens = int(getattr(trunk, "num_prefix_tokens", 0))  # CLS + registers
        self.channels_last = False
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", mean / std, persistent=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(B, H, W, 3) uint8`` → ``(B, 3, S, S) float32`` on the encoder's device.

        Resizes to the input size with the spec's interpolation (anti-aliased) when
        ``H, W != S``, then scales to [0, 1] and normalises with the spec's mean/std.
        On CPU the resize runs on uint8 (as PIL does; ~10x faster than float), on other
        devices in float32 (clamped to [0, 255] after bicubic).
        """
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: preprocess expects uint8 (B, H, W, 3) patches, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view
        size = self.input_size
        if tuple(x.shape[-2:]) != (size, size):
            on_cpu = x.device.type == "cpu"
            x = F.interpolate(
                x if on_cpu else x.float(),
                size=(size, size),
                mode=self.spec.interpolation,
                align_corners=False,
                antialias=True,
            )
            if not on_cpu and self.spec.interpolation == "bicubic":
                x = x.clamp_(0.0, 255.0)
        x = x.float()
        x = x * self.scale - self.shift
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, S, S)`` → ``(B, embed_dim)``, pooled as the spec says."""
        if self.spec.pooling == "cls+mean":
            tokens = self.trunk.forward_features(x)
            cls_token = tokens[:, 0]
            patch_tokens = tokens[:, self.num_prefix_tokens :]  # registers excluded
            return torch.cat([cls_token, patch_tokens.mean(dim=1)], dim=-1)
        return self.trunk(x)

    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Convenience: ``forward(preprocess(images))`` under ``torch.inference_mode``."""
        with torch.inference_mode():
            return self(self.preprocess(images))

    def identity(self) -> dict[str, Any]:
        """JSON-able description recorded in feature stores (name, weights, preprocessing)."""
        spec = self.spec
        return {
            "encoder": spec.name,
            "weights_id": self.weights_id,
            "arch": spec.arch,
            "embed_dim": spec.embed_dim,
            "pooling": spec.pooling,
            "input_size": spec.input_size,
            "interpolation": spec.interpolation,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "native_mpp": spec.native_mpp,
            "license": spec.license,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__.split("+")[0],
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, weights_id={self.weights_id!r}"


def _timm_kwargs(spec: EncoderSpec) -> dict[str, Any]:
    kwargs = dict(spec.timm_kwargs)
    kwargs["num_classes"] = 0
    kwargs["global_pool"] = TIMM_GLOBAL_POOL[spec.pooling]
    return kwargs


def _truncate(spec: EncoderSpec, trunk: nn.Module) -> nn.Module:
    if spec.truncate_after is None:
        return trunk
    if spec.truncate_after not in _RESNET_STAGES:
        raise ValueError(f"{spec.name}: cannot truncate after {spec.truncate_after!r}")
    for stage in _RESNET_STAGES[_RESNET_STAGES.index(spec.truncate_after) + 1 :]:
        setattr(trunk, stage, nn.Identity())
    trunk.num_features = trunk.head_hidden_size = spec.embed_dim
    return trunk


def build_trunk(spec: EncoderSpec, *, hub_id: str | None = None) -> nn.Module:
    """The timm trunk for ``spec`` (headless, pooled as the spec says), random or from the hub.

    Build under ``with torch.device("meta"):`` to count parameters without allocating.
    """
    trunk = timm.create_model(
        hub_id or spec.arch, pretrained=hub_id is not None, **_timm_kwargs(spec)
    )
    return _truncate(spec, trunk)


_SEED_LOCK = threading.Lock()


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the CPU RNG for a build and restore it after; one build at a time per process."""
    with _SEED_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _empty_trunk(spec: EncoderSpec) -> nn.Module:
    """A trunk to load a checkpoint into, skipping random init where that is safe.

    A trunk without buffers (plain ViTs) is built on ``meta`` and given uninitialised
    memory: the strict load fills every parameter, and init of a 1 B-parameter model
    costs seconds. Trunks with (possibly non-persistent) buffers are built normally.
    """
    with torch.device("meta"):
        trunk = build_trunk(spec)
    if next(trunk.buffers(), None) is None:
        return trunk.to_empty(device="cpu")
    with _seeded(RANDOM_SEED):
        return build_trunk(spec)


def _load_local(spec: EncoderSpec, source: Path) -> tuple[nn.Module, str]:
    file = resolve_weight_file(source)
    config = read_config_json(source) if source.is_dir() else None
    if config and config.get("architecture") not in (None, spec.arch):
        logger.warning(
            "%s: config.json names architecture %r; building %r for encoder %r",
            source,
            config.get("architecture"),
            spec.arch,
            spec.name,
        )
    state = read_state_dict(file)
    trunk = _empty_trunk(spec)
    if spec.checkpoint_filter is not None:
        state = spec.checkpoint_filter(state, trunk)
    load_state_dict_strict(trunk, state, source=str(file), encoder=spec.name)
    weights_id = sha256_file(file)
    logger.info("%s: loaded weights %s (%s)", spec.name, file, weights_id)
    return trunk, weights_id


def _load_hub(spec: EncoderSpec, hub_id: str) -> tuple[nn.Module, str]:
    try:
        trunk = build_trunk(spec, hub_id=hub_id)
    except Exception as err:
        raise hub_error(hub_id, err, spec.weights_hint) from err
    cached = cached_hub_weight_file(hub_id)
    weights_id = sha256_file(cached) if cached is not None else hub_id
    logger.info("%s: loaded weights %s (%s)", spec.name, hub_id, weights_id)
    return trunk, weights_id


def create_encoder(
    name: str,
    *,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Encoder:
    """Build encoder ``name`` with ``weights`` on ``device``, in eval mode without gradients.

    ``weights``: a local file or HF-layout folder, ``"hf-hub:org/name"`` (through timm),
    or ``"random"`` (seeded random init). ``None`` is an error that says what to pass.
    ``device`` may be ``"auto"``, ``"cpu"``, ``"cuda[:i]"`` or ``"meta"`` (no memory; for
    counting parameters).
    """
    spec = get_spec(name)
    if weights is None:
        raise WeightsError(
            spec.name,
            "no weights given (random weights are used only when asked for by name)",
            weights_options(spec.hf_hub_id, spec.weights_hint),
        )
    dev = resolve_device(device)
    weights_str = str(weights)
    if weights_str == "random":
        ctx = torch.device("meta") if dev.type == "meta" else _seeded(RANDOM_SEED)
        with ctx:
            trunk = build_trunk(spec)
        weights_id = "random"
    elif dev.type == "meta":
        raise WeightsError(
            weights_str, "cannot load weights on the meta device", "use weights='random'"
        )
    elif weights_str.startswith("hf-hub:"):
        trunk, weights_id = _load_hub(spec, weights_str)
    else:
        trunk, weights_id = _load_local(spec, Path(weights_str).expanduser())
    encoder = Encoder(spec, trunk, weights_id=weights_id).to(dev)
    encoder.eval().requires_grad_(False)
    return encoder


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def flops_per_patch(name: str) -> float:
    """Forward FLOPs (2 x multiply-adds, attention included) of one patch at the input size.

    Counted with ``torch.utils.flop_counter`` on the ``meta`` device: no memory, no compute.
    """
    from torch.utils.flop_counter import FlopCounterMode

    encoder = create_encoder(name, weights="random", device="meta")
    size = encoder.input_size
    with FlopCounterMode(display=False) as counter:
        encoder(torch.empty(1, 3, size, size, device="meta"))
    return float(counter.get_total_flops())
