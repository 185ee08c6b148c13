"""``slidepipe export-h5``: one CLAM/TRIDENT-style ``<slide_id>.h5`` per slide of a feature store.

Each file holds ``features`` (N, D) float32 and ``coords`` (N, 2) int64 (level-0 top-left x, y).
``coords`` carries the attrs CLAM's and TRIDENT's readers use (``patch_size``, ``patch_level``,
``downsample``, ``level_dim``, ``patch_size_level0``, magnifications ...); the file root carries
the encoder identity and slidepipe's own provenance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import ExportJob
from pipelines.summary import RunSummary, SlideResult
from wsi.errors import StoreCorruptError
from wsi.store import FeatureStore, SlideFeatures

log = logging.getLogger(__name__)

MPP_AT_10X = 1.0  # µm/px at 10x: magnification = 10 / mpp (reported as is, never binned)


def coords_attrs(slide: SlideFeatures) -> dict[str, Any]:
    """The attrs of the ``coords`` dataset, in CLAM and TRIDENT naming.

    ``patch_size`` is the side at ``target_mpp`` (TRIDENT's meaning, as in ``slidepipe tile``);
    ``patch_size_read`` is the side read at ``patch_level``. They differ only when the read level
    needs a resize (``needs_resize``): CLAM-style readers then read ``patch_size_read`` px at
    ``patch_level`` (or ``patch_size_level0`` px at level 0).
    """
    a = slide.attrs
    grid = a.get("grid", {})
    dims = [int(v) for v in grid.get("slide_dimensions", [0, 0])]
    ds = float(grid.get("read_downsample", 1.0))
    level_dims = [int(v) for v in a.get("read_level_dimensions", [round(dims[0] / ds), round(dims[1] / ds)])]
    slide_mpp = float(a.get("slide_mpp", grid.get("slide_mpp", float("nan"))))
    target_mpp = float(grid.get("target_mpp", float("nan")))
    return {
        "name": slide.slide_id,
        "patch_size": int(grid.get("patch_size", 0)),
        "patch_level": int(grid.get("read_level", a.get("read_level", 0))),
        "downsample": np.array([ds, ds], dtype=np.float64),
        "level_dim": np.array(level_dims, dtype=np.int64),
        "downsampled_level_dim": np.array(level_dims, dtype=np.int64),
        "patch_size_level0": int(grid.get("patch_size_level0", 0)),
        "patch_size_read": int(grid.get("patch_size_read", grid.get("patch_size", 0))),
        "needs_resize": bool(grid.get("needs_resize", False)),
        "stride_level0": int(grid.get("stride_level0", 0)),
        "overlap": int(grid.get("overlap", 0)),
        "level0_width": dims[0],
        "level0_height": dims[1],
        "level0_mpp": slide_mpp,
        "level0_magnification": round(10 * MPP_AT_10X / slide_mpp, 3) if slide_mpp > 0 else -1.0,
        "target_mpp": target_mpp,
        "target_magnification": round(10 * MPP_AT_10X / target_mpp, 3) if target_mpp > 0 else -1.0,
        "effective_mpp": float(grid.get("effective_mpp", a.get("effective_mpp", float("nan")))),
    }


def export_slide(store: FeatureStore, slide_id: str, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<slide_id>.h5`` atomically (temp file + rename); returns its path."""
    import h5py

    slide = store.read(slide_id)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{slide_id}.h5"
    tmp = path.with_name(f".{path.name}.tmp")
    ident = store.identity
    with h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", data=slide.features.astype(np.float32))
        coords = f.create_dataset("coords", data=slide.coords.astype(np.int64))
        f.create_dataset("tissue", data=slide.tissue.astype(np.float32))
        for k, v in coords_attrs(slide).items():
            coords.attrs[k] = v
        enc = ident.get("encoder", {})
        feats.attrs["encoder"] = str(enc.get("name", ""))
        feats.attrs["weights_id"] = str(enc.get("weights_id", ""))
        f.attrs["encoder"] = str(enc.get("name", ""))
        f.attrs["weights_id"] = str(enc.get("weights_id", ""))
        f.attrs["slidepipe_store"] = str(store.path)
        f.attrs["slidepipe_identity"] = json.dumps(ident, default=str)
        f.attrs["slidepipe_slide_attrs"] = json.dumps(slide.attrs, default=str)
    tmp.replace(path)
    return path


def export_h5(store_path: str | Path, out_dir: str | Path, *, slide_ids: Iterable[str] | None = None) -> RunSummary:
    """Export every (or the named) complete slide of a store; one failure does not stop the rest,
    but a corrupt slide (missing or damaged chunk) stops the export with ``StoreCorruptError``:
    before any file is written when a chunk file is missing or resized, else when it is read."""
    summary = RunSummary("export-h5")
    store = FeatureStore(store_path, mode="r")
    ids = store.slide_ids() if slide_ids is None else list(slide_ids)
    refuse_corrupt(store, ids)
    for sid in ids:
        t0 = time.perf_counter()
        try:
            path = export_slide(store, sid, out_dir)
        except StoreCorruptError:
            raise  # never a partial export that looks complete
        except Exception as err:
            log.warning("%s: export failed: %s", sid, err)
            summary.add(SlideResult.failed(sid, str(store.path / "slides" / sid), err, time.perf_counter() - t0))
            continue
        n = int((store.slide_attrs(sid) or {}).get("n_tiles", 0))
        summary.add(SlideResult(sid, str(path), "done", n_patches=n, seconds=round(time.perf_counter() - t0, 3)))
    summary.finished = time.time()
    return summary


def refuse_corrupt(store: FeatureStore, slide_ids: Iterable[str]) -> None:
    """``StoreCorruptError`` naming the first slide with a missing, empty or resized chunk file (a
    listing of the chunk files: nothing is read) and how many others there are."""
    bad = [(sid, check) for sid in slide_ids if sid in store and not (check := store.check(sid)).ok]
    if not bad:
        return
    sid, check = bad[0]
    reason = "; ".join(map(str, check.problems))
    if len(bad) > 1:
        reason += f" (and {len(bad) - 1} more corrupt slides: {', '.join(s for s, _ in bad[1:6])})"
    raise StoreCorruptError(store.path, sid, check.problems[0].array, f"{reason}; nothing was exported")


def run_export(job: ExportJob) -> RunSummary:
    """``slidepipe export-h5`` as a job; the summary is written to ``<out>/export-summary.json``."""
    if job.store is None:
        raise ValueError("export-h5 needs a store. Fix: slidepipe export-h5 STORE OUTDIR")
    summary = export_h5(job.store, job.out)
    summary.write(Path(job.out) / "export-summary.json")
    return summary
