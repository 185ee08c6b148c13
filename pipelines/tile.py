"""``slidepipe tile``: slides → tissue mask → patch grid, written per slide.

Output directory layout (every file of a slide is written aside and moved in by one rename)::

    OUT/config.yaml                      the resolved job config
    OUT/summary.json                     slides done / failed (with reasons), patches, seconds
    OUT/coords/<slide>.zarr              Zarr v3 group: coords (N, 2) int64 level-0 (x, y),
                                         tissue (N,) float32; attrs: grid, slide, identity
    OUT/patches/<slide>_patches.h5       CLAM/TRIDENT-compatible: dataset ``coords`` with attrs
                                         patch_size, patch_level, downsample, level_dim,
                                         patch_size_level0, target_mpp, overlap (+ ``tissue``)
    OUT/geojson/<slide>.geojson          tissue contours, level-0 px (QuPath)
    OUT/overlays/<slide>.png             thumbnail + tissue contours + the patch grid
    OUT/images/<slide>/<x>_<y>.png|jpg   with ``--save-patches`` (stain-normalised with ``--stain``)
    OUT/stain/<slide>_preview.png        with ``--stain`` and no ``--save-patches``: originals
                                         (top row) above their normalised versions

``tile_slide(path, job)`` is a plain module-level function returning a ``SlideResult`` and never
raising for a bad slide, so a Dask worker can run it (see :mod:`pipelines.cluster`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import TileJob, save_resolved_config
from pipelines.inputs import InputError, expand_slides
from pipelines.summary import RunSummary, SlideResult
from wsi.errors import SlideError
from wsi.slide import Slide, file_identity, open_slide, slide_id_for
from wsi.tiling import TileGrid, make_grid

logger = logging.getLogger(__name__)

N_STAIN_PREVIEW = 8
OUTPUT_DIRS = ("coords", "patches", "geojson", "overlays", "images", "stain")
_TMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)(?:@(?P<host>.+))?$")  # .<name>.tmp-<pid>[@<host>]


class OutputConflictError(InputError):
    """The output already holds a slide of the same id tiled from another file."""


# ---------------------------------------------------------------------------------------------
# writers (each writes to a temporary name, then renames)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{socket.gethostname()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(tmp: Path, final: Path) -> None:
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextlib.contextmanager
def _aside(final: Path) -> Iterator[Path]:
    """Yield this process's temporary name for ``final``, renamed into place on success and
    removed on any error or interruption (Ctrl-C, SIGTERM)."""
    tmp = _tmp_name(final)
    _remove(tmp)
    try:
        yield tmp
        _replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def clean_stale_tmp(out: Path) -> int:
    """Remove the temporary outputs (``<sub>/.<name>.tmp-<pid>``) left in ``out`` by processes of
    this host that are gone (killed, or interrupted before this cleanup existed); returns the count."""
    import psutil

    removed = 0
    host = socket.gethostname()
    for sub in OUTPUT_DIRS:
        folder = out / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            m = _TMP_RE.match(entry.name)
            if m is None or m["host"] not in (None, host) or psutil.pid_exists(int(m["pid"])):
                continue
            logger.info("%s: removing the leftover of process %s", entry, m["pid"])
            _remove(entry)
            removed += 1
    return removed


def write_coords_zarr(path: Path, grid: TileGrid, attrs: dict[str, Any]) -> Path:
    """Zarr v3 group with ``coords`` (N, 2) int64 and ``tissue`` (N,) float32; ``attrs`` on the group."""
    import zarr

    with _aside(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        rows = max(1, min(len(grid), 65536))
        group.create_array("coords", data=grid.coords, chunks=(rows, 2))
        group.create_array("tissue", data=grid.tissue, chunks=(rows,))
        group.attrs.update(attrs)
    return path


def write_patches_h5(path: Path, slide: Slide, grid: TileGrid) -> Path:
    """CLAM/TRIDENT-style ``<slide>_patches.h5``: ``coords`` (N, 2) int64 with the patching attrs.

    ``patch_size`` is the patch side at ``target_mpp`` (TRIDENT's meaning); when the read level
    needs no resize (``needs_resize`` false, the usual case) it is also the side read at
    ``patch_level`` (CLAM's meaning). ``patch_size_read`` is always the side read at that level.
    """
    import h5py

    level_dim = slide.level_dimensions[grid.read_level]
    ds = grid.read_downsample
    with _aside(path) as tmp, h5py.File(tmp, "w") as f:
        coords = f.create_dataset("coords", data=grid.coords, dtype="int64")
        attrs = {
            "patch_size": grid.patch_size,
            "patch_level": grid.read_level,
            "downsample": np.array([ds, ds], dtype=np.float64),
            "downsampled_level_dim": np.array(level_dim, dtype=np.int64),
            "level_dim": np.array(level_dim, dtype=np.int64),
            "level0_dim": np.array(slide.dimensions, dtype=np.int64),
            "patch_size_level0": grid.patch_size_level0,
            "patch_size_read": grid.patch_size_read,
            "stride_level0": grid.stride_level0,
            "target_mpp": grid.target_mpp,
            "effective_mpp": grid.effective_mpp,
            "slide_mpp": grid.slide_mpp,
            "mpp_source": slide.mpp_source or "",
            "overlap": grid.overlap,
            "min_tissue": grid.min_tissue,
            "needs_resize": grid.needs_resize,
            "name": slide.slide_id,
            "save_path": str(path.parent),
        }
        for key, value in attrs.items():
            coords.attrs[key] = value
        f.create_dataset("tissue", data=grid.tissue, dtype="float32")
        f.attrs["slide_path"] = str(slide.path)
    return path


# ---------------------------------------------------------------------------------------------
# patch reading for --save-patches / --stain


def iter_patches(
    slide: Slide, grid: TileGrid, *, indices: np.ndarray | None = None, workers: int = 1,
    skip_corrupt_tiles: bool = False, batch_size: int = 64, skipped: list | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images (B, S, S, 3) uint8, grid indices (B,))`` in grid order, through
    ``wsi.reader.PatchReader`` (only the patches at ``indices`` when given). Corrupt patches
    raise ``CorruptTileError`` unless ``skip_corrupt_tiles`` (then ``(index, reason)`` go to
    ``skipped``)."""
    from wsi.reader import PatchReader

    sub = grid
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
        sub = dataclasses.replace(grid, coords=grid.coords[indices], tissue=grid.tissue[indices])
    reader = PatchReader(slide, sub, batch_size=batch_size, workers=workers, skip_corrupt_tiles=skip_corrupt_tiles)
    for batch in reader:
        idx = np.asarray(batch.indices)
        yield np.asarray(batch.images), (idx if indices is None else indices[idx])
    if skipped is not None:
        skipped.extend((int(i if indices is None else indices[i]), reason) for i, reason in reader.skipped)


def _save_images(folder: Path, images: np.ndarray, coords: np.ndarray, fmt: str) -> None:
    from PIL import Image

    ext, kwargs = (".png", {}) if fmt == "png" else (".jpg", {"quality": 90})
    for img, (x, y) in zip(images, coords, strict=True):
        Image.fromarray(img).save(folder / f"{int(x)}_{int(y)}{ext}", **kwargs)


def _stain_preview(path: Path, before: np.ndarray, after: np.ndarray) -> Path:
    from PIL import Image

    top = np.concatenate(list(before), axis=1)
    bottom = np.concatenate(list(after), axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(path)
    return path


def _load_stain(job: TileJob):
    if job.stain.method == "none":
        return None
    from wsi.stain import load_normalizer

    return load_normalizer(job.stain.method, job.stain.target)


# ---------------------------------------------------------------------------------------------


def tile_slide(path: str | Path, job: TileJob) -> SlideResult:
    """Tissue → grid → outputs for one slide. Never raises for a bad slide: returns a failed
    ``SlideResult`` naming the reason (safe to run in a Dask worker)."""
    path = Path(path)
    slide_id = slide_id_for(path)
    t0 = time.perf_counter()
    try:
        extra = _tile_slide(path, slide_id, job)
    except (SlideError, OSError, ValueError) as err:
        logger.warning("%s", err)
        return SlideResult.failed(slide_id, path, err, seconds=round(time.perf_counter() - t0, 3))
    except Exception as err:  # an unexpected bug must not stop the batch either
        logger.exception("%s: unexpected error", path)
        return SlideResult.failed(slide_id, path, err, seconds=round(time.perf_counter() - t0, 3))
    n = int(extra.pop("n_patches"))
    return SlideResult(slide_id, str(path), "done", n_patches=n, seconds=round(time.perf_counter() - t0, 3), extra=extra)


def _tile_slide(path: Path, slide_id: str, job: TileJob) -> dict[str, Any]:
    from wsi.tissue import detect_tissue

    out = Path(job.out)
    t = job.tiling
    with open_slide(path, backend=t.backend, mpp=t.slide_mpp) as slide:
        mask = detect_tissue(slide, target_mpp=t.tissue_mpp)
        grid = make_grid(
            slide, mask, patch_size=t.patch_size, mpp=t.mpp, overlap=t.overlap, min_tissue=t.min_tissue
        )
        skipped: list = []
        if len(grid) and (job.save_patches != "none" or job.stain.method != "none"):
            _write_patch_images(slide, grid, job, out, slide_id, skipped)
        if skipped and job.save_patches != "none":  # every patch was read: drop the undecodable ones
            keep = np.ones(len(grid), bool)
            keep[[i for i, _ in skipped]] = False
            grid = dataclasses.replace(grid, coords=grid.coords[keep], tissue=grid.tissue[keep])
        attrs = {
            "slide_id": slide_id,
            "slide": slide.info(),
            "identity": slide.identity(),
            "grid": grid.to_attrs(),
            "tissue_fraction": mask.fraction,
            "tissue_mpp": mask.mpp,
            "n_skipped_corrupt": len(skipped),
        }
        for sub in ("coords", "patches", "geojson", "overlays"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        write_coords_zarr(out / "coords" / f"{slide_id}.zarr", grid, attrs)
        write_patches_h5(out / "patches" / f"{slide_id}_patches.h5", slide, grid)
        mask.save_geojson(out / "geojson" / f"{slide_id}.geojson")
        mask.save_overlay(out / "overlays" / f"{slide_id}.png", grid=grid)
    logger.info("%s: %d patches (tissue %.1f %%)", slide_id, len(grid), 100 * mask.fraction)
    return {
        "n_patches": len(grid),
        "backend": slide.backend,
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "read_level": grid.read_level,
        "effective_mpp": grid.effective_mpp,
        "tissue_fraction": round(mask.fraction, 6),
        "n_skipped_corrupt": len(skipped),
        "skipped_corrupt": [list(s) for s in skipped[:100]],
    }


def _write_patch_images(
    slide: Slide, grid: TileGrid, job: TileJob, out: Path, slide_id: str, skipped: list
) -> None:
    norm = _load_stain(job)
    if job.save_patches == "none":  # stain preview only: a few patches spread over the slide
        idx = np.unique(np.linspace(0, len(grid) - 1, min(N_STAIN_PREVIEW, len(grid))).round().astype(int))
        parts = list(iter_patches(slide, grid, indices=idx, skip_corrupt_tiles=job.skip_corrupt_tiles, skipped=skipped))
        if not parts or norm is None:
            return
        before = np.concatenate([p[0] for p in parts])
        (out / "stain").mkdir(parents=True, exist_ok=True)
        _stain_preview(out / "stain" / f"{slide_id}_preview.png", before, norm.transform(before))
        return
    with _aside(out / "images" / slide_id) as tmp:
        tmp.mkdir(parents=True)
        for images, indices in iter_patches(
            slide, grid, workers=job.workers, skip_corrupt_tiles=job.skip_corrupt_tiles, skipped=skipped
        ):
            if norm is not None:
                images = norm.transform(images)
            _save_images(tmp, images, grid.coords[indices], job.save_patches)


def _recorded_identity(out: Path, slide_id: str) -> dict[str, Any] | None:
    """The slide file identity that ``out`` records for ``slide_id`` (coords attrs), else None."""
    meta = out / "coords" / f"{slide_id}.zarr" / "zarr.json"
    try:
        recorded = json.loads(meta.read_text()).get("attributes", {}).get("identity")
    except (OSError, ValueError, AttributeError):
        return None  # nothing there (or unreadable): nothing to compare, the slide is redone
    return recorded if isinstance(recorded, dict) and recorded.get("quick_hash") else None


def _same_file(path: Path, recorded: dict[str, Any]) -> bool:
    st = path.stat()
    if st.st_size != recorded.get("size"):
        return False
    if (str(path.resolve()), st.st_mtime) == (recorded.get("path"), recorded.get("mtime")):
        return True  # the very file, untouched since: no need to hash it
    return file_identity(path)["quick_hash"] == recorded["quick_hash"]


def check_outputs(paths: list[Path], out: Path) -> None:
    """Refuse (``OutputConflictError``) to replace a slide that ``out`` holds from another file
    (another size or content hash) under the same slide id; the same file is simply redone."""
    for path in paths:
        sid = slide_id_for(path)
        recorded = _recorded_identity(out, sid)
        if recorded is None or _same_file(path, recorded):
            continue
        raise OutputConflictError(
            f"{path}: {out} already holds slide '{sid}' tiled from another file, "
            f"{recorded.get('path')} ({recorded.get('size')} bytes, {recorded['quick_hash'][:19]}...), "
            "and would replace it. Fix: pass --overwrite to replace it, tile into another --out, "
            "or rename one file"
        )


def check_job(job: TileJob) -> list[Path]:
    """The job's slide paths, after checking what would otherwise fail every slide or silently
    replace outputs: the stain target (``StainError``), the slide arguments (``InputError``)
    and, unless ``job.overwrite``, slides that the output holds from other files
    (``OutputConflictError``)."""
    _load_stain(job)
    paths = expand_slides(job.slides)
    if not job.overwrite:
        check_outputs(paths, Path(job.out))
    return paths


def run_tile(job: TileJob, *, progress: Callable[[SlideResult], None] | None = None) -> RunSummary:
    """Tile every slide of ``job`` (in this process, or on ``job.cluster``); write the resolved
    config and ``summary.json`` into ``job.out``. Raises (before any slide runs) ``InputError``
    when a slide argument matches no slide, ``OutputConflictError`` when the output holds a slide
    of the same id from another file (unless ``job.overwrite``) and ``StainError`` for an
    unusable stain target. Temporary outputs of dead processes are removed first; this run's own
    are removed if it is interrupted."""
    from pipelines.cluster import run_slides

    paths = check_job(job)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    save_resolved_config(job, out)
    summary = RunSummary("tile")
    for result in run_slides(tile_slide, paths, job, progress=progress):
        summary.add(result)
    summary.finished = time.time()
    summary.write(out / "summary.json")
    return summary
