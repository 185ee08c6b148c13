"""Small PNG figures for training and prediction reports: ROC, calibration, Kaplan–Meier, scatter.

Every function selects matplotlib's Agg backend itself, returns the figure as PNG bytes, closes it
and draws something sensible (a note instead of a curve) on degenerate input: one class, no
events, too few points. Statistics come from :mod:`pipelines.metrics` (sksurv / scikit-learn).
"""

from __future__ import annotations

import io
import math

import numpy as np

from pipelines.metrics import (
    _float_array,
    _survival_arrays,
    regression_metrics,
    risk_groups,
    survival_metrics,
)

FIGSIZE = (4.2, 4.2)
DPI = 110


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _note(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey", fontsize=9
    )


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _unit_axes(ax, xlabel: str, ylabel: str, title: str, *, legend: str) -> None:
    """Axes of a plot on the unit square (ROC, calibration): limits, labels, title, legend."""
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend, fontsize=7)


def roc_png(
    y_true_binary: np.ndarray,
    score: np.ndarray,
    fold: np.ndarray | None = None,
    *,
    title: str = "ROC (out-of-fold predictions)",
) -> bytes:
    """ROC curve(s) as PNG bytes: one line per fold (thin) and the pooled curve (thick)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = _float_array(y_true_binary)
    s = _float_array(score)
    f = None if fold is None else np.asarray(fold).ravel()
    keep = np.isfinite(y) & np.isfinite(s)
    y, s = y[keep].astype(int), s[keep]
    f = None if f is None else f[keep]

    plt, fig, ax = _figure()
    if f is not None:
        for k in np.unique(f):
            sel = f == k
            if len(np.unique(y[sel])) == 2:
                fpr, tpr, _ = roc_curve(y[sel], s[sel])
                ax.plot(fpr, tpr, lw=1, alpha=0.45, label=f"fold {k}")
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        auc = roc_auc_score(y, s)
        ax.plot(fpr, tpr, lw=2.5, color="black", label=f"pooled AUC {auc:.3f}")
    else:
        _note(ax, "ROC undefined: fewer than two classes")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    _unit_axes(ax, "false positive rate", "true positive rate", title, legend="lower right")
    return _png(plt, fig)


def calibration_png(
    y_true_binary: np.ndarray,
    prob: np.ndarray,
    *,
    n_bins: int = 10,
    title: str = "Calibration",
) -> bytes:
    """Reliability diagram (uniform bins of predicted probability) with the diagonal and Brier score."""
    from sklearn.calibration import calibration_curve

    y = _float_array(y_true_binary)
    p = _float_array(prob)
    keep = np.isfinite(y) & np.isfinite(p)
    y, p = y[keep].astype(int), np.clip(p[keep], 0.0, 1.0)

    plt, fig, ax = _figure()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    if len(y) and set(np.unique(y)) <= {0, 1}:
        frac_pos, mean_pred = calibration_curve(
            y, p, n_bins=max(int(n_bins), 1), strategy="uniform"
        )
        brier = float(np.mean((p - y) ** 2))
        ax.plot(
            mean_pred,
            frac_pos,
            marker="o",
            ms=4,
            lw=1.5,
            color="C0",
            label=f"model (Brier {brier:.3f})",
        )
        counts, edges = np.histogram(p, bins=max(int(n_bins), 1), range=(0.0, 1.0))
        ax.bar(
            edges[:-1],
            0.3 * counts / counts.max(),
            width=np.diff(edges),
            align="edge",
            color="C0",
            alpha=0.2,
            label="predictions per bin (scaled)",
        )
    else:
        _note(ax, "no binary labels to calibrate against")
    _unit_axes(ax, "mean predicted probability", "observed fraction positive", title, legend="best")
    return _png(plt, fig)


def km_png(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    title: str = "Kaplan–Meier by predicted risk",
) -> bytes:
    """Kaplan–Meier curves (sksurv) of high- (risk > median) vs low-risk groups, log-rank p in the title.

    Censored observations are marked with ``|``; the legend gives each group's size and events.
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    t, e, r = _survival_arrays(time, event, risk)
    high = risk_groups(r)
    p = survival_metrics(t, e, r)["logrank_p"] if len(t) else float("nan")

    plt, fig, ax = _figure()
    drawn = False
    for name, sel, color in (("low risk", ~high, "C0"), ("high risk", high, "C3")):
        if not sel.any():
            continue
        tt, ee = t[sel], e[sel]
        ut, surv = kaplan_meier_estimator(ee, tt)
        x = np.r_[min(0.0, float(ut[0])), ut]
        y = np.r_[1.0, surv]
        ax.step(
            x,
            y,
            where="post",
            color=color,
            lw=1.8,
            label=f"{name} (n={int(sel.sum())}, {int(ee.sum())} events)",
        )
        cens = tt[~ee]
        if len(cens):
            ax.plot(
                cens,
                y[np.searchsorted(x, cens, side="right") - 1],
                ls="none",
                marker="|",
                ms=6,
                color=color,
            )
        drawn = True
    if not drawn:
        _note(ax, "no survival data")
    elif not e.any():
        _note(ax, "no events")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("time")
    ax.set_ylabel("event-free probability")
    ax.set_title(f"{title}\nlog-rank p = {_fmt_p(p)}", fontsize=10)
    if drawn:
        ax.legend(loc="lower left", fontsize=7)
    return _png(plt, fig)


def scatter_png(y_true: np.ndarray, y_pred: np.ndarray, *, target: str = "value") -> bytes:
    """Predicted vs observed with the identity line; Pearson r in the title."""
    yt = _float_array(y_true)
    yp = _float_array(y_pred)
    keep = np.isfinite(yt) & np.isfinite(yp)
    yt, yp = yt[keep], yp[keep]
    r = regression_metrics(yt, yp)["pearson_r"]

    plt, fig, ax = _figure()
    if len(yt):
        ax.scatter(yt, yp, s=12, alpha=0.6, color="C0", edgecolors="none")
        lo = float(min(yt.min(), yp.min()))
        hi = float(max(yt.max(), yp.max()))
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.03 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    else:
        lo, hi = 0.0, 1.0
        _note(ax, "no observed values")
    ax.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"observed {target}")
    ax.set_ylabel(f"predicted {target}")
    r_txt = "n/a" if math.isnan(r) else f"{r:.3f}"
    ax.set_title(f"{target}: Pearson r = {r_txt} (n={len(yt)})", fontsize=10)
    return _png(plt, fig)
