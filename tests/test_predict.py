"""``predict``: the fold ensemble's arithmetic against the run's own out-of-fold predictions,
metrics with bootstrap CIs on a second cohort for every task, the feature-identity check (API,
CLI exit code 2, heatmap), class coding, patient level, reports."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from planted import FAST, planted_store
from typer.testing import CliRunner

from pipelines.features import FeatureMismatchError
from pipelines.labels import LabelTableError
from pipelines.predict import ensemble, predict_mil
from pipelines.train import train_mil

IDENTITY = {
    "encoder": {"name": "tiny-vit", "weights_id": "sha256:aaaa", "dim": 16},
    "tiling": {"mpp": 0.5, "patch_size": 224, "overlap": 0, "min_tissue": 0.5, "tissue_mpp": 8.0},
    "stain": {"method": "none", "target": None, "target_hash": None},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: steadier on a shared machine


def cohort(root, seed, identity=IDENTITY, n=60):
    from wsi.store import FeatureStore

    root.mkdir(parents=True, exist_ok=True)
    FeatureStore(root / "features.zarr").ensure_identity(identity)
    return planted_store(root, n=n, seed=seed)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    train_store, train_table = cohort(base / "train", 0)
    ext_store, ext_table = cohort(base / "external", 1)
    run = base / "run"
    train_mil(train_store, train_table, target="high", model="abmil", out=run, seed=0, **FAST)
    return run, (train_store, train_table), (ext_store, ext_table)


def test_one_fold_reproduces_the_runs_out_of_fold_predictions(tmp_path, two):
    run, (store, table), _ = two
    oof = pd.read_csv(run / "predictions.csv")
    for k in range(3):
        res = predict_mil(run, store, folds=[k], device="cpu")
        mine = oof[(oof.fold == k) & (oof.part == "test")].set_index("slide_id")
        got = res.predictions.set_index("slide_id").loc[mine.index]
        np.testing.assert_allclose(got[["prob_no", "prob_yes"]], mine[["prob_no", "prob_yes"]], atol=1e-6)
        assert (got["pred"] == mine["pred"]).all()
    full = predict_mil(run, store, device="cpu").predictions
    per_fold = [full[[f"fold{k}_prob_yes"]].to_numpy() for k in range(3)]
    np.testing.assert_allclose(full[["prob_yes"]].to_numpy(), ensemble(per_fold), atol=1e-12)
    np.testing.assert_allclose(full["prob_yes"], np.mean(per_fold, axis=0)[:, 0], atol=1e-12)


def test_external_cohort_metrics_with_cis_and_report(tmp_path, two):
    run, _, (store, table) = two
    out = tmp_path / "pred"
    res = predict_mil(run, store, table, out=out, device="cpu", n_boot=300)
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    auc = m["auc"]
    assert auc["value"] >= 0.85 and auc["ci95"][0] <= auc["value"] <= auc["ci95"][1] < 1.0 + 1e-9
    assert auc["ci95"][1] - auc["ci95"][0] > 0  # a real interval
    assert m["n"]["value"] == len(table) and res.metrics["balanced_accuracy"]["value"] > 0.7
    for name in ("predictions.csv", "roc.png", "calibration.png", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "95 % bootstrap CI" in html and "data:image/png;base64" in html
    pred = pd.read_csv(out / "predictions.csv")
    assert {"slide_id", "patient_id", "label", "prob_no", "prob_yes", "pred", "fold0_prob_yes"} <= set(pred.columns)


@pytest.mark.parametrize("task,extra,metric,floor", [
    ("regression", {"target": "score"}, "pearson_r", 0.8),
    ("survival", {"batch_size": 16}, "c_index", 0.7),
])  # fmt: skip
def test_predict_every_task_on_a_second_cohort(tmp_path, two, task, extra, metric, floor):
    _, (store, table), (ext_store, ext_table) = two
    run = tmp_path / "run"
    train_mil(store, table, task=task, model="abmil", out=run, seed=0, **{**FAST, **extra})
    res = predict_mil(run, ext_store, ext_table, out=tmp_path / "p", device="cpu", n_boot=200)
    value = res.metrics[metric]
    assert value["value"] >= floor and value["ci95"][0] <= value["value"] <= value["ci95"][1], res.metrics
    plot = "scatter.png" if task == "regression" else "km.png"
    assert (tmp_path / "p" / plot).is_file() and (run / "report.html").is_file()


def test_other_features_are_refused(tmp_path, two):
    from pipelines.cli import app
    from pipelines.heatmap import heatmap_slide

    run, _, _ = two
    other = {**IDENTITY, "encoder": {"name": "tiny-vit", "weights_id": "sha256:bbbb", "dim": 16}}
    store, _ = cohort(tmp_path / "other", 2, identity=other, n=12)
    with pytest.raises(FeatureMismatchError, match=r"weights_id: trained on 'sha256:aaaa', this store has 'sha256:bbbb'"):
        predict_mil(run, store, device="cpu")
    r = CliRunner().invoke(app, ["predict", "--run", str(run), "--store", str(store), "--out", str(tmp_path / "o")])
    said = " ".join(r.output.split())  # rich wraps long lines
    assert r.exit_code == 2 and "sha256:bbbb" in said and "Fix:" in said
    with pytest.raises(FeatureMismatchError, match="sha256:aaaa"):
        heatmap_slide(run, store, tmp_path / "s000.svs", tmp_path / "hm")
    mpp = {**IDENTITY, "tiling": {**IDENTITY["tiling"], "mpp": 1.0}}
    store2, _ = cohort(tmp_path / "mpp", 2, identity=mpp, n=12)
    with pytest.raises(FeatureMismatchError, match="mpp: trained on 0.5, this store has 1.0"):
        predict_mil(run, store2, device="cpu")
    checkpoint = torch.load(run / "fold0.pt", weights_only=True)
    assert checkpoint["features"]["weights_id"] == "sha256:aaaa" and checkpoint["features"]["dim"] == 16
    assert "sha256:aaaa" in (run / "config.yaml").read_text()


def test_cli_predict_and_class_coding(tmp_path, two):
    from pipelines.cli import app

    run, _, (store, table) = two
    out = tmp_path / "cli"
    table.to_csv(tmp_path / "ext.csv", index=False)
    r = CliRunner().invoke(app, ["predict", "--run", str(run), "--store", str(store), "--labels", str(tmp_path / "ext.csv"),
                                 "--out", str(out), "--n-boot", "100", "--device", "cpu", "--slides", "s000",
                                 "--slides", "s001", "--slides", "s002", "--slides", "s003"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "auc" in r.output and len(pd.read_csv(out / "predictions.csv")) == 4
    assert (out / "predict-config.yaml").is_file()
    bad = table.assign(high=["maybe"] * len(table))
    with pytest.raises(LabelTableError, match=r"classes \['maybe'\] the model was not trained on"):
        predict_mil(run, store, bad, device="cpu")


def test_patient_level_predict(tmp_path, two):
    _, (store, table), (ext_store, ext_table) = two

    def by_patient(t):
        t = t.copy()
        t["patient_id"] = [f"p{i // 2:03d}" for i in range(len(t))]
        t["high"] = t.groupby("patient_id")["high"].transform("first")
        return t

    run = tmp_path / "run"
    train_mil(store, by_patient(table), target="high", level="patient", model="abmil", out=run, **FAST)
    res = predict_mil(run, ext_store, by_patient(ext_table), device="cpu", n_boot=50)
    assert len(res.predictions) == len(ext_table) // 2 and res.predictions.loc[0, "slide_ids"] == "s000;s001"
    with pytest.raises(Exception, match="patient-level"):
        predict_mil(run, ext_store, device="cpu")


def test_out_that_is_a_file_is_a_named_error(tmp_path, two):
    from pipelines.cli import app

    run, (store, _), _ = two
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = CliRunner().invoke(app, ["predict", "--run", str(run), "--store", str(store), "--out", str(afile)])
    assert r.exit_code == 2 and "afile: --out is a file" in " ".join(r.output.split())  # rich wraps lines
    r = CliRunner().invoke(app, ["heatmap", "--run", str(run), "--store", str(store), "--slide", "s000.svs",
                                 "--out", str(afile)])  # fmt: skip
    assert r.exit_code == 2 and "afile: --out is a file" in " ".join(r.output.split())
