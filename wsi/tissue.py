"""Tissue detection on a low-resolution thumbnail, with Numba kernels.

The steps, each a small Numba kernel working at a physical resolution (µm per pixel):

1. **Background (glass) estimate robust to uneven illumination** — per block of the thumbnail,
   the mean colour of its bright, unsaturated pixels; blocks without glass borrow from their
   neighbours. Every pixel is divided by its local glass colour ("white balance"), so tinted
   or vignetted glass, scanner-tile seams and faint smudges look like plain white.
2. **Features** on the balanced colour: HSV saturation, optical density, hue/value.
3. **Pen ink** (green, blue, red, black) by hue/saturation/value rules that H&E, DAB and
   hematoxylin do not reach (black: dark and unsaturated over ~8 µm, so single nuclei are not
   ink). Strong-ink components of a minimum area are strokes; they grow into touching faint
   ink of the same colour (hysteresis) and are dilated a little to take their rims.
4. **Otsu** threshold on the saturation histogram (clamped to a sane range), and a minimum
   optical density: tissue = coloured *and* darker than the glass. Dust and smudges are grey,
   so they never count.
5. **Morphology** (close, then open, with a digital disk, run-based), **hole filling**
   (background components not touching the border and smaller than ``min_hole_area_mm2``
   become tissue), then the ink is cut out and a **size filter** on 8-connected components
   (``min_tissue_area_mm2``) is applied. Connected components are labelled on runs
   (union-find), so these steps cost little more than one pass over the mask.

``detect_tissue`` accepts a ``Slide`` (reads ``slide.thumbnail_at_mpp``) or an RGB array with
its µm/px and returns a ``TissueMask`` that exports QuPath GeoJSON (level-0 pixels) and an
overlay PNG.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

logger = logging.getLogger(__name__)

__all__ = ["TissueMask", "detect_tissue", "tissue_features", "pen_ink_mask"]

# --- tunables (physical units where they are about sizes) -------------------------------------
_BLOCK_UM = 512.0  # side of a background-estimation block, µm
_BLOCK_PX = (16, 96)  # ... clamped to this many thumbnail pixels
_OPEN_UM, _CLOSE_UM, _INK_DILATE_UM = 8.0, 24.0, 16.0
_BLACK_SMOOTH_UM = 8.0  # black ink is judged on the mean colour over about this radius
_RADIUS_PX_MAX = 8  # morphology radii are capped in pixels (fine thumbnails of tiny slides)
_SAT_CLAMP = (0.05, 0.15)  # Otsu on saturation is clamped to this range
_OD_MIN = 0.06  # minimum optical density (sum of the three channels, log10) of tissue
_MIN_INK_AREA_MM2 = 0.002  # smaller "ink" blobs are dark nuclei or noise, not pen strokes
_MIN_INK_PX = 9

# pixel classes written by the feature kernel
# strong classes are bits 0-2; the same colour family's faint ink is the bit three places up
_INK_GREEN_BLUE, _INK_RED, _INK_BLACK = 1, 2, 4
_INK_STRONG = _INK_GREEN_BLUE | _INK_RED | _INK_BLACK
_WEAK_SHIFT = 3


# ============================== Numba kernels ==================================================


@njit(cache=True, nogil=True)
def _glass_white(rgb: np.ndarray) -> np.ndarray:
    """Global glass colour: mean of the brightest unsaturated pixels (fallback: white)."""
    h, w, _ = rgb.shape
    hist = np.zeros(256, np.int64)
    for y in range(0, h, 2):  # every 2nd pixel: the glass colour is smooth
        for x in range(0, w, 2):
            r, g, b = rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2]
            mx = max(r, g, b)
            mn = min(r, g, b)
            if mx >= 128 and (mx - mn) <= 0.08 * mx:
                hist[mx] += 1
    total = hist.sum()
    out = np.full(3, 255.0, np.float64)
    if total < 4:
        return out
    # value at the 90th percentile of unsaturated bright pixels
    acc, v90 = 0, 255
    for v in range(256):
        acc += hist[v]
        if acc >= 0.9 * total:
            v90 = v
            break
    if v90 < 200:  # no glass in the picture (all tissue): assume near-white glass
        return out
    s = np.zeros(3, np.float64)
    n = 0
    for y in range(0, h, 2):  # every 2nd pixel: the glass colour is smooth
        for x in range(0, w, 2):
            r, g, b = rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2]
            mx = max(r, g, b)
            mn = min(r, g, b)
            if mx >= v90 - 8 and (mx - mn) <= 0.08 * mx:
                s[0] += r
                s[1] += g
                s[2] += b
                n += 1
    for c in range(3):
        out[c] = s[c] / n
    return out


@njit(cache=True, nogil=True)
def _block_background(
    rgb: np.ndarray, block: int, white: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block glass colour ``(gh, gw, 3)`` and whether the block had enough glass."""
    h, w, _ = rgb.shape
    gh = (h + block - 1) // block
    gw = (w + block - 1) // block
    bg = np.zeros((gh, gw, 3), np.float64)
    valid = np.zeros((gh, gw), np.uint8)
    vmin = 0.75 * max(white[0], white[1], white[2])
    for by in range(gh):
        for bx in range(gw):
            y0, x0 = by * block, bx * block
            y1, x1 = min(h, y0 + block), min(w, x0 + block)
            # median value of candidate glass pixels, then mean colour of those above it
            hist = np.zeros(256, np.int64)
            n = 0
            for y in range(y0, y1, 2):
                for x in range(x0, x1, 2):
                    r, g, b = rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2]
                    mx = max(r, g, b)
                    mn = min(r, g, b)
                    if mx >= vmin and (mx - mn) <= 0.06 * mx:
                        hist[mx] += 1
                        n += 1
            if n < 0.05 * (y1 - y0) * (x1 - x0) or n == 0:  # < 20 % glass (1 in 4 sampled)
                continue
            acc, vmed = 0, 0
            for v in range(256):
                acc += hist[v]
                if 2 * acc >= n:
                    vmed = v
                    break
            s0 = s1 = s2 = 0.0
            m = 0
            for y in range(y0, y1, 2):
                for x in range(x0, x1, 2):
                    r, g, b = rgb[y, x, 0], rgb[y, x, 1], rgb[y, x, 2]
                    mx = max(r, g, b)
                    mn = min(r, g, b)
                    if mx >= vmed and (mx - mn) <= 0.06 * mx:
                        s0 += r
                        s1 += g
                        s2 += b
                        m += 1
            if (
                m > 0
                and s0 / m >= 0.8 * white[0]
                and s1 / m >= 0.8 * white[1]
                and s2 / m >= 0.8 * white[2]
            ):
                bg[by, bx, 0] = s0 / m
                bg[by, bx, 1] = s1 / m
                bg[by, bx, 2] = s2 / m
                valid[by, bx] = 1
    return bg, valid


@njit(cache=True, nogil=True)
def _fill_blocks(bg: np.ndarray, valid: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Blocks without glass take the mean of valid neighbours (grown outwards); then 3x3 smoothing."""
    gh, gw, _ = bg.shape
    out = bg.copy()
    ok = valid.copy()
    if ok.sum() == 0:
        for y in range(gh):
            for x in range(gw):
                for c in range(3):
                    out[y, x, c] = white[c]
        return out
    while ok.min() == 0:
        new_ok = ok.copy()
        for y in range(gh):
            for x in range(gw):
                if ok[y, x]:
                    continue
                s0 = s1 = s2 = 0.0
                n = 0
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < gh and 0 <= xx < gw and ok[yy, xx]:
                            s0 += out[yy, xx, 0]
                            s1 += out[yy, xx, 1]
                            s2 += out[yy, xx, 2]
                            n += 1
                if n > 0:
                    out[y, x, 0] = s0 / n
                    out[y, x, 1] = s1 / n
                    out[y, x, 2] = s2 / n
                    new_ok[y, x] = 1
        ok = new_ok
    smooth = np.empty_like(out)
    for y in range(gh):
        for x in range(gw):
            for c in range(3):
                s = 0.0
                n = 0
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < gh and 0 <= xx < gw:
                            s += out[yy, xx, c]
                            n += 1
                smooth[y, x, c] = s / n
    return smooth


_OD_LUT_N = 1024


@njit(cache=True, nogil=True)
def _ink_class(r: float, g: float, b: float, rs: float, gs: float, bs: float) -> int:
    """Pen-ink class of a white-balanced colour ``(r, g, b)`` whose local mean is ``(rs, gs, bs)``."""
    mx = max(r, g, b)
    chroma = mx - min(r, g, b)
    s = chroma / mx if mx > 0 else 0.0
    cls = 0
    if s >= 0.08:
        if mx == r:
            h6 = (g - b) / chroma
            hue = 60.0 * (h6 + 6.0 if h6 < 0.0 else h6)
        elif mx == g:
            hue = 60.0 * ((b - r) / chroma + 2.0)
        else:
            hue = 60.0 * ((r - g) / chroma + 4.0)
        if (
            (70.0 <= hue < 200.0 and s >= 0.15)
            or (200.0 <= hue < 232.0 and s >= 0.25)
            or (232.0 <= hue < 260.0 and s >= 0.8)
        ):
            cls = _INK_GREEN_BLUE  # green / cyan / blue pen: hues (or purity) stains do not reach
        elif 70.0 <= hue < 200.0 or (200.0 <= hue < 232.0 and s >= 0.15):
            cls = _INK_GREEN_BLUE << _WEAK_SHIFT
        if (hue >= 340.0 or hue < 12.0) and s >= 0.6 and mx >= 0.35:
            cls = _INK_RED  # saturated red: redder and more saturated than eosin
        elif cls == 0 and (hue >= 340.0 or hue < 15.0) and s >= 0.35:
            cls = _INK_RED << _WEAK_SHIFT
    # black ink is judged on the local mean colour: dark nuclei are small, strokes are not
    mxs = max(rs, gs, bs)
    if mxs < 0.45:
        ss = (mxs - min(rs, gs, bs)) / mxs if mxs > 0 else 0.0
        if mxs < 0.25 or (mxs < 0.35 and ss < 0.4):
            cls = _INK_BLACK  # very dark and unsaturated over an area: black pen
        elif cls == 0 and ss < 0.55:
            cls = _INK_BLACK << _WEAK_SHIFT
    return cls


_FEATURE_THREADS = 2  # _features runs on this many threads over row bands (nogil kernel)
_MIN_BAND_PX = 1 << 18  # ... when the image has at least this many pixels per thread


def _features(
    rgb: np.ndarray, bg: np.ndarray, block: int, radius: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Saturation, optical density and ink class of every pixel, relative to the local glass.

    The glass colour is bilinearly interpolated between block centres. Black ink is judged on
    the mean colour of the ``(2 radius + 1)^2`` window around dark pixels. Row bands are
    computed on ``_FEATURE_THREADS`` threads (every pixel is independent of the others' results).
    """
    h, w, _ = rgb.shape
    sat = np.empty((h, w), np.float32)
    od = np.empty((h, w), np.float32)
    ink = np.zeros((h, w), np.uint8)
    n = max(1, min(_FEATURE_THREADS, (h * w) // _MIN_BAND_PX, h))
    if n == 1:
        _features_rows(rgb, bg, block, radius, 0, h, sat, od, ink)
        return sat, od, ink
    from concurrent.futures import ThreadPoolExecutor

    cuts = [h * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n, thread_name_prefix="slidepipe-tissue") as pool:
        futures = [
            pool.submit(_features_rows, rgb, bg, block, radius, a, b, sat, od, ink)
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        for fut in futures:
            fut.result()
    return sat, od, ink


@njit(cache=True, nogil=True)
def _features_rows(
    rgb: np.ndarray,
    bg: np.ndarray,
    block: int,
    radius: int,
    y_start: int,
    y_stop: int,
    sat: np.ndarray,
    od: np.ndarray,
    ink: np.ndarray,
) -> None:
    """``_features`` for rows ``[y_start, y_stop)``, into ``sat``, ``od`` and ``ink`` (zeroed)."""
    h, w, _ = rgb.shape
    gh, gw, _ = bg.shape
    inv = np.empty((gh, gw, 3), np.float64)
    for i in range(gh):
        for j in range(gw):
            for c in range(3):
                inv[i, j, c] = 1.0 / max(bg[i, j, c], 1.0)
    lut = np.empty(_OD_LUT_N + 1, np.float32)  # -log10 of a transmittance in (0, 1]
    for i in range(_OD_LUT_N + 1):
        lut[i] = -math.log10(max(i / _OD_LUT_N, 1.0 / 255.0))
    xs0 = np.empty(w, np.int64)
    xs1 = np.empty(w, np.int64)
    wxs = np.empty(w, np.float64)
    for x in range(w):
        fx = (x + 0.5) / block - 0.5
        x0 = min(max(int(math.floor(fx)), 0), gw - 1)
        xs0[x] = x0
        xs1[x] = min(x0 + 1, gw - 1)
        wxs[x] = min(max(fx - x0, 0.0), 1.0)
    for y in range(y_start, y_stop):
        fy = (y + 0.5) / block - 0.5
        y0 = min(max(int(math.floor(fy)), 0), gh - 1)
        y1 = min(y0 + 1, gh - 1)
        wy = min(max(fy - y0, 0.0), 1.0)
        row = np.empty((gw, 3), np.float64)  # 1/glass along this row, interpolated in y
        for j in range(gw):
            for c in range(3):
                row[j, c] = (1.0 - wy) * inv[y0, j, c] + wy * inv[y1, j, c]
        for x in range(w):
            x0, x1, wx = xs0[x], xs1[x], wxs[x]
            i0 = (1.0 - wx) * row[x0, 0] + wx * row[x1, 0]
            i1 = (1.0 - wx) * row[x0, 1] + wx * row[x1, 1]
            i2 = (1.0 - wx) * row[x0, 2] + wx * row[x1, 2]
            r = min((rgb[y, x, 0] + 0.5) * i0, 1.0)
            g = min((rgb[y, x, 1] + 0.5) * i1, 1.0)
            b = min((rgb[y, x, 2] + 0.5) * i2, 1.0)
            od[y, x] = lut[int(r * _OD_LUT_N)] + lut[int(g * _OD_LUT_N)] + lut[int(b * _OD_LUT_N)]
            mx = max(r, g, b)
            s = (mx - min(r, g, b)) / mx
            sat[y, x] = s
            rs = gs = bs = 1.0
            if mx < 0.6:  # dark: black ink is judged on the mean colour around the pixel
                ya, yb = max(y - radius, 0), min(y + radius + 1, h)
                xa, xb = max(x - radius, 0), min(x + radius + 1, w)
                a0 = a1 = a2 = 0
                for yy in range(ya, yb):
                    for xx in range(xa, xb):
                        a0 += rgb[yy, xx, 0]
                        a1 += rgb[yy, xx, 1]
                        a2 += rgb[yy, xx, 2]
                inv_n = 1.0 / ((yb - ya) * (xb - xa))
                rs = min((a0 * inv_n + 0.5) * i0, 1.0)
                gs = min((a1 * inv_n + 0.5) * i1, 1.0)
                bs = min((a2 * inv_n + 0.5) * i2, 1.0)
            if s >= 0.08 or max(rs, gs, bs) < 0.45:
                ink[y, x] = _ink_class(r, g, b, rs, gs, bs)


@njit(cache=True, nogil=True)
def _otsu(values: np.ndarray, ink: np.ndarray, strokes: np.ndarray, nbins: int) -> float:
    """Otsu threshold of ``values`` in [0, 1] over pixels that are neither strong ink nor stroke."""
    h, w = values.shape
    hist = np.zeros(nbins, np.float64)
    for y in range(h):
        for x in range(w):
            if (ink[y, x] & _INK_STRONG) == 0 and strokes[y, x] == 0:
                v = values[y, x]
                i = min(max(int(v * nbins), 0), nbins - 1)
                hist[i] += 1.0
    total = hist.sum()
    if total == 0:
        return 0.5
    sum_all = 0.0
    for i in range(nbins):
        sum_all += (i + 0.5) * hist[i]
    w0 = 0.0
    sum0 = 0.0
    best, best_t = -1.0, 0
    for i in range(nbins - 1):
        w0 += hist[i]
        sum0 += (i + 0.5) * hist[i]
        w1 = total - w0
        if w0 == 0 or w1 == 0:
            continue
        m0 = sum0 / w0
        m1 = (sum_all - sum0) / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, best_t = between, i
    return (best_t + 1) / nbins


@njit(cache=True, nogil=True)
def _threshold(
    sat: np.ndarray, od: np.ndarray, ink: np.ndarray, strokes: np.ndarray, sat_t: float, od_t: float
) -> np.ndarray:
    """Tissue candidates: saturated and darker than the glass, not ink."""
    h, w = sat.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            if (
                sat[y, x] >= sat_t
                and od[y, x] >= od_t
                and (ink[y, x] & _INK_STRONG) == 0
                and strokes[y, x] == 0
            ):
                out[y, x] = 1
    return out


@njit(cache=True, nogil=True)
def _disk_half_widths(radius: int) -> np.ndarray:
    half = np.empty(2 * radius + 1, np.int64)
    for dy in range(-radius, radius + 1):
        half[dy + radius] = int(math.floor(math.sqrt(radius * radius - dy * dy) + 1e-9))
    return half


@njit(cache=True, nogil=True)
def _dilate_value(mask: np.ndarray, value: int, radius: int, paint: int) -> np.ndarray:
    """``paint`` where a digital disk of ``radius`` around the pixel meets a pixel equal to
    ``value``, ``1 - paint`` elsewhere.

    Each horizontal run of ``value`` paints one widened run per disk row (a memset each), so the
    cost follows the number of runs, not pixels x disk area.
    """
    h, w = mask.shape
    half = _disk_half_widths(radius)
    out = np.zeros((h, w), np.uint8) if paint else np.ones((h, w), np.uint8)
    for y in range(h):
        x = 0
        while x < w:
            if mask[y, x] != value:
                x += 1
                continue
            x0 = x
            while x < w and mask[y, x] == value:
                x += 1
            for dy in range(-radius, radius + 1):
                yy = y + dy
                if 0 <= yy < h:
                    k = half[dy + radius]
                    out[yy, max(x0 - k, 0) : min(x + k, w)] = paint
    return out


@njit(cache=True, nogil=True)
def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a digital disk (pixels outside the image count as background)."""
    if radius <= 0:
        return mask.copy()
    return _dilate_value(mask, 1, radius, 1)


@njit(cache=True, nogil=True)
def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a digital disk (pixels outside the image count as foreground)."""
    if radius <= 0:
        return mask.copy()
    return _dilate_value(mask, 0, radius, 0)


@njit(cache=True, nogil=True)
def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@njit(cache=True, nogil=True)
def _runs(mask: np.ndarray, value: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of pixels equal to ``value``: ``row, start, end`` (exclusive) and, per row,
    the index of its first run (``row_first[h]`` is the total)."""
    h, w = mask.shape
    n = 0
    for y in range(h):
        prev = False
        for x in range(w):
            cur = mask[y, x] == value
            if cur and not prev:
                n += 1
            prev = cur
    row = np.empty(n, np.int32)
    start = np.empty(n, np.int32)
    end = np.empty(n, np.int32)
    row_first = np.empty(h + 1, np.int64)
    k = 0
    for y in range(h):
        row_first[y] = k
        x = 0
        while x < w:
            if mask[y, x] == value:
                x0 = x
                while x < w and mask[y, x] == value:
                    x += 1
                row[k], start[k], end[k] = y, x0, x
                k += 1
            else:
                x += 1
    row_first[h] = k
    return row, start, end, row_first


@njit(cache=True, nogil=True)
def _label_runs(
    row: np.ndarray, start: np.ndarray, end: np.ndarray, row_first: np.ndarray, w: int, eight: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of runs (union-find on runs that overlap the previous row's).

    Returns the component of each run (0..n-1), ``areas[n]`` and ``touches_border[n]``.
    """
    n = row.shape[0]
    h = row_first.shape[0] - 1
    parent = np.arange(n).astype(np.int64)
    slack = 1 if eight else 0
    for y in range(1, h):
        a, a_end = row_first[y - 1], row_first[y]
        for k in range(row_first[y], row_first[y + 1]):
            s0, e0 = start[k] - slack, end[k] + slack
            while a < a_end and end[a] <= s0:
                a += 1
            j = a
            while j < a_end and start[j] < e0:
                ra, rb = _find(parent, k), _find(parent, j)
                if ra != rb:
                    if ra < rb:
                        parent[rb] = ra
                    else:
                        parent[ra] = rb
                j += 1
    comp = np.empty(n, np.int64)
    remap = np.full(n, -1, np.int64)
    m = 0
    for k in range(n):
        r = _find(parent, k)
        if remap[r] < 0:
            remap[r] = m
            m += 1
        comp[k] = remap[r]
    areas = np.zeros(m, np.int64)
    border = np.zeros(m, np.uint8)
    for k in range(n):
        c = comp[k]
        areas[c] += end[k] - start[k]
        if row[k] == 0 or row[k] == h - 1 or start[k] == 0 or end[k] == w:
            border[c] = 1
    return comp, areas, border


@njit(cache=True, nogil=True)
def _fill_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background components (4-connected) that do not touch the border and are smaller than
    ``max_hole_px``."""
    h, w = mask.shape
    row, start, end, first = _runs(mask, 0)
    comp, areas, border = _label_runs(row, start, end, first, w, False)
    out = mask.copy()
    for k in range(row.shape[0]):
        c = comp[k]
        if border[c] == 0 and areas[c] < max_hole_px:
            out[row[k], start[k] : end[k]] = 1
    return out


@njit(cache=True, nogil=True)
def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected foreground components smaller than ``min_px``."""
    h, w = mask.shape
    row, start, end, first = _runs(mask, 1)
    comp, areas, _ = _label_runs(row, start, end, first, w, True)
    out = np.zeros_like(mask)
    for k in range(row.shape[0]):
        if areas[comp[k]] >= min_px:
            out[row[k], start[k] : end[k]] = 1
    return out


@njit(cache=True, nogil=True)
def _ink_strokes_kernel(ink: np.ndarray, min_px: float, shift: int) -> np.ndarray:
    """Per colour class: strong-ink components (8-connected) of at least ``min_px`` pixels, grown
    into the touching faint ink of the same class (``class << shift``): hysteresis."""
    h, w = ink.shape
    out = np.zeros((h, w), np.uint8)
    counts = np.zeros(256, np.int64)
    for y in range(h):
        for x in range(w):
            counts[ink[y, x]] += 1
    cls = 1
    while cls < (1 << shift):
        weak = cls << shift
        if counts[cls] >= min_px:
            # strong components big enough to be strokes are the seeds
            row, start, end, first = _runs(ink, cls)
            comp, areas, _ = _label_runs(row, start, end, first, w, True)
            seed = np.zeros((h, w), np.uint8)
            fam = np.zeros((h, w), np.uint8)
            for k in range(row.shape[0]):
                if areas[comp[k]] >= min_px:
                    seed[row[k], start[k] : end[k]] = 1
            for y in range(h):
                for x in range(w):
                    v = ink[y, x]
                    if v == cls or v == weak:  # noqa: SIM109 (Numba kernel)
                        fam[y, x] = 1
            # family components (strong or faint ink of this colour) that hold a seed
            row, start, end, first = _runs(fam, 1)
            comp, areas, _ = _label_runs(row, start, end, first, w, True)
            hit = np.zeros(areas.shape[0], np.uint8)
            for k in range(row.shape[0]):
                c = comp[k]
                if hit[c]:
                    continue
                for x in range(start[k], end[k]):
                    if seed[row[k], x]:
                        hit[c] = 1
                        break
            for k in range(row.shape[0]):
                if hit[comp[k]]:
                    out[row[k], start[k] : end[k]] = 1
        cls <<= 1
    return out


@njit(cache=True, nogil=True)
def _and_not(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h, w = a.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            if a[y, x] != 0 and b[y, x] == 0:
                out[y, x] = 1
    return out


@njit(cache=True, nogil=True)
def _box_reduce(rgb: np.ndarray, f: int) -> np.ndarray:
    """Area-average an RGB uint8 image by an integer factor (the edge remainder is dropped)."""
    h, w, _ = rgb.shape
    oh, ow = h // f, w // f
    out = np.empty((oh, ow, 3), np.uint8)
    inv = 1.0 / (f * f)
    for y in range(oh):
        for x in range(ow):
            for c in range(3):
                s = 0.0
                for dy in range(f):
                    for dx in range(f):
                        s += rgb[y * f + dy, x * f + dx, c]
                out[y, x, c] = np.uint8(min(255.0, s * inv + 0.5))
    return out


# ============================== Python API =====================================================


@dataclass(frozen=True)
class _Params:
    mpp: float
    min_tissue_area_mm2: float
    min_hole_area_mm2: float
    remove_pen: bool

    @property
    def px_area_mm2(self) -> float:
        return (self.mpp * 1e-3) ** 2

    def radius(self, um: float) -> int:
        return int(min(max(round(um / self.mpp), 1), _RADIUS_PX_MAX))

    def area_px(self, mm2: float) -> float:
        return mm2 / self.px_area_mm2

    @property
    def block(self) -> int:
        lo, hi = _BLOCK_PX
        return int(min(max(round(_BLOCK_UM / self.mpp), lo), hi))


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise ValueError(
            f"expected an RGB(A) uint8 image (h, w, 3|4), got shape {arr.shape} dtype {arr.dtype}; "
            "convert it first (e.g. np.asarray(PIL.Image.open(p).convert('RGB')))"
        )
    if arr.shape[2] == 4:  # composite on white
        rgb = arr[..., :3].astype(np.uint16)
        alpha = arr[..., 3:4].astype(np.uint16)
        arr = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def pen_ink_mask(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Boolean mask of pen-ink strokes (green, blue, red, black) in an RGB thumbnail at ``mpp`` µm/px."""
    rgb = _as_rgb(rgb)
    p = _Params(mpp, 0.0, 0.0, True)
    _, _, ink = tissue_features(rgb, mpp)
    return _ink_strokes(ink, p).astype(bool)


def tissue_features(rgb: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel ``(saturation, optical_density, ink_class)`` relative to the local glass colour.

    ``ink_class`` is 0 (none), 1 (green/blue pen), 2 (red pen), 4 (black: dark and unsaturated),
    or that class shifted up three bits (8, 16, 32) for faint ink of the colour, which counts only
    where it touches a stroke.
    """
    rgb = _as_rgb(rgb)
    block = _Params(mpp, 0.0, 0.0, True).block
    white = _glass_white(rgb)
    bg, valid = _block_background(rgb, block, white)
    bg = _fill_blocks(bg, valid, white)
    radius = int(min(max(round(_BLACK_SMOOTH_UM / mpp), 0), _RADIUS_PX_MAX))
    return _features(rgb, bg, block, radius)


def _ink_strokes(ink: np.ndarray, p: _Params) -> np.ndarray:
    """Pen strokes: per colour, strong-ink components of a minimum area grown into the touching
    faint ink of the same colour (hysteresis); then dilated a little."""
    min_px = max(_MIN_INK_PX, p.area_px(_MIN_INK_AREA_MM2))
    out = _ink_strokes_kernel(ink, min_px, _WEAK_SHIFT)
    if not out.any():
        return out
    return _dilate(out, p.radius(_INK_DILATE_UM))


def _segment(rgb: np.ndarray, p: _Params) -> tuple[np.ndarray, dict[str, Any]]:
    sat, od, ink = tissue_features(rgb, p.mpp)
    if p.remove_pen:
        ink_px = _ink_strokes(ink, p)
    else:
        ink_px = np.zeros(sat.shape, np.uint8)
        ink = ink_px  # ink is tissue like anything else
    otsu = _otsu(sat, ink, ink_px, 256)
    sat_t = float(min(max(otsu, _SAT_CLAMP[0]), _SAT_CLAMP[1]))
    mask = _threshold(sat, od, ink, ink_px, sat_t, _OD_MIN)
    r_close, r_open = p.radius(_CLOSE_UM), p.radius(_OPEN_UM)
    mask = _erode(_dilate(mask, r_close), r_close)  # close: join lacy stroma, fat septa
    mask = _dilate(_erode(mask, r_open), r_open)  # open: drop specks and threads
    mask = _fill_holes(mask, p.area_px(p.min_hole_area_mm2))
    mask = _remove_small(mask, max(1.0, p.area_px(p.min_tissue_area_mm2)))
    if p.remove_pen and ink_px.any():
        mask = _remove_small(_and_not(mask, ink_px), max(1.0, p.area_px(p.min_tissue_area_mm2)))
    info = {
        "otsu_saturation": float(otsu),
        "saturation_threshold": sat_t,
        "ink_fraction": float(ink_px.mean()),
    }
    return mask.astype(bool), info


@dataclass
class TissueMask:
    """A boolean tissue mask at a known resolution, mapped to the slide's level-0 pixels.

    ``scale`` is level-0 pixels per mask pixel ``(sx, sy)``; mask pixel ``(i, j)`` covers
    level-0 ``x in [j*sx, (j+1)*sx)``, ``y in [i*sy, (i+1)*sy)``.
    """

    mask: np.ndarray
    mpp: float
    scale: tuple[float, float]
    slide_dimensions: tuple[int, int]
    thumbnail: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Fraction of the mask area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm²."""
        return float(self.mask.sum()) * (self.mpp * 1e-3) ** 2

    def polygons(self, *, tolerance: float = 0.75) -> list[list[np.ndarray]]:
        """Polygons in level-0 pixels: one ``[outer, hole, ...]`` ring list per tissue component.

        Rings are closed ``(n, 2)`` float arrays of ``(x, y)``; ``tolerance`` (mask pixels) is the
        Douglas–Peucker simplification.
        """
        from skimage.measure import approximate_polygon, find_contours, label, regionprops

        sx, sy = self.scale
        out: list[list[np.ndarray]] = []
        labels = label(self.mask, connectivity=2)
        for region in regionprops(labels):
            r0, c0, r1, c1 = region.bbox
            crop = np.pad(labels[r0:r1, c0:c1] == region.label, 1)
            rings = []
            for contour in find_contours(crop.astype(np.float32), 0.5, fully_connected="high"):
                simple = approximate_polygon(contour, tolerance)
                contour = simple if len(simple) >= 4 else contour  # thin slivers: keep all points
                if len(contour) < 4:
                    continue
                rows = contour[:, 0] - 1 + r0
                cols = contour[:, 1] - 1 + c0
                ring = np.stack([(cols + 0.5) * sx, (rows + 0.5) * sy], axis=1)
                rings.append(ring)
            if not rings:
                continue
            areas = [_signed_area(r) for r in rings]
            outer = int(np.argmax(np.abs(areas)))
            ordered = [rings[outer]] + [r for i, r in enumerate(rings) if i != outer]
            out.append(ordered)
        return out

    def to_geojson(self) -> dict[str, Any]:
        """A QuPath-compatible GeoJSON FeatureCollection of the tissue, in level-0 pixels."""
        polys = []
        for rings in self.polygons():
            fixed = []
            for i, ring in enumerate(rings):
                ccw = _signed_area(ring) > 0
                if (i == 0) != ccw:  # RFC 7946: exterior counter-clockwise, holes clockwise
                    ring = ring[::-1]
                fixed.append([[round(float(x), 2), round(float(y), 2)] for x, y in ring])
            polys.append(fixed)
        features = []
        if polys:
            geometry = (
                {"type": "Polygon", "coordinates": polys[0]}
                if len(polys) == 1
                else {"type": "MultiPolygon", "coordinates": polys}
            )
            features.append(
                {
                    "type": "Feature",
                    "geometry": geometry,
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": "Tissue", "color": [0, 160, 0]},
                        "isLocked": False,
                        "measurements": {"area_mm2": round(self.area_mm2, 6)},
                    },
                }
            )
        return {"type": "FeatureCollection", "features": features}

    def save_geojson(self, path: str | Path) -> Path:
        """Write :meth:`to_geojson` to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_geojson()))
        return path

    def save_overlay(self, path: str | Path, *, grid: Any = None, max_side: int = 2048) -> Path:
        """Draw the tissue contours (and a ``TileGrid``'s patch boxes) on the thumbnail as a PNG."""
        from PIL import Image, ImageDraw

        h, w = self.mask.shape
        if self.thumbnail is not None:
            base = Image.fromarray(self.thumbnail)
        else:
            base = Image.fromarray(np.where(self.mask, 200, 255).astype(np.uint8)).convert("RGB")
        zoom = min(1.0, max_side / max(h, w))
        zoom = max(zoom, min(4.0, 512 / max(h, w)))  # small thumbnails are enlarged to be legible
        size = (max(1, round(w * zoom)), max(1, round(h * zoom)))
        base = base.resize(size, Image.Resampling.LANCZOS if zoom < 1 else Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(base, "RGBA")
        sx, sy = self.scale
        fx, fy = zoom / sx, zoom / sy  # level-0 px → overlay px
        if grid is not None and len(grid):
            side = float(grid.patch_size_level0)
            for x, y in np.asarray(grid.coords):
                draw.rectangle(
                    [x * fx, y * fy, (x + side) * fx, (y + side) * fy],
                    outline=(0, 90, 255, 200),
                    width=1,
                )
        line = max(2, round(max(size) / 400))
        for rings in self.polygons():
            for i, ring in enumerate(rings):
                pts = [(float(x) * fx, float(y) * fy) for x, y in ring]
                draw.line(pts, fill=(0, 200, 0, 255) if i == 0 else (255, 140, 0, 255), width=line)
        path = Path(path)
        base.save(path)
        return path


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _thumbnail_mpp(long_side_um: float, level0_mpp: float, target_mpp: float, min_px: int) -> float:
    """``target_mpp``, made finer (never finer than level 0) when the thumbnail would be tiny."""
    if min_px <= 0:
        return max(target_mpp, level0_mpp)
    return max(level0_mpp, min(target_mpp, long_side_um / min_px))


def detect_tissue(
    source: Any,
    *,
    mpp: float | None = None,
    target_mpp: float = 8.0,
    remove_pen: bool = True,
    min_tissue_area_mm2: float = 0.0005,
    min_hole_area_mm2: float = 0.01,
    min_thumbnail_px: int = 1024,
    slide_dimensions: tuple[int, int] | None = None,
) -> TissueMask:
    """Find tissue in a slide, or in an RGB image with its resolution.

    Parameters
    ----------
    source
        A ``wsi.slide.Slide`` (its ``thumbnail_at_mpp`` is read) or an RGB(A) ``uint8`` array.
    mpp
        µm/px of ``source`` when it is an array (required then).
    target_mpp
        Resolution of the analysis (default 8 µm/px). When the slide is so small that the
        thumbnail's long side would be under ``min_thumbnail_px``, a finer resolution is used
        (never finer than the source).
    remove_pen
        Remove green, blue, red and black pen ink (and dark dust) from the mask.
    min_tissue_area_mm2, min_hole_area_mm2
        Tissue pieces smaller than this are dropped; holes larger than this are kept.
    slide_dimensions
        For an array: the level-0 size ``(w, h)`` it depicts (default: the array itself is level 0).

    Returns an empty mask (not an error) when there is no tissue.
    """
    if hasattr(source, "thumbnail_at_mpp"):
        w0, h0 = source.dimensions
        s_mpp = float(source.mpp)
        use = _thumbnail_mpp(max(w0, h0) * s_mpp, s_mpp, target_mpp, min_thumbnail_px)
        thumb, mx, my = source.thumbnail_at_mpp(use)
        rgb = _as_rgb(thumb)
        mask_mpp = float(math.sqrt(mx * my))
        dims = (int(w0), int(h0))
    else:
        if mpp is None or not mpp > 0:
            raise ValueError(
                "detect_tissue(array) needs mpp=<µm per pixel of the array>, e.g. mpp=8.0"
            )
        rgb = _as_rgb(source)
        h, w = rgb.shape[:2]
        dims = (
            (w, h)
            if slide_dimensions is None
            else (int(slide_dimensions[0]), int(slide_dimensions[1]))
        )
        mask_mpp = float(mpp)
        use = _thumbnail_mpp(max(h, w) * mpp, mpp, target_mpp, min_thumbnail_px)
        factor = int(use / mpp + 1e-6)
        if factor >= 2 and min(h, w) // factor >= 1:
            rgb = _box_reduce(rgb, factor)
            mask_mpp = mpp * factor
    h, w = rgb.shape[:2]
    if w == 0 or h == 0:
        raise ValueError("detect_tissue: empty image")
    # level-0 px per mask px; an integer box-reduce drops the remainder, so use the exact factor
    if hasattr(source, "thumbnail_at_mpp"):
        scale = (dims[0] / w, dims[1] / h)
    else:
        arr_h, arr_w = np.asarray(source).shape[:2]
        f = round(mask_mpp / float(mpp))
        scale = (dims[0] / arr_w * f, dims[1] / arr_h * f)
    params = _Params(mask_mpp, min_tissue_area_mm2, min_hole_area_mm2, remove_pen)
    mask, info = _segment(rgb, params)
    info["thumbnail_mpp"] = mask_mpp
    tm = TissueMask(
        mask=mask, mpp=mask_mpp, scale=scale, slide_dimensions=dims, thumbnail=rgb, info=info
    )
    logger.debug(
        "tissue: %.1f%% of %dx%d px at %.2f µm/px (%s)", 100 * tm.fraction, w, h, mask_mpp, info
    )
    return tm
