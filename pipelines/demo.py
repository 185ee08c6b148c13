"""``slidepipe demo``: the whole pipeline on a generated two-class cohort, with an HTML report.

Positive slides carry a few dense nuclear clusters ("lesions"); negative slides do not. The demo
tiles the cohort, embeds every tissue patch with a small encoder (random weights by default —
said plainly in the output), trains ABMIL with k-fold cross-validation, renders attention
heatmaps and writes ``report.html``. It needs no data and no network.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import DemoJob, ExtractJob, TileJob, TilingConfig, save_resolved_config

log = logging.getLogger(__name__)

SLIDE_SIZE = (3072, 2304)  # level-0 pixels at 0.5 µm/px: 1.5 x 1.2 mm of tissue section
SLIDE_MPP = 0.5
LESION_RADIUS = 200


@dataclass
class DemoResult:
    """Where the demo wrote its outputs and what it measured."""

    out: Path
    report: Path
    summary: dict[str, dict[str, float | None]]
    stages: list[dict[str, Any]]
    attention_inside: float | None
    attention_outside: float | None
    n_patches: int
    cohort: pd.DataFrame = field(repr=False)


def _make_one(args: tuple[Path, int, int]) -> dict[str, Any]:
    from wsi.synthetic import make_synthetic_slide

    path, seed, n_lesions = args
    s = make_synthetic_slide(
        path, width=SLIDE_SIZE[0], height=SLIDE_SIZE[1], mpp=SLIDE_MPP, seed=seed,
        n_lesions=n_lesions, lesion_radius=LESION_RADIUS,
    )  # fmt: skip
    return {"lesions": [[les.x, les.y, les.radius] for les in s.lesions]}


TASK_COLUMNS = {"classification": ["label"], "regression": ["score"], "survival": ["time", "event"]}


def _planted_labels(task: str, n_lesions: int, rng: np.random.Generator) -> dict[str, Any]:
    """Regression: ``score`` = lesions + noise; survival: an exponential event time whose hazard
    grows with the lesions (x e^1.6 per lesion), censored uniformly."""
    if task == "regression":
        return {"score": round(n_lesions + float(rng.normal(0, 0.3)), 3)}
    if task == "survival":
        t_event = float(rng.exponential(60.0 / np.exp(1.6 * n_lesions)))
        t_cens = float(rng.uniform(20, 150))
        return {"time": round(min(t_event, t_cens), 2), "event": int(t_event <= t_cens)}
    return {}


def make_cohort(folder: Path, n_slides: int, *, seed: int = 0, workers: int = 2,
                task: str = "classification") -> pd.DataFrame:  # fmt: skip
    """Write ``n_slides`` synthetic slides and ``cohort.json``; reuse a matching cohort.

    Classification: half the slides are positive (1-3 lesions), half negative (none). Regression
    and survival: every slide has 0-3 lesions, and the lesion count drives the value or hazard.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "cohort.json"
    params = {"n_slides": n_slides, "seed": seed, "size": SLIDE_SIZE, "mpp": SLIDE_MPP, "version": 1}
    if task != "classification":
        params["task"] = task
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        if saved.get("params") == json.loads(json.dumps(params)):
            return pd.DataFrame(saved["slides"])
    rng = np.random.default_rng(seed)
    labels = np.array(["negative", "positive"] * (n_slides // 2) + ["negative"] * (n_slides % 2))
    rng.shuffle(labels)
    rows, jobs = [], []
    for i, label in enumerate(labels):
        sid = f"demo-{i:03d}"
        if task == "classification":
            n_les = int(rng.integers(1, 4)) if label == "positive" else 0
        else:
            n_les = int(rng.integers(0, 4))
            label = "positive" if n_les else "negative"
        rows.append({"slide_id": sid, "patient_id": f"patient-{i:03d}", "label": label,
                     **_planted_labels(task, n_les, rng)})  # fmt: skip
        jobs.append((folder / f"{sid}.svs", seed * 1000 + i, n_les))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        truth = list(pool.map(_make_one, jobs))
    for row, t in zip(rows, truth, strict=True):
        row["n_lesions"] = len(t["lesions"])
        row["lesions"] = json.dumps(t["lesions"])
    manifest.write_text(json.dumps({"params": params, "slides": rows}, indent=1))
    return pd.DataFrame(rows)


def _lesion_attention(csv_path: Path, lesions: list[list[int]], patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Attention of patches whose centre lies in a lesion, and of all the others."""
    from wsi.synthetic import Lesion, lesion_mask

    att = pd.read_csv(csv_path)
    centres = att[["x", "y"]].to_numpy() + patch / 2
    inside = lesion_mask(centres, [Lesion(*les) for les in lesions])
    a = att["attention"].to_numpy()
    return a[inside], a[~inside]


def _task_plots_html(res, run_dir: Path) -> str:
    """The task's plots of the pooled out-of-fold predictions (KM, predicted vs observed) as HTML."""
    import base64

    from pipelines.report import task_plots
    from pipelines.train import load_cohort, out_of_fold
    from wsi.store import FeatureStore

    if res.task == "classification":
        return ""  # the ROC curve is already on the page
    cohort, _ = load_cohort(FeatureStore(res.config.store, mode="r"), res.config.labels, res.config)
    _, y, pred, fold = out_of_fold(cohort, res.predictions)
    imgs = "".join(f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' width='420' alt='{name}'>"
                   for name, png in task_plots(cohort.task, y, pred, fold).items())  # fmt: skip
    return f"<h2>{res.task.capitalize()}: out-of-fold predictions</h2><div class='grid'>{imgs}</div>"


def _demo_heatmaps(cohort: pd.DataFrame, out: Path, patch_size: int) -> tuple[dict[str, Path], float | None, float | None]:
    """Attention heatmaps of every slide; mean attention inside and outside the planted lesions."""
    from pipelines.heatmap import heatmap_slide

    heatmaps: dict[str, Path] = {}
    inside: list[np.ndarray] = []
    outside: list[np.ndarray] = []
    for row in cohort.itertuples():
        hm = heatmap_slide(out / "run", out / "features.zarr", out / "slides" / f"{row.slide_id}.svs",
                           out / "heatmaps", thumb_mpp=4.0)  # fmt: skip
        heatmaps[row.slide_id] = hm.png
        if row.n_lesions > 0:
            a_in, a_out = _lesion_attention(hm.csv, json.loads(row.lesions), patch_size)
            inside.append(a_in)
            outside.append(a_out)
    att_in = float(np.mean(np.concatenate(inside))) if inside else None
    att_out = float(np.mean(np.concatenate(outside))) if outside else None
    return heatmaps, att_in, att_out


def _demo_report(job: DemoJob, out: Path, cohort: pd.DataFrame, ex, res, stages, heatmaps, att_in, att_out,
                 n_patches: int) -> Path:  # fmt: skip
    """The demo's report.html: KPIs, cohort, thumbnails and heatmaps, cross-validated metrics, plots."""
    from pipelines.report import stage_table, write_report

    metric = {"classification": ("auc", "AUC"), "regression": ("pearson_r", "Pearson r"),
              "survival": ("c_index", "C-index")}[job.task]  # fmt: skip
    main = res.summary.get(metric[0], {})
    patches_per_slide = cohort["slide_id"].map({r.slide_id: r.n_patches for r in ex.results})
    extra_cols = [c for c in TASK_COLUMNS[job.task] if c != "label"]
    table = cohort.assign(patches=patches_per_slide)[["slide_id", "patient_id", "label", *extra_cols, "n_lesions",
                                                     "patches"]]  # fmt: skip
    folds = pd.DataFrame(res.folds)
    keep = [c for c in ("repeat", "fold", *res.summary, "epochs", "best_epoch") if c in folds]
    random_note = (
        f"The encoder '{job.encoder}' has RANDOM weights (weights='{job.weights}'): features are random "
        "projections of the pixels, good enough to separate these synthetic classes, not real tissue. "
        "Use a pathology foundation model with its weights on real slides."
        if job.weights == "random" else f"Encoder '{job.encoder}' with weights {job.weights}."
    )
    report = write_report(
        out / "report.html",
        title="slidepipe demo",
        subtitle=f"{len(cohort)} generated slides (pyramidal JPEG TIFF, {SLIDE_MPP} µm/px); " + {
            "classification": "two classes: 'positive' slides carry 1-3 dense nuclear clusters",
            "regression": "each slide carries 0-3 dense nuclear clusters; the score to regress is their count + noise",
            "survival": "each slide carries 0-3 dense nuclear clusters; each one multiplies the hazard by e^1.6",
        }[job.task] + f"; encoder {job.encoder}.",
        kpis={
            "slides": str(len(cohort)),
            "patches": f"{n_patches:,}",
            f"{metric[1]} (mean ± sd)": f"{main.get('mean', float('nan')):.3f} ± {main.get('std', float('nan')):.3f}",
            "attention in clusters / elsewhere": (
                f"{att_in / att_out:.1f}×" if att_in and att_out else "n/a"
            ),
        },
        notes=[random_note],
        cohort=table,
        thumbnails={sid: out / "tiles" / "overlays" / f"{sid}.png" for sid in cohort["slide_id"]},
        heatmaps=heatmaps,
        fold_metrics=folds[keep],
        summary=res.summary,
        predictions=res.predictions,
        stages=stage_table(stages),
        extra_html=_task_plots_html(res, out / "run"),
        commands=[
            "# 1. tissue + patch grid (overlays, GeoJSON for QuPath, CLAM/TRIDENT coords h5)",
            "slidepipe tile /path/to/slides --out tiles --mpp 0.5 --size 224",
            "# 2. features with a pathology foundation model (local weights file)",
            "slidepipe extract /path/to/slides --out features.zarr --encoder ctranspath --weights ctranspath.pth --mpp 0.5 --size 224",
            "# 3. labels.csv: slide_id,patient_id,label — then cross-validated ABMIL",
            f"slidepipe train --store features.zarr --labels labels.csv --model abmil --folds {job.folds} --out run"
            + {"classification": "", "regression": " --task regression --target score",
               "survival": " --task survival --time time --event event"}[job.task],
            "# 3b. apply the run to an external cohort: metrics with bootstrap CIs",
            "slidepipe predict --run run --store other.zarr --labels other.csv --out predictions",
            "# 4. attention heatmap of one slide",
            "slidepipe heatmap --run run --store features.zarr --slide /path/to/slides/SLIDE.svs --out heatmaps",
            "# this demo again:",
            f"slidepipe demo --out {out} --slides {job.slides} --encoder {job.encoder}",
        ],
    )
    return report


def run_demo(job: DemoJob, *, echo=print) -> DemoResult:
    """Cohort → tile → extract → k-fold ABMIL → heatmaps → ``report.html`` in ``job.out``."""
    from pipelines.extract import run_extract
    from pipelines.tile import run_tile
    from pipelines.train import train_mil

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(job, out)
    stages: list[dict[str, Any]] = []
    tiling = TilingConfig(mpp=0.5, patch_size=224, min_tissue=0.5)

    def stage(name: str, t0: float, items: int | None, unit: str) -> None:
        sec = time.perf_counter() - t0
        stages.append({"stage": name, "items": items, "seconds": sec})
        rate = f", {items / max(sec, 1e-9):.1f} {unit}/s" if items else ""
        echo(f"  {name}: {items if items is not None else ''} {unit} in {sec:.1f} s{rate}")

    echo(f"slidepipe demo → {out}")
    t0 = time.perf_counter()
    cohort = make_cohort(out / "slides", job.slides, seed=job.seed, workers=job.workers, task=job.task)
    cohort[["slide_id", "patient_id", *TASK_COLUMNS[job.task]]].to_csv(out / "labels.csv", index=False)
    stage("generate cohort", t0, len(cohort), "slides")

    t0 = time.perf_counter()
    # the demo owns its outputs: a cohort generated anew (another --task or --seed) replaces the last one
    tile_sum = run_tile(TileJob(slides=[str(out / "slides")], out=out / "tiles", tiling=tiling, overwrite=True))
    stage("tissue + grid", t0, len(tile_sum.results), "slides")
    failed = [r for r in tile_sum.results if r.status == "failed"]
    if failed:
        raise RuntimeError(f"demo: tiling failed for {failed[0].slide_id}: {failed[0].reason}")

    t0 = time.perf_counter()
    ex = run_extract(
        ExtractJob(slides=[str(out / "slides")], out=out / "features.zarr", encoder=job.encoder,
                   weights=job.weights, tiling=tiling, batch_size=64, workers=job.workers, overwrite=True)
    )  # fmt: skip
    if ex.n_failed:
        bad = next(r for r in ex.results if r.status == "failed")
        raise RuntimeError(f"demo: extraction failed for {bad.slide_id}: {bad.reason}")
    n_patches = int(sum(r.n_patches for r in ex.results))
    stage("read + embed patches", t0, n_patches if any(r.status == "done" for r in ex.results) else None, "patches")

    t0 = time.perf_counter()
    target = {"regression": "score"}.get(job.task, "label")
    res = train_mil(out / "features.zarr", out / "labels.csv", model="abmil", folds=job.folds, task=job.task,
                    target=target, out=out / "run", overwrite=True, seed=job.seed, epochs=40, patience=10, lr=5e-4,
                    batch_size=8 if job.task != "survival" else 16)  # fmt: skip
    stage(f"train ABMIL, {job.task} ({job.folds}-fold CV)", t0, job.folds, "folds")

    t0 = time.perf_counter()
    heatmaps, att_in, att_out = _demo_heatmaps(cohort, out, tiling.patch_size)
    stage("attention heatmaps", t0, len(cohort), "slides")

    report = _demo_report(job, out, cohort, ex, res, stages, heatmaps, att_in, att_out, n_patches)
    summary = {
        "slides": len(cohort), "patches": n_patches, "stages": stages, "metrics": res.summary,
        "attention_inside_clusters": att_in, "attention_outside_clusters": att_out,
        "encoder": job.encoder, "weights": job.weights, "report": str(report),
    }  # fmt: skip
    (out / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return DemoResult(out, report, res.summary, stages, att_in, att_out, n_patches, cohort)
