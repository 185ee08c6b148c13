"""A self-contained HTML report (images inlined as base64) for a demo or training run."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def _img_tag(path: str | Path | None, *, width: int = 260, alt: str = "") -> str:
    if path is None or not Path(path).exists():
        return "<em>n/a</em>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" alt="{html.escape(alt)}">'


def roc_png(y_true: np.ndarray, y_score: np.ndarray, fold: np.ndarray | None = None) -> bytes:
    """ROC curve(s) as PNG bytes: one line per fold (thin) and the pooled curve (thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=110)
    if fold is not None:
        for k in np.unique(fold):
            sel = fold == k
            if len(np.unique(y_true[sel])) == 2:
                fpr, tpr, _ = roc_curve(y_true[sel], y_score[sel])
                ax.plot(fpr, tpr, lw=1, alpha=0.45, label=f"fold {k}")
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, y_score)
        auc = roc_auc_score(y_true, y_score)
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled AUC {auc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC (out-of-fold predictions)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=False, border=0, classes="tbl", float_format=lambda v: f"{v:.3f}")


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{margin-bottom:0} .sub{color:#666;margin-top:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
.tbl{border-collapse:collapse;font-size:13px} .tbl th,.tbl td{padding:4px 10px;border-bottom:1px solid #eee;text-align:left}
.tbl th{background:#f6f6f6} .grid{display:flex;flex-wrap:wrap;gap:14px} .card{border:1px solid #e3e3e3;border-radius:6px;padding:8px;font-size:12px}
.kpi{display:flex;gap:18px;flex-wrap:wrap} .kpi div{background:#f4f7fb;border-radius:8px;padding:10px 16px}
.kpi b{display:block;font-size:22px} pre{background:#f7f7f7;padding:10px;border-radius:6px;overflow-x:auto;font-size:12.5px}
.warn{background:#fff6e0;border:1px solid #f0d58c;padding:8px 12px;border-radius:6px}
"""


def write_report(
    path: str | Path,
    *,
    title: str,
    subtitle: str,
    kpis: Mapping[str, str],
    notes: Sequence[str],
    cohort: pd.DataFrame,
    thumbnails: Mapping[str, Path],
    heatmaps: Mapping[str, Path],
    fold_metrics: pd.DataFrame,
    summary: Mapping[str, Mapping[str, float]],
    predictions: pd.DataFrame | None,
    stages: pd.DataFrame,
    commands: Sequence[str],
    extra_html: str = "",
) -> Path:
    """Write ``report.html``; every image is embedded so the file can be mailed or archived."""
    path = Path(path)
    parts: list[str] = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>",
        "<div class='kpi'>" + "".join(f"<div>{html.escape(k)}<b>{html.escape(v)}</b></div>" for k, v in kpis.items()) + "</div>",
    ]
    for note in notes:
        parts.append(f"<p class='warn'>{html.escape(note)}</p>")
    parts.append("<h2>Stages</h2>" + _table(stages))
    summ = pd.DataFrame(
        [{"metric": m, "mean": v["mean"], "std": v["std"]} for m, v in summary.items()]
    )
    parts.append("<h2>Cross-validated metrics</h2><div class='grid'><div>" + _table(summ) + "<br>" + _table(fold_metrics) + "</div>")
    if predictions is not None and len(predictions):
        prob_cols = [c for c in predictions.columns if c.startswith("prob_")]
        score = predictions[prob_cols[-1]].to_numpy()
        y = predictions["label"].to_numpy()
        classes = [c[len("prob_") :] for c in prob_cols]
        y_bin = (pd.Series(y).astype(str) == str(classes[-1])).to_numpy().astype(int)
        fold = predictions["fold"].to_numpy() if "fold" in predictions else None
        roc = base64.b64encode(roc_png(y_bin, score, fold)).decode()
        parts.append(f"<div><img src='data:image/png;base64,{roc}' width='420' alt='ROC curve'></div>")
    parts.append("</div>")
    parts.append("<h2>Cohort</h2>" + _table(cohort))
    parts.append("<h2>Tissue detection and attention heatmaps</h2><div class='grid'>")
    for sid in cohort["slide_id"]:
        row = cohort[cohort["slide_id"] == sid].iloc[0]
        label = html.escape(str(row.get("label", "")))
        parts.append(
            f"<div class='card'><b>{html.escape(sid)}</b> · label {label}<br>"
            f"{_img_tag(thumbnails.get(sid), alt=f'tissue {sid}')}<br>{_img_tag(heatmaps.get(sid), alt=f'heatmap {sid}')}</div>"
        )
    parts.append("</div>")
    parts.append(extra_html)
    parts.append("<h2>Reproduce on your own slides</h2><pre>" + html.escape("\n".join(commands)) + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path


def stage_table(stages: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Stage rows: name, items, seconds, items per second."""
    rows = []
    for s in stages:
        sec = float(s["seconds"])
        n = s.get("items")
        rows.append(
            {
                "stage": s["stage"],
                "items": "" if n is None else n,
                "seconds": round(sec, 2),
                "per second": "" if not n else round(n / max(sec, 1e-9), 1),
            }
        )
    return pd.DataFrame(rows)
