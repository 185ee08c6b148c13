"""Read a slide's grid patches fast: each stored tile decoded once, threads within a slide.

Two ways to get pixels, chosen per slide:

- **direct** (tiled RGB TIFF: Aperio SVS, generic pyramidal TIFF; JPEG, JPEG 2000, Deflate, ...):
  stored tiles are read with ``os.pread`` and decoded with imagecodecs (see ``wsi.tiff_tiles``).
  Every tile the grid touches is decoded once: a shared cache holds a decoded tile until the last
  patch that needs it has been cut (reference counts planned from the grid), so memory stays at
  about one row of tiles plus the batches in flight. Output is bit-identical to OpenSlide's
  ``read_region`` at levels with an integer downsample; at open, the first stored tile is
  checked against the backend and any disagreement (a vendor colour-space quirk) switches the
  slide to region reads.
- **region** (any other format OpenSlide or tiffslide opens): runs of neighbouring patches in a
  row are read in one ``Slide.read_region`` call (the backend's tile cache serves tiles shared
  with the next row); one slide handle per thread.

When the grid's mpp is not a pyramid level, patches are read at the read level and shrunk with
an area (box) filter (``wsi.resample``): anti-aliased and within a few grey levels of the Lanczos
``Slide.read_region_mpp``. For integer factors with tile-aligned patches (0.5 µm/px from a
0.25 base) each stored tile is reduced once by a Numba kernel (~0.03 ms per 256 px tile, vs
~3 ms per 448 px patch for Pillow Lanczos), and patches are cut from the reduced tiles.
Missing stored tiles and pixels outside the level are white, as in ``Slide.read_region``.

``PatchReader`` yields :class:`PatchBatch` in grid order with a bounded number of batches in
flight; ``patches_dask_array`` is a lazy ``dask.array`` view ``(N, H, W, 3)``; ``prefetch`` runs
any iterator in a background thread so a consumer (the encoder) never waits.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from wsi.errors import CorruptTileError
from wsi.patch_cut import cut_tile_rows
from wsi.resample import box_reduce, resize_patch
from wsi.tiff_tiles import (
    DIRECT_OPENSLIDE_VENDORS,
    TiffLevel,
    TiffTileSource,
    TileDecodeError,
)

if TYPE_CHECKING:
    import dask.array

    from wsi.slide import Slide
    from wsi.tiling import TileGrid

logger = logging.getLogger(__name__)

T = TypeVar("T")
MAX_RUN_PX = 8192  # widest region read in one backend call (region mode)


@dataclass(frozen=True)
class PatchBatch:
    """``images (B, H, W, 3) uint8``, level-0 ``coords (B, 2) int64``, grid ``indices (B,) int64``."""

    images: np.ndarray
    coords: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class ReadSpec:
    """What to read for a grid, independent of the grid's arrays (small; ships to Dask workers)."""

    path: Path
    level: int
    downsample: float
    size_read: int  # px at the read level
    patch_size: int  # px delivered
    backend: str = "auto"
    mpp: float | None = None
    direct: bool = True

    @classmethod
    def from_grid(
        cls,
        path: Path,
        grid: TileGrid,
        *,
        backend: str = "auto",
        mpp: float | None = None,
        direct: bool = True,
    ) -> ReadSpec:
        return cls(
            path=Path(path),
            level=int(grid.read_level),
            downsample=float(grid.read_downsample),
            size_read=int(grid.patch_size_read),
            patch_size=int(grid.patch_size),
            backend=backend,
            mpp=mpp,
            direct=direct,
        )

    @property
    def needs_resize(self) -> bool:
        return self.size_read != self.patch_size

    @property
    def scale(self) -> float:
        """Level-0 px per read-level px. Pyramids are built by integer factors; a reported
        downsample like 4.00012 only reflects odd level sizes, so it snaps to the integer."""
        k = round(self.downsample)
        return float(k) if k >= 1 and abs(self.downsample - k) <= 1e-3 * k else self.downsample

    def read_positions(self, coords: np.ndarray) -> np.ndarray:
        """Level-0 (x, y) → read-level (x, y), int64 (rounded when not a multiple of ``scale``)."""
        c = np.asarray(coords, np.int64).reshape(-1, 2)
        if self.scale == 1.0:
            return c.copy()
        return np.rint(c / self.scale).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# direct mode: a shared, reference-counted cache of decoded tiles


class _Entry:
    """A cache slot; ``done`` is held by the decoding thread until the tile is ready (a latch
    lighter than ``threading.Event``)."""

    __slots__ = ("done", "error", "refs", "tile")

    def __init__(self, refs: int) -> None:
        self.refs = refs
        self.done = threading.Lock()
        self.done.acquire()
        self.tile: np.ndarray | None = None
        self.error: BaseException | None = None


class TileCache:
    """Decoded stored tiles, each decoded once (single flight across threads) and dropped when the
    last patch that needs it (``refcounts``) has released it."""

    def __init__(
        self, decode: Callable[[int], np.ndarray | None], refcounts: np.ndarray, f: int = 1
    ) -> None:
        self.f = f  # tiles are held area-reduced by this factor
        self._decode = decode
        self._refcounts = refcounts
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()
        self.decoded = 0
        self.peak = 0

    def acquire(self, key: int) -> tuple[np.ndarray | None, BaseException | None]:
        with self._lock:
            entry = self._entries.get(key)
            owner = entry is None
            if owner:
                entry = self._entries[key] = _Entry(int(self._refcounts[key]))
                self.decoded += 1
                self.peak = max(self.peak, len(self._entries))
        assert entry is not None
        if owner:
            try:
                entry.tile = self._decode(key)
            except Exception as err:  # kept for every patch that needs this tile
                entry.error = err
            finally:
                entry.done.release()
        elif entry.done.locked():  # another thread is decoding it: wait for the latch
            with entry.done:
                pass
        return entry.tile, entry.error

    def take_single(self, key: int) -> bool:
        """True (and counted as decoded) if exactly one patch needs tile ``key``: the caller
        decodes it straight into that patch, bypassing the cache."""
        if self._refcounts[key] != 1:
            return False
        with self._lock:
            self.decoded += 1
        return True

    def uncached(self, keys: np.ndarray) -> np.ndarray:
        """The distinct ``keys`` not (yet) in the cache: tiles a batch may still have to decode."""
        keys = np.unique(keys)
        with self._lock:
            have = self._entries.keys()
            if not have or len(keys) == 0:
                return keys
            return keys[np.fromiter((k not in have for k in keys.tolist()), bool, len(keys))]

    def singles(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` exactly one patch needs (see ``take_single``; not counted here)."""
        return self._refcounts[keys] == 1

    def count_decoded(self, n: int) -> None:
        with self._lock:
            self.decoded += n

    def release(self, key: int, n: int = 1) -> None:
        """``n`` patches are done with tile ``key``."""
        with self._lock:
            entry = self._entries[key]
            entry.refs -= n
            if entry.refs <= 0:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


def _tile_ranges(xy: np.ndarray, size: int, lv: TiffLevel) -> tuple[np.ndarray, ...]:
    """Per patch: clipped pixel box and the inclusive tile index range it touches."""
    x, y = xy[:, 0], xy[:, 1]
    x0, y0 = np.minimum(np.maximum(x, 0), lv.width), np.minimum(np.maximum(y, 0), lv.height)
    x1 = np.minimum(np.maximum(x + size, 0), lv.width)
    y1 = np.minimum(np.maximum(y + size, 0), lv.height)
    empty = (x1 <= x0) | (y1 <= y0)
    tx0, ty0 = x0 // lv.tile_width, y0 // lv.tile_height
    tx1 = np.where(empty, tx0 - 1, (x1 - 1) // lv.tile_width)
    ty1 = np.where(empty, ty0 - 1, (y1 - 1) // lv.tile_height)
    return tx0, tx1, ty0, ty1


def _touched_pairs(xy: np.ndarray, size: int, lv: TiffLevel) -> tuple[np.ndarray, np.ndarray]:
    """Every (patch, stored tile) pair where read-level box ``xy`` + ``size`` touches the tile:
    patch indices and row-major tile keys."""
    if len(xy) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tx0, tx1, ty0, ty1 = _tile_ranges(xy, size, lv)
    patches, keys = [], []
    for dy in range(max(int((ty1 - ty0).max()) + 1, 0)):
        for dx in range(max(int((tx1 - tx0).max()) + 1, 0)):
            ok = (ty0 + dy <= ty1) & (tx0 + dx <= tx1)
            patches.append(np.flatnonzero(ok))
            keys.append(((ty0 + dy) * lv.tiles_across + tx0 + dx)[ok])
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(patches).astype(np.int64), np.concatenate(keys).astype(np.int64)


def _touched_keys(xy: np.ndarray, size: int, lv: TiffLevel) -> np.ndarray:
    """Stored tiles (row-major keys) touched by each read-level box ``xy`` + ``size``, one entry
    per (patch, tile) pair."""
    return _touched_pairs(xy, size, lv)[1]


def tile_refcounts(xy: np.ndarray, size: int, lv: TiffLevel) -> np.ndarray:
    """How many patches (read-level boxes ``xy`` + ``size``) touch each stored tile (row-major)."""
    n_tiles = lv.tiles_across * lv.tiles_down
    return np.bincount(_touched_keys(xy, size, lv), minlength=n_tiles).astype(np.int32)


class _DirectSource:
    """Direct decoding of one slide's stored tiles (thread-safe: pread + stateless decoders).

    When patches are shrunk by an integer factor ``f`` and every patch starts on an ``f``-block
    that never straddles a stored tile, each decoded tile is area-reduced once in the cache and
    patches are cut from reduced tiles (``cache.f > 1``): the same pixels as cutting then reducing
    each patch, with 1/f² of the copying and no per-patch resize.
    """

    mode = "direct"

    def __init__(self, tiles: TiffTileSource, spec: ReadSpec) -> None:
        self.tiles = tiles
        self.spec = spec
        self.lv = tiles.levels[spec.level]
        self._local = threading.local()  # .prefetched: this thread's batch's stored bytes by key

    def read_spans(self, keys: np.ndarray) -> dict[int, memoryview]:
        """Raw bytes of stored tiles ``keys``, read with one ``pread`` per run of tiles stored back
        to back (at most 16 MiB): fewer system calls, and fewer GIL hand-offs between workers.
        Missing tiles and runs that fail to read are left out (read again one by one)."""
        lv = self.lv
        keys = np.unique(np.asarray(keys, np.int64))
        counts = lv.bytecounts[keys]
        keys, counts = keys[counts > 0], counts[counts > 0]
        offsets = lv.offsets[keys]
        order = np.argsort(offsets, kind="stable")
        keys, counts, offsets = keys[order].tolist(), counts[order].tolist(), offsets[order].tolist()
        out: dict[int, memoryview] = {}
        i = 0
        while i < len(keys):
            start, end, k = offsets[i], offsets[i] + counts[i], i + 1
            while k < len(keys) and offsets[k] == end and end + counts[k] - start <= 1 << 24:
                end += counts[k]
                k += 1
            try:
                view = memoryview(self.tiles.read_span(start, end - start))
            except (TileDecodeError, OSError):
                i = k
                continue
            for r in range(i, k):
                o = offsets[r] - start
                out[keys[r]] = view[o : o + counts[r]]
            i = k
        return out

    @contextmanager
    def prefetched(self, keys: np.ndarray) -> Iterator[None]:
        """Within the block, tiles ``keys`` decoded by this thread use bytes read ahead in runs."""
        self._local.prefetched = self.read_spans(keys)
        try:
            yield
        finally:
            self._local.prefetched = None

    def _decode(self, tx: int, ty: int, out: np.ndarray | None = None) -> np.ndarray | None:
        pre = getattr(self._local, "prefetched", None)
        key = ty * self.lv.tiles_across + tx
        data = pre.get(key) if pre else None
        if data is None:
            return self.tiles.decode(self.spec.level, tx, ty, out=out)
        return self.tiles.decode_bytes(self.spec.level, key, data, out)

    def prepare(self, xy: np.ndarray) -> TileCache:
        """Choose the working resolution for these patches (``cache.f``) and make their tile cache."""
        lv, spec = self.lv, self.spec
        f = spec.size_read // spec.patch_size
        aligned = (
            spec.needs_resize
            and f > 1
            and f * spec.patch_size == spec.size_read
            and lv.tile_width % f == 0
            and lv.tile_height % f == 0
            and bool(np.all(xy % f == 0))
        )
        f = f if aligned else 1

        local = threading.local()  # per-thread buffer for full-size tiles that are reduced at once

        def decode(key: int) -> np.ndarray | None:
            ty, tx = divmod(key, lv.tiles_across)
            if f == 1:
                return self._decode(tx, ty)
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = np.empty((lv.tile_height, lv.tile_width, 3), np.uint8)
            if self._decode(tx, ty, out=buf) is None:
                return None  # missing tile: white
            ex, ey = lv.width - tx * lv.tile_width, lv.height - ty * lv.tile_height
            if ex < lv.tile_width or ey < lv.tile_height:  # past the level's edge: white
                buf[max(ey, 0) :, :] = 255
                buf[:, max(ex, 0) :] = 255
            return box_reduce(buf, f)

        return TileCache(decode, tile_refcounts(xy, spec.size_read, lv), f)

    def _tile_region(self, tx: int, ty: int) -> tuple[int, int, int, int]:
        ds, lv = self.spec.scale, self.lv
        return (
            round(tx * lv.tile_width * ds),
            round(ty * lv.tile_height * ds),
            round(lv.tile_width * ds),
            round(lv.tile_height * ds),
        )

    def _corrupt(self, tx: int, ty: int, err: BaseException) -> CorruptTileError:
        return CorruptTileError(
            self.tiles.path,
            f"stored tile (column {tx}, row {ty}) of level {self.spec.level} could not be decoded ({err})",
            region=self._tile_region(tx, ty),
        )

    def read_singles(
        self, xy: np.ndarray, images: np.ndarray, cache: TileCache
    ) -> tuple[np.ndarray, list[tuple[int, CorruptTileError]]]:
        """Decode the patches that are exactly one stored tile no other patch needs (native,
        tile-aligned grids) straight into ``images``, reading the bytes of adjacent tiles with one
        ``pread`` per run (fewer GIL hand-offs between worker threads than one per tile).

        Returns which patches were done, and (patch, error) for corrupt tiles among them;
        patches not done (shared or partial tiles, a failed read) go through ``read_patch``."""
        lv, f = self.lv, cache.f
        n = len(xy)
        done = np.zeros(n, bool)
        s = self.spec.size_read
        if f != 1 or s != lv.tile_width or s != lv.tile_height or n == 0:
            return done, []
        x, y = xy[:, 0], xy[:, 1]
        ok = (x % s == 0) & (y % s == 0) & (x >= 0) & (y >= 0)
        ok &= (x + s <= lv.width) & (y + s <= lv.height)
        js = np.flatnonzero(ok)
        keys = (y[js] // s) * lv.tiles_across + x[js] // s
        single = cache.singles(keys)
        js, keys = js[single], keys[single]
        if len(js) == 0:
            return done, []
        offsets, counts = lv.offsets[keys], lv.bytecounts[keys]
        order = np.argsort(offsets, kind="stable")
        failures: list[tuple[int, CorruptTileError]] = []
        i = 0
        while i < len(order):  # a run: tiles stored back to back (or missing), at most 16 MiB
            k = i + 1
            end = offsets[order[i]] + counts[order[i]]
            while (
                k < len(order)
                and offsets[order[k]] == end
                and end + counts[order[k]] - offsets[order[i]] <= 1 << 24
            ):
                end += counts[order[k]]
                k += 1
            run = order[i:k]
            i = k
            start = int(offsets[run[0]])
            try:
                data = self.tiles.read_span(start, int(end) - start)
            except (TileDecodeError, OSError):
                continue  # read_patch reports the tiles one by one
            view = memoryview(data)
            for r in run.tolist():
                j, key, c = int(js[r]), int(keys[r]), int(counts[r])
                done[j] = True
                if c == 0:  # missing tile: white
                    images[j] = 255
                    continue
                o = int(offsets[r]) - start
                try:
                    self.tiles.decode_bytes(self.spec.level, key, view[o : o + c], images[j])
                except TileDecodeError as err:
                    ty, tx = divmod(key, lv.tiles_across)
                    failures.append((j, self._corrupt(tx, ty, err)))
        cache.count_decoded(int(done.sum()))
        return done, sorted(failures, key=lambda jf: jf[0])

    def cut_patches(
        self, xy: np.ndarray, out: np.ndarray, cache: TileCache
    ) -> list[tuple[int, CorruptTileError]]:
        """Cut the patches at read-level ``xy`` into ``out`` (side ``size_read // cache.f``),
        visiting each stored tile they touch once (one Numba call per tile, see
        :mod:`wsi.patch_cut`). Returns (patch, error) for patches touching a corrupt tile (their
        ``out`` is then garbage)."""
        lv, f = self.lv, cache.f
        s = self.spec.size_read // f
        tw, th = lv.tile_width // f, lv.tile_height // f
        width, height = -(-lv.width // f), -(-lv.height // f)
        pxy = xy // f
        xs, ys = np.ascontiguousarray(pxy[:, 0]), np.ascontiguousarray(pxy[:, 1])
        outside = (xs < 0) | (ys < 0) | (xs + s > width) | (ys + s > height)
        if outside.any():
            out[outside] = 255  # outside the level: white, as Slide.read_region
        patches, keys = _touched_pairs(xy, self.spec.size_read, lv)
        order = np.argsort(keys, kind="stable")
        patches, keys = patches[order], keys[order]
        bounds = np.flatnonzero(np.diff(keys)) + 1
        failures: dict[int, CorruptTileError] = {}
        starts = np.concatenate([[0], bounds]) if len(keys) else np.zeros(0, np.int64)
        with self.prefetched(cache.uncached(keys)):
            for a, b in zip(starts.tolist(), [*bounds.tolist(), len(keys)], strict=False):
                key, js = int(keys[a]), patches[a:b]
                ty, tx = divmod(key, lv.tiles_across)
                tile, err = cache.acquire(key)
                try:
                    if err is not None:
                        if not isinstance(err, (TileDecodeError, OSError)):
                            raise err
                        for j in js.tolist():
                            failures.setdefault(j, self._corrupt(tx, ty, err))
                        continue
                    if tile is None:  # missing tile: transparent → white
                        tile = self._white(th, tw)
                    cut_tile_rows(np.ascontiguousarray(tile), tx * tw, ty * th, xs, ys, js, s,
                                  width, height, out)
                finally:
                    cache.release(key, len(js))
        return sorted(failures.items())

    def _white(self, th: int, tw: int) -> np.ndarray:
        white = getattr(self, "_white_tile", None)
        if white is None or white.shape[:2] != (th, tw):
            white = self._white_tile = np.full((th, tw, 3), 255, np.uint8)
        return white

    def close(self) -> None:
        self.tiles.close()


# ---------------------------------------------------------------------------------------------
# region mode: Slide.read_region on runs of patches, one handle per thread


class _RegionSource:
    mode = "region"

    def __init__(self, spec: ReadSpec, slide: Slide | None) -> None:
        self.spec = spec
        self._given = slide
        self._local = threading.local()
        self._opened: list[Slide] = []
        self._lock = threading.Lock()

    def slide(self) -> Slide:
        s = getattr(self._local, "slide", None)
        if s is None:
            with self._lock:  # the caller's slide serves the first thread; others open their own
                s, self._given = self._given, None
            if s is None:
                from wsi.slide import open_slide

                s = open_slide(
                    self.spec.path, backend=self.spec.backend, mpp=self.spec.mpp, require_mpp=False
                )
                with self._lock:
                    self._opened.append(s)
            self._local.slide = s
        return s

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.spec.scale
        return self.slide().read_region((round(x * ds), round(y * ds)), self.spec.level, (w, h))

    def read_runs(self, xy: np.ndarray) -> list[tuple[int, int]]:
        """Split patches (grid order) into runs [i, j) on one row, close enough to read at once."""
        s = self.spec.size_read
        runs, start = [], 0
        for i in range(1, len(xy) + 1):
            if (
                i == len(xy)
                or xy[i, 1] != xy[start, 1]
                or xy[i, 0] - (xy[i - 1, 0] + s) > s // 2
                or xy[i, 0] < xy[i - 1, 0]
                or xy[i, 0] + s - xy[start, 0] > MAX_RUN_PX
            ):
                runs.append((start, i))
                start = i
        return runs

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for s in opened:
            s.close()


# ---------------------------------------------------------------------------------------------


def _open_source(spec: ReadSpec, slide: Slide | None) -> _DirectSource | _RegionSource:
    if spec.direct:
        if slide is not None:
            direct = _try_direct(spec, slide)
        else:
            from wsi.slide import open_slide

            with open_slide(spec.path, backend=spec.backend, mpp=spec.mpp, require_mpp=False) as s:
                direct = _try_direct(spec, s)
        if direct is not None:
            return direct
    logger.debug("%s: reading level %d through the slide backend", spec.path, spec.level)
    return _RegionSource(spec, slide)


def _try_direct(spec: ReadSpec, slide: Slide) -> _DirectSource | None:
    """A direct source for ``spec.level`` if the format allows it and its first stored tile
    decodes to exactly the backend's pixels (guards against vendor colour-space quirks)."""
    if not (slide.backend == "tiffslide" or slide.vendor in DIRECT_OPENSLIDE_VENDORS):
        return None
    tiles = TiffTileSource.open(spec.path, slide.level_dimensions)
    if tiles is None:
        return None
    if spec.level not in tiles.levels:
        tiles.close()
        return None
    lv = tiles.levels[spec.level]
    w, h = min(lv.tile_width, lv.width), min(lv.tile_height, lv.height)
    try:
        mine = tiles.decode(spec.level, 0, 0)
        theirs = slide.read_region((0, 0), spec.level, (w, h))
    except (TileDecodeError, CorruptTileError, OSError):
        mine = None  # cannot compare on a damaged first tile; corrupt tiles surface when read
    if mine is not None and not np.array_equal(mine[:h, :w], theirs):
        logger.warning(
            "%s: stored tiles of level %d do not decode to the %s backend's pixels; reading "
            "through the backend instead (slower)",
            spec.path,
            spec.level,
            slide.backend,
        )
        tiles.close()
        return None
    return _DirectSource(tiles, spec)


def _read_batch(
    source: _DirectSource | _RegionSource,
    xy: np.ndarray,
    indices: np.ndarray,
    coords: np.ndarray,
    cache: TileCache | None,
    skip_corrupt: bool,
) -> tuple[PatchBatch, list[tuple[int, str]]]:
    """Read patches ``xy`` (read level) into one batch; returns it and the skipped (index, reason)."""
    spec = source.spec
    n, s, p = len(xy), spec.size_read, spec.patch_size
    images = np.empty((n, p, p, 3), np.uint8)
    keep = np.ones(n, bool)
    skipped: list[tuple[int, str]] = []

    def fail(j: int, err: CorruptTileError) -> None:
        if not skip_corrupt:
            raise err
        keep[j] = False
        skipped.append((int(indices[j]), err.reason))

    if isinstance(source, _DirectSource):
        assert cache is not None
        side = s // cache.f  # patches are cut at this side, then resized to p if it differs
        done, failures = source.read_singles(xy, images, cache)
        for j, err in failures:
            fail(j, err)
        rest = np.flatnonzero(~done)
        if len(rest):
            whole = len(rest) == n and side == p
            cut = images if whole else np.empty((len(rest), side, side, 3), np.uint8)
            for k, err in source.cut_patches(xy[rest], cut, cache):
                fail(int(rest[k]), err)
            if not whole:
                for k, j in enumerate(rest.tolist()):
                    if keep[j]:
                        images[j] = cut[k] if side == p else resize_patch(cut[k], p)
    else:
        for a, b in source.read_runs(xy):
            x0, y0 = int(xy[a, 0]), int(xy[a, 1])
            try:
                region = source.read(x0, y0, int(xy[b - 1, 0]) + s - x0, s)
                pieces = [
                    (j, region[:, int(xy[j, 0]) - x0 : int(xy[j, 0]) - x0 + s]) for j in range(a, b)
                ]
            except CorruptTileError as err:
                if not skip_corrupt:
                    raise
                logger.debug(
                    "%s: run read failed (%s); reading its patches one by one", spec.path, err
                )
                pieces = []
                for j in range(a, b):
                    try:
                        pieces.append((j, source.read(int(xy[j, 0]), int(xy[j, 1]), s, s)))
                    except CorruptTileError as one:
                        fail(j, one)
            for j, piece in pieces:
                images[j] = (
                    resize_patch(np.ascontiguousarray(piece), p) if spec.needs_resize else piece
                )
    if not keep.all():
        images, coords, indices = images[keep], coords[keep], indices[keep]
    return PatchBatch(images, coords, indices), skipped


class PatchReader:
    """Iterate a grid's patches as :class:`PatchBatch` in grid order.

    ``workers`` threads read batches concurrently (decoders release the GIL); at most
    ``max_inflight`` batches (default ``2 * workers``) are read ahead of the consumer, and decoded
    tiles are kept only until their last patch is cut, so memory is bounded whatever the slide size.
    A corrupt stored tile raises :class:`~wsi.errors.CorruptTileError` naming the slide and region;
    with ``skip_corrupt_tiles=True`` the patches touching it are dropped and listed in ``skipped``
    as ``(index, reason)``. ``direct=False`` forces region reads through the slide backend.
    After (or during) iteration ``stats`` holds ``mode``, ``tiles_decoded``, ``peak_cached_tiles``,
    ``peak_inflight``.
    """

    def __init__(
        self,
        slide_or_path: Slide | str | Path,
        grid: TileGrid,
        *,
        batch_size: int = 64,
        workers: int = 1,
        skip_corrupt_tiles: bool = False,
        max_inflight: int | None = None,
        backend: str = "auto",
        mpp: float | None = None,
        direct: bool = True,
    ) -> None:
        if batch_size < 1 or workers < 1:
            raise ValueError(f"batch_size and workers must be >= 1, got {batch_size}, {workers}")
        if isinstance(slide_or_path, (str, Path)):
            self._slide: Slide | None = None
            path = Path(slide_or_path)
        else:
            self._slide = slide_or_path
            path = slide_or_path.path
            backend = slide_or_path.backend
        self.grid = grid
        self.spec = ReadSpec.from_grid(path, grid, backend=backend, mpp=mpp, direct=direct)
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self.max_inflight = max(
            1, int(max_inflight) if max_inflight is not None else 2 * self.workers
        )
        self.skip_corrupt_tiles = bool(skip_corrupt_tiles)
        self.skipped: list[tuple[int, str]] = []
        self.stats: dict[str, Any] = {}

    def __len__(self) -> int:
        """Number of batches (before any are dropped as corrupt)."""
        return -(-len(self.grid) // self.batch_size)

    def __iter__(self) -> Iterator[PatchBatch]:
        self.skipped = []
        n = len(self.grid)
        coords = np.asarray(self.grid.coords, np.int64).reshape(-1, 2)
        xy = self.spec.read_positions(coords)
        source = _open_source(self.spec, self._slide)
        cache = source.prepare(xy) if isinstance(source, _DirectSource) else None
        self.stats = {
            "mode": source.mode,
            "tiles_decoded": 0,
            "peak_cached_tiles": 0,
            "peak_inflight": 0,
        }
        starts = iter(range(0, n, self.batch_size))

        def task(a: int) -> tuple[PatchBatch, list[tuple[int, str]]]:
            b = min(a + self.batch_size, n)
            idx = np.arange(a, b, dtype=np.int64)
            return _read_batch(
                source, xy[a:b], idx, coords[a:b].copy(), cache, self.skip_corrupt_tiles
            )

        pool = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="slidepipe-read")
            if self.workers > 1
            else None
        )
        pending: deque[Future] = deque()
        try:
            if pool is None:
                for a in starts:
                    batch, skipped = task(a)
                    self._account(skipped, cache, 1)
                    if len(batch):
                        yield batch
            else:
                for a in starts:
                    pending.append(pool.submit(task, a))
                    if len(pending) >= self.max_inflight:
                        break
                while pending:
                    self._account([], cache, len(pending))
                    batch, skipped = pending.popleft().result()
                    nxt = next(starts, None)
                    if nxt is not None:
                        pending.append(pool.submit(task, nxt))
                    self._account(skipped, cache, 0)
                    if len(batch):
                        yield batch
        finally:
            for fut in pending:
                fut.cancel()
            if pool is not None:
                pool.shutdown(wait=True)
            if cache is not None:
                self.stats["tiles_decoded"] = cache.decoded
                self.stats["peak_cached_tiles"] = cache.peak
            source.close()
            if self.skipped:
                logger.warning(
                    "%s: %d patches skipped (corrupt tiles)", self.spec.path, len(self.skipped)
                )

    def _account(
        self, skipped: list[tuple[int, str]], cache: TileCache | None, inflight: int
    ) -> None:
        self.skipped.extend(skipped)
        self.stats["peak_inflight"] = max(self.stats["peak_inflight"], inflight)
        if cache is not None:
            self.stats["tiles_decoded"] = cache.decoded
            self.stats["peak_cached_tiles"] = cache.peak


# ---------------------------------------------------------------------------------------------
# dask.array view


class _SourceCache:
    """Open sources per process (a Dask worker reuses them across chunks of the same slide).

    ``use(spec)`` is a context manager; a source evicted from the cache is closed once the last
    chunk using it is done.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self._items: OrderedDict[ReadSpec, _DirectSource | _RegionSource] = OrderedDict()
        self._users: dict[int, int] = {}
        self._evicted: dict[int, _DirectSource | _RegionSource] = {}
        self._lock = threading.RLock()
        self.maxsize = maxsize

    @contextmanager
    def use(self, spec: ReadSpec) -> Iterator[_DirectSource | _RegionSource]:
        with self._lock:  # opening is a few ms; serialised so each slide is opened once
            src = self._items.get(spec)
            if src is None:
                src = self._items[spec] = _open_source(spec, None)
                while len(self._items) > self.maxsize:
                    _, old = self._items.popitem(last=False)
                    self._evicted[id(old)] = old
                    self._close_if_unused(old)
            self._items.move_to_end(spec)
            self._users[id(src)] = self._users.get(id(src), 0) + 1
        try:
            yield src
        finally:
            with self._lock:
                self._users[id(src)] -= 1
                if id(src) in self._evicted:
                    self._close_if_unused(src)

    def _close_if_unused(self, src: _DirectSource | _RegionSource) -> None:
        if self._users.get(id(src), 0) == 0:
            self._users.pop(id(src), None)
            self._evicted.pop(id(src), None)
            src.close()

    def clear(self) -> None:
        """Close every cached source not in use (the rest close when their chunks finish)."""
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
            for src in items:
                self._evicted[id(src)] = src
                self._close_if_unused(src)


_SOURCES = _SourceCache()
atexit.register(_SOURCES.clear)


def _read_chunk(spec: ReadSpec, coords: np.ndarray, start: int) -> np.ndarray:
    with _SOURCES.use(spec) as source:
        xy = spec.read_positions(coords)
        cache = source.prepare(xy) if isinstance(source, _DirectSource) else None
        idx = np.arange(start, start + len(coords), dtype=np.int64)
        batch, _ = _read_batch(source, xy, idx, coords, cache, False)
    return batch.images


def patches_dask_array(
    slide_or_path: Slide | str | Path,
    grid: TileGrid,
    *,
    chunk_size: int = 64,
    backend: str = "auto",
    mpp: float | None = None,
    direct: bool = True,
) -> dask.array.Array:
    """Lazy ``(N, H, W, 3) uint8`` array of the grid's patches, ``chunk_size`` patches per chunk.

    Each chunk is one delayed read (tiles decoded once per chunk) on an open source cached per
    process, so it computes with the threaded scheduler or on ``distributed`` workers. A corrupt
    tile raises ``CorruptTileError`` when the chunk computes.
    """
    import dask
    import dask.array as da

    if isinstance(slide_or_path, (str, Path)):
        path = Path(slide_or_path)
    else:
        path, backend = slide_or_path.path, slide_or_path.backend
    spec = ReadSpec.from_grid(path, grid, backend=backend, mpp=mpp, direct=direct)
    coords = np.asarray(grid.coords, np.int64).reshape(-1, 2)
    p = spec.patch_size
    if len(coords) == 0:
        return da.zeros((0, p, p, 3), dtype=np.uint8, chunks=(chunk_size, p, p, 3))
    parts = []
    for a in range(0, len(coords), chunk_size):
        part = coords[a : a + chunk_size]
        delayed = dask.delayed(_read_chunk, pure=True)(spec, part, a)
        parts.append(da.from_delayed(delayed, shape=(len(part), p, p, 3), dtype=np.uint8))
    return da.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------


_DONE = object()


class _Failure:
    def __init__(self, err: BaseException) -> None:
        self.err = err


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``iterable`` in a background thread, up to ``depth`` items ahead.

    Exceptions are re-raised in the consumer; stopping early stops (and closes) the producer.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(iterable)
        try:
            for item in it:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:
            put(_Failure(err))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="slidepipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.err
            yield item
    finally:
        stop.set()
        thread.join()
