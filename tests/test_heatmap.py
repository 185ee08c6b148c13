"""Heatmaps: attention CSV, QuPath GeoJSON and a thumbnail-sized PNG overlay on a real slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipelines.heatmap import HeatmapError, heatmap_slide, patch_size_level0, render_overlay
from pipelines.train import train_mil
from wsi.errors import StoreError
from wsi.store import FeatureStore

SLIDE = Path(__file__).resolve().parents[1].parent / "shared" / "slides" / "real" / "cmu-1-small-region.svs"
D = 8
PATCH = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: steadier on a shared machine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store of 40 training bags plus the real CMU slide, whose top-left patches are witnesses,
    and a 2-fold abmil run trained on the 40 bags."""
    if not SLIDE.exists():
        pytest.skip(f"shared test slide not found: {SLIDE}")
    root = tmp_path_factory.mktemp("heatmap")
    fs = FeatureStore(root / "features.zarr")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        x = rng.normal(size=(int(rng.integers(60, 120)), D))
        if i % 2:
            x[:10, :4] += 3.0
        fs.write(f"b{i:02d}", x.astype(np.float16), np.zeros((len(x), 2), np.int64))
        rows.append({"slide_id": f"b{i:02d}", "label": i % 2})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    xs, ys = np.meshgrid(np.arange(0, 2220 - PATCH, PATCH), np.arange(0, 2967 - PATCH, PATCH))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    witness = (coords[:, 0] < 600) & (coords[:, 1] < 600)
    feats = rng.normal(size=(len(coords), D))
    feats[witness, :4] += 3.0
    fs.write("cmu-1-small-region", feats.astype(np.float16), coords,
             attrs={"grid": {"patch_size_level0": PATCH}})  # fmt: skip
    run = root / "run"
    train_mil(fs.path, labels, model="abmil", out=run, folds=2, epochs=8, lr=3e-3, batch_size=4,
              model_kwargs={"hidden": 16, "attn_dim": 8}, device="cpu")  # fmt: skip
    return fs.path, run, coords, witness, root


def test_heatmap_files_and_attention_on_witnesses(trained):
    store, run, coords, witness, root = trained
    res = heatmap_slide(run, store, SLIDE, root / "hm", thumb_mpp=16.0)
    df = pd.read_csv(res.csv)
    assert len(df) == len(coords) == res.n_patches
    np.testing.assert_array_equal(df[["x", "y"]].to_numpy(), coords)
    assert (df.width == PATCH).all()
    assert df.attention_percentile[witness].mean() > 0.85  # the witness patches are the hot ones
    assert set(res.probs) == {"0", "1"} and res.probs["1"] > 0.5
    gj = json.loads(res.geojson.read_text())
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(coords)
    f0 = gj["features"][0]
    x, y = coords[0].tolist()
    assert f0["geometry"]["coordinates"][0] == [[x, y], [x + PATCH, y], [x + PATCH, y + PATCH], [x, y + PATCH], [x, y]]
    assert set(f0["properties"]["measurements"]) == {"attention", "attention_percentile"}
    png = np.asarray(Image.open(res.png))
    # 2220 x 2967 px at 0.499 µm/px drawn at 16 µm/px
    assert png.shape == (round(2967 * 0.499 / 16), round(2220 * 0.499 / 16), 3)
    assert json.loads((root / "hm" / "cmu-1-small-region_prediction.json").read_text())["checkpoints"] == [
        "fold0.pt", "fold1.pt"
    ]


def test_single_fold_and_errors(trained):
    store, run, _, _, root = trained
    res = heatmap_slide(run, store, SLIDE, root / "hm1", fold=1, thumb_mpp=32.0)
    assert res.png.is_file()
    with pytest.raises(HeatmapError, match="no checkpoint fold7.pt"):
        heatmap_slide(run, store, SLIDE, root / "x", fold=7)
    other = SLIDE.parent / "kidney-48-5.tif"
    with pytest.raises(StoreError, match="'kidney-48-5'.*not in the store.*Fix"):
        heatmap_slide(run, store, other, root / "x")


def test_overlay_is_bounded_by_the_thumbnail():
    thumb = np.full((50, 40, 3), 255, np.uint8)
    coords = np.array([[0, 0], [100, 0], [10**7, 10**7]])  # the last is far off the canvas
    out = render_overlay(thumb, coords, 100, np.array([0.0, 1.0, 0.5]), scale=(0.1, 0.1), alpha=1.0)
    assert out.shape == thumb.shape
    assert tuple(out[5, 5]) != tuple(out[5, 15])  # low vs high attention colours differ
    assert tuple(out[30, 30]) == (255, 255, 255)  # uncovered stays the slide


def test_patch_size_from_attrs_or_coords():
    coords = np.array([[0, 0], [512, 0], [0, 512]])
    assert patch_size_level0({"grid": {"patch_size_level0": 300}}, coords) == 300
    assert patch_size_level0({}, coords) == 512


def test_cli_heatmap(trained):
    from pipelines.cli import app

    store, run, _, _, root = trained
    out = root / "cli"
    r = CliRunner().invoke(app, ["heatmap", "--run", str(run), "--store", str(store), "--slide", str(SLIDE),
                                 "--out", str(out), "--thumb-mpp", "32"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} >= {
        "cmu-1-small-region_attention.csv", "cmu-1-small-region_attention.geojson",
        "cmu-1-small-region_heatmap.png", "heatmap-config.yaml",
    }  # fmt: skip
    r = CliRunner().invoke(app, ["heatmap", "--run", str(run), "--store", str(store)])
    assert r.exit_code == 2 and "required" in r.output


def test_overlay_memory_follows_the_thumbnail_not_the_slide():
    import tracemalloc

    from matplotlib import colormaps  # imported up front: its import is not the overlay's memory

    colormaps["jet"](0.5)
    rng = np.random.default_rng(0)
    thumb = np.full((200, 150, 3), 240, np.uint8)
    n = 50_000  # a 150,000 x 200,000 px slide at 0.25 µm/px drawn at 250 µm/px (scale 0.001)
    coords = np.stack([rng.integers(0, 150_000, n), rng.integers(0, 200_000, n)], 1)
    values = rng.random(n)
    tracemalloc.start()
    out = render_overlay(thumb, coords, 1024, values, scale=(0.001, 0.001))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == thumb.shape
    assert peak < 8 * 2**20  # a slide-sized canvas would need > 80 GB; per-patch arrays ~2 MB


def test_a_different_file_of_the_same_name_is_refused(trained, tmp_path):
    """The store records the slide file's size and content hash; another file named like it (here:
    another real slide copied to that name) must not get the stored slide's attention drawn on it."""
    import shutil

    from wsi.slide import file_identity

    store, run, coords, _, _ = trained
    fs = FeatureStore(store)
    feats = np.random.default_rng(1).normal(size=(len(coords), D)).astype(np.float16)
    fs.write("case-7", feats, coords, attrs={"grid": {"patch_size_level0": PATCH}, "source": file_identity(SLIDE)})
    impostor = tmp_path / "case-7.tif"
    shutil.copy(SLIDE.parent / "kidney-48-5.tif", impostor)
    with pytest.raises(HeatmapError, match="case-7.tif: not the file whose features.*Fix"):
        heatmap_slide(run, store, impostor, tmp_path / "hm")
    genuine = tmp_path / "case-7.svs"
    shutil.copy(SLIDE, genuine)
    assert heatmap_slide(run, store, genuine, tmp_path / "hm", thumb_mpp=32.0).n_patches == len(coords)
