"""Regression, survival and bootstrap statistics (pipelines.metrics) and report figures (pipelines.plots)."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import mean_absolute_error, r2_score
from sksurv.metrics import concordance_index_ipcw
from sksurv.util import Surv

from pipelines import plots
from pipelines.metrics import (
    METRICS,
    REGRESSION_METRICS,
    SURVIVAL_METRICS,
    bootstrap_ci,
    classification_metrics,
    regression_metrics,
    risk_groups,
    survival_metrics,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _survival_data(n: int = 150, seed: int = 0, censor_scale: float = 12.0):
    """Exponential event times, independent exponential censoring, continuous (tie-free) times."""
    rng = np.random.default_rng(seed)
    t_event = rng.exponential(10.0, n)
    t_cens = rng.exponential(censor_scale, n)
    time_ = np.minimum(t_event, t_cens)
    event = t_event <= t_cens
    risk = -np.log(t_event) + rng.normal(0, 0.8, n)  # informative but noisy
    return time_, event, risk


def _harrell_bruteforce(time_, event, risk) -> float:
    """Test oracle: pairs (i, j) with an event at i and t_i < t_j; ties in risk count 1/2."""
    num = den = 0.0
    for i in range(len(time_)):
        if not event[i]:
            continue
        for j in range(len(time_)):
            if time_[i] < time_[j]:
                den += 1
                if risk[i] > risk[j]:
                    num += 1
                elif risk[i] == risk[j]:
                    num += 0.5
    return num / den


@pytest.fixture(autouse=True)
def _warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------------
# survival
# ---------------------------------------------------------------------------------------------


def test_survival_metric_keys_and_types():
    res = survival_metrics(*_survival_data())
    assert tuple(res) == SURVIVAL_METRICS
    assert all(type(v) is float for v in res.values())


def test_c_index_perfect_and_reversed_order():
    t = np.arange(1.0, 21.0)
    e = np.ones(20, dtype=bool)
    e[::3] = False  # some censoring
    assert survival_metrics(t, e, -t)["c_index"] == pytest.approx(1.0)
    assert survival_metrics(t, e, t)["c_index"] == pytest.approx(0.0)
    assert survival_metrics(t, e, -t)["uno_c"] == pytest.approx(1.0)
    assert survival_metrics(t, e, t)["uno_c"] == pytest.approx(0.0)
    # constant risk: every comparable pair is a tie
    assert survival_metrics(t, e, np.ones(20))["c_index"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harrell_matches_bruteforce(seed):
    t, e, r = _survival_data(n=120, seed=seed)
    r = np.round(r, 1)  # force some tied risks
    assert survival_metrics(t, e, r)["c_index"] == pytest.approx(
        _harrell_bruteforce(t, e, r), abs=1e-12
    )


def test_event_as_int_or_bool_and_missing_rows_dropped():
    t, e, r = _survival_data()
    as_bool = survival_metrics(t, e, r)
    assert survival_metrics(t, e.astype(int), r) == as_bool
    assert survival_metrics(t, e.astype(float), r) == as_bool
    t2, e2, r2 = np.r_[t, np.nan, 5.0], np.r_[e.astype(float), 1.0, np.nan], np.r_[r, 0.3, 0.1]
    assert survival_metrics(t2, e2, r2) == as_bool


def test_uno_equals_harrell_without_censoring():
    rng = np.random.default_rng(3)
    t = rng.exponential(10.0, 200)
    r = -np.log(t) + rng.normal(0, 1.0, 200)
    e = np.ones(200, dtype=bool)
    res = survival_metrics(t, e, r)
    assert res["uno_c"] == pytest.approx(res["c_index"], abs=1e-9)
    res = survival_metrics(t, e, r, train_time=t, train_event=e)
    assert res["uno_c"] == pytest.approx(res["c_index"], abs=1e-9)


def test_uno_uses_training_censoring_distribution():
    t, e, r = _survival_data(n=300, seed=4)
    train_t, train_e = t[:200], e[:200]
    # evaluation times inside the training follow-up: no truncation, same as sksurv directly
    inside = t[200:] < train_t.max()
    tt, ee, rr = t[200:][inside], e[200:][inside], r[200:][inside]
    got = survival_metrics(tt, ee, rr, train_time=train_t, train_event=train_e)["uno_c"]
    want = concordance_index_ipcw(Surv.from_arrays(train_e, train_t), Surv.from_arrays(ee, tt), rr)[
        0
    ]
    assert got == pytest.approx(want, abs=1e-12)
    # self-estimated censoring differs from the training-estimated one
    assert survival_metrics(tt, ee, rr)["uno_c"] != pytest.approx(got, abs=1e-12)
    assert 0.5 < got < 1.0


def test_uno_with_evaluation_beyond_training_follow_up():
    t, e, r = _survival_data(n=300, seed=5)
    train_t, train_e = t[:150] * 0.5, e[:150]  # short training follow-up
    # sksurv on its own refuses evaluation times beyond the training follow-up ...
    with pytest.raises(ValueError):
        concordance_index_ipcw(Surv.from_arrays(train_e, train_t), Surv.from_arrays(e, t), r)
    # ... we truncate at the training follow-up instead
    res = survival_metrics(t, e, r, train_time=train_t, train_event=train_e)
    assert 0.5 < res["uno_c"] < 1.0
    tau = train_t.max()
    want = concordance_index_ipcw(
        Surv.from_arrays(train_e, train_t), Surv.from_arrays(e, t), r, tau=tau
    )[0]
    assert res["uno_c"] == pytest.approx(want, abs=1e-12)
    # evaluation events all after the training follow-up: nothing to weigh
    late = survival_metrics(t + 100, e, r, train_time=train_t, train_event=train_e)
    assert math.isnan(late["uno_c"])
    assert not math.isnan(late["c_index"])


def test_logrank_separated_and_random():
    rng = np.random.default_rng(6)
    n = 200
    high = np.arange(n) < n // 2
    t = np.where(high, rng.exponential(2.0, n), rng.exponential(20.0, n))
    e = rng.random(n) < 0.8
    risk = high.astype(float) + rng.normal(0, 0.01, n)
    assert survival_metrics(t, e, risk)["logrank_p"] < 1e-8
    p_random = [survival_metrics(t, e, rng.normal(size=n))["logrank_p"] for _ in range(20)]
    assert all(0.0 <= p <= 1.0 for p in p_random)
    assert np.median(p_random) > 0.1  # uniform under the null


def test_risk_groups_split_strictly_above_median():
    assert risk_groups(np.array([4.0, 1.0, 3.0, 2.0])).tolist() == [True, False, True, False]
    assert risk_groups(np.array([1.0, 1.0, 1.0, 2.0])).tolist() == [False, False, False, True]
    assert risk_groups(np.array([3.0, 1.0, 2.0])).tolist() == [True, False, False]
    assert not risk_groups(np.ones(5)).any()
    assert risk_groups(np.zeros(0)).shape == (0,)


@pytest.mark.parametrize(
    "args",
    [
        ([], [], []),
        ([3.0], [1], [0.2]),
        ([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3]),  # no events
        ([1.0, 1.0], [1, 1], [0.1, 0.2]),  # no comparable pair
        ([np.nan, 2.0], [1, np.nan], [0.1, 0.2]),
    ],
)
def test_survival_degenerate_is_nan(args):
    res = survival_metrics(*(np.asarray(a, dtype=float) for a in args))
    assert set(res) == set(SURVIVAL_METRICS)
    assert all(math.isnan(v) for v in res.values())


def test_survival_degenerate_training_set():
    t, e, r = _survival_data(n=50)
    res = survival_metrics(t, e, r, train_time=t, train_event=np.zeros(50))
    assert math.isnan(res["uno_c"])
    assert not math.isnan(res["c_index"])
    # constant risk: no high-risk group
    assert math.isnan(survival_metrics(t, e, np.zeros(50))["logrank_p"])


# ---------------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------------


def test_regression_metrics_match_scipy_sklearn():
    rng = np.random.default_rng(7)
    y = rng.normal(size=80)
    p = 0.7 * y + rng.normal(0, 0.5, 80)
    res = regression_metrics(y, p)
    assert tuple(res) == REGRESSION_METRICS
    assert res["pearson_r"] == pytest.approx(pearsonr(y, p)[0])
    assert res["spearman_rho"] == pytest.approx(spearmanr(y, p)[0])
    assert res["r2"] == pytest.approx(r2_score(y, p))
    assert res["mae"] == pytest.approx(mean_absolute_error(y, p))
    assert all(type(v) is float for v in res.values())


def test_regression_metrics_known_values_and_missing_rows():
    res = regression_metrics(np.array([1.0, 2.0, np.nan, 3.0]), np.array([2.0, 4.0, 100.0, 6.0]))
    assert res["pearson_r"] == pytest.approx(1.0)
    assert res["spearman_rho"] == pytest.approx(1.0)
    assert res["mae"] == pytest.approx(2.0)  # |1-2| + |2-4| + |3-6| over 3
    assert res["r2"] == pytest.approx(1 - (1 + 4 + 9) / 2)
    res = regression_metrics(np.array([1, None, 3], dtype=object), np.array([1.0, 5.0, 3.0]))
    assert res["mae"] == 0.0 and res["r2"] == 1.0


@pytest.mark.parametrize(
    "y, p",
    [
        ([], []),
        ([1.0], [2.0]),
        ([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),
        ([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]),
    ],
)
def test_regression_degenerate_is_nan(y, p):
    res = regression_metrics(np.asarray(y), np.asarray(p))
    assert math.isnan(res["pearson_r"]) and math.isnan(res["spearman_rho"])
    if len(y) < 2 or np.ptp(y) == 0:
        assert math.isnan(res["r2"])
    if len(y):
        assert res["mae"] == pytest.approx(np.mean(np.abs(np.subtract(y, p))))
    else:
        assert math.isnan(res["mae"])


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


def _classification_data(n=300, seed=8):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p1 = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    return {"y_true": y, "probs": np.c_[1 - p1, p1]}


def test_bootstrap_deterministic_and_contains_value():
    data = _classification_data()
    groups = np.arange(300) // 2  # two slides per patient
    a = bootstrap_ci(classification_metrics, data, groups, n_boot=100, seed=1)
    b = bootstrap_ci(classification_metrics, data, groups, n_boot=100, seed=1)
    c = bootstrap_ci(classification_metrics, data, groups, n_boot=100, seed=2)
    assert a == b
    assert a != c
    assert set(a) == set(METRICS)
    full = classification_metrics(**data)
    for m in METRICS:
        assert a[m]["value"] == full[m]
        lo, hi = a[m]["ci95"]
        assert lo <= a[m]["value"] <= hi
        assert lo < hi
    assert a["auc"]["ci95"][0] > 0.5  # the score is informative


def test_bootstrap_level_key_and_width():
    data = _classification_data()
    groups = np.arange(300)
    ci95 = bootstrap_ci(classification_metrics, data, groups, n_boot=100, seed=0)["auc"]
    ci80 = bootstrap_ci(classification_metrics, data, groups, n_boot=100, seed=0, level=0.8)["auc"]
    assert set(ci95) == {"value", "ci95"}
    assert set(ci80) == {"value", "ci80"}
    assert ci80["ci80"][0] >= ci95["ci95"][0] and ci80["ci80"][1] <= ci95["ci95"][1]


def test_bootstrap_resamples_patients_with_all_their_rows():
    rng = np.random.default_rng(9)
    n_rows_per_patient = rng.integers(1, 5, 40)
    patient = np.repeat(np.array([f"p{i:02d}" for i in range(40)]), n_rows_per_patient)
    row = np.arange(len(patient))
    perm = rng.permutation(len(patient))  # rows of a patient need not be contiguous
    patient, row = patient[perm], row[perm]
    size = dict(zip(*np.unique(patient, return_counts=True), strict=True))
    seen: list[int] = []

    def check(patient, row):
        ids, counts = np.unique(patient, return_counts=True)
        draws = 0
        for pid, c in zip(ids, counts, strict=True):
            k, rem = divmod(int(c), int(size[pid]))
            assert rem == 0, "a patient's rows were split"
            rows, row_counts = np.unique(row[patient == pid], return_counts=True)
            assert len(rows) == size[pid] and (row_counts == k).all()
            draws += k
        assert draws == 40  # as many draws as patients
        seen.append(len(ids))
        return {"n_patients": float(len(ids))}

    out = bootstrap_ci(check, {"patient": patient, "row": row}, patient, n_boot=50, seed=0)
    assert len(seen) == 51  # full data + replicates, none skipped
    assert out["n_patients"]["value"] == 40.0
    assert out["n_patients"]["ci95"][1] < 40  # with replacement: some patients missing
    assert len(set(seen[1:])) > 1


def test_bootstrap_survival_and_regression():
    t, e, r = _survival_data(n=120, seed=10)
    groups = np.arange(120) // 3
    out = bootstrap_ci(survival_metrics, {"time": t, "event": e, "risk": r}, groups, n_boot=100)
    assert set(out) == set(SURVIVAL_METRICS)
    for m in ("c_index", "uno_c"):
        lo, hi = out[m]["ci95"]
        assert 0.5 < lo <= out[m]["value"] <= hi <= 1.0
    y = np.linspace(0, 1, 60)
    out = bootstrap_ci(
        regression_metrics, {"y_true": y, "y_pred": y + 0.1}, np.arange(60), n_boot=100
    )
    assert out["pearson_r"]["ci95"] == pytest.approx([1.0, 1.0])
    assert out["mae"]["value"] == pytest.approx(0.1)


def test_bootstrap_degenerate_gives_nan_and_none():
    t = np.arange(1.0, 11.0)
    out = bootstrap_ci(
        survival_metrics, {"time": t, "event": np.zeros(10), "risk": t}, np.arange(10), n_boot=50
    )
    assert all(math.isnan(v["value"]) and v["ci95"] is None for v in out.values())
    # constant target: no correlation, but MAE is fine
    out = bootstrap_ci(
        regression_metrics,
        {"y_true": np.ones(20), "y_pred": np.arange(20.0)},
        np.arange(20),
        n_boot=50,
    )
    assert math.isnan(out["pearson_r"]["value"]) and out["pearson_r"]["ci95"] is None
    assert out["mae"]["ci95"] is not None
    # a single patient: every replicate is the full data
    data = _classification_data(n=6)
    out = bootstrap_ci(classification_metrics, data, np.zeros(6), n_boot=30)
    assert out["accuracy"]["ci95"] == [out["accuracy"]["value"]] * 2
    # one class only: AUC undefined
    data = {"y_true": np.zeros(8, dtype=int), "probs": np.tile([0.6, 0.4], (8, 1))}
    out = bootstrap_ci(classification_metrics, data, np.arange(8), n_boot=30)
    assert math.isnan(out["auc"]["value"]) and out["auc"]["ci95"] is None
    # no rows at all
    out = bootstrap_ci(
        regression_metrics, {"y_true": np.zeros(0), "y_pred": np.zeros(0)}, np.zeros(0)
    )
    assert all(math.isnan(v["value"]) and v["ci95"] is None for v in out.values())


def test_bootstrap_too_few_valid_replicates_gives_none():
    calls = iter(range(10_000))

    def flaky(x):  # valid only for the point estimate and 5 replicates
        i = next(calls)
        return {"m": 1.0 if i <= 5 else float("nan")}

    out = bootstrap_ci(flaky, {"x": np.arange(10)}, np.arange(10), n_boot=100)
    assert out["m"] == {"value": 1.0, "ci95": None}


def test_bootstrap_index_generation_is_fast():
    data = _classification_data(n=500)
    t0 = time.perf_counter()
    bootstrap_ci(lambda y_true, probs: {"n": float(len(y_true))}, data, np.arange(500), n_boot=1000)
    assert time.perf_counter() - t0 < 1.0


def test_bootstrap_rejects_misaligned_data():
    with pytest.raises(ValueError):
        bootstrap_ci(
            regression_metrics, {"y_true": np.zeros(3), "y_pred": np.zeros(4)}, np.arange(3)
        )


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _is_png(data) -> bool:
    return isinstance(data, bytes) and data.startswith(PNG) and len(data) > 1000


def test_plots_return_png():
    rng = np.random.default_rng(11)
    d = _classification_data(n=120)
    y, p = d["y_true"], d["probs"][:, 1]
    assert _is_png(plots.roc_png(y, p))
    assert _is_png(plots.roc_png(y, p, rng.integers(0, 5, 120), title="ROC"))
    assert _is_png(plots.calibration_png(y, p, n_bins=5))
    t, e, r = _survival_data()
    assert _is_png(plots.km_png(t, e, r, title="OS"))
    assert _is_png(plots.km_png(t, e.astype(int), r))
    assert _is_png(plots.scatter_png(t, t + rng.normal(size=len(t)), target="TMB"))


def test_plots_degenerate_input():
    n = 20
    rng = np.random.default_rng(12)
    zeros, score = np.zeros(n, dtype=int), rng.random(n)
    t = np.arange(1.0, n + 1)
    for png in (
        plots.roc_png(zeros, score),
        plots.roc_png(zeros, score, np.arange(n) % 2),
        plots.roc_png(np.zeros(0), np.zeros(0)),
        plots.calibration_png(np.ones(n), score),
        plots.calibration_png(np.zeros(0), np.zeros(0)),
        plots.calibration_png(np.r_[0, 1, np.nan], np.r_[0.2, np.nan, 0.5]),
        plots.km_png(t, np.zeros(n), score),  # no events
        plots.km_png(t, np.ones(n), np.ones(n)),  # constant risk: one group
        plots.km_png(np.zeros(0), np.zeros(0), np.zeros(0)),
        plots.km_png([5.0], [1], [0.3]),
        plots.scatter_png(np.ones(n), score),
        plots.scatter_png([1.0], [1.0]),
        plots.scatter_png(np.zeros(0), np.zeros(0)),
        plots.scatter_png([np.nan, 1.0, 2.0], [0.0, np.nan, 2.0]),
    ):
        assert _is_png(png)


def test_plots_close_their_figures():
    import matplotlib.pyplot as plt

    before = len(plt.get_fignums())
    plots.km_png(*_survival_data(n=30))
    plots.scatter_png(np.arange(5.0), np.arange(5.0))
    assert len(plt.get_fignums()) == before
