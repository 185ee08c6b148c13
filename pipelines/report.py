"""Self-contained HTML reports (images inlined) for the demo, training runs and predictions.

``write_report`` is the demo's page; ``write_task_report`` the page of ``train`` and ``predict``
for every task (metrics with confidence intervals, the fold table, the task's plots from
``pipelines.plots``, heatmaps). Heatmaps are embedded as JPEG at twice their display width, so a
report stays small however many slides it shows."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.plots import calibration_png, km_png, roc_png, scatter_png


def _img_tag(path: str | Path | None, *, width: int = 260, alt: str = "") -> str:
    if path is None or not Path(path).exists():
        return "<em>n/a</em>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" alt="{html.escape(alt)}">'


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
    prob_cols = [] if predictions is None else [c for c in predictions.columns if c.startswith("prob_")]
    if predictions is not None and len(predictions) and prob_cols:
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


# --------------------------------------------------------------------------- task reports
def _jpeg_tag(path: str | Path, *, width: int = 300, alt: str = "") -> str:
    """An image file as an inline JPEG at twice ``width`` (a few tens of kB instead of a full PNG)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > 2 * width:
            im = im.resize((2 * width, max(1, round(im.height * 2 * width / im.width))), Image.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/jpeg;base64,{data}" width="{width}" alt="{html.escape(alt)}">'


def task_plots(task: Any, y: np.ndarray, pred: np.ndarray, fold: np.ndarray | None = None) -> dict[str, bytes]:
    """The task's plots as PNG bytes: ROC and calibration per binary target, predicted vs observed
    per regression target, Kaplan-Meier of the median risk split for survival."""
    known = ~np.all(np.isnan(y), axis=1)
    y, pred = y[known], pred[known]
    fold = None if fold is None else np.asarray(fold)[known]
    plots: dict[str, bytes] = {}
    if task.name == "survival":
        plots["km"] = km_png(y[:, 0], y[:, 1], pred[:, 0])
        return plots
    multi = len(task.columns) > 1
    for j, col in enumerate(task.columns):
        suffix = f"_{col}" if multi else ""
        ok = ~np.isnan(y[:, j])
        if task.name == "regression":
            plots[f"scatter{suffix}"] = scatter_png(y[ok, j], pred[ok, j], target=col)
            continue
        start = sum(len(c) for c in task.classes[:j])
        classes = task.classes[j]
        if len(classes) == 2:
            yb, prob = (y[ok, j] == 1).astype(int), pred[ok, start + 1]
            plots[f"roc{suffix}"] = roc_png(yb, prob, None if fold is None else fold[ok],
                                            title=f"ROC: {col} = {classes[1]}")  # fmt: skip
            plots[f"calibration{suffix}"] = calibration_png(yb, prob, title=f"Calibration: {col} = {classes[1]}")
    return plots


def _metrics_table(metrics: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not metrics:
        return "<p><em>no labels: no metrics</em></p>"
    rows = []
    for name, m in metrics.items():
        ci = m.get("ci95")
        value = m.get("value")
        rows.append({"metric": name, "value": "n/a" if value is None or value != value else (
            f"{value:.3f}" if isinstance(value, float) else str(value)),
            "95% CI": "" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"})  # fmt: skip
    return _table(pd.DataFrame(rows))


def write_task_report(
    path: str | Path,
    *,
    title: str,
    subtitle: str,
    task: Any,
    metrics: Mapping[str, Mapping[str, Any]] | None,
    predictions: pd.DataFrame,
    plots: Mapping[str, bytes],
    heatmaps: Mapping[str, Path] | None = None,
    fold_metrics: pd.DataFrame | None = None,
    summary: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
    commands: Sequence[str] = (),
) -> Path:
    """The report of a training run or a prediction: metrics with CIs, the fold table (mean ± sd),
    the task's plots, heatmaps and the first rows of the predictions; written aside and renamed."""
    path = Path(path)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='sub'>{html.escape(subtitle)}</p>",
    ]
    parts += [f"<p class='warn'>{html.escape(n)}</p>" for n in notes]
    parts.append("<h2>Metrics (95 % bootstrap CI over patients)</h2>" + _metrics_table(metrics))
    if summary:
        summ = pd.DataFrame([{"metric": k, "mean": v["mean"], "std": v["std"]} for k, v in summary.items()])
        parts.append("<h2>Cross-validation (mean ± sd over folds)</h2>" + _table(summ))
    if fold_metrics is not None and len(fold_metrics):
        parts.append("<h3>Per fold</h3>" + _table(fold_metrics))
    if plots:
        imgs = "".join(
            f"<div class='card'><b>{html.escape(name)}</b><br><img src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}' width='380' alt='{html.escape(name)}'></div>"
            for name, png in plots.items()
        )
        parts.append(f"<h2>Plots</h2><div class='grid'>{imgs}</div>")
    if heatmaps:
        cards = "".join(f"<div class='card'><b>{html.escape(sid)}</b><br>{_jpeg_tag(p, alt=sid)}</div>"
                        for sid, p in heatmaps.items())  # fmt: skip
        parts.append(f"<h2>Attention heatmaps</h2><div class='grid'>{cards}</div>")
    parts.append(f"<h2>Predictions</h2><p>{len(predictions)} rows (first 50; all in predictions.csv)</p>")
    parts.append(_table(predictions.head(50)))
    if commands:
        parts.append("<h2>Commands</h2><pre>" + html.escape("\n".join(commands)) + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)
    return path
