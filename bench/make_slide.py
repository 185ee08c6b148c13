"""Write a realistic gigapixel pyramidal TIFF for benchmarks (Aperio-style, JPEG, 256 px tiles).

Tissue islands are mosaics of the tissue-dense parts of the real slides in
``../shared/slides/real`` (a TCGA frozen section and H&E skin; each island repeats one source
from its own offset) laid on flat glass; islands come from a smoothed random field thresholded
to the requested tissue fraction, with soft edges. The texture is the source pixels as they are
(not rescaled), so JPEG tiles carry real-tissue entropy; ``--mpp`` is written as the scan
resolution (``MPP``/``AppMag`` in the Aperio description).

Levels are Aperio-style (downsample 4 per level, down to ~1-2k px, plus a stripped thumbnail
page) and rendered independently from box-downsampled sources, so each level matches the one
above it. OpenSlide opens the result as vendor ``aperio``. Tiles stream from a generator into
``tifffile`` (bounded memory), which JPEG-encodes them on ``--workers`` threads; measured
~1 Gpx/min on 2 heavily shared cores, so a 2-Gpx slide takes a few minutes at most.

    python bench/make_slide.py /tmp/big.svs --width 100000 --height 80000 --mpp 0.25
    python bench/make_slide.py /tmp/small.svs --quick
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import openslide
import tifffile
from scipy import ndimage

TILE = 256
CELL = 32  # level-0 px per cell of the island field
SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "slides" / "real"
# source slide and its tissue-dense box (x0, y0, x1, y1) in level-0 px
SOURCES = (
    ("tcga-cr-7395-01a-01-ts1.svs", (512, 640, 3968, 3200)),
    ("cmu-1-small-region.svs", (768, 768, 1664, 2944)),
)
GLASS = np.array([243, 242, 244], np.uint8)
GLASS16 = GLASS.astype(np.uint16)


def _box_down(img: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks (dimensions must be multiples of f)."""
    if f == 1:
        return img
    h, w = img.shape[:2]
    rest = img.shape[2:]
    out = img.reshape(h // f, f, w // f, f, *rest).mean(axis=(1, 3))
    return out.round().astype(img.dtype) if img.dtype == np.uint8 else out.astype(img.dtype)


def load_sources(max_levels: int) -> list[np.ndarray]:
    """Level-0 RGB of each source's tissue box, cropped to a multiple of 4**(levels-1)."""
    m = 4 ** (max_levels - 1)
    out = []
    for name, (x0, y0, x1, y1) in SOURCES:
        w, h = max(m, (x1 - x0) // m * m), max(m, (y1 - y0) // m * m)
        with openslide.OpenSlide(SLIDES / name) as s:
            rgb = np.asarray(s.read_region((x0, y0), 0, (w, h)).convert("RGB"))
        out.append(rgb)
    return out


def island_field(width: int, height: int, fraction: float, seed: int) -> tuple[np.ndarray, float]:
    """Smooth random field at 1/CELL scale and the threshold giving ``fraction`` above it."""
    rng = np.random.default_rng(seed)
    ch, cw = -(-height // CELL), -(-width // CELL)
    coarse = (max(ch // 8, 8), max(cw // 8, 8))  # 256 px cells
    noise = ndimage.gaussian_filter(
        rng.standard_normal(coarse), sigma=max(coarse) / 14, mode="wrap"
    )
    fine = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma=max(coarse) / 60, mode="wrap")
    field = noise / noise.std() + 0.35 * fine / fine.std()
    field = ndimage.zoom(field, (ch / coarse[0], cw / coarse[1]), order=1)[:ch, :cw]
    field = np.pad(
        field, ((0, max(0, ch - field.shape[0])), (0, max(0, cw - field.shape[1]))), mode="edge"
    )
    thr = float(np.quantile(field, 1.0 - fraction))
    return field.astype(np.float32), thr


def _interp_weights() -> tuple[np.ndarray, np.ndarray]:
    """Bilinear sample positions of tile pixels in a cell block with a 1-cell margin: (i0, t)."""
    n = TILE // CELL + 2
    pos = (np.arange(TILE) + 0.5) / CELL - 0.5 + 1
    i0 = np.clip(np.floor(pos).astype(np.intp), 0, n - 2)
    return i0, (pos - i0).astype(np.float32)


def _upsample(blk: np.ndarray, i0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Separable bilinear upsampling of a cell block to a tile (no BLAS: tiny matmuls are slow
    under thread contention)."""
    rows = blk[i0] * (1 - t)[:, None] + blk[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


class LevelRenderer:
    """Renders 256 x 256 tiles of one pyramid level."""

    def __init__(self, sources, field, labels, thr, f, width, height, seed, edge):
        self.f = f
        self.w, self.h = width // f, height // f
        # field in cells of CELL level-f px: block-mean of the level-0 field by f
        fh, fw = field.shape
        ph, pw = -(-fh // f) * f, -(-fw // f) * f
        fld = np.pad(field, ((0, ph - fh), (0, pw - fw)), mode="edge")
        lab = np.pad(labels, ((0, ph - fh), (0, pw - fw)), mode="edge")
        self.field = np.pad(_box_down(fld, f), 1, mode="edge")
        self.labels = lab.reshape(ph // f, f, pw // f, f).max(axis=(1, 3))
        self.thr, self.edge = thr, edge
        self.srcs = [
            np.pad(_box_down(s, f), ((0, TILE), (0, TILE), (0, 0)), mode="wrap") for s in sources
        ]
        self.sizes = [(s.shape[0] // f, s.shape[1] // f) for s in sources]
        rng = np.random.default_rng(seed)
        n = int(labels.max()) + 1
        self.choice = rng.integers(0, len(sources), n)
        self.offset = rng.integers(0, 1 << 20, (n, 2))
        self.i0, self.t = _interp_weights()
        self.glass = np.broadcast_to(GLASS, (TILE, TILE, 3))

    def tile(self, tx: int, ty: int) -> np.ndarray:
        k = TILE // CELL
        blk = self.field[ty * k : ty * k + k + 2, tx * k : tx * k + k + 2]
        lo, hi = self.thr - self.edge, self.thr + self.edge
        if blk.size == 0 or blk.max() <= lo:
            return self.glass
        lab = self.labels[ty * k : ty * k + k, tx * k : tx * k + k]
        i = int(lab.max())
        s = int(self.choice[i])
        sh, sw = self.sizes[s]
        oy = (ty * TILE + int(self.offset[i, 0])) % sh
        ox = (tx * TILE + int(self.offset[i, 1])) % sw
        tissue = self.srcs[s][oy : oy + TILE, ox : ox + TILE]
        if blk.shape == (k + 2, k + 2) and blk.min() >= hi:
            return tissue
        if blk.shape != (k + 2, k + 2):
            blk = np.pad(blk, ((0, k + 2 - blk.shape[0]), (0, k + 2 - blk.shape[1])), mode="edge")
        a = _upsample(blk, self.i0, self.t)
        a = (np.clip((a - lo) * (256.0 / (hi - lo)), 0.0, 256.0) + 0.5).astype(np.uint16)[..., None]
        out = tissue * a  # uint16 fixed-point blend with the glass
        out += GLASS16 * (256 - a)
        out += 128
        return (out >> 8).astype(np.uint8)

    def tiles(self):
        for ty in range(-(-self.h // TILE)):
            for tx in range(-(-self.w // TILE)):
                yield self.tile(tx, ty)


def make_slide(
    path: str | Path,
    *,
    width: int = 100_000,
    height: int = 80_000,
    mpp: float = 0.25,
    tissue_fraction: float = 0.4,
    quality: int = 80,
    levels: int | None = None,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Write the slide; returns its path."""
    path = Path(path)
    if levels is None:  # Aperio: downsample 4 per level down to ~1-2k px
        levels = 1
        while max(width, height) // 4**levels >= 1000:
            levels += 1
    sources = load_sources(levels)
    field, thr = island_field(width, height, tissue_fraction, seed)
    labels, _ = ndimage.label(field > thr)
    edge = 0.08 * float(field.std())
    workers = workers or os.cpu_count() or 1
    mag = round(10.0 / mpp)
    head = "Aperio Image Library v12.0.0 \r\n"
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality},
        metadata=None,
        maxworkers=workers,
    )
    renderers = [
        LevelRenderer(sources, field, labels, thr, 4**k, width, height, seed, edge)
        for k in range(levels)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for k, r in enumerate(renderers):
            if k == 0:
                desc = (
                    f"{head}{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
                    f"JPEG/RGB Q={quality}|AppMag = {mag}|MPP = {mpp:.4f}"
                )
            else:
                desc = f"{head}{width}x{height} -> {r.w}x{r.h} - |AppMag = {mag}|MPP = {mpp:.4f}"
            tif.write(
                r.tiles(),
                shape=(r.h, r.w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                description=desc,
                subfiletype=0 if k == 0 else 1,
                **common,
            )
            if k == 0:  # Aperio keeps a stripped thumbnail as the second page
                low = renderers[-1]
                thumb = np.concatenate(
                    [
                        np.concatenate(
                            [low.tile(tx, ty) for tx in range(-(-low.w // TILE))], axis=1
                        )
                        for ty in range(-(-low.h // TILE))
                    ]
                )[: low.h, : low.w]
                step = max(1, max(low.w, low.h) // 768)
                tif.write(
                    np.ascontiguousarray(thumb[::step, ::step]),
                    rowsperstrip=16,
                    description=f"{head}{width}x{height} -> thumbnail",
                    **common,
                )
    return path


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=100_000)
    p.add_argument("--height", type=int, default=80_000)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--tissue-fraction", type=float, default=0.4)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workers", type=int, default=None, help="JPEG encoder threads (default: all cores)"
    )
    p.add_argument(
        "--quick", action="store_true", help="small slide (12,000 x 9,000) for a smoke run"
    )
    a = p.parse_args()
    if a.quick:
        a.width, a.height = 12_000, 9_000
    t0 = time.perf_counter()
    make_slide(
        a.out,
        width=a.width,
        height=a.height,
        mpp=a.mpp,
        tissue_fraction=a.tissue_fraction,
        quality=a.quality,
        seed=a.seed,
        workers=a.workers,
    )
    dt = time.perf_counter() - t0
    gp = a.width * a.height / 1e9
    size = a.out.stat().st_size / 2**20
    print(
        f"wrote {a.out}: {a.width} x {a.height} px ({gp:.2f} Gpx) at {a.mpp} um/px, "
        f"{size:.0f} MiB in {dt:.1f} s ({gp / dt * 60:.1f} Gpx/min, {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
