"""Slide-level classification metrics per fold and their mean ± sd over folds."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (one-vs-rest macro for more than two classes), accuracy, balanced accuracy, F1.

    Binary F1 is for class index 1; multi-class F1 is macro. AUC is NaN when the set holds a
    single class.
    """
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = probs.shape[1]
    pred = probs.argmax(1)
    auc = float("nan")
    present = np.unique(y_true)
    if len(present) == n_classes:
        auc = float(
            roc_auc_score(y_true, probs[:, 1])
            if n_classes == 2
            else roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=range(n_classes))
        )
    with warnings.catch_warnings():  # a fold may lack a predicted class: defined as 0, not a problem
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        bacc = float(balanced_accuracy_score(y_true, pred))
    f1 = f1_score(
        y_true,
        pred,
        average="binary" if n_classes == 2 else "macro",
        labels=None if n_classes == 2 else list(range(n_classes)),
        zero_division=0,
    )
    return {
        "auc": auc,
        "accuracy": float(accuracy_score(y_true, pred)),
        "balanced_accuracy": bacc,
        "f1": float(f1),
    }


def summarize(folds: Sequence[dict], keys: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """``{metric: {"mean", "std", "n"}}`` over folds (sample sd, ddof=1; NaN folds skipped)."""
    out: dict[str, dict[str, float | None]] = {}
    for key in keys:
        vals = np.array([f[key] for f in folds if f.get(key) is not None], dtype=float)
        vals = vals[~np.isnan(vals)]
        if len(vals) == 0:
            out[key] = {"mean": None, "std": None, "n": 0}
            continue
        std = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out[key] = {"mean": float(vals.mean()), "std": std, "n": len(vals)}
    return out


def json_safe(value):
    """NaN/inf floats -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Regression, survival and bootstrap confidence intervals. Every function takes numpy arrays,
# returns plain python floats, gives NaN where a statistic is undefined (too few values, constant
# input, no events, ...) and neither raises nor warns on such degenerate input.
# --------------------------------------------------------------------------------------------

REGRESSION_METRICS = ("pearson_r", "spearman_rho", "r2", "mae")
SURVIVAL_METRICS = ("c_index", "uno_c", "logrank_p")

_NAN = float("nan")


def _float_array(x) -> np.ndarray:
    """1-d float array; ``None`` and pandas missing values become NaN."""
    arr = np.asarray(x)
    if arr.dtype == object:
        return np.array([_to_float(v) for v in arr.ravel()], dtype=np.float64)
    return np.asarray(arr, dtype=np.float64).ravel()


def _to_float(v) -> float:
    """A finite float, or NaN for None / pandas NA / NaN / inf / anything not a number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _NAN
    return f if math.isfinite(f) else _NAN


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman rho, R² and mean absolute error of a continuous target.

    Rows whose target (or prediction) is missing/non-finite are dropped first. Correlations and R²
    are NaN with fewer than two rows or constant input (R² needs a non-constant target); MAE is
    NaN only when no row is left.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    y_true = _float_array(y_true)
    y_pred = _float_array(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values but y_pred has {y_pred.size}")
    keep = np.isfinite(y_true) & np.isfinite(y_pred)
    y_true, y_pred = y_true[keep], y_pred[keep]
    out = dict.fromkeys(REGRESSION_METRICS, _NAN)
    if len(y_true) == 0:
        return out
    out["mae"] = float(mean_absolute_error(y_true, y_pred))
    if len(y_true) < 2 or np.ptp(y_true) == 0:
        return out
    out["r2"] = float(r2_score(y_true, y_pred))
    if np.ptp(y_pred) == 0:
        return out
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy's small-sample / near-constant notices
        out["pearson_r"] = float(pearsonr(y_true, y_pred)[0])
        out["spearman_rho"] = float(spearmanr(y_true, y_pred)[0])
    return out


def _survival_arrays(time, event, risk=None):
    """Float time, bool event (and float risk) with rows holding any missing value dropped."""
    time = _float_array(time)
    event_f = _float_array(event)
    cols = [time, event_f] if risk is None else [time, event_f, _float_array(risk)]
    if len({c.size for c in cols}) != 1:
        raise ValueError(f"time, event and risk lengths differ: {[c.size for c in cols]}")
    keep = np.logical_and.reduce([np.isfinite(c) for c in cols])
    time, event_b = time[keep], event_f[keep] != 0
    if risk is None:
        return time, event_b
    return time, event_b, cols[2][keep]


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=event, time=time)


def _harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    from sksurv.metrics import concordance_index_censored

    if len(time) < 2 or not event.any():
        return _NAN
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            c = float(concordance_index_censored(event, time, risk)[0])
    except (ValueError, ZeroDivisionError):  # incl. sksurv's NoComparablePairException
        return _NAN
    return c if math.isfinite(c) else _NAN


def _uno_c(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
) -> float:
    """Uno's IPCW C; the censoring distribution G is the reverse Kaplan–Meier of the train set.

    sksurv needs G(t) > 0 at every evaluation event time it weights, and refuses times beyond the
    largest training time. G is positive strictly below the largest training follow-up, so when
    an evaluation time reaches that follow-up we truncate at ``tau`` = that follow-up: sksurv
    keeps events with ``time < tau`` (strict), i.e. exactly the evaluation times strictly below the
    training follow-up (up to the largest such evaluation time). Later subjects still act as the
    longer-surviving member of a pair.
    """
    from sksurv.metrics import concordance_index_ipcw

    if len(time) < 2 or not event.any() or len(train_time) == 0 or not train_event.any():
        return _NAN
    follow_up = float(train_time.max())
    tau = follow_up if time.max() >= follow_up else None
    if tau is not None and not (event & (time < tau)).any():
        return _NAN
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            c = float(
                concordance_index_ipcw(
                    _structured(train_time, train_event), _structured(time, event), risk, tau=tau
                )[0]
            )
    except (ValueError, ZeroDivisionError):
        return _NAN
    return c if math.isfinite(c) else _NAN


def _logrank_p(time: np.ndarray, event: np.ndarray, high: np.ndarray) -> float:
    from sksurv.compare import compare_survival

    if not event.any() or high.all() or not high.any():
        return _NAN
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p = float(compare_survival(_structured(time, event), high.astype(int))[1])
    except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
        return _NAN
    return p if math.isfinite(p) else _NAN


def risk_groups(risk: np.ndarray) -> np.ndarray:
    """Boolean high-risk indicator: risk strictly above the median risk."""
    risk = _float_array(risk)
    if len(risk) == 0:
        return np.zeros(0, dtype=bool)
    return risk > np.median(risk)


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    train_time: np.ndarray | None = None,
    train_event: np.ndarray | None = None,
) -> dict[str, float]:
    """Harrell's C, Uno's C and the median-split log-rank p-value of a risk score (sksurv).

    ``risk``: higher means an earlier event. ``event``: bool or 0/1 (1 = event observed).
    ``c_index``: Harrell's concordance. ``uno_c``: Uno's IPCW concordance, censoring distribution
    from ``(train_time, train_event)`` when given, else from the evaluation set itself; truncated
    at the largest training follow-up when needed (see ``_uno_c``). ``logrank_p``: log-rank test of
    high (risk > median) against low risk. Rows with a missing time, event or risk are dropped.
    """
    time, event, risk = _survival_arrays(time, event, risk)
    if (train_time is None) != (train_event is None):
        raise ValueError("pass both train_time and train_event, or neither")
    if train_time is None:
        tr_time, tr_event = time, event
    else:
        tr_time, tr_event = _survival_arrays(train_time, train_event)
    return {
        "c_index": _harrell_c(time, event, risk),
        "uno_c": _uno_c(time, event, risk, tr_time, tr_event),
        "logrank_p": _logrank_p(time, event, risk_groups(risk)),
    }


def _ci_key(level: float) -> str:
    return "ci95" if level == 0.95 else f"ci{int(round(level * 100, 9))}"


def bootstrap_ci(
    metric_fn,
    data: dict[str, np.ndarray],
    groups: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict]:
    """Percentile bootstrap CIs of ``metric_fn(**data)``, resampling groups (patients).

    Each replicate draws as many groups as there are, with replacement; a drawn group contributes
    all its rows, repeated as often as it was drawn. Returns ``{metric: {"value": point estimate on
    the full data, "ci95": [lo, hi] or None}}`` (key ``ci{level*100}`` for other levels). NaN
    replicates (and replicates where ``metric_fn`` raises ValueError/ZeroDivisionError) are
    ignored; the interval is None when the value is NaN or fewer than 10 replicates are valid.
    Library warnings raised inside replicates are suppressed. Deterministic for a given seed.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    groups = np.asarray(groups).ravel()
    n = len(groups)
    data = {k: np.asarray(v) for k, v in data.items()}
    for k, v in data.items():
        if len(v) != n:
            raise ValueError(f"data[{k!r}] has {len(v)} rows but groups has {n}")

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        point = {k: _to_float(v) for k, v in metric_fn(**data).items()}
    names = list(point)
    reps = np.full((max(int(n_boot), 0), len(names)), np.nan)

    if n > 0 and len(reps):
        _, inv = np.unique(groups, return_inverse=True)
        inv = inv.ravel()
        counts = np.bincount(inv)
        n_groups = len(counts)
        order = np.argsort(inv, kind="stable")  # rows sorted by group, each group contiguous
        starts = np.cumsum(counts) - counts
        draws = np.random.default_rng(seed).integers(0, n_groups, size=(len(reps), n_groups))
        sizes = counts[draws]  # (n_boot, n_groups) rows contributed by each draw
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for b in range(len(reps)):
                c = sizes[b]
                total = int(c.sum())
                offset = np.repeat(starts[draws[b]] - (np.cumsum(c) - c), c)
                rows = order[offset + np.arange(total)]
                try:
                    res = metric_fn(**{k: v[rows] for k, v in data.items()})
                except (ValueError, ZeroDivisionError):
                    continue
                reps[b] = [_to_float(res.get(m)) for m in names]

    key = _ci_key(level)
    alpha = (1.0 - level) / 2.0
    out: dict[str, dict] = {}
    for j, m in enumerate(names):
        col = reps[:, j]
        col = col[~np.isnan(col)]
        ci = None
        if not math.isnan(point[m]) and len(col) >= 10:
            lo, hi = np.quantile(col, [alpha, 1.0 - alpha])
            ci = [float(lo), float(hi)]
        out[m] = {"value": point[m], key: ci}
    return out
