"""Finding, reading, identifying and loading encoder weights.

Sources: a local file (``.pth``/``.pt``/``.bin`` via ``torch.load(weights_only=True)``, or
``.safetensors``), a directory in Hugging Face layout (``model.safetensors`` or
``pytorch_model.bin``, optional ``config.json``), or ``hf-hub:org/name`` through timm.
The identity of a weight file is ``"sha256:<hex>"`` of its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import WeightsError

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")

_hash_cache: dict[tuple[str, int, int], str] = {}
_hash_lock = threading.Lock()


def sha256_file(path: str | Path, *, chunk_size: int = 8 << 20) -> str:
    """``"sha256:<hex>"`` of a file, streamed; cached per (path, size, mtime) in-process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_cache:
            return _hash_cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    value = f"sha256:{digest.hexdigest()}"
    with _hash_lock:
        _hash_cache[key] = value
    return value


def hf_cache_dir() -> str:
    """The Hugging Face hub cache directory in use (``HF_HUB_CACHE`` / ``HF_HOME``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    """True when Hugging Face offline mode is on (env var or ``huggingface_hub`` constant)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or bool(constants.HF_HUB_OFFLINE)


def weights_options(hf_hub_id: str | None = None, hint: str = "") -> str:
    """The ways to pass weights, for error messages."""
    hub = hf_hub_id or "hf-hub:org/name"
    text = (
        "pass `weights=` / `--weights` as a local file (.pth/.pt/.bin/.safetensors), "
        f"a folder in Hugging Face layout, `{hub}`, or `random` (random init, for tests)"
    )
    return f"{text}; {hint}" if hint else text


def resolve_weight_file(path: str | Path) -> Path:
    """The weight file for ``path``: the file itself, or the weights inside an HF-layout folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        raise WeightsError(
            str(path),
            f"folder has no {' or '.join(HF_WEIGHT_FILES)}"
            + (f" and {len(found)} candidate weight files" if found else ""),
            "point to the weight file itself, or use a folder in Hugging Face layout",
        )
    if not path.is_file():
        raise WeightsError(str(path), "no such file or folder", weights_options())
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            str(path),
            f"unsupported weight file type {path.suffix!r}",
            f"use one of {', '.join(WEIGHT_SUFFIXES)}",
        )
    return path


def read_config_json(path: str | Path) -> dict[str, Any] | None:
    """``config.json`` next to the weights of an HF-layout folder, if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(str(cfg), f"unreadable config.json ({err})", "fix or remove it") from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a weight file, unwrapping ``model``/``state_dict`` and ``module.``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip, safetensors header, I/O errors
        raise WeightsError(
            str(path),
            f"cannot read weights ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
            "check the file is complete; a checkpoint holding pickled Python objects must be "
            "re-saved as a plain state dict (torch.save(model.state_dict(), path)) or as .safetensors",
        ) from err
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            str(path),
            "not a state dict (expected a mapping of names to tensors, optionally under "
            f"{'/'.join(_WRAPPER_KEYS)})",
            "pass the model's state dict file",
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listed(keys: list[str], limit: int = 12) -> str:
    more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, encoder: str
) -> None:
    """``model.load_state_dict(state_dict)`` with every key matched; else a ``WeightsError``."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise WeightsError(
            source,
            f"weights do not fit encoder {encoder!r}: {str(err).strip()}",
            "check that these are the weights of this encoder (see `list_encoders()`)",
        ) from err
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        raise WeightsError(
            source,
            f"weights do not match encoder {encoder!r} ({'; '.join(parts)})",
            "check that these are the weights of this encoder (see `list_encoders()`)",
        )


def cached_hub_weight_file(hub_id: str) -> Path | None:
    """Path of a hub model's weight file in the local HF cache, if it is there."""
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = hub_id.removeprefix("hf-hub:").partition("@")
    for name in (*HF_WEIGHT_FILES, "open_clip_pytorch_model.bin"):
        try:
            hit = try_to_load_from_cache(repo, name, revision=revision or None)
        except Exception:  # invalid repo id and the like: no cached file
            return None
        if isinstance(hit, str):
            return Path(hit)
    return None


def hub_error(hub_id: str, err: BaseException, hint: str) -> WeightsError:
    """A ``WeightsError`` for a failed hub download that says what to do next."""
    cache = hf_cache_dir()
    name = type(err).__name__
    if hf_offline() or "offline" in name.lower() or "LocalEntryNotFound" in name:
        reason = (
            f"not in the Hugging Face cache ({cache}) and the hub is not reachable "
            f"(offline mode or no network: {name})"
        )
        fix = (
            "download the weights on a machine with network (`hf download "
            f"{hub_id.removeprefix('hf-hub:')}`), copy the cache or the files, then pass the local "
            "weight file or folder as --weights; or set HF_HUB_CACHE to a cache holding them"
        )
    elif "Gated" in name or "401" in str(err) or "403" in str(err):
        reason = f"access denied by the hub ({name}); the model is gated"
        fix = hint or "request access on the model page and log in (`hf auth login` or HF_TOKEN)"
    else:
        reason = f"download or load through timm failed ({name}: {str(err).splitlines()[0] if str(err) else ''})"
        fix = f"check the hub id and network, or pass a local weight file; cache: {cache}"
    return WeightsError(hub_id, reason, fix)
