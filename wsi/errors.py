"""Typed errors for slide input. Every message names the file, the reason and the fix."""

from __future__ import annotations

from pathlib import Path


class SlideError(Exception):
    """Base class for problems with one slide file.

    ``str(err)`` reads ``"<path>: <reason>. Fix: <fix>"`` so a batch summary line is
    self-explaining.
    """

    default_fix = "check the file, or leave it out of the batch"

    def __init__(self, path: str | Path, reason: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.fix = fix or self.default_fix
        super().__init__(f"{self.path}: {reason}. Fix: {self.fix}")

    def __reduce__(self):  # picklable across Dask workers
        return (type(self), (self.path, self.reason, self.fix))


class SlideOpenError(SlideError):
    """No backend could open the file (not a slide, unknown compression, truncated...)."""

    default_fix = "check that the file is a whole-slide image readable by OpenSlide or tiffslide"


class UnsupportedSlideError(SlideError):
    """The file opens but is not a brightfield RGB slide (fluorescence, 16-bit, single channel)."""

    default_fix = "slidepipe handles brightfield RGB (H&E, IHC) slides; convert or leave this file out"


class MissingMPPError(SlideError):
    """The physical pixel size (µm per pixel) is not in the file."""

    default_fix = (
        "pass the scan resolution explicitly, e.g. `--slide-mpp 0.25` "
        "(or `open_slide(path, mpp=0.25)`)"
    )


class CorruptTileError(SlideError):
    """Pixel data of a region could not be decoded."""

    default_fix = (
        "re-export or re-scan the slide, or pass `--skip-corrupt-tiles` "
        "to drop the affected patches and go on"
    )

    def __init__(
        self,
        path: str | Path,
        reason: str,
        fix: str | None = None,
        *,
        region: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.region = region
        if region is not None and "region" not in reason:
            x, y, w, h = region
            reason = f"{reason} (region x={x} y={y} w={w} h={h} at level 0)"
        super().__init__(path, reason, fix)

    def __reduce__(self):
        return (_rebuild_corrupt, (self.path, self.reason, self.fix, self.region))


def _rebuild_corrupt(path, reason, fix, region):
    err = CorruptTileError(path, reason, fix)
    err.region = region
    return err


class StainError(ValueError):
    """A stain normaliser cannot be fitted (too little tissue in the reference, bad input)."""


class StoreError(Exception):
    """A feature store problem: identity mismatch, incomplete slide, layout version."""


class StoreMismatchError(StoreError):
    """The store was written with a different encoder, weights or tiling than this run."""


class StoreCorruptError(StoreError):
    """A committed slide of a feature store has a missing, empty, truncated or corrupt chunk (or
    its metadata is gone): reading it would give wrong numbers (Zarr reads a missing chunk as zeros).

    ``str(err)`` reads ``"<store>: slide '<id>' is corrupt: array '<name>': <reason>. Fix: <fix>"``.
    """

    def __init__(
        self, store: str | Path, slide_id: str, array: str | None, reason: str, fix: str | None = None
    ) -> None:
        self.store = Path(store)
        self.slide_id = slide_id
        self.array = array
        self.reason = reason
        self.fix = fix or (
            f"re-extract it: `slidepipe extract ... --out {self.store}` redoes the slides "
            f"`slidepipe verify {self.store}` reports, or delete it ({self.store / 'slides' / slide_id})"
        )
        super().__init__(f"{self.store}: slide {slide_id!r} is corrupt: {reason}. Fix: {self.fix}")

    def __reduce__(self):  # picklable across Dask workers
        return (type(self), (self.store, self.slide_id, self.array, self.reason, self.fix))
