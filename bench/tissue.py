"""Tissue detection speed: slidepipe's Numba pipeline vs the same steps in scikit-image/SciPy.

Both run side by side in one process on the same image: a real pen-marked slide thumbnail
(``../shared/thumbnails/diagnostic-slide-thumb-rgb.png``) resized to the thumbnail of a
12.5 x 10 mm slide at 8 µm/px (1562 x 1250 px). Timings alternate between the two and report
medians after a warm-up (JIT compile is cached on disk with ``cache=True``), so machine load
hits both alike.

  numba     wsi.tissue.detect_tissue(rgb, mpp=8)     (glass estimate, features, ink, Otsu,
                                                      morphology, holes, size filters)
  skimage   rgb2hsv → threshold_otsu(saturation) → binary close/open with a disk →
            remove_small_holes / remove_small_objects (fewer steps: no glass estimate, no ink)

The Numba kernels are single-threaded on purpose: slides are processed in parallel by Dask
workers, and on a shared 2-core machine ``parallel=True`` kernels measured 2-3x *slower* than
serial ones (thread barriers stall when a core is taken).

Targets: numba ≤ 50 ms per thumbnail (quiet machine) and ≥ 3x faster than skimage.

    python bench/tissue.py --quick      # a smaller image and fewer repeats (smoke run)
    python bench/tissue.py              # the real figures (run on a quiet machine)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TARGET_MS = 50.0
TARGET_RATIO = 3.0


def skimage_baseline(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """A straightforward scikit-image/SciPy tissue mask (CLAM-style saturation + Otsu)."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk

    sat = rgb2hsv(rgb)[..., 1]
    mask = sat > threshold_otsu(sat)
    mask = ndi.binary_closing(mask, structure=disk(max(1, round(24 / mpp))), border_value=1)
    mask = ndi.binary_opening(mask, structure=disk(max(1, round(8 / mpp))))
    px_area = (mpp * 1e-3) ** 2
    # remove_small_holes / remove_small_objects, via ndimage labels (no deprecation warnings)
    holes, _ = ndi.label(~mask)
    sizes = np.bincount(holes.ravel())
    mask |= (sizes < 0.01 / px_area)[holes] & (holes > 0)
    lab, _ = ndi.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(lab.ravel())
    return (sizes >= 0.0005 / px_area)[lab] & (lab > 0)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="half-size image, 3 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()

    from wsi.tissue import detect_tissue

    size = (781, 625) if args.quick else (1562, 1250)
    repeats = args.repeats or (3 if args.quick else 15)
    with Image.open(SHARED / "thumbnails" / "diagnostic-slide-thumb-rgb.png") as im:
        rgb = np.ascontiguousarray(
            np.asarray(im.convert("RGB").resize(size, Image.Resampling.LANCZOS))
        )
    mpp = 8.0 * 1562 / size[0]  # same physical slide (12.5 x 10 mm) at either size

    t0 = time.perf_counter()
    ours = detect_tissue(rgb, mpp=mpp)
    first_ms = (time.perf_counter() - t0) * 1e3
    skimage_baseline(rgb, mpp)  # warm-up

    t_ours, t_base = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ours = detect_tissue(rgb, mpp=mpp)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        base = skimage_baseline(rgb, mpp)
        t_base.append(time.perf_counter() - t)
    ms_ours = statistics.median(t_ours) * 1e3
    ms_base = statistics.median(t_base) * 1e3
    ratio = ms_base / ms_ours

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load avg {os.getloadavg()[0]:.1f} (the kernels are single-threaded)"
    )
    print(f"image: {size[0]} x {size[1]} px at {mpp:.1f} µm/px, repeats {repeats} (median)")
    print(f"first call (loads the cached JIT, or compiles): {first_ms:.0f} ms")
    print()
    print(f"{'method':<10}{'ms/thumbnail':>14}{'tissue %':>10}{'ratio':>8}{'target':>16}")
    print(f"{'skimage':<10}{ms_base:>14.1f}{100 * base.mean():>10.1f}{1.0:>8.2f}{'':>16}")
    print(
        f"{'numba':<10}{ms_ours:>14.1f}{100 * ours.fraction:>10.1f}{ratio:>8.2f}"
        f"{f'≤{TARGET_MS:.0f} ms, ≥{TARGET_RATIO:.0f}x':>16}"
    )
    ok = ms_ours <= TARGET_MS and ratio >= TARGET_RATIO
    print(
        f"\ntargets {'met' if ok else 'NOT met'} "
        f"(time {'ok' if ms_ours <= TARGET_MS else 'over'}, ratio {'ok' if ratio >= TARGET_RATIO else 'under'})"
    )


if __name__ == "__main__":
    main()
