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
        cls, path: str | Path, level_dimensions: tuple[tuple[int, int], ...]
    ) -> TiffTileSource | None:
        """Map each slide level (by its (w, h)) to a tiled TIFF page; None if level 0 cannot be."""
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
                    if (lv := _level_layout(path, index, dims, pages)) is not None
                }
            except Exception as err:  # a TIFF tifffile cannot lay out: the backend path handles it
                logger.debug("%s: no direct tile access (%s)", path, err)
                return None
        if 0 not in levels:
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

    def decode_bytes(
        self, level: int, index: int, data: bytes, out: np.ndarray | None = None
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

    def close(self) -> None:
        self._fd = None
        self._finalizer()

    def __enter__(self) -> TiffTileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
