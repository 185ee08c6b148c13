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


def make_cohort(folder: Path, n_slides: int, *, seed: int = 0, workers: int = 2) -> pd.DataFrame:
    """Write ``n_slides`` synthetic slides (half positive) and ``cohort.csv``; reuse a matching cohort."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "cohort.json"
    params = {"n_slides": n_slides, "seed": seed, "size": SLIDE_SIZE, "mpp": SLIDE_MPP, "version": 1}
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
        n_les = int(rng.integers(1, 4)) if label == "positive" else 0
        rows.append({"slide_id": sid, "patient_id": f"patient-{i // 2:03d}", "label": label})
        jobs.append((folder / f"{sid}.svs", seed * 1000 + i, n_les))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        truth = list(pool.map(_make_one, jobs))
    for row, t in zip(rows, truth, strict=True):
        row["n_lesions"] = len(t["lesions"])
        row["lesions"] = json.dumps(t["lesions"])
    cohort = pd.DataFrame(rows)
    cohort[["slide_id", "patient_id", "label"]].to_csv(folder.parent / "labels.csv", index=False)
    manifest.write_text(json.dumps({"params": params, "slides": rows}, indent=1))
    return cohort
