"""The MIL head registry, in the manner of timm's ``register_model`` / ``create_model``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from models.mil.base import MILHead


@dataclass(frozen=True)
class MILSpec:
    """A registered head: its class, its default kwargs (as data) and what it is."""

    name: str
    cls: type[MILHead]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    reference: str = ""
    permutation_invariant: bool = True
    #: most (padded) instances per forward/backward pass in training by default; ``None`` = no
    #: limit. Heads that gain nothing from batching (TransMIL runs each bag on its own) set a
    #: small budget so a batch's gradient is accumulated over passes instead of holding every
    #: bag's activations at once.
    batch_tokens: int | None = None


_REGISTRY: dict[str, MILSpec] = {}


def register_mil(
    name: str,
    *,
    description: str = "",
    reference: str = "",
    permutation_invariant: bool = True,
    batch_tokens: int | None = None,
) -> Callable[[type[MILHead]], type[MILHead]]:
    """Class decorator adding a head to the registry; defaults come from ``__init__``.

    ``batch_tokens``: the head's default training budget of padded instances per pass (see
    ``MILSpec.batch_tokens``).
    """

    def deco(cls: type[MILHead]) -> type[MILHead]:
        if name in _REGISTRY:
            raise ValueError(f"MIL head {name!r} is already registered")
        params = inspect.signature(cls.__init__).parameters
        defaults = {
            k: p.default
            for k, p in params.items()
            if k not in ("self", "in_dim", "n_classes") and p.default is not inspect.Parameter.empty
        }
        _REGISTRY[name] = MILSpec(name, cls, defaults, description, reference, permutation_invariant,
                                  batch_tokens)
        return cls

    return deco


def list_mil() -> list[str]:
    """Names of all registered heads, sorted."""
    return sorted(_REGISTRY)


def get_mil_spec(name: str) -> MILSpec:
    """The spec of ``name``; an unknown name lists the valid choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown MIL head {name!r}; choose one of: {', '.join(list_mil())}") from None


def create_mil(name: str, in_dim: int, n_classes: int, **kwargs: Any) -> MILHead:
    """Build head ``name`` for ``in_dim``-d features and ``n_classes`` classes.

    ``kwargs`` override the head's defaults (``get_mil_spec(name).defaults``); an unknown
    keyword is an error that lists the valid ones. The model remembers how it was built in
    ``model.mil_config`` so a checkpoint can rebuild it.
    """
    spec = get_mil_spec(name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise TypeError(
            f"MIL head {name!r} got unknown option(s) {unknown}; valid: {sorted(spec.defaults)}"
        )
    model = spec.cls(in_dim, n_classes, **kwargs)
    model.mil_config = {"name": name, "in_dim": in_dim, "n_classes": n_classes, "kwargs": dict(kwargs)}
    return model
