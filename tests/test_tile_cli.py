"""pipelines.tile and the `slidepipe info` / `slidepipe tile` verbs, on real and synthetic slides."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
import zarr
from conftest import write_pyramid
from PIL import Image
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import TileJob, load_config
from pipelines.tile import run_tile, tile_slide
from wsi.slide import open_slide

runner = CliRunner()


def _job(out: Path, **kw) -> TileJob:
    tiling = kw.pop("tiling", {})
    return TileJob(out=out, tiling={"mpp": 0.5, "patch_size": 256, **tiling}, **kw)


@pytest.fixture(scope="module")
def cmu_outputs(real_slides_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tile-cmu")
    result = tile_slide(real_slides_dir / "cmu-1-small-region.svs", _job(out, save_patches="png"))
    return out, result


def test_tile_slide_writes_consistent_outputs(cmu_outputs):
    out, r = cmu_outputs
    assert r.status == "done", r.reason
    assert r.extra["mpp_source"] == "vendor" and r.extra["read_level"] == 0
    sid = "cmu-1-small-region"

    with h5py.File(out / "patches" / f"{sid}_patches.h5", "r") as f:
        coords = f["coords"][:]
        a = dict(f["coords"].attrs)
        tissue = f["tissue"][:]
    assert coords.dtype == np.int64 and coords.shape == (r.n_patches, 2)
    assert a["patch_size"] == 256 and a["patch_level"] == 0 and a["patch_size_level0"] == 256
    assert list(a["downsample"]) == [1.0, 1.0] and list(a["level_dim"]) == [2220, 2967]
    assert a["target_mpp"] == 0.5 and a["overlap"] == 0
    assert (tissue >= 0.5).all() and (tissue <= 1).all()
    assert (coords % 256 == 0).all()  # on the grid, inside the slide
    assert (coords[:, 0] + 256 <= 2220).all() and (coords[:, 1] + 256 <= 2967).all()

    g = zarr.open_group(str(out / "coords" / f"{sid}.zarr"), mode="r")
    assert g.metadata.zarr_format == 3
    np.testing.assert_array_equal(g["coords"][:], coords)
    np.testing.assert_array_equal(g["tissue"][:], tissue)
    attrs = g.attrs.asdict()
    assert attrs["grid"]["n_patches"] == r.n_patches and attrs["slide"]["mpp_source"] == "vendor"
    assert attrs["identity"]["quick_hash"].startswith("sha256:")

    gj = json.loads((out / "geojson" / f"{sid}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    with Image.open(out / "overlays" / f"{sid}.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100


def test_real_patch_count_plausible_and_stable(real_slides_dir, cmu_outputs, tmp_path):
    """cmu-1 is ~40 % tissue (with white holes) over 8 x 11 possible patches at 0.5 µm/256 px."""
    _, first = cmu_outputs
    again = tile_slide(real_slides_dir / "cmu-1-small-region.svs", _job(tmp_path))
    assert again.n_patches == first.n_patches
    assert 0.2 * 88 <= first.n_patches <= 0.6 * 88, first.n_patches
    with h5py.File(tmp_path / "patches" / "cmu-1-small-region_patches.h5", "r") as f:
        coords = f["coords"][:]
    assert (np.lexsort((coords[:, 0], coords[:, 1])) == np.arange(len(coords))).all()  # row-major


def test_tiny_slide_zero_patches(real_slides_dir, tmp_path):
    r = tile_slide(real_slides_dir / "tiny-aperio.svs", _job(tmp_path))
    assert r.status == "done" and r.n_patches == 0
    with h5py.File(tmp_path / "patches" / "tiny-aperio_patches.h5", "r") as f:
        assert f["coords"].shape == (0, 2)


BAD_TYPES = {
    "broken.svs": "SlideOpenError",
    "unopenable.tiff": "SlideOpenError",
    "unreadable.svs": "CorruptTileError",
    "small_dicom.dcm": "SlideOpenError",
    "small_vectra.qptiff": "UnsupportedSlideError",
    "uint16-grayscale.tif": "UnsupportedSlideError",
}


@pytest.mark.parametrize("name", sorted(BAD_TYPES))
def test_bad_slide_is_a_failed_result(bad_slides_dir, tmp_path, name):
    r = tile_slide(bad_slides_dir / name, _job(tmp_path))
    assert r.status == "failed" and r.error_type == BAD_TYPES[name]
    assert name in r.reason and "Fix:" in r.reason


def test_missing_mpp_is_a_failed_result_then_override_works(real_slides_dir, tmp_path):
    path = real_slides_dir / "tcga-cr-7395-01a-01-ts1.svs"
    r = tile_slide(path, _job(tmp_path))
    assert r.status == "failed" and r.error_type == "MissingMPPError" and "--slide-mpp" in r.reason
    r = tile_slide(path, _job(tmp_path, tiling={"slide_mpp": 0.25}))
    assert r.status == "done" and r.extra["mpp_source"] == "override" and r.extra["read_level"] == 1
    # almost all tissue: most of the 8 x 6 level-1 patches of 512 level-0 px are kept
    assert 20 <= r.n_patches <= 48


def test_tile_slide_is_picklable_for_dask(tmp_path):
    job = _job(tmp_path, save_patches="png")
    fn, job2 = pickle.loads(pickle.dumps((tile_slide, job)))
    assert fn is tile_slide and job2 == job


# --------------------------------------------------------------------------- synthetic slides


def test_save_patches_match_slide_reads(real_slides_dir, cmu_outputs):
    out, r = cmu_outputs
    files = sorted((out / "images" / "cmu-1-small-region").glob("*.png"))
    assert len(files) == r.n_patches > 0
    with open_slide(real_slides_dir / "cmu-1-small-region.svs") as s:
        for f in files[:: max(1, len(files) // 4)]:
            x, y = (int(v) for v in f.stem.split("_"))
            with Image.open(f) as im:
                np.testing.assert_array_equal(np.asarray(im), s.read_region((x, y), 0, (256, 256)))


def test_skip_corrupt_tiles(corrupt_slide, tmp_path):
    job = _job(tmp_path / "a", save_patches="jpeg", tiling={"min_tissue": 0.0})
    r = tile_slide(corrupt_slide, job)
    assert r.status == "failed" and r.error_type == "CorruptTileError"
    assert "corrupt.svs" in r.reason and "region x=" in r.reason

    job = _job(tmp_path / "b", save_patches="jpeg", skip_corrupt_tiles=True, tiling={"min_tissue": 0.0})
    r = tile_slide(corrupt_slide, job)
    assert r.status == "done" and r.n_patches == 8 * 6 - 1  # the dropped patch is not in the outputs
    assert r.extra["n_skipped_corrupt"] == 1 and r.extra["skipped_corrupt"][0][0] == 0
    names = {p.name for p in (tmp_path / "b" / "images" / "corrupt").glob("*.jpg")}
    assert len(names) == 47 and "0_0.jpg" not in names and "256_0.jpg" in names
    with h5py.File(tmp_path / "b" / "patches" / "corrupt_patches.h5", "r") as f:
        coords = f["coords"][:]
    assert len(coords) == 47 and [0, 0] not in coords.tolist() and [256, 0] in coords.tolist()
    stored = zarr.open_group(tmp_path / "b" / "coords" / "corrupt.zarr", mode="r")
    np.testing.assert_array_equal(stored["coords"][:], coords)


def test_blank_slide_gives_empty_grid_not_error(tmp_path):
    path = write_pyramid(tmp_path / "blank.tiff", np.full((512, 768, 3), 245, np.uint8), n_levels=2,
                         compression="zlib", resolution_mpp=0.5)
    r = tile_slide(path, _job(tmp_path / "out"))
    assert r.status == "done" and r.n_patches == 0 and r.extra["tissue_fraction"] == 0.0
    assert json.loads((tmp_path / "out" / "geojson" / "blank.geojson").read_text())["features"] == []


def test_stain_preview(real_slides_dir, tmp_path):
    pytest.importorskip("wsi.stain")
    job = _job(tmp_path, stain={"method": "macenko"}, tiling={"min_tissue": 0.8})
    r = tile_slide(real_slides_dir / "cmu-1-small-region.svs", job)
    assert r.status == "done", r.reason
    with Image.open(tmp_path / "stain" / "cmu-1-small-region_preview.png") as im:
        w, h = im.size
    assert h == 512 and w == 256 * min(8, r.n_patches)


# --------------------------------------------------------------------------- CLI


def test_cli_tile_batch_goes_on_and_exits_nonzero(real_slides_dir, bad_slides_dir, tmp_path):
    cfg = tmp_path / "tile.yaml"
    cfg.write_text(yaml.safe_dump({"tiling": {"min_tissue": 0.9, "patch_size": 128}}))
    out = tmp_path / "out"
    res = runner.invoke(app, [
        "tile", str(real_slides_dir / "tiny-aperio.svs"), str(bad_slides_dir / "broken.svs"),
        str(real_slides_dir / "cmu-1-small-region.svs"),
        "--out", str(out), "--config", str(cfg), "--min-tissue", "0.6",
    ])
    assert res.exit_code == 1, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_slides"] == 3 and summary["n_failed"] == 1 and summary["n_done"] == 2
    failed = [s for s in summary["slides"] if s["status"] == "failed"]
    assert failed[0]["slide_id"] == "broken" and "broken.svs" in failed[0]["reason"]
    resolved = load_config(TileJob, out / "config.yaml")
    assert resolved.tiling.min_tissue == 0.6 and resolved.tiling.patch_size == 128  # flag > file
    with h5py.File(out / "patches" / "cmu-1-small-region_patches.h5", "r") as f:
        assert f["coords"].attrs["patch_size"] == 128


def test_cli_tile_all_good_exits_zero_with_glob(real_slides_dir, tmp_path):
    res = runner.invoke(app, ["tile", str(real_slides_dir / "tiny-*.svs"), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "overlays" / "tiny-aperio.png").exists()


def test_cli_tile_usage_errors(tmp_path):
    assert runner.invoke(app, ["tile", "--out", str(tmp_path)]).exit_code == 2
    assert runner.invoke(app, ["tile", str(tmp_path / "nothing-*.svs"), "--out", str(tmp_path)]).exit_code == 2
    res = runner.invoke(app, ["tile", "x.svs", "--save-patches", "gif", "--out", str(tmp_path)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["tile", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no slide files" in res.output  # an empty directory
    res = runner.invoke(app, ["tile", str(tmp_path), "--stain", "reinhard", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "stain-target" in res.output
    assert not (tmp_path / "o").exists()  # nothing ran


def test_cli_help_lists_every_option():
    res = runner.invoke(app, ["tile", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0
    for opt in ("--out", "--mpp", "--size", "--overlap", "--min-tissue", "--slide-mpp", "--tissue-mpp",
                "--backend", "--workers", "--save-patches", "--skip-corrupt-tiles", "--stain",
                "--stain-target", "--config"):
        assert opt in res.output, opt
    res = runner.invoke(app, ["info", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0 and "--slide-mpp" in res.output and "--json" in res.output


def test_cli_info(real_slides_dir, bad_slides_dir):
    res = runner.invoke(app, ["info", str(real_slides_dir / "cmu-1-small-region.svs"),
                              str(real_slides_dir / "kidney-48-5.tif"), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["dimensions"] == [2220, 2967] and rows[0]["mpp_source"] == "vendor"
    assert rows[0]["backend"] == "openslide" and rows[0]["vendor"] == "aperio"
    assert rows[1]["mpp"] is None and rows[1]["backend"] == "tiffslide"
    res = runner.invoke(app, ["info", str(real_slides_dir / "kidney-48-5.tif"), "--slide-mpp", "2"])
    assert res.exit_code == 0 and "override" in res.stdout and "1493" in res.stdout
    res = runner.invoke(app, ["info", str(bad_slides_dir / "small_vectra.qptiff")])
    assert res.exit_code == 1


def test_run_tile_writes_summary_and_config(real_slides_dir, tmp_path):
    job = _job(tmp_path, slides=[str(real_slides_dir / "tiny-aperio.svs")])
    summary = run_tile(job)
    assert summary.n_failed == 0 and (tmp_path / "summary.json").exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["tiling"]["mpp"] == 0.5


@pytest.mark.slow
def test_cli_tile_every_shared_slide(real_slides_dir, bad_slides_dir, tmp_path):
    """The acceptance batch: every real and bad slide in one run; bad ones fail with typed errors."""
    res = runner.invoke(app, ["tile", str(real_slides_dir), str(bad_slides_dir), "--out", str(tmp_path),
                              "--slide-mpp", "0.5"])
    assert res.exit_code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    by_id = {s["slide_id"]: s for s in summary["slides"]}
    for name, err in BAD_TYPES.items():
        s = by_id[Path(name).stem]
        assert s["status"] == "failed" and s["error_type"] == err and name in s["reason"]
    for sid in ("cmu-1-small-region", "tcga-cr-7395-01a-01-ts1", "kidney-48-5", "tiny-aperio", "boxes-pyramid"):
        assert by_id[sid]["status"] == "done"
        assert (tmp_path / "overlays" / f"{sid}.png").exists()
    assert by_id["tiny-aperio"]["n_patches"] == 0
    assert 100 <= by_id["tcga-cr-7395-01a-01-ts1"]["n_patches"] <= 221  # 17 x 13 at most


@pytest.mark.cluster
def test_run_tile_on_a_local_dask_cluster(real_slides_dir, bad_slides_dir, tmp_path):
    """tile_slide runs in Dask worker processes; results come back in input order, bad ones failed."""
    slides = [str(real_slides_dir / "tiny-aperio.svs"), str(bad_slides_dir / "broken.svs"),
              str(real_slides_dir / "cmu-1-small-region.svs")]
    local = TileJob(out=tmp_path / "local", slides=slides)
    dask = TileJob(out=tmp_path / "dask", slides=slides,
                   cluster={"kind": "local", "n_workers": 2, "dashboard_address": None})
    a, b = run_tile(local), run_tile(dask)
    assert [(r.slide_id, r.status, r.n_patches) for r in a.results] == [
        (r.slide_id, r.status, r.n_patches) for r in b.results
    ]
    assert [r.status for r in b.results] == ["failed", "done", "done"]  # sorted input order
    with h5py.File(tmp_path / "local" / "patches" / "cmu-1-small-region_patches.h5", "r") as f, h5py.File(
        tmp_path / "dask" / "patches" / "cmu-1-small-region_patches.h5", "r"
    ) as g:
        np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
