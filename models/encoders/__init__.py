"""Patch encoders: a registry of pathology foundation models built with timm.

>>> from models.encoders import create_encoder, list_encoders
>>> enc = create_encoder("ctranspath", weights="ctranspath.pth", device="auto")
>>> feats = enc(enc.preprocess(uint8_patches_bhwc))   # (B, 768)
"""

from . import entries as _entries  # noqa: F401  (registers the encoders)
from .ctranspath import ConvStem, remap_ctranspath_state_dict
from .encoder import Encoder, build_trunk, count_parameters, create_encoder, flops_per_patch
from .errors import EncoderError, UnknownEncoderError, WeightsError
from .runtime import autocast_context, prepare_for_inference, resolve_device, resolve_precision
from .specs import EncoderSpec, get_spec, list_encoders, register_encoder
from .weights import read_state_dict, sha256_file

__all__ = [
    "ConvStem",
    "Encoder",
    "EncoderError",
    "EncoderSpec",
    "UnknownEncoderError",
    "WeightsError",
    "autocast_context",
    "build_trunk",
    "count_parameters",
    "create_encoder",
    "flops_per_patch",
    "get_spec",
    "list_encoders",
    "prepare_for_inference",
    "read_state_dict",
    "register_encoder",
    "remap_ctranspath_state_dict",
    "resolve_device",
    "resolve_precision",
    "sha256_file",
]
