"""Feature stores with planted signals for the task and predict tests (written from arrays)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from wsi.store import FeatureStore

D = 16
FAST = {"epochs": 12, "patience": 12, "lr": 2e-3, "batch_size": 8, "folds": 3, "device": "cpu",
        "model_kwargs": {"hidden": 32, "attn_dim": 16, "dropout": 0.0}}  # fmt: skip


def planted_store(root, *, n=90, seed=0):
    """Bags of 80-160 N(0, 1) instances; a fraction ``frac`` in [0, 0.5] of them are witnesses
    (+2.5 in the first 8 dimensions). ``frac`` drives every label: a value, a hazard, classes."""
    rng = np.random.default_rng(seed)
    fs = FeatureStore(root / "features.zarr")
    rows = []
    for i in range(n):
        frac = float(rng.uniform(0, 0.5))
        m = int(rng.integers(80, 160))
        x = rng.normal(size=(m, D))
        k = int(round(frac * m))
        x[:k, :8] += 2.5
        rng.shuffle(x)
        fs.write(f"s{i:03d}", x.astype(np.float16), np.stack([np.arange(m) * 256, np.zeros(m, int)], 1))
        hazard = np.exp(12.0 * frac)  # oracle C-index of frac itself ~0.82
        t_event = rng.exponential(100.0 / hazard)
        t_cens = rng.uniform(20, 200)
        rows.append({
            "slide_id": f"s{i:03d}", "patient_id": f"p{i:03d}", "score": 10 * frac + rng.normal(0, 0.2),
            "time": round(min(t_event, t_cens), 2), "event": int(t_event <= t_cens),
            "high": "yes" if frac > 0.25 else "no", "any": "pos" if frac > 0.1 else "neg",
        })  # fmt: skip
    table = pd.DataFrame(rows)
    table.to_csv(root / "labels.csv", index=False)
    return root / "features.zarr", table
