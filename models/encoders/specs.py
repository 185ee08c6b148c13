"""The encoder record (:class:`EncoderSpec`) and the name → record registry."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from .errors import UnknownEncoderError

Pooling = Literal["cls", "cls+mean", "mean", "avgpool"]
Interpolation = Literal["bilinear", "bicubic"]
Family = Literal["vit", "swin", "cnn"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: timm ``global_pool`` for each pooling; ``cls+mean`` pools by hand from all tokens.
TIMM_GLOBAL_POOL: Mapping[str, str] = MappingProxyType(
    {"cls": "token", "cls+mean": "", "mean": "avg", "avgpool": "avg"}
)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build a patch encoder and to describe its features.

    ``timm_kwargs`` go to ``timm.create_model(arch, num_classes=0, global_pool=..., **kw)``;
    they may hold classes (``mlp_layer``, ``act_layer``, ``embed_layer``), which
    :meth:`to_dict` writes as dotted names.
    """

    name: str
    arch: str
    family: Family
    pooling: Pooling
    embed_dim: int
    input_size: int
    native_mpp: float | None
    license: str
    param_count: int | None
    """Published parameter count of the trunk (None for test encoders)."""
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict)
    interpolation: Interpolation = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hf_hub_id: str | None = None
    truncate_after: str | None = None
    """ResNet stage after which the trunk is cut (``"layer3"`` for the CLAM baseline)."""
    checkpoint_filter: Callable[[dict, Any], dict] | None = None
    """``fn(state_dict, model) -> state_dict`` applied to local checkpoints before loading."""
    weights_hint: str = ""
    """Where to obtain the weights; quoted in error messages."""
    reference: str = ""
    test_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))
        if self.pooling not in TIMM_GLOBAL_POOL:
            raise ValueError(f"{self.name}: unknown pooling {self.pooling!r}")
        if self.pooling in ("cls", "cls+mean") and self.family != "vit":
            raise ValueError(f"{self.name}: {self.pooling!r} pooling needs a ViT (class token)")

    def __reduce__(self):
        # registered specs travel by name (their kwargs hold classes and closures)
        if _REGISTRY.get(self.name) is self:
            return (get_spec, (self.name,))
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["timm_kwargs"] = dict(self.timm_kwargs)
        return (_spec_from_fields, (values,))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (for store attributes and run summaries)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "checkpoint_filter":
                value = _qualname(value) if value is not None else None
            elif f.name == "timm_kwargs":
                value = {k: _jsonable(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _spec_from_fields(values: dict[str, Any]) -> EncoderSpec:
    return EncoderSpec(**values)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, functools.partial):
        args = [_qualname(value.func)] + [f"{k}={_jsonable(v)}" for k, v in value.keywords.items()]
        return f"partial({', '.join(args)})"
    if inspect.isclass(value) or callable(value):
        return _qualname(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add ``spec`` under ``spec.name`` (error on a clash unless ``replace``)."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"encoder {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_encoders(*, include_test: bool = True) -> list[str]:
    """Registered encoder names, sorted (``include_test=False`` hides the tiny ones)."""
    return sorted(n for n, s in _REGISTRY.items() if include_test or not s.test_only)


def get_spec(name: str) -> EncoderSpec:
    """The record of encoder ``name``; unknown names raise an error listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownEncoderError(
            f"unknown encoder {name!r}.{hint} Valid choices: {', '.join(list_encoders())}"
        ) from None
