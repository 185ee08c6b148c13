"""The identity of a store's features, written into every checkpoint, and the check that a model is
only ever applied to features of the same kind (encoder, weights, dimension, patch size, mpp,
stain normalisation)."""

from __future__ import annotations

import math
from typing import Any

from wsi.errors import StoreMismatchError
from wsi.store import FeatureStore

FEATURE_KEYS = ("encoder", "weights_id", "dim", "patch_size", "mpp", "stain")


class FeatureMismatchError(StoreMismatchError):
    """A model is applied to features other than those it was trained on."""


def features_identity(store: FeatureStore, *, dim: int | None = None) -> dict[str, Any]:
    """What made the store's features: encoder name and weights, dim, patch px, mpp, stain method.

    A store written straight from arrays has no encoder or tiling identity: those fields are None
    and ``dim`` (when given) comes from the data.
    """
    ident = store.identity or {}
    enc = ident.get("encoder") or {}
    tiling = ident.get("tiling") or {}
    stain = ident.get("stain") or {}
    return {
        "encoder": enc.get("name"),
        "weights_id": enc.get("weights_id"),
        "dim": enc.get("dim", dim) if enc.get("dim") is not None else dim,
        "patch_size": tiling.get("patch_size"),
        "mpp": tiling.get("mpp"),
        "stain": stain.get("method"),
        "store": str(store.path),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return a == b


def feature_differences(trained: dict[str, Any] | None, actual: dict[str, Any]) -> list[str]:
    """Fields the training features recorded that ``actual`` does not match, as readable text."""
    out = []
    for key in FEATURE_KEYS:
        want = (trained or {}).get(key)
        if want is None:
            continue  # not recorded at training time (store written from arrays, older checkpoint)
        got = actual.get(key)
        if got is None or not _same(want, got):
            out.append(f"{key}: trained on {want!r}, this store has {got!r}")
    return out


def check_features(trained: dict[str, Any] | None, actual: dict[str, Any], *, model: str, store: str) -> None:
    """Raise ``FeatureMismatchError`` naming both sides when the features differ."""
    diffs = feature_differences(trained, actual)
    if diffs:
        where = (trained or {}).get("store", "?")
        raise FeatureMismatchError(
            f"{store}: its features are not those {model} was trained on (training store {where}): "
            + "; ".join(diffs)
            + ". Fix: extract this cohort with the same encoder, weights, patch size and mpp as the training "
            "store (see the run's config.yaml), or train a model on these features"
        )


__all__ = ["FEATURE_KEYS", "FeatureMismatchError", "check_features", "feature_differences", "features_identity"]
