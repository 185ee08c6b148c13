"""Open a whole-slide image with openslide or tiffslide and read RGB regions at a physical resolution.

``open_slide(path)`` returns a :class:`Slide` that knows its pyramid, its pixel size in µm
(``mpp``) and where that number came from (``mpp_source``), and reads regions as RGB ``uint8``
numpy arrays with alpha composited on white.

mpp chain: vendor metadata (Aperio ``MPP``, ``openslide.mpp-x`` of a known vendor) → TIFF
resolution tags when plausibly microscope-scale (≤ 10 µm/px) → the caller's ``mpp`` →
:class:`~wsi.errors.MissingMPPError`. Magnification is never binned.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from wsi.errors import CorruptTileError, MissingMPPError, SlideOpenError, UnsupportedSlideError

logger = logging.getLogger(__name__)

Backend = Literal["openslide", "tiffslide"]
MppSource = Literal["vendor", "tiff-resolution", "override"]
BACKENDS: tuple[Backend, ...] = ("openslide", "tiffslide")

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".qptiff", ".dcm", ".czi", ".ome.tif", ".ome.tiff",
)
MAX_PLAUSIBLE_MPP = 10.0  # µm/px; coarser "resolution tags" are screen/print DPI, not a microscope
MIN_PLAUSIBLE_MPP = 0.01
_MIB = 1 << 20
_BAND_BYTES = 64 * _MIB  # a thumbnail is built from full-width bands of about this many bytes
_DIRECT_THUMBNAIL = True  # thumbnails of tiled TIFF levels decode stored tiles (wsi.tiff_tiles)
_THUMBNAIL_THREADS = 2


def slide_id_for(path: str | Path) -> str:
    """The slide's id in stores and outputs: its file name without the (slide) extension."""
    name = Path(path).name
    for suffix in sorted(SLIDE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass(frozen=True)
class Level:
    """One pyramid level: ``dimensions`` (w, h), ``downsample`` from level 0, ``mpp`` (µm/px, x)."""

    index: int
    dimensions: tuple[int, int]
    downsample: float
    mpp: float | None


# ---------------------------------------------------------------------------------------------
# file inspection (tifffile): brightfield check and codec support, before any backend decodes


def _inspect_tiff(path: Path) -> None:
    """Reject TIFF-family files that are not brightfield RGB, or whose codec cannot be decoded.

    Non-TIFF files (DICOM, MRXS, ...) are left to the backends.
    """
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # not a TIFF: nothing to inspect here
        return
    with tif:
        try:
            if not tif.series:
                return
            series = tif.series[0]
            page = series.keyframe
            dtype = np.dtype(page.dtype) if page.dtype is not None else None
            spp = int(page.samplesperpixel)
            photometric = int(page.photometric)
            axes = series.axes
            n_channels = series.shape[axes.index("C")] if "C" in axes else None
            is_qpi = bool(tif.is_qpi)
        except Exception as err:  # an odd TIFF layout: let the backends decide
            logger.debug("%s: TIFF inspection skipped (%s)", path, err)
            return
        if is_qpi or (n_channels is not None and n_channels not in (3, 4)):
            kind = "PerkinElmer/Vectra QPTIFF" if is_qpi else "multi-channel TIFF"
            raise UnsupportedSlideError(
                path,
                f"multiplexed fluorescence image ({kind}, {n_channels or spp} channel(s) of "
                f"{dtype}), not a brightfield RGB slide",
            )
        if dtype is not None and dtype != np.uint8:
            bits = dtype.itemsize * 8
            channels = "single-channel" if spp == 1 else f"{spp}-channel"
            raise UnsupportedSlideError(
                path, f"{bits}-bit {channels} image ({dtype}), not an 8-bit brightfield RGB slide"
            )
        if spp < 3 or photometric in (0, 1):  # MINISWHITE / MINISBLACK
            raise UnsupportedSlideError(
                path,
                f"single-channel (grayscale or fluorescence) image with {spp} sample(s) per pixel, "
                "not a brightfield RGB slide",
            )
        if spp > 4:
            raise UnsupportedSlideError(
                path, f"multispectral image with {spp} samples per pixel, not brightfield RGB"
            )
        compression = page.compression
        if compression not in tifffile.TIFF.DECOMPRESSORS:
            raise SlideOpenError(
                path,
                f"unsupported TIFF compression {int(compression)} in the full-resolution image",
                "re-export the slide with JPEG, JPEG 2000, LZW, Deflate or no compression",
            )


# ---------------------------------------------------------------------------------------------
# backends


def _open_backend(path: Path, backend: Backend) -> Any:
    if backend == "openslide":
        import openslide

        return openslide.OpenSlide(str(path))
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def _decode_errors(backend: Backend) -> tuple[type[BaseException], ...]:
    """Exceptions a backend raises when pixel data cannot be decoded."""
    if backend == "openslide":
        import openslide

        return (openslide.OpenSlideError,)
    import zlib

    # tiffslide surfaces imagecodecs codec errors (RuntimeError subclasses), tifffile's ValueError
    # for unknown codecs, OSError/EOFError for truncated files, zlib.error for bad Deflate data
    return (RuntimeError, ValueError, OSError, EOFError, zlib.error)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _str_props(props: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in dict(props).items() if v is not None}


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _vendor(backend: Backend, props: dict[str, str]) -> str | None:
    v = props.get("openslide.vendor") if backend == "openslide" else props.get("tiffslide.vendor")
    return v or None


def _vendor_mpp(backend: Backend, props: dict[str, str], vendor: str | None) -> tuple[float, float] | None:
    """µm/px from vendor metadata; generic TIFF 'mpp' derived from resolution tags does not count."""
    aperio = _float(props.get("aperio.MPP"))
    if aperio is not None:
        return aperio, aperio
    if vendor is None or vendor == "generic-tiff":
        return None
    prefix = "openslide" if backend == "openslide" else "tiffslide"
    x = _float(props.get(f"{prefix}.mpp-x"))
    y = _float(props.get(f"{prefix}.mpp-y")) or x
    return (x, y) if x is not None and y is not None else None


def _resolution_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    """µm/px from TIFF XResolution/YResolution + ResolutionUnit (cm or inch), else None."""
    unit = (props.get("tiff.ResolutionUnit") or "").strip().lower()
    per_unit_um = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}.get(unit)
    xres = _float(props.get("tiff.XResolution"))
    if per_unit_um is None or xres is None:
        return None
    yres = _float(props.get("tiff.YResolution")) or xres
    return per_unit_um / xres, per_unit_um / yres


def _resolve_mpp(
    path: Path, backend: Backend, props: dict[str, str], vendor: str | None, override: float | None
) -> tuple[float, float, MppSource] | None:
    found = _vendor_mpp(backend, props, vendor)
    if found is not None:
        if override is not None and not math.isclose(found[0], override, rel_tol=0.05):
            logger.warning(
                "%s: file says %.4f µm/px (vendor metadata); the given mpp %.4f is not used",
                path, found[0], override,
            )
        return found[0], found[1], "vendor"
    res = _resolution_mpp(props)
    if res is not None:
        if MIN_PLAUSIBLE_MPP <= res[0] <= MAX_PLAUSIBLE_MPP:
            if override is not None and not math.isclose(res[0], override, rel_tol=0.05):
                logger.warning(
                    "%s: TIFF resolution tags say %.4f µm/px; the given mpp %.4f is not used",
                    path, res[0], override,
                )
            return res[0], res[1], "tiff-resolution"
        logger.debug("%s: TIFF resolution %.3g µm/px is not microscope scale; ignored", path, res[0])
    if override is not None:
        return float(override), float(override), "override"
    return None


# ---------------------------------------------------------------------------------------------


class Slide:
    """An open whole-slide image. Use :func:`open_slide`; close with ``close()`` or ``with``."""

    def __init__(
        self,
        path: Path,
        handle: Any,
        backend: Backend,
        *,
        mpp_override: float | None = None,
        require_mpp: bool = True,
    ) -> None:
        self.path = path
        self.slide_id = slide_id_for(path)
        self.backend: Backend = backend
        self._handle = handle
        self._lock = threading.Lock()
        self._mpp_override = mpp_override
        self.properties: dict[str, str] = _str_props(handle.properties)
        self.vendor: str | None = _vendor(backend, self.properties)
        self.level_count: int = int(handle.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in handle.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in handle.level_downsamples)
        self.dimensions: tuple[int, int] = self.level_dimensions[0]
        resolved = _resolve_mpp(path, backend, self.properties, self.vendor, mpp_override)
        if resolved is None:
            if require_mpp:
                raise MissingMPPError(
                    path,
                    "no pixel size (µm per pixel) in the file: no vendor MPP and no "
                    "microscope-scale TIFF resolution tags",
                )
            self.mpp_x = self.mpp_y = None
            self.mpp_source: MppSource | None = None
        else:
            self.mpp_x, self.mpp_y, self.mpp_source = resolved
        self.levels: tuple[Level, ...] = tuple(
            Level(i, dims, ds, None if self.mpp_x is None else self.mpp_x * ds)
            for i, (dims, ds) in enumerate(zip(self.level_dimensions, self.level_downsamples, strict=True))
        )

    # -- basics ------------------------------------------------------------------------------

    @property
    def mpp(self) -> float:
        """µm per level-0 pixel (x). Raises MissingMPPError if the slide was opened without one."""
        if self.mpp_x is None:
            raise MissingMPPError(self.path, "no pixel size (µm per pixel) in the file")
        return self.mpp_x

    def __repr__(self) -> str:
        return (
            f"Slide({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self.mpp_x}, mpp_source={self.mpp_source!r})"
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backend handle."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __reduce__(self):  # reopen on the other side (Dask workers)
        return (_reopen, (str(self.path), self.backend, self._mpp_override, self.mpp_x is not None))

    def identity(self) -> dict[str, Any]:
        """``{"path", "size", "mtime", "quick_hash"}``; quick_hash = sha256(size + first + last MiB)."""
        return file_identity(self.path)

    # -- reading -----------------------------------------------------------------------------

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """RGB ``uint8`` array ``(h, w, 3)`` of ``size`` (w, h) level pixels whose top-left is at
        level-0 ``location`` (x, y). Outside the slide and transparent pixels are white."""
        w, h = int(size[0]), int(size[1])
        x, y = int(location[0]), int(location[1])
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be positive, got {size}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # clip the request to the level (backends pad differently; we pad with white)
        lx0, ly0 = x / ds, y / ds
        cx0, cy0 = max(0, math.ceil(-lx0)), max(0, math.ceil(-ly0))
        cx1 = min(w, math.floor(lw - lx0))
        cy1 = min(h, math.floor(lh - ly0))
        if (cx0, cy0, cx1, cy1) == (0, 0, w, h):  # fully inside: no canvas
            return self._read((x, y), level, (w, h))
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        loc0 = (x + round(cx0 * ds), y + round(cy0 * ds))
        out[cy0:cy1, cx0:cx1] = self._read(loc0, level, (cx1 - cx0, cy1 - cy0))
        return out

    def _read(self, loc0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        # openslide: an error poisons the whole handle, so a read that fails may be another
        # thread's corrupt tile: reopen and retry once before calling this region corrupt
        attempts = 2 if self.backend == "openslide" else 1
        for attempt in range(attempts):
            handle = self._handle
            if handle is None:
                raise ValueError(f"{self.path}: slide is closed")
            try:
                img = handle.read_region(loc0, level, size)
                break
            except _decode_errors(self.backend) as err:
                self._reopen_after_error(handle)
                if attempt + 1 < attempts:
                    continue
                ds = self.level_downsamples[level]
                region = (loc0[0], loc0[1], round(size[0] * ds), round(size[1] * ds))
                raise CorruptTileError(
                    self.path, f"pixel data could not be decoded ({_short(err)})", region=region
                ) from err
        if isinstance(img, Image.Image):
            return _pil_to_rgb(img)
        return _to_rgb(np.asarray(img))

    def _reopen_after_error(self, failed: Any) -> None:
        """openslide handles are unusable after a decode error: swap in a fresh one.

        The failed handle is not closed here (another thread may still be inside a call on it);
        openslide-python closes it when its last reference goes.
        """
        if self.backend != "openslide":
            return
        with self._lock:
            if self._handle is not failed:  # closed, or another thread already swapped it
                return
            try:
                self._handle = _open_backend(self.path, self.backend)
            except Exception as err:  # keep the broken handle; the next read reports again
                logger.debug("%s: reopen after decode error failed: %s", self.path, err)

    def best_level_for_mpp(self, mpp: float, *, tolerance: float = 0.05) -> int:
        """The coarsest level whose mpp ≤ ``mpp·(1+tolerance)`` (level 0 if all are coarser)."""
        best = 0
        for lvl in self.levels:
            if self.mpp * lvl.downsample <= mpp * (1 + tolerance):
                best = lvl.index
        return best

    def read_region_mpp(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float, *, tolerance: float = 0.05
    ) -> np.ndarray:
        """``size`` (w, h) pixels at ``mpp`` µm/px from level-0 ``location``: reads the best level
        and resizes anti-aliased (Lanczos); a level within ``tolerance`` of ``mpp`` is used as is."""
        level = self.best_level_for_mpp(mpp, tolerance=tolerance)
        level_mpp = self.mpp * self.level_downsamples[level]
        w, h = int(size[0]), int(size[1])
        scale = mpp / level_mpp
        if abs(scale - 1) <= tolerance:
            return self.read_region(location, level, (w, h))
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        return resize_rgb(self.read_region(location, level, (rw, rh)), (w, h))

    def thumbnail_at_mpp(self, mpp: float) -> tuple[np.ndarray, float, float]:
        """The whole slide at about ``mpp`` µm/px: ``(rgb, actual_mpp_x, actual_mpp_y)``.

        Built from the coarsest level with mpp ≤ target (never level 0 when a coarser level
        suffices), box-averaged by an integer factor, then Lanczos-resized the rest of the way.
        A tiled TIFF level (Aperio, generic TIFF, anything tiffslide opens) is decoded from its
        stored tiles on 2 threads, each tile reduced at once; other formats are read through the
        backend in full-width bands (~64 MiB; whole strips of a striped TIFF), each reduced — so
        a big single-level file is never held whole either way.
        """
        w0, h0 = self.dimensions
        mpp_x = self.mpp
        mpp_y = float(self.mpp_y or mpp_x)
        out_w = max(1, round(w0 * mpp_x / mpp))
        out_h = max(1, round(h0 * mpp_y / mpp))
        level = self.best_level_for_mpp(mpp, tolerance=0.0)
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        factor = max(1, int(min(lw / out_w, lh / out_h)))
        reduced = self._thumbnail_direct(level, factor) if _DIRECT_THUMBNAIL else None
        if reduced is None:
            band = max(factor, (_BAND_BYTES // (3 * lw)) // factor * factor)
            bands = []
            for by in range(0, lh, band):
                strip = self.read_region((0, round(by * ds)), level, (lw, min(band, lh - by)))
                bands.append(
                    np.asarray(Image.fromarray(strip).reduce(factor)) if factor > 1 else strip
                )
            reduced = bands[0] if len(bands) == 1 else np.concatenate(bands, axis=0)
        thumb = resize_rgb(reduced, (out_w, out_h))
        return thumb, w0 * mpp_x / out_w, h0 * mpp_y / out_h

    def _thumbnail_direct(self, level: int, factor: int) -> np.ndarray | None:
        """``level`` box-reduced by ``factor`` from its stored tiles (``wsi.tiff_tiles``: decoded on
        2 threads, each tile reduced at once), or None when the format, the tile size or a
        disagreement with the backend on the first tile (a vendor colour quirk) rules it out; a
        tile that fails to decode also falls back to the backend, which names the region."""
        from wsi.tiff_tiles import DIRECT_OPENSLIDE_VENDORS, TiffTileSource, TileDecodeError

        if not (self.backend == "tiffslide" or self.vendor in DIRECT_OPENSLIDE_VENDORS):
            return None
        tiles = TiffTileSource.open(self.path, self.level_dimensions, only=level)
        if tiles is None:
            return None
        with tiles:
            lv = tiles.levels[level]
            if lv.tile_width % factor or lv.tile_height % factor:
                return None
            w, h = min(lv.tile_width, lv.width), min(lv.tile_height, lv.height)
            try:
                mine = tiles.decode(level, 0, 0)
                if mine is not None and not np.array_equal(
                    mine[:h, :w], self.read_region((0, 0), level, (w, h))
                ):
                    return None
                return tiles.read_level_reduced(level, factor, threads=_THUMBNAIL_THREADS)
            except (TileDecodeError, CorruptTileError, OSError) as err:
                logger.debug("%s: thumbnail through the backend (%s)", self.path, err)
                return None

    def info(self) -> dict[str, Any]:
        """A json-able description: dimensions, levels, mpp and its source, vendor, backend."""
        return {
            "path": str(self.path),
            "slide_id": self.slide_id,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "mpp": self.mpp_x,
            "mpp_y": self.mpp_y,
            "mpp_source": self.mpp_source,
            "objective_power": self.properties.get("openslide.objective-power")
            or self.properties.get("tiffslide.objective-power"),
            "levels": [
                {"index": lv.index, "dimensions": list(lv.dimensions), "downsample": lv.downsample, "mpp": lv.mpp}
                for lv in self.levels
            ],
        }


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image → writable RGB uint8 array, compositing alpha on white (Pillow's C paths)."""
    if img.mode == "RGBA":
        lo, _ = img.getchannel("A").getextrema()
        if lo < 255:
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        img = img.convert("RGB")
    elif img.mode != "RGB":
        return _to_rgb(np.asarray(img))
    return np.array(img)


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB(A)/gray array → RGB uint8, compositing alpha on white."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.uint16)
        if alpha.min() == 255:
            return np.ascontiguousarray(arr[..., :3])
        rgb = arr[..., :3].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    rgb = np.ascontiguousarray(arr[..., :3])
    return rgb if rgb.flags.writeable else rgb.copy()  # PIL-backed arrays are read-only


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased resize of an RGB uint8 array to ``size`` (w, h) with Pillow's Lanczos filter."""
    w, h = int(size[0]), int(size[1])
    if rgb.shape[1] == w and rgb.shape[0] == h:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS))


def file_identity(path: str | Path) -> dict[str, Any]:
    """``{"path", "size", "mtime", "quick_hash"}`` of a file; hash = sha256(size, first, last MiB)."""
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with p.open("rb") as f:
        h.update(f.read(_MIB))
        if st.st_size > _MIB:
            f.seek(max(_MIB, st.st_size - _MIB))
            h.update(f.read(_MIB))
    return {
        "path": str(p.resolve()),
        "size": st.st_size,
        "mtime": st.st_mtime,
        "quick_hash": "sha256:" + h.hexdigest(),
    }


def _reopen(path: str, backend: Backend, mpp: float | None, require_mpp: bool) -> Slide:
    return open_slide(path, backend=backend, mpp=mpp, require_mpp=require_mpp)


def open_slide(
    path: str | Path,
    *,
    backend: Literal["auto", "openslide", "tiffslide"] = "auto",
    mpp: float | None = None,
    require_mpp: bool = True,
) -> Slide:
    """Open a brightfield whole-slide image.

    ``backend="auto"`` tries openslide then tiffslide. ``mpp`` (µm/px) is used when the file has
    none. ``require_mpp=False`` opens a slide without a pixel size (``slide.mpp_x is None``) for
    inspection; reading at an mpp then raises MissingMPPError.

    Raises SlideOpenError (no backend can read the file; every backend's reason in the message),
    UnsupportedSlideError (not brightfield RGB), MissingMPPError.
    """
    path = Path(path)
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp}")
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of 'auto', 'openslide', 'tiffslide'; got {backend!r}")
    if not path.exists():
        raise SlideOpenError(path, "no such file", "check the path")
    if path.is_dir():
        raise SlideOpenError(path, "is a directory, not a slide file", "pass the slide file itself")
    candidates: tuple[Backend, ...] = BACKENDS if backend == "auto" else (backend,)

    _inspect_tiff(path)  # UnsupportedSlideError / SlideOpenError for TIFFs we cannot use

    errors: list[tuple[Backend, BaseException]] = []
    for name in candidates:
        try:
            handle = _open_backend(path, name)
        except Exception as err:
            errors.append((name, err))
            continue
        try:
            return Slide(path, handle, name, mpp_override=mpp, require_mpp=require_mpp)
        except BaseException:
            handle.close()
            raise
    reasons = "; ".join(f"{name}: {_short(err)}" for name, err in errors)
    first = errors[0][1]
    cause = first
    for _, later in errors[1:]:  # chain: first error, caused by the next, ...
        cause.__cause__ = later
        cause = later
    raise SlideOpenError(path, f"no backend could open the file ({reasons})") from first
