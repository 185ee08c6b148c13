"""A reduced `slidepipe demo` end to end: report exists, AUC well above chance, attention on the clusters."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import DemoJob
from pipelines.demo import make_cohort, run_demo


def test_cohort_is_balanced_and_reused(tmp_path):
    a = make_cohort(tmp_path / "slides", 6, seed=3, workers=1)
    assert sorted(a["label"].value_counts().tolist()) == [3, 3]
    assert (a.loc[a.label == "positive", "n_lesions"] >= 1).all()
    assert (a.loc[a.label == "negative", "n_lesions"] == 0).all()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "slides").glob("*.svs")}
    b = make_cohort(tmp_path / "slides", 6, seed=3, workers=1)  # same parameters: nothing rewritten
    pd.testing.assert_frame_equal(a, b)
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "slides").glob("*.svs")}


@pytest.mark.slow
def test_reduced_demo_end_to_end(tmp_path):
    res = run_demo(DemoJob(out=tmp_path / "demo", slides=16, folds=3, seed=0, workers=2), echo=lambda *_: None)
    html = res.report.read_text()
    assert res.report.name == "report.html" and len(html) > 50_000  # images are inlined
    assert "RANDOM weights" in html and "ROC" in html
    assert len(re.findall(r"data:image/png;base64", html)) >= 2 * 16 + 1  # contours + heatmaps per slide, ROC
    auc = res.summary["auc"]["mean"]
    assert auc >= 0.8, f"AUC {auc} is not well above chance"
    assert res.attention_inside > 1.5 * res.attention_outside
    summary = json.loads((tmp_path / "demo" / "demo-summary.json").read_text())
    assert summary["weights"] == "random" and summary["patches"] == res.n_patches > 0
    metrics = json.loads((tmp_path / "demo" / "run" / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3
    # the run applied to the cohort again: heatmaps of the 2 highest- and 2 lowest-scoring slides
    from pipelines.predict import predict_mil

    demo = tmp_path / "demo"
    pred = predict_mil(demo / "run", demo / "features.zarr", demo / "labels.csv", out=tmp_path / "pred",
                       heatmaps=2, n_boot=100, device="cpu")  # fmt: skip
    maps = sorted((tmp_path / "pred" / "heatmaps").glob("*_heatmap.png"))
    assert len(maps) == 4 and pred.metrics["auc"]["value"] >= 0.8
    top = pred.predictions.sort_values("prob_positive").slide_id.tolist()
    assert {p.name.split("_")[0] for p in maps} == set(top[:2] + top[-2:])
    page = (tmp_path / "pred" / "report.html").read_text()
    assert page.count("data:image/jpeg;base64") == 4 and len(page) < 2_000_000


def test_demo_cli_help_lists_options():
    out = CliRunner().invoke(app, ["demo", "--help"])
    assert out.exit_code == 0
    for flag in ("--out", "--slides", "--encoder", "--weights", "--config"):
        assert flag in out.output


@pytest.mark.slow
@pytest.mark.parametrize("task,metric,floor", [("regression", "pearson_r", 0.8), ("survival", "c_index", 0.65)])
def test_reduced_demo_for_each_task(tmp_path, task, metric, floor):
    """`slidepipe demo --task ...`: the lesion count planted in the slides drives a value or a hazard,
    and the cross-validated report shows it learned (pooled out-of-fold metric with its CI)."""
    res = run_demo(DemoJob(out=tmp_path / "demo", slides=24, folds=3, seed=0, workers=2, task=task),
                   echo=lambda *_: None)  # fmt: skip
    pooled = json.loads((tmp_path / "demo" / "run" / "pooled_metrics.json").read_text())[metric]
    assert pooled["value"] >= floor and pooled["ci95"][0] <= pooled["value"], pooled
    html = res.report.read_text()
    assert ("Kaplan" in html or "km" in html) if task == "survival" else "scatter" in html
    labels = pd.read_csv(tmp_path / "demo" / "labels.csv")
    assert {"time", "event"} <= set(labels.columns) if task == "survival" else "score" in labels.columns
