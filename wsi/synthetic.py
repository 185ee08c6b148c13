"""Synthetic H&E-like slides written as real pyramidal JPEG TIFFs (Aperio-style metadata).

Used by the demo cohort, tests and benchmarks: the files open with OpenSlide and tiffslide like
scanner output (tiled JPEG pages, one per pyramid level, ``MPP`` and ``AppMag`` in the
description). The tissue is procedural: eosin-pink stroma with hematoxylin nuclei, optional
dense nuclear clusters ("lesions") at known places for testing attention and tissue finders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.transform import resize

HEMATOXYLIN = np.array([0.65, 0.70, 0.29])  # optical density per unit stain (Ruifrok & Johnston)
EOSIN = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class Lesion:
    """A dense nuclear cluster: centre (x, y) and radius, in level-0 pixels."""

    x: int
    y: int
    radius: int


@dataclass
class SyntheticSlide:
    """What was written, so tests can check detectors and heatmaps against the truth."""

    path: Path
    width: int
    height: int
    mpp: float
    lesions: list[Lesion] = field(default_factory=list)
    tissue_mask: np.ndarray | None = None  # bool, at `mask_downsample`
    mask_downsample: int = 16


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / (n.std() + 1e-9)


def render_tissue(
    width: int,
    height: int,
    *,
    seed: int = 0,
    n_lesions: int = 0,
    lesion_radius: int = 160,
    nuclei_per_mpx: float = 2500.0,
    tissue_fraction: float = 0.55,
) -> tuple[np.ndarray, list[Lesion], np.ndarray]:
    """Render an RGB uint8 image of procedural tissue on glass.

    Returns ``(rgb, lesions, mask16)`` where ``mask16`` is the tissue mask at 1/16 scale.
    """
    rng = np.random.default_rng(seed)
    ds = 16
    mh, mw = max(height // ds, 4), max(width // ds, 4)
    # Tissue shape: a large smoothed blob, thresholded to the wanted area fraction.
    yy, xx = np.mgrid[0:mh, 0:mw]
    ellipse = 1.0 - (((xx - mw / 2) / (mw / 2.1)) ** 2 + ((yy - mh / 2) / (mh / 2.1)) ** 2)
    field_ = ellipse * 2.0 + 0.8 * _smooth_noise(rng, (mh, mw), sigma=max(mh, mw) / 12)
    thr = np.quantile(field_, 1.0 - tissue_fraction)
    mask16 = field_ > thr
    mask16 = ndimage.binary_opening(mask16, iterations=2)

    # Lesions: discs fully inside tissue, not overlapping.
    lesions: list[Lesion] = []
    inner = ndimage.binary_erosion(mask16, iterations=max(2, lesion_radius // ds + 2))
    cand = np.argwhere(inner)
    tries = 0
    while len(lesions) < n_lesions and len(cand) and tries < 200:
        tries += 1
        cy, cx = cand[rng.integers(len(cand))]
        x, y = int(cx * ds + ds // 2), int(cy * ds + ds // 2)
        if all((x - o.x) ** 2 + (y - o.y) ** 2 > (3 * lesion_radius) ** 2 for o in lesions):
            lesions.append(Lesion(x, y, lesion_radius))

    mask = resize(mask16.astype(np.float32), (height, width), order=1) > 0.5
    # Stain concentrations: eosin everywhere in tissue, with texture; hematoxylin from nuclei.
    eos_small = 0.35 + 0.08 * _smooth_noise(rng, (mh, mw), 3)
    eos = resize(eos_small.astype(np.float32), (height, width), order=1).astype(np.float32)
    nuc = np.zeros((height, width), np.float32)
    n_nuclei = int(nuclei_per_mpx * width * height / 1e6)
    nuc[rng.integers(0, height, n_nuclei), rng.integers(0, width, n_nuclei)] = 1.0
    for les in lesions:  # dense, large, dark nuclei in the lesions
        k = int(12 * nuclei_per_mpx * np.pi * les.radius**2 / 1e6)
        r = les.radius * np.sqrt(rng.random(k))
        t = rng.random(k) * 2 * np.pi
        ly = np.clip((les.y + r * np.sin(t)).astype(int), 0, height - 1)
        lx = np.clip((les.x + r * np.cos(t)).astype(int), 0, width - 1)
        nuc[ly, lx] = 1.6
    hema = np.minimum(ndimage.gaussian_filter(nuc, 2.2) * np.float32(60.0), np.float32(1.4))
    grain = rng.standard_normal((height, width), dtype=np.float32) * np.float32(0.02)
    rgb = np.empty((height, width, 3), np.uint8)
    for c in range(3):
        od = hema * np.float32(HEMATOXYLIN[c]) + eos * np.float32(EOSIN[c]) + grain
        chan = np.float32(240.0) * np.exp(-np.maximum(od, 0))
        chan = np.where(mask, chan, np.float32(236.0) + grain * np.float32(150.0))
        rgb[..., c] = np.clip(chan, 0, 255)
    return rgb, lesions, mask16


def write_pyramid_tiff(
    path: str | Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    tile: int = 256,
    quality: int = 90,
    min_level_size: int = 512,
    aperio: bool = True,
) -> Path:
    """Write ``rgb`` as a tiled JPEG pyramid (levels halve until ``min_level_size``).

    ``aperio=True`` writes an Aperio-style description (``MPP``, ``AppMag``) that OpenSlide
    reads as vendor ``aperio``; otherwise a generic TIFF with resolution tags (when ``mpp``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rgb.shape[:2]
    levels: list[np.ndarray] = [rgb]
    while min(levels[-1].shape[:2]) // 2 >= min_level_size:
        prev = levels[-1]
        ph, pw = (prev.shape[0] // 2) * 2, (prev.shape[1] // 2) * 2
        levels.append(
            prev[:ph, :pw].reshape(ph // 2, 2, pw // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
        )
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, level in enumerate(levels):
            kwargs: dict = {}
            if aperio:
                mag = f"|AppMag = {round(10.0 / mpp)}|MPP = {mpp:.4f}" if mpp else ""
                kwargs["description"] = (
                    f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
                    f"JPEG/RGB Q={quality}{mag}"
                    if i == 0
                    else f"Aperio Image Library v12.0.0 \r\n{w}x{h} -> {level.shape[1]}x{level.shape[0]}"
                )
            elif mpp:
                scale = 2**i
                kwargs["resolution"] = (1e4 / (mpp * scale), 1e4 / (mpp * scale))
                kwargs["resolutionunit"] = "CENTIMETER"
            tif.write(
                level,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subfiletype=0 if (i == 0 or aperio) else 1,
                metadata=None,
                **kwargs,
            )
            if aperio and i == 0:
                # Aperio files keep a stripped thumbnail as the second page; readers rely on it.
                step = max(1, max(h, w) // 768)
                tif.write(
                    np.ascontiguousarray(rgb[::step, ::step]),
                    photometric="rgb",
                    compression="jpeg",
                    rowsperstrip=16,
                    description=f"Aperio Image Library v12.0.0 \r\n{w}x{h} -> thumbnail",
                    metadata=None,
                )
    return path


def make_synthetic_slide(
    path: str | Path,
    *,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
    seed: int = 0,
    n_lesions: int = 0,
    lesion_radius: int = 160,
    tissue_fraction: float = 0.55,
) -> SyntheticSlide:
    """Render and write one synthetic slide; returns its ground truth."""
    rgb, lesions, mask16 = render_tissue(
        width, height, seed=seed, n_lesions=n_lesions, lesion_radius=lesion_radius,
        tissue_fraction=tissue_fraction,
    )
    write_pyramid_tiff(path, rgb, mpp=mpp)
    return SyntheticSlide(Path(path), width, height, mpp, lesions, mask16, 16)


def lesion_mask(points: np.ndarray, lesions: Sequence[Lesion], margin: float = 0.0) -> np.ndarray:
    """Which level-0 ``points`` (N, 2) lie inside any lesion (radius grown by ``margin``)."""
    inside = np.zeros(len(points), bool)
    for les in lesions:
        d2 = (points[:, 0] - les.x) ** 2 + (points[:, 1] - les.y) ** 2
        inside |= d2 <= (les.radius + margin) ** 2
    return inside
