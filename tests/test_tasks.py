"""Study designs: the Task registry, losses checked against reference implementations, and
training on stores with planted signals — regression, survival (Cox and discrete-time),
multi-target classification with missing values, patient-level bags — each repeatable
bit-for-bit with a seed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from planted import FAST, D, planted_store

from models.mil import create_mil, list_mil
from pipelines.cohort import build_cohort, pool_patients
from pipelines.config import TrainJob
from pipelines.labels import LabelTableError
from pipelines.tasks import create_task, list_tasks, task_from_dict
from pipelines.tasks.survival import cox_breslow_loss
from pipelines.train import train_mil

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: steadier on a shared machine


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_store(tmp_path_factory.mktemp("planted"))


def test_registry_and_every_head_takes_one_output():
    assert list_tasks() == ["classification", "regression", "survival"]
    x, mask = torch.randn(2, 7, D), torch.ones(2, 7, dtype=torch.bool)
    kw = {"transmil": {"dim": 16, "heads": 2, "landmarks": 4}}
    for name in list_mil():
        out = create_mil(name, D, 1, **kw.get(name, {}))(x, mask)
        assert out.logits.shape == (2, 1), name
    with pytest.raises(ValueError, match="no loss 'cox'"):
        create_task(TrainJob(task="regression", loss="cox"))


def test_cox_loss_minimiser_is_scikit_survival_coxph():
    """The Breslow partial likelihood: its minimiser over one coefficient is sksurv's CoxPH fit."""
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    rng = np.random.default_rng(1)
    x = rng.normal(size=200)
    t = np.round(rng.exponential(1 / np.exp(0.8 * x)) * 10)  # rounded: many tied times
    e = rng.random(200) < 0.7
    ref = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(x[:, None], Surv.from_arrays(e, t)).coef_[0]
    beta = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")
    xt, tt, et = (torch.tensor(v, dtype=torch.float64) for v in (x, t, e.astype(float)))

    def closure():
        opt.zero_grad()
        loss = cox_breslow_loss(beta.double() * xt, tt, et)
        loss.backward()
        return loss

    opt.step(closure)
    assert len(np.unique(t)) < 150 and abs(beta.item() - ref) < 1e-3, (beta.item(), ref)
    assert float(cox_breslow_loss(torch.zeros(3), torch.ones(3), torch.zeros(3))) == 0.0  # no events


def test_regression_learns_the_planted_value(tmp_path, planted):
    store, table = planted
    a = train_mil(store, table, task="regression", target="score", model="abmil", out=tmp_path / "a", seed=3, **FAST)
    assert a.task == "regression" and a.summary["pearson_r"]["mean"] >= 0.8, a.summary
    assert {"spearman_rho", "r2", "mae"} <= set(a.summary)
    pred = a.predictions
    assert {"score", "pred_score"} <= set(pred.columns)
    assert abs(pred["pred_score"].mean() - table["score"].mean()) < 1.0  # back in the column's units
    b = train_mil(store, table, task="regression", target="score", model="abmil", out=tmp_path / "b", seed=3, **FAST)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)  # bit-for-bit on CPU
    ckpt = torch.load(a.checkpoints[0], weights_only=True)
    task = task_from_dict(ckpt["task"])
    assert task.name == "regression" and task.state["std"][0] > 0 and ckpt["n_outputs"] == 1


@pytest.mark.parametrize("loss", ["cox", "discrete"])
def test_survival_ranks_the_planted_hazard(tmp_path, planted, loss):
    store, table = planted
    opts = {**FAST, "batch_size": 16, "max_batch_tokens": 600}  # Cox over passes: whole-batch loss
    a = train_mil(store, table, task="survival", loss=loss, model="abmil", out=tmp_path / "a", seed=1, **opts)
    assert a.summary["c_index"]["mean"] >= 0.75, a.summary
    assert set(a.summary) == {"c_index", "uno_c", "logrank_p"}
    assert {"time", "event", "risk"} <= set(a.predictions.columns)
    b = train_mil(store, table, task="survival", loss=loss, model="abmil", out=tmp_path / "b", seed=1, **opts)
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    logs = pd.read_csv(tmp_path / "a" / "log.csv")
    assert "val_c_index" in logs.columns
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["task"] == "survival" and metrics["loss"] == loss and metrics["targets"] == ["time", "event"]


def test_cox_passes_give_the_whole_batch_gradient(tmp_path, planted):
    """A batch run as one-bag passes (Cox: all passes, one backward) trains like whole batches."""
    store, table = planted
    opts = {**FAST, "epochs": 2, "batch_size": 16, "folds": 2, "seed": 5}
    whole = train_mil(store, table, task="survival", out=tmp_path / "w", max_batch_tokens=None, **opts)
    split = train_mil(store, table, task="survival", out=tmp_path / "s", max_batch_tokens=1, **opts)
    # a Cox risk has no fixed offset: the bias gets only rounding noise as gradient (which Adam scales
    # up), so the two runs may differ by a constant per fold model, never in their ordering
    def centred(pred):
        return pred["risk"] - pred.groupby("fold")["risk"].transform("mean")

    np.testing.assert_allclose(centred(whole.predictions), centred(split.predictions), atol=1e-4)


def test_multi_target_learns_both_and_masks_missing(tmp_path, planted):
    store, table = planted
    table = table.copy()
    table.loc[::7, "any"] = np.nan  # missing in one target only: still trains the other
    res = train_mil(store, table, target=["high", "any"], model="abmil", out=tmp_path / "m", seed=2, **FAST)
    assert res.summary["high.auc"]["mean"] >= 0.9 and res.summary["any.auc"]["mean"] >= 0.9, res.summary
    pred = res.predictions
    assert {"high", "any", "high_prob_no", "high_prob_yes", "any_prob_neg", "any_prob_pos", "high_pred",
            "any_pred"} <= set(pred.columns)  # fmt: skip
    assert len(pred) == len(table)  # the rows missing 'any' are still predicted
    assert pred.loc[pred.slide_id.isin(table.slide_id[::7]), "any"].isna().all()
    ckpt = torch.load(res.checkpoints[0], weights_only=True)
    assert ckpt["n_outputs"] == 4 and task_from_dict(ckpt["task"]).classes == [["no", "yes"], ["neg", "pos"]]


def test_patient_level_pools_a_patients_slides():
    """Unit test of the pooling: one bag per patient, slides in id order, labels must agree."""
    table = pd.DataFrame({"slide_id": ["b", "a", "c", "d"], "patient_id": ["P1", "P1", "P2", "P3"],
                          "label": ["x", "x", "y", "y"]})  # fmt: skip
    task = create_task(TrainJob())
    cohort = build_cohort(table, ["a", "b", "c", "d"], task=task)
    bags = {s: torch.full((n, 2), float(i)) for i, (s, n) in enumerate([("a", 2), ("b", 3), ("c", 1), ("d", 4)])}
    pc, pooled = pool_patients(cohort, bags)
    assert pc.slide_ids == ["P1", "P2", "P3"] and pc.level == "patient"
    assert pc.members == {"P1": ["a", "b"], "P2": ["c"], "P3": ["d"]}
    assert pooled["P1"].shape == (5, 2) and pooled["P1"][:, 0].tolist() == [0, 0, 1, 1, 1]
    assert pc.y[:, 0].tolist() == [0, 1, 1]
    assert pc.id_columns("P1") == {"patient_id": "P1", "slide_ids": "a;b"}
    bad = table.assign(label=["x", "y", "y", "y"])
    with pytest.raises(LabelTableError, match="patient P1: slides"):
        pool_patients(build_cohort(bad, ["a", "b", "c", "d"], task=create_task(TrainJob())), bags)


def test_patient_level_training(tmp_path, planted):
    store, table = planted
    table = table.copy()
    table["patient_id"] = [f"p{i // 2:03d}" for i in range(len(table))]
    table["high"] = table.groupby("patient_id")["high"].transform("first")
    res = train_mil(store, table, target="high", level="patient", model="abmil", out=tmp_path / "p", seed=0, **FAST)
    pred = res.predictions
    assert len(pred) == len(table) // 2 and {"patient_id", "slide_ids"} <= set(pred.columns)
    assert "slide_id" not in pred.columns
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["level"] == "patient" and metrics["n_bags"] == 45 and metrics["n_slides"] == 90
    labels = pd.read_csv(tmp_path / "p" / "labels.csv")
    assert labels.loc[0, "slide_ids"] == "s000;s001"


def test_task_label_errors(tmp_path, planted):
    store, table = planted
    with pytest.raises(LabelTableError, match="'high' is not numeric"):
        train_mil(store, table, task="regression", target="high", out=tmp_path / "r", **FAST)
    bad = table.assign(event=["maybe"] * len(table))
    with pytest.raises(LabelTableError, match="event 'event' must be 1"):
        train_mil(store, bad, task="survival", out=tmp_path / "s", **FAST)


def test_small_cohort_split_errors_and_conflicting_patients(caplog):
    from pipelines.splits import SplitError, make_splits

    with pytest.raises(SplitError, match=r"patients per class, found \{0: 3, 1: 3\}.*Fix: use fewer --folds"):
        make_splits([f"s{i}" for i in range(6)], [0, 1] * 3, [f"p{i}" for i in range(6)], folds=5)
    with pytest.raises(SplitError, match=r"cannot split 1 patient\(s\) into 2 parts.*Fix: use fewer --folds"):
        make_splits([f"s{i}" for i in range(8)], [0, 0, 1, 1] * 2, ["p0", "p1"] * 4, folds=2)
    table = pd.DataFrame({"slide_id": ["a", "b", "c", "d"], "patient_id": ["P1", "P1", "P2", "P2"],
                          "label": ["x", "y", "y", "y"]})  # fmt: skip
    with caplog.at_level("WARNING"):
        build_cohort(table, ["a", "b", "c", "d"], task=create_task(TrainJob()))
    assert "1 patient(s) have slides with different labels: P1" in caplog.text
