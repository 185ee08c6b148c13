"""Attention heatmaps of a trained run on one slide: CSV, QuPath GeoJSON and a PNG overlay.

The overlay is drawn patch by patch into a canvas the size of the slide thumbnail (at
``thumb_mpp``), so memory is bounded by the thumbnail, never by the slide. The GeoJSON is
streamed feature by feature. Attention is averaged over the run's fold models (or taken from
one fold) and also given as a percentile rank in [0, 1], which is what the overlay colours.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy.stats import rankdata

from pipelines.config import HeatmapJob, save_resolved_config
from wsi.errors import StoreError
from wsi.store import FeatureStore

log = logging.getLogger(__name__)


class HeatmapError(ValueError):
    """A heatmap cannot be made; the message names the file, the reason and the fix."""


@dataclass
class HeatmapResult:
    """Files written for one slide and the run's prediction for it."""

    slide_id: str
    n_patches: int
    csv: Path
    geojson: Path
    png: Path
    probs: dict[str, float] = field(default_factory=dict)


def _check_same_file(slide: str | Path, store: Path, slide_id: str, attrs: dict[str, Any]) -> None:
    """The slide file must be the one the store's features came from (size and content hash)."""
    from wsi.slide import file_identity

    recorded = attrs.get("source") or {}
    if not recorded.get("quick_hash") or not Path(slide).is_file():
        return  # a store written from arrays records no source file; a missing file fails when opened
    mine = file_identity(slide)
    if (mine["size"], mine["quick_hash"]) != (recorded.get("size"), recorded.get("quick_hash")):
        raise HeatmapError(
            f"{slide}: not the file whose features {store} holds as slide {slide_id!r} (that was "
            f"{recorded.get('path')}, {recorded.get('size')} bytes, {recorded.get('quick_hash', '')[:19]}...; this one "
            f"{mine['size']} bytes, {mine['quick_hash'][:19]}...). Fix: pass the slide the store was extracted from, "
            "or extract this file into a store"
        )


def run_checkpoints(run_dir: str | Path, fold: int | None = None) -> list[Path]:
    """The fold checkpoints of a training run (one fold if ``fold`` is given)."""
    from pipelines.predict import PredictError, fold_checkpoints

    try:
        return fold_checkpoints(run_dir, None if fold is None else [fold])
    except PredictError as err:
        raise HeatmapError(str(err)) from err


def patch_size_level0(attrs: dict[str, Any], coords: np.ndarray) -> int:
    """Patch side in level-0 pixels: from the store's grid attributes, else the coordinate step."""
    grid = attrs.get("grid") or {}
    for value in (grid.get("patch_size_level0"), attrs.get("patch_size_level0")):
        if value:
            return int(value)
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    if len(steps) == 0:
        raise HeatmapError("cannot tell the patch size: no grid attributes and a single patch position")
    return int(steps.min())


def slide_attention(
    models: Sequence[Any], features: np.ndarray, *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-patch attention ``(N,)`` and the prediction ``(m,)`` (class probabilities, a value or a
    risk) with its column names, averaged over the fold models (``pipelines.predict.FoldModel``)."""
    bag = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float16))
    att_sum = np.zeros(len(bag), dtype=np.float64)
    pred_sum = None
    for fm in models:
        ckpt = fm.ckpt
        if ckpt["in_dim"] != bag.shape[1]:
            raise HeatmapError(
                f"{fm.name}.pt: model expects {ckpt['in_dim']}-d features, the store has {bag.shape[1]}-d. "
                "Fix: use the store the run was trained on"
            )
        mean, std = ckpt["mean"], ckpt["std"]
        with torch.no_grad():
            x = bag.float()
            if mean is not None:
                x = (x - mean) / std
            out = fm.model(x[None].to(device))
        if out.attention is None:
            raise HeatmapError(f"{fm.name}.pt: MIL head {ckpt['model']!r} has no per-instance attention")
        att_sum += out.attention[0].double().cpu().numpy()
        pred = fm.task.predict(out.logits.float().cpu())[0]
        pred_sum = pred if pred_sum is None else pred_sum + pred
    task = models[0].task
    names = [c[len("prob_"):] if c.startswith("prob_") else c for c in task.prediction_columns]
    return att_sum / len(models), pred_sum / len(models), names


def percentile(values: np.ndarray) -> np.ndarray:
    """Rank of each value scaled to [0, 1] (ties share their average rank)."""
    if len(values) <= 1:
        return np.ones_like(values, dtype=np.float64)
    return (rankdata(values) - 1) / (len(values) - 1)


def render_overlay(
    thumbnail: np.ndarray,
    coords: np.ndarray,
    size: int,
    values: np.ndarray,
    *,
    scale: tuple[float, float],
    cmap: str = "jet",
    alpha: float = 0.45,
) -> np.ndarray:
    """Colour ``values`` in [0, 1] over ``thumbnail`` patch by patch; overlaps are averaged.

    ``scale`` is thumbnail pixels per level-0 pixel (x, y). Memory: two float32 canvases of
    the thumbnail's size plus the output image.
    """
    from matplotlib import colormaps

    h, w = thumbnail.shape[:2]
    total = np.zeros((h, w), dtype=np.float32)
    count = np.zeros((h, w), dtype=np.float32)
    sx, sy = scale
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(np.int64), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(np.int64), 0, h)
    x1 = np.clip(np.maximum(np.ceil((coords[:, 0] + size) * sx).astype(np.int64), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((coords[:, 1] + size) * sy).astype(np.int64), y0 + 1), 0, h)
    for i in range(len(values)):
        total[y0[i] : y1[i], x0[i] : x1[i]] += values[i]
        count[y0[i] : y1[i], x0[i] : x1[i]] += 1
    covered = count > 0
    heat = total[covered] / count[covered]
    colours = colormaps[cmap](heat, bytes=True)[:, :3].astype(np.float32)  # covered pixels only
    out = thumbnail.copy()
    out[covered] = np.clip((1 - alpha) * out[covered] + alpha * colours + 0.5, 0, 255).astype(np.uint8)
    return out


def write_geojson(path: Path, coords: np.ndarray, size: int, measurements: dict[str, np.ndarray]) -> Path:
    """One square polygon per patch (level-0 px) with its measurements, streamed (QuPath 0.4+)."""
    with path.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for i, (x, y) in enumerate(coords.tolist()):
            feature = {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "name": f"patch {i}",
                    "measurements": {k: float(v[i]) for k, v in measurements.items()},
                },
            }
            f.write(("," if i else "") + json.dumps(feature) + "\n")
        f.write("]}\n")
    return path


def heatmap_slide(
    run: str | Path,
    store: str | Path | FeatureStore,
    slide: str | Path,
    out: str | Path,
    *,
    fold: int | None = None,
    thumb_mpp: float = 8.0,
    cmap: str = "jet",
    alpha: float = 0.45,
    slide_mpp: float | None = None,
    device: str = "cpu",
) -> HeatmapResult:
    """Attention CSV, GeoJSON and overlay PNG of ``slide`` under the models of ``run``."""
    from wsi.slide import open_slide, slide_id_for

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HeatmapError(f"{out}: --out is a file, not a directory. Fix: pass a directory for the heatmaps")
    out.mkdir(parents=True, exist_ok=True)
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    slide_id = slide_id_for(slide)
    if slide_id not in fs:
        raise StoreError(
            f"{fs.path}: slide {slide_id!r} ({slide}) is not in the store. "
            "Fix: extract it first (`slidepipe extract`), or pass the store it was extracted into"
        )
    feats = fs.read(slide_id)
    _check_same_file(slide, fs.path, slide_id, feats.attrs)
    if len(feats) == 0:
        raise HeatmapError(f"{slide}: the slide has no patches in {fs.path}; nothing to draw")
    from pipelines.features import check_features, features_identity
    from pipelines.predict import PredictError, load_fold_models

    try:
        models = load_fold_models(run, folds=None if fold is None else [fold], device=device)
    except PredictError as err:
        raise HeatmapError(str(err)) from err
    check_features(models[0].features, features_identity(fs, dim=int(feats.features.shape[1])),
                   model=f"run {run}", store=str(fs.path))  # fmt: skip
    attention, probs, classes = slide_attention(models, feats.features, device=device)
    pct = percentile(attention)
    size = patch_size_level0(feats.attrs, feats.coords)
    csv_path = out / f"{slide_id}_attention.csv"
    with csv_path.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["x", "y", "width", "height", "attention", "attention_percentile"])
        for (x, y), a, p in zip(feats.coords.tolist(), attention.tolist(), pct.tolist(), strict=True):
            wr.writerow([x, y, size, size, f"{a:.6g}", f"{p:.6g}"])
    geojson = write_geojson(out / f"{slide_id}_attention.geojson", feats.coords, size,
                            {"attention": attention, "attention_percentile": pct})  # fmt: skip
    with open_slide(slide, mpp=slide_mpp) as s:
        thumb, mpp_x, mpp_y = s.thumbnail_at_mpp(thumb_mpp)
        scale = (s.mpp / mpp_x, float(getattr(s, "mpp_y", None) or s.mpp) / mpp_y)
    overlay = render_overlay(thumb, feats.coords, size, pct, scale=scale, cmap=cmap, alpha=alpha)
    png = out / f"{slide_id}_heatmap.png"
    Image.fromarray(overlay).save(png)
    result = HeatmapResult(slide_id, len(feats), csv_path, geojson, png,
                           {c: float(p) for c, p in zip(classes, probs, strict=True)})  # fmt: skip
    (out / f"{slide_id}_prediction.json").write_text(
        json.dumps({"slide_id": slide_id, "probs": result.probs, "checkpoints": [f"{m.name}.pt" for m in models]},
                   indent=1)
    )
    log.info("%s: %d patches, heatmap %dx%d px -> %s", slide_id, len(feats), thumb.shape[1], thumb.shape[0], png)
    return result


def run_heatmap(job: HeatmapJob) -> HeatmapResult:
    """``slidepipe heatmap`` as a function of its job config; writes the resolved config too."""
    if job.run is None or job.store is None or job.slide is None:
        raise HeatmapError("--run, --store and --slide are required")
    if Path(job.out).exists() and not Path(job.out).is_dir():
        raise HeatmapError(f"{job.out}: --out is a file, not a directory. Fix: pass a directory for the heatmaps")
    save_resolved_config(job, job.out, name="heatmap-config.yaml")
    return heatmap_slide(job.run, job.store, job.slide, job.out, fold=job.fold, thumb_mpp=job.thumb_mpp,
                         cmap=job.cmap, alpha=job.alpha, slide_mpp=job.slide_mpp)  # fmt: skip


__all__ = ["HeatmapError", "HeatmapResult", "heatmap_slide", "render_overlay", "run_heatmap"]
