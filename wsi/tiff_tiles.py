"""Direct access to the stored tiles of tiled RGB TIFF slides (Aperio SVS, generic pyramidal TIFF).

tifffile gives each pyramid page's tile offsets, byte counts and JPEG tables; the bytes are read
with ``os.pread`` (no shared file position, so one descriptor serves every thread) and decoded
with imagecodecs, which releases the GIL. JPEG tiles are decoded exactly as tifffile does (Aperio
stores RGB components in the JPEG stream without a colour transform), which is bit-identical to
OpenSlide's ``read_region`` at levels with an integer downsample (tested). Other codecs that
tifffile decodes (JPEG 2000, Deflate, LZW, none, ...) go through ``TiffPage.decode``.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JPEG = 7
_RGB, _YCBCR = 2, 6

# OpenSlide formats whose levels are plain TIFF pages on a regular tile grid (others, e.g. Ventana
# BIF with overlapping tiles or Leica SCN collections, are read through the backend). tiffslide
# itself decodes pages with tifffile, so any slide it opens qualifies.
DIRECT_OPENSLIDE_VENDORS = frozenset({"aperio", "generic-tiff"})


class TileDecodeError(Exception):
    """One stored tile could not be read or decoded (wrapped into CorruptTileError by callers)."""


@dataclass(frozen=True)
class TiffLevel:
    """Stored-tile layout of one pyramid level."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    tiles_down: int
    offsets: np.ndarray  # (n_tiles,) int64, row-major
    bytecounts: np.ndarray  # (n_tiles,) int64
    compression: int
    jpegtables: bytes | None
    colorspaces: tuple[int | None, int]  # JPEG (colorspace, outcolorspace) for imagecodecs
    decoder: Any  # tifffile's decode function of the page (non-JPEG codecs)


def _jpeg_colorspaces(page: Any) -> tuple[int | None, int]:
    """JPEG colour spaces as tifffile uses them (``jpeg_decode_colorspace``)."""
    if page.photometric == _RGB and not page.is_jfif:
        return _RGB, _RGB  # Aperio: RGB components in the stream, no colour transform
    return None, _RGB  # YCbCr (or JFIF) stream converted to RGB by libjpeg


def _why_unsupported(page: Any) -> str | None:
    if not page.is_tiled:
        return "not tiled"
    if page.planarconfig != 1 or page.samplesperpixel != 3 or page.bitspersample != 8:
        return f"{page.samplesperpixel} samples of {page.bitspersample} bit, planar {page.planarconfig}"
    if page.photometric not in (_RGB, _YCBCR):
        return f"photometric {page.photometric}"
    if page.compression != JPEG and page.photometric != _RGB:
        return f"photometric {page.photometric} with compression {page.compression}"
    if getattr(page, "is_ndpi", False) or page.parent.is_ndpi:
        return "NDPI"
    return None


def _level_layout(
    path: Path, index: int, dims: tuple[int, int], pages: list[Any]
) -> TiffLevel | None:
    """The tiled page of size ``dims`` as a TiffLevel, or None (logged) if it is not decodable here."""
    w, h = dims
    page = next((p for p in pages if p.imagewidth == w and p.imagelength == h and p.is_tiled), None)
    if page is None:
        return None
    why = _why_unsupported(page)
    if why is not None:
        logger.debug("%s: level %d read through the backend (%s)", path, index, why)
        return None
    tw, th = int(page.tilewidth), int(page.tilelength)
    return TiffLevel(
        width=w,
        height=h,
        tile_width=tw,
        tile_height=th,
        tiles_across=-(-w // tw),
        tiles_down=-(-h // th),
        offsets=np.asarray(page.dataoffsets, np.int64),
        bytecounts=np.asarray(page.databytecounts, np.int64),
        compression=int(page.compression),
        jpegtables=page.jpegtables,
        # resolved here, in one thread: is_jfif reads the file through tifffile's handle
        colorspaces=_jpeg_colorspaces(page) if page.compression == JPEG else (None, _RGB),
        decoder=page.decode,
    )


class TiffTileSource:
    """Stored tiles of a slide's pyramid levels; ``decode(level, tx, ty)`` returns a full tile.

    Build with :meth:`open`, which returns None when the file is not a TIFF whose levels can be
    decoded directly (callers then read regions through the slide backend).
    """

    def __init__(self, path: Path, levels: dict[int, TiffLevel]) -> None:
        self.path = path
        self.levels = levels
        self._fd: int | None = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)  # if never closed

    @classmethod
    def open(
        cls,
        path: str | Path,
        level_dimensions: tuple[tuple[int, int], ...],
        *,
        only: int | None = None,
    ) -> TiffTileSource | None:
        """Map each slide level (by its (w, h)) to a tiled TIFF page; None if level 0 cannot be
        (with ``only=i``: lay out just level ``i``, None if it cannot be)."""
        import tifffile

        path = Path(path)
        try:
            tif = tifffile.TiffFile(path)
        except Exception as err:  # not a TIFF (or unreadable): the backend path handles it
            logger.debug("%s: no direct tile access (%s)", path, err)
            return None
        with tif:  # layout and decoders stay in memory; tiles are then read with pread
            try:
                pages = [lvl.keyframe for s in tif.series[:1] for lvl in s.levels]
                pages += [p for p in tif.pages if p not in pages]
                levels = {
                    index: lv
                    for index, dims in enumerate(level_dimensions)
                    if (only is None or index == only)
                    and (lv := _level_layout(path, index, dims, pages)) is not None
                }
            except Exception as err:  # a TIFF tifffile cannot lay out: the backend path handles it
                logger.debug("%s: no direct tile access (%s)", path, err)
                return None
        if (0 if only is None else only) not in levels:
            return None
        return cls(path, levels)

    def tile_bytes(self, level: int, tx: int, ty: int) -> bytes:
        """Raw stored bytes of tile (tx, ty) of ``level`` (empty for a missing tile)."""
        lv = self.levels[level]
        i = ty * lv.tiles_across + tx
        n = int(lv.bytecounts[i])
        if n == 0:
            return b""
        if self._fd is None:
            raise ValueError(f"{self.path}: tile source is closed")
        data = os.pread(self._fd, n, int(lv.offsets[i]))
        if len(data) != n:
            raise TileDecodeError(
                f"file truncated: {len(data)} of {n} bytes at offset {lv.offsets[i]}"
            )
        return data

    def read_span(self, offset: int, size: int) -> bytes:
        """``size`` raw bytes of the file at ``offset`` (several stored tiles in one read)."""
        if self._fd is None:
            raise ValueError(f"{self.path}: tile source is closed")
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise TileDecodeError(f"file truncated: {len(data)} of {size} bytes at offset {offset}")
        return data

    def decode_bytes(
        self, level: int, index: int, data: bytes | memoryview, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Decode one stored tile's bytes to ``(tile_h, tile_w, 3) uint8`` (into ``out`` if given)."""
        import imagecodecs

        lv = self.levels[level]
        try:
            if lv.compression == JPEG:
                cs, out_cs = lv.colorspaces
                tile = imagecodecs.jpeg8_decode(
                    data, tables=lv.jpegtables, colorspace=cs, outcolorspace=out_cs, out=out
                )
            else:
                tile, _, _ = lv.decoder(data, index, jpegtables=lv.jpegtables)
                tile = tile.reshape(tile.shape[-3:])
        except Exception as err:
            raise TileDecodeError(f"{type(err).__name__}: {err}") from err
        if tile.shape != (lv.tile_height, lv.tile_width, 3) or tile.dtype != np.uint8:
            raise TileDecodeError(
                f"decoded tile has shape {tile.shape} {tile.dtype}, expected "
                f"({lv.tile_height}, {lv.tile_width}, 3) uint8"
            )
        if out is not None and tile is not out:
            out[...] = tile
            return out
        return tile

    def decode(
        self, level: int, tx: int, ty: int, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Tile (tx, ty) of ``level`` as ``(tile_h, tile_w, 3) uint8`` (into ``out`` if given); None
        for a missing tile, which renders white (OpenSlide: transparent). Raises TileDecodeError."""
        data = self.tile_bytes(level, tx, ty)
        if not data:
            if out is not None:
                out[...] = 255
            return None
        lv = self.levels[level]
        return self.decode_bytes(level, ty * lv.tiles_across + tx, data, out)

    def read_level_reduced(self, level: int, factor: int, *, threads: int = 2) -> np.ndarray:
        """The whole of ``level`` area-averaged by ``factor`` (``wsi.resample.box_reduce``: partial
        blocks at the right/bottom edge average the pixels they have) → ``(ceil(h/f), ceil(w/f), 3)``.

        Each stored tile is decoded and reduced on its own (``factor`` must divide the tile size),
        by ``threads`` threads over tile rows (decoders and the reduce kernel release the GIL), so
        only the output is held. Missing tiles are white. Raises TileDecodeError / OSError.
        """
        from concurrent.futures import ThreadPoolExecutor

        from wsi.resample import box_reduce

        lv = self.levels[level]
        f = int(factor)
        if f < 1 or lv.tile_width % f or lv.tile_height % f:
            raise ValueError(f"factor {factor} does not divide the {lv.tile_width} px tiles")
        tw, th = lv.tile_width // f, lv.tile_height // f
        out = np.empty((-(-lv.height // f), -(-lv.width // f), 3), np.uint8)

        def row(ty: int) -> None:
            buf = np.empty((lv.tile_height, lv.tile_width, 3), np.uint8)
            ey = min(lv.tile_height, lv.height - ty * lv.tile_height)
            for tx in range(lv.tiles_across):
                ex = min(lv.tile_width, lv.width - tx * lv.tile_width)
                dst = out[ty * th : ty * th + -(-ey // f), tx * tw : tx * tw + -(-ex // f)]
                if self.decode(level, tx, ty, out=buf) is None:
                    dst[...] = 255
                elif f == 1:
                    dst[...] = buf[:ey, :ex]
                elif ey == lv.tile_height and ex == lv.tile_width:
                    dst[...] = box_reduce(buf, f)
                else:
                    dst[...] = box_reduce(np.ascontiguousarray(buf[:ey, :ex]), f)

        n = max(1, min(int(threads), lv.tiles_down))
        if n == 1:
            for ty in range(lv.tiles_down):
                row(ty)
        else:
            with ThreadPoolExecutor(n, thread_name_prefix="slidepipe-thumb") as pool:
                for _ in pool.map(row, range(lv.tiles_down)):
                    pass
        return out

    def close(self) -> None:
        self._fd = None
        self._finalizer()

    def __enter__(self) -> TiffTileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
