"""The patch grid of a slide: where patches are, at which level they are read, how much tissue each holds.

Tissue fraction is exact: the mask is treated as a piecewise-constant image over the slide
(each mask pixel covers ``scale`` level-0 pixels), and the area of tissue inside each patch's
level-0 box is the integral of that image over the box. The integral of a piecewise-constant
image at fractional coordinates is the bilinear interpolation of its summed-area table, so
four interpolated look-ups per patch give the fractional coverage with no resampling of the
mask. Parts of a patch outside the mask count as background.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

LEVEL_TOLERANCE = 0.05  # a level within 5 % of the target mpp is read as is


class _MaskLike(Protocol):
    mask: np.ndarray
    scale: tuple[float, float]


@dataclass(frozen=True, eq=False)
class TileGrid:
    """Patches of ``patch_size`` px at ``target_mpp``, in row-major order.

    ``coords`` are level-0 top-left (x, y). A reader reads ``patch_size_read`` px at
    ``read_level`` from each coord and, when ``needs_resize``, resizes to ``patch_size``;
    the delivered pixels are ``effective_mpp`` µm wide.
    """

    coords: np.ndarray  # (N, 2) int64
    tissue: np.ndarray  # (N,) float32
    patch_size: int
    target_mpp: float
    overlap: int
    min_tissue: float
    read_level: int
    read_downsample: float
    patch_size_read: int
    patch_size_level0: int
    stride_level0: int
    effective_mpp: float
    slide_mpp: float
    needs_resize: bool
    slide_dimensions: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def to_attrs(self) -> dict[str, Any]:
        """Everything but the arrays, json-able (for Zarr attrs and h5 attrs)."""
        return {
            "n_patches": len(self),
            "patch_size": self.patch_size,
            "target_mpp": self.target_mpp,
            "overlap": self.overlap,
            "min_tissue": self.min_tissue,
            "read_level": self.read_level,
            "read_downsample": self.read_downsample,
            "patch_size_read": self.patch_size_read,
            "patch_size_level0": self.patch_size_level0,
            "stride_level0": self.stride_level0,
            "effective_mpp": self.effective_mpp,
            "slide_mpp": self.slide_mpp,
            "needs_resize": self.needs_resize,
            "slide_dimensions": list(self.slide_dimensions),
        }


def summed_area_table(mask: np.ndarray) -> np.ndarray:
    """``S[j, i] = mask[:j, :i].sum()``, shape ``(h + 1, w + 1)``, float64."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1, out=sat[1:, 1:])
    return sat


def _integral_at(sat: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Integral of the mask over [0, u] x [0, v] (mask-pixel units, fractional): bilinear SAT."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    u = np.clip(u, 0.0, w)
    v = np.clip(v, 0.0, h)
    i = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    j = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    a = u - i
    b = v - j
    s00 = sat[j, i]
    s01 = sat[j, i + 1]
    s10 = sat[j + 1, i]
    s11 = sat[j + 1, i + 1]
    return s00 + a * (s01 - s00) + b * (s10 - s00) + a * b * (s11 - s10 - s01 + s00)


def box_fractions(
    mask: np.ndarray, scale: tuple[float, float], boxes: np.ndarray
) -> np.ndarray:
    """Exact fraction of each level-0 box ``(x, y, w, h)`` covered by ``mask`` (a mask pixel
    spans ``scale`` = (sx, sy) level-0 pixels). Returns float64 in [0, 1]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if m.size == 0:
        return np.zeros(boxes.shape[0], dtype=np.float64)
    sat = summed_area_table(m)
    sx, sy = float(scale[0]), float(scale[1])
    u0, v0 = boxes[:, 0] / sx, boxes[:, 1] / sy
    u1, v1 = (boxes[:, 0] + boxes[:, 2]) / sx, (boxes[:, 1] + boxes[:, 3]) / sy
    area = (u1 - u0) * (v1 - v0)
    inside = (
        _integral_at(sat, u1, v1) - _integral_at(sat, u0, v1) - _integral_at(sat, u1, v0)
        + _integral_at(sat, u0, v0)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, inside / area, 0.0)
    return np.clip(frac, 0.0, 1.0)


def _mask_and_scale(mask: Any, dims: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]] | None:
    if mask is None:
        return None
    if isinstance(mask, np.ndarray):
        arr = mask.astype(bool, copy=False)
        if arr.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
        h, w = arr.shape
        return arr, (dims[0] / max(w, 1), dims[1] / max(h, 1))
    arr = np.asarray(mask.mask, dtype=bool)
    sx, sy = mask.scale
    return arr, (float(sx), float(sy))


def make_grid(
    slide: Any,
    mask: _MaskLike | np.ndarray | None,
    *,
    patch_size: int = 256,
    mpp: float = 0.5,
    overlap: int = 0,
    min_tissue: float = 0.5,
) -> TileGrid:
    """Lay patches of ``patch_size`` px at ``mpp`` µm/px over ``slide``, keeping those whose
    tissue fraction is ≥ ``min_tissue``.

    ``mask`` is a ``TissueMask`` (or anything with ``mask`` and ``scale``), a bare boolean
    array spanning the whole slide, or None (every patch counts as tissue, fraction 1).
    Only whole patches inside level 0 are laid; a slide smaller than one patch gives N = 0.
    Order is row-major (y, then x) and deterministic.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap} for patch_size {patch_size}")
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")

    slide_mpp = float(slide.mpp)
    dims = (int(slide.dimensions[0]), int(slide.dimensions[1]))
    level = int(slide.best_level_for_mpp(mpp, tolerance=LEVEL_TOLERANCE))
    ds = float(slide.level_downsamples[level])
    level_mpp = slide_mpp * ds
    needs_resize = abs(mpp / level_mpp - 1.0) > LEVEL_TOLERANCE
    if needs_resize:
        patch_size_read = max(1, round(patch_size * mpp / level_mpp))
        effective_mpp = patch_size_read * level_mpp / patch_size
    else:
        patch_size_read = patch_size
        effective_mpp = level_mpp
    l0_per_px = effective_mpp / slide_mpp  # level-0 px per delivered px
    patch_l0 = max(1, round(patch_size * l0_per_px))
    stride_l0 = max(1, round((patch_size - overlap) * l0_per_px))

    w, h = dims
    xs = np.arange(0, w - patch_l0 + 1, stride_l0, dtype=np.int64) if w >= patch_l0 else np.zeros(0, np.int64)
    ys = np.arange(0, h - patch_l0 + 1, stride_l0, dtype=np.int64) if h >= patch_l0 else np.zeros(0, np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.int64).reshape(-1, 2)

    ms = _mask_and_scale(mask, dims)
    if ms is None:
        tissue = np.ones(len(coords), dtype=np.float64)
    else:
        boxes = np.concatenate(
            [coords, np.full((len(coords), 2), patch_l0, dtype=np.int64)], axis=1
        )
        tissue = box_fractions(ms[0], ms[1], boxes)
    keep = tissue >= min_tissue - 1e-9
    coords, tissue = coords[keep], tissue[keep].astype(np.float32)
    logger.debug(
        "%s: %d patches of %d px at %.3f µm/px (level %d, read %d px, resize=%s)",
        getattr(slide, "path", "slide"), len(coords), patch_size, mpp, level, patch_size_read, needs_resize,
    )
    return TileGrid(
        coords=np.ascontiguousarray(coords),
        tissue=np.ascontiguousarray(tissue),
        patch_size=int(patch_size),
        target_mpp=float(mpp),
        overlap=int(overlap),
        min_tissue=float(min_tissue),
        read_level=level,
        read_downsample=ds,
        patch_size_read=int(patch_size_read),
        patch_size_level0=int(patch_l0),
        stride_level0=int(stride_l0),
        effective_mpp=float(effective_mpp),
        slide_mpp=slide_mpp,
        needs_resize=bool(needs_resize),
        slide_dimensions=dims,
    )
