"""slidepipe extract / export-h5 on the real test slides with the tiny random-weight encoder."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from pipelines.config import ExtractJob, TilingConfig
from pipelines.export import export_h5
from pipelines.extract import extract_slide, load_encoder, run_extract
from wsi.errors import StoreMismatchError
from wsi.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "slides" / "real"
BAD = SHARED / "slides" / "bad"
TCGA = REAL / "tcga-cr-7395-01a-01-ts1.svs"
TINY = REAL / "tiny-aperio.svs"
REAL_IDS = ["boxes-pyramid", "cmu-1-small-region", "kidney-48-5", "tcga-cr-7395-01a-01-ts1", "tiny-aperio"]

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="shared test slides not available")


def make_job(out: Path, slides: list, **kw) -> ExtractJob:
    tiling = {"mpp": 1.0, "patch_size": 224, "min_tissue": 0.25, "slide_mpp": 0.5, **kw.pop("tiling", {})}
    return ExtractJob(
        slides=[str(s) for s in slides], out=out, encoder="tiny-vit", weights="random",
        tiling=TilingConfig(**tiling), batch_size=16, device="cpu", torch_threads=1, **kw,
    )


def cli_args(job: ExtractJob) -> list[str]:
    t = job.tiling
    return [
        "extract", *job.slides, "--out", str(job.out), "--encoder", job.encoder, "--weights", str(job.weights),
        "--mpp", str(t.mpp), "--size", str(t.patch_size), "--min-tissue", str(t.min_tissue),
        "--slide-mpp", str(t.slide_mpp), "--batch-size", str(job.batch_size), "--device", "cpu", "--threads", "1",
    ]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(make_job(Path("unused.zarr"), []))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, encoder):
    out = tmp_path_factory.mktemp("store") / "features.zarr"
    job = make_job(out, [REAL])
    return job, run_extract(job, encoder=encoder)


def test_real_slides_make_a_valid_store(extracted, encoder):
    from wsi.slide import open_slide
    from wsi.tiling import make_grid
    from wsi.tissue import detect_tissue

    job, summary = extracted
    assert [r.slide_id for r in summary.results] == REAL_IDS
    assert {r.status for r in summary.results} == {"done"}, [r.reason for r in summary.results]
    store = FeatureStore(job.out, mode="r")
    assert store.slide_ids() == REAL_IDS
    ident = store.identity
    assert ident["encoder"] == {"name": "tiny-vit", "weights_id": "random", "dim": 64}
    assert ident["tiling"] == {"mpp": 1.0, "patch_size": 224, "overlap": 0, "min_tissue": 0.25, "tissue_mpp": 8.0}
    assert ident["stain"] == {"method": "none", "target": None, "target_hash": None}
    assert store.attrs["config"]["encoder"] == "tiny-vit"

    tcga = store.read("tcga-cr-7395-01a-01-ts1")
    assert tcga.features.dtype == np.float16 and tcga.features.shape == (len(tcga), 64) and len(tcga) > 20
    assert np.isfinite(tcga.features.astype(np.float32)).all() and tcga.features.std() > 0
    assert tcga.attrs["mpp_source"] == "override" and tcga.attrs["slide_mpp"] == 0.5
    assert tcga.attrs["complete"] is True and tcga.attrs["n_tiles"] == len(tcga)
    assert tcga.attrs["source"]["size"] == TCGA.stat().st_size
    # the stored grid is exactly the tiling module's grid of this slide
    with open_slide(TCGA, mpp=0.5) as slide:
        grid = make_grid(slide, detect_tissue(slide, target_mpp=8.0), patch_size=224, mpp=1.0, min_tissue=0.25)
    np.testing.assert_array_equal(tcga.coords, grid.coords)
    np.testing.assert_array_equal(tcga.tissue, grid.tissue)
    assert len(store.read("tiny-aperio")) == 0  # smaller than one patch: stored with N = 0

    runs = list((Path(job.out) / "runs").glob("*-summary.json"))
    assert len(runs) == 1 and json.loads(runs[0].read_text())["n_done"] == 5


def test_stored_features_are_the_encoder_output_of_those_patches(extracted, encoder):
    from wsi.reader import PatchReader
    from wsi.slide import open_slide
    from wsi.tiling import make_grid

    job, _ = extracted
    tcga = FeatureStore(job.out, mode="r").read("tcga-cr-7395-01a-01-ts1")
    with open_slide(TCGA, mpp=0.5) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=1.0, min_tissue=0.0)
        keep = np.isin(grid.coords.view("i8,i8").ravel(), tcga.coords[-5:].copy().view("i8,i8").ravel())
        sub = type(grid)(**{**grid.__dict__, "coords": grid.coords[keep], "tissue": grid.tissue[keep]})
        images = np.concatenate([b.images for b in PatchReader(slide, sub, batch_size=8)])
    direct = encoder.encode(images).numpy()
    np.testing.assert_allclose(tcga.features[-5:].astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_rerun_skips_complete_slides(extracted, encoder):
    job, _ = extracted
    store = FeatureStore(job.out, mode="r")
    before = {sid: store.slide_attrs(sid)["created"] for sid in REAL_IDS}
    again = run_extract(job, encoder=encoder)
    assert {r.status for r in again.results} == {"skipped"}
    assert {sid: store.slide_attrs(sid)["created"] for sid in REAL_IDS} == before
    assert again.results[3].n_patches == len(store.read(REAL_IDS[3]))


def test_export_h5_names_the_read_size_when_patches_are_resized():
    """0.25 µm/px slide, 0.5 µm/px patches read at level 0: 512 px read, resized to 256."""
    from pipelines.export import coords_attrs
    from wsi.store import SlideFeatures

    grid = {"patch_size": 256, "patch_size_read": 512, "needs_resize": True, "read_level": 0,
            "patch_size_level0": 512, "read_downsample": 1.0, "slide_dimensions": [4000, 3000],
            "slide_mpp": 0.25, "target_mpp": 0.5, "effective_mpp": 0.5}
    slide = SlideFeatures("s", np.zeros((0, 4), np.float16), np.zeros((0, 2), np.int64),
                          np.zeros(0, np.float32), {"grid": grid, "slide_mpp": 0.25})
    a = coords_attrs(slide)
    assert (a["patch_size"], a["patch_size_read"], a["patch_level"], a["needs_resize"]) == (256, 512, 0, True)
    assert a["patch_size_level0"] == 512 and a["level0_magnification"] == 40.0


def test_export_h5_matches_store(extracted, tmp_path):
    job, _ = extracted
    summary = export_h5(job.out, tmp_path / "h5")
    assert summary.n_failed == 0 and len(summary.results) == 5
    store = FeatureStore(job.out, mode="r")
    tcga = store.read("tcga-cr-7395-01a-01-ts1")
    with h5py.File(tmp_path / "h5" / "tcga-cr-7395-01a-01-ts1.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == tcga.features.shape
        np.testing.assert_array_equal(f["features"][:], tcga.features.astype(np.float32))
        np.testing.assert_array_equal(f["coords"][:], tcga.coords)
        a = f["coords"].attrs
        assert a["patch_size"] == a["patch_size_read"] == 224 and not a["needs_resize"]
        assert a["patch_level"] == tcga.attrs["read_level"] == 1
        assert a["patch_size_level0"] == tcga.attrs["grid"]["patch_size_level0"] == 448
        ds = tcga.attrs["grid"]["read_downsample"]
        assert list(a["downsample"]) == [ds, ds] and list(a["level_dim"]) == [2221, 1783]  # level 1
        assert a["target_mpp"] == 1.0 and a["level0_magnification"] == 20.0
        assert f.attrs["encoder"] == "tiny-vit" and f.attrs["weights_id"] == "random"
    with h5py.File(tmp_path / "h5" / "tiny-aperio.h5", "r") as f:
        assert f["features"].shape == (0, 64)


def test_bad_slides_fail_alone_with_reasons(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [BAD, TCGA])
    summary = run_extract(job, encoder=encoder)
    by_id = {r.slide_id: r for r in summary.results}
    assert by_id["tcga-cr-7395-01a-01-ts1"].status == "done"
    bad = [r for r in summary.results if r.slide_id != "tcga-cr-7395-01a-01-ts1"]
    assert len(bad) == 6 and all(r.status == "failed" for r in bad)
    for r in bad:
        assert r.error_type and r.reason and Path(r.path).name in r.reason and "Fix:" in r.reason
    assert by_id["unreadable"].error_type == "CorruptTileError"
    assert by_id["uint16-grayscale"].error_type == "UnsupportedSlideError"
    store = FeatureStore(job.out, mode="r")
    assert store.slide_ids() == ["tcga-cr-7395-01a-01-ts1"]
    assert not list((store.path / ".staging").iterdir()) and not list((store.path / ".claims").iterdir())
    saved = json.loads(next((store.path / "runs").glob("*-summary.json")).read_text())
    assert saved["n_failed"] == 6 and saved["n_done"] == 1


def test_cli_exit_code_nonzero_when_a_slide_fails(tmp_path, encoder):
    from typer.testing import CliRunner

    from pipelines.cli import app

    job = make_job(tmp_path / "f.zarr", [BAD / "broken.svs", TINY])
    result = CliRunner().invoke(app, cli_args(job))
    assert result.exit_code == 1, result.output
    assert FeatureStore(job.out, mode="r").slide_ids() == ["tiny-aperio"]
    result = CliRunner().invoke(app, ["export-h5", str(job.out), str(tmp_path / "h5")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "h5" / "tiny-aperio.h5").is_file()


def test_store_identity_mismatch_is_refused_unless_overwrite(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [TINY])
    run_extract(job, encoder=encoder)
    other = make_job(tmp_path / "f.zarr", [TINY], tiling={"mpp": 2.0})
    with pytest.raises(StoreMismatchError, match=r"tiling.*--overwrite"):
        run_extract(other, encoder=encoder)
    other.overwrite = True
    assert run_extract(other, encoder=encoder).results[0].status == "done"
    assert FeatureStore(job.out, mode="r").identity["tiling"]["mpp"] == 2.0


def test_a_cluster_task_never_replaces_the_identity_itself(tmp_path, encoder):
    """Cluster tasks open the store with replace_identity=False: the driver already applied
    --overwrite, and a task that replaced the identity again would delete a concurrent run's
    slides."""
    job = make_job(tmp_path / "f.zarr", [TINY, TCGA])
    run_extract(job, encoder=encoder)
    other = make_job(tmp_path / "f.zarr", [TCGA], tiling={"mpp": 2.0}, overwrite=True)
    with pytest.raises(StoreMismatchError, match="tiling"):
        extract_slide(TCGA, other, encoder=encoder, replace_identity=False)
    store = FeatureStore(job.out, mode="r")
    assert store.identity["tiling"]["mpp"] == 1.0 and len(store.slide_ids()) == 2
    assert extract_slide(TCGA, other, encoder=encoder).status == "done"  # on its own it does replace it
    assert store.identity["tiling"]["mpp"] == 2.0 and store.slide_ids() == ["tcga-cr-7395-01a-01-ts1"]


def test_changed_slide_file_is_an_error_unless_overwrite(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [TINY])
    run_extract(job, encoder=encoder)
    group = zarr.open_group(tmp_path / "f.zarr" / "slides" / "tiny-aperio", mode="a")
    group.attrs["source"] = {**group.attrs["source"], "quick_hash": "sha256:other"}
    res = run_extract(job, encoder=encoder).results[0]
    assert res.status == "failed" and res.error_type == "StoreMismatchError" and "--overwrite" in res.reason
    job.overwrite = True
    assert run_extract(job, encoder=encoder).results[0].status == "done"
    assert FeatureStore(job.out).slide_attrs("tiny-aperio")["source"]["quick_hash"] != "sha256:other"


def test_overwrite_redoes_what_was_there_not_what_this_run_wrote(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [TINY, TCGA])
    run_extract(job, encoder=encoder)
    store = FeatureStore(job.out, mode="r")
    before = {sid: store.slide_attrs(sid)["written_at"] for sid in store.slide_ids()}
    job.overwrite = True
    time.sleep(0.05)  # past the file system clock's tick
    assert [r.status for r in run_extract(job, encoder=encoder).results] == ["done", "done"]
    (config,) = sorted((Path(job.out) / "runs").glob("*-config.yaml"))[-1:]
    started = config.stat().st_mtime  # the second run's start, by the store's clock
    again = {sid: store.slide_attrs(sid)["written_at"] for sid in store.slide_ids()}
    assert all(before[sid] < started <= again[sid] for sid in before)  # both redone
    # a slide this run (or a concurrent --overwrite run) committed after it started is kept
    res = extract_slide(TCGA, job, encoder=encoder, run_started=started)
    assert res.status == "skipped" and store.slide_attrs(res.slide_id)["written_at"] == again[res.slide_id]


def _hold_claim(store: FeatureStore, slide_id: str) -> subprocess.Popen:
    """A live process of this host holding ``slide_id``'s claim (until it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    claim = {"host": socket.gethostname(), "pid": holder.pid, "time": time.time()}
    (store.path / ".claims" / f"{slide_id}.claim").write_text(json.dumps(claim))
    return holder


def test_a_slide_another_live_process_holds_is_left_to_it_and_said_so(tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    job = make_job(tmp_path / "f.zarr", [TINY, TCGA])
    store = FeatureStore(job.out)
    holder = _hold_claim(store, "tiny-aperio")
    try:
        result = CliRunner().invoke(app, cli_args(job))
        assert result.exit_code == 0, result.output  # its own share is done (e.g. one of several array jobs)
        assert "still being written by another process" in result.output and "--wait" in result.output
        summary = json.loads(next((store.path / "runs").glob("*-summary.json")).read_text())
        by_id = {s["slide_id"]: s for s in summary["slides"]}
        assert summary["n_busy"] == 1 and by_id["tiny-aperio"]["status"] == "skipped"
        assert str(holder.pid) in by_id["tiny-aperio"]["reason"]
        assert by_id["tcga-cr-7395-01a-01-ts1"]["status"] == "done"
        assert store.slide_ids() == ["tcga-cr-7395-01a-01-ts1"]
    finally:
        holder.kill()
        holder.communicate()
    result = CliRunner().invoke(app, cli_args(job))  # the holder died: its slide is taken over
    assert result.exit_code == 0, result.output
    assert store.slide_ids() == ["tcga-cr-7395-01a-01-ts1", "tiny-aperio"]


def test_wait_waits_for_slides_another_process_holds_and_takes_over_when_it_dies(tmp_path, encoder):
    import threading

    job = make_job(tmp_path / "f.zarr", [TINY, TCGA], wait=True)
    store = FeatureStore(job.out)
    holder = _hold_claim(store, "tiny-aperio")
    out: dict = {}
    runner = threading.Thread(target=lambda: out.update(summary=run_extract(job, encoder=encoder)))
    try:
        runner.start()
        deadline = time.time() + 120
        while store.slide_ids() != ["tcga-cr-7395-01a-01-ts1"] and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        assert runner.is_alive(), "the run ended while a slide was still held"
    finally:
        holder.kill()
        holder.communicate()
    runner.join(120)
    assert not runner.is_alive()
    assert [r.status for r in out["summary"].results] == ["done", "done"]
    assert store.slide_ids() == ["tcga-cr-7395-01a-01-ts1", "tiny-aperio"]


def test_leftovers_of_a_dead_run_are_recovered(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [TINY])
    store = FeatureStore(job.out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim = {"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}
    (store.path / ".claims" / "tiny-aperio.claim").write_text(json.dumps(claim))
    (store.path / ".staging" / f"tiny-aperio-{'a' * 32}" / "features").mkdir(parents=True)
    assert run_extract(job, encoder=encoder).results[0].status == "done"
    assert store.slide_ids() == ["tiny-aperio"]
    assert not list((store.path / ".staging").iterdir()) and not list((store.path / ".claims").iterdir())


def test_extract_slide_result_is_picklable(tmp_path, encoder):
    job = make_job(tmp_path / "f.zarr", [])
    res = extract_slide(TINY, job, encoder=encoder)
    assert res.status == "done" and res.n_patches == 0
    back = pickle.loads(pickle.dumps(res))
    assert back == res
    bad = extract_slide(BAD / "broken.svs", job, encoder=encoder)
    assert bad.status == "failed" and pickle.loads(pickle.dumps(bad)).error_type == "SlideOpenError"


# ---------------------------------------------------------------------------- processes
def _slide_links(tmp_path: Path, n: int) -> Path:
    """``n`` differently named links to the TCGA slide (plus the tiny one), in a temp dir."""
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(n):
        (d / f"s{i}.svs").symlink_to(TCGA)
    (d / "tiny.svs").symlink_to(TINY)
    return d


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _cli(job: ExtractJob) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *cli_args(job)]


def _assert_same_store(a: Path, b: Path) -> None:
    sa, sb = FeatureStore(a, mode="r"), FeatureStore(b, mode="r")
    assert sa.slide_ids() == sb.slide_ids()
    assert sa.identity == sb.identity
    for sid in sa.slide_ids():
        x, y = sa.read(sid), sb.read(sid)
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.tissue, y.tissue)
        np.testing.assert_array_equal(x.features, y.features)  # bit-identical (1 torch thread)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path):
    slides = _slide_links(tmp_path, 3)
    ref = make_job(tmp_path / "ref.zarr", [slides])
    subprocess.run(_cli(ref), check=True, env=_env(), capture_output=True, timeout=600)
    assert len(FeatureStore(ref.out, mode="r").slide_ids()) == 4

    job = make_job(tmp_path / "crash.zarr", [slides])
    proc = subprocess.Popen(_cli(job), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slides_dir, staging = Path(job.out) / "slides", Path(job.out) / ".staging"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in slides_dir.glob("*/zarr.json")] if slides_dir.is_dir() else []
        if done and staging.is_dir() and any(staging.iterdir()):
            break  # one slide complete and the next one half-written
        time.sleep(0.02)
    assert proc.poll() is None, "extractor finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureStore(job.out, mode="r")
    finished = store.slide_ids()
    assert 1 <= len(finished) < 4
    assert list((Path(job.out) / ".claims").glob("*.claim")), "the killed run should leave its claim"
    kept = {sid: store.slide_attrs(sid) for sid in finished}

    rerun = subprocess.run(_cli(job), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _assert_same_store(ref.out, job.out)
    (summary,) = (Path(job.out) / "runs").glob("*-summary.json")  # the killed run wrote none
    status = {s["slide_id"]: s["status"] for s in json.loads(summary.read_text())["slides"]}
    assert {sid for sid, st in status.items() if st == "skipped"} == set(finished)  # resumed, not redone
    assert {sid for sid, st in status.items() if st == "done"} == set(status) - set(finished)
    assert {sid: store.slide_attrs(sid) for sid in finished} == kept  # untouched by the rerun
    assert not list(staging.iterdir()) and not list((Path(job.out) / ".claims").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_cleans_up_like_ctrl_c(tmp_path, sig):
    """What SLURM, Docker and systemd send: the run stops, removes its partial slide, releases its
    claims and exits 128 + the signal; the slides it committed stay, and a rerun completes."""
    slides = _slide_links(tmp_path, 3)
    job = make_job(tmp_path / "term.zarr", [slides])
    proc = subprocess.Popen(_cli(job), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    slides_dir, staging = Path(job.out) / "slides", Path(job.out) / ".staging"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in slides_dir.glob("*/zarr.json")] if slides_dir.is_dir() else []
        if done and staging.is_dir() and any(p for p in staging.iterdir() if not p.name.startswith(".")):
            break  # one slide complete and the next one half-written
        time.sleep(0.02)
    assert proc.poll() is None, "extractor finished before it could be signalled"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"interrupted by {signal.Signals(sig).name}" in err
    store = FeatureStore(job.out, mode="r")
    assert 1 <= len(store.slide_ids()) < 4
    assert not [p for p in staging.iterdir() if not p.name.startswith(".")], "partial slide left in staging"
    assert not list((Path(job.out) / ".claims").glob("*.claim")), "claims not released"
    (summary,) = (Path(job.out) / "runs").glob("*-summary.json")
    summary = json.loads(summary.read_text())
    assert summary["interrupted"] == f"signal {signal.Signals(sig).name}"
    status = {s["slide_id"]: (s["status"], s["reason"]) for s in summary["slides"]}
    assert {sid for sid, (st, _) in status.items() if st == "done"} == set(store.slide_ids())  # committed
    stopped = [(sid, reason) for sid, (st, reason) in status.items() if st == "interrupted"]
    assert stopped and all(reason == f"stopped: signal {signal.Signals(sig).name}" for _, reason in stopped)
    assert summary["n_slides"] == len(status) >= 2
    rerun = subprocess.run(_cli(job), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(FeatureStore(job.out, mode="r").slide_ids()) == 4


@pytest.mark.slow
def test_two_concurrent_processes_extract_each_slide_once(tmp_path):
    slides = _slide_links(tmp_path, 3)
    job = make_job(tmp_path / "shared.zarr", [slides])
    FeatureStore(job.out)  # create before both start
    procs = [subprocess.Popen(_cli(job), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]

    store = FeatureStore(job.out, mode="r")
    assert store.slide_ids() == ["s0", "s1", "s2", "tiny"]
    summaries = [json.loads(p.read_text()) for p in (Path(job.out) / "runs").glob("*-summary.json")]
    assert len(summaries) == 2
    done = [s["slide_id"] for summ in summaries for s in summ["slides"] if s["status"] == "done"]
    assert sorted(done) == ["s0", "s1", "s2", "tiny"]  # every slide encoded exactly once
    writers = {store.slide_attrs(sid)["written_by"]["pid"] for sid in store.slide_ids()}
    assert writers <= {p.pid for p in procs}


def _fail_launch(monkeypatch, call: int, exc: BaseException, *, delay: float = 0.0) -> None:
    """The encoder's ``call``-th batch raises ``exc`` (after ``delay`` seconds)."""
    from pipelines import extract as ex

    real_launch = ex._Embedder.launch
    calls = {"n": 0}

    def launch(self, images, normalizer=None):
        calls["n"] += 1
        if calls["n"] == call:
            time.sleep(delay)
            raise exc
        return real_launch(self, images, normalizer)

    monkeypatch.setattr(ex._Embedder, "launch", launch)


def _run_expecting(job, encoder, *, failed: str, reason: str, done: str) -> None:
    """Run ``job``: slide ``failed`` fails with ``reason``, ``done`` alone is in the store, and
    nothing is left in staging or claimed."""
    by_id = {r.slide_id: r for r in run_extract(job, encoder=encoder).results}
    assert by_id[failed].status == "failed" and reason in by_id[failed].reason, by_id[failed]
    assert by_id[done].status == "done"
    store = FeatureStore(job.out, mode="r")
    assert store.slide_ids() == [done]
    assert not list((store.path / ".staging").iterdir()) and not list((store.path / ".claims").iterdir())


def test_encoder_failure_mid_slide_fails_that_slide_only(tmp_path, encoder, monkeypatch):
    _fail_launch(monkeypatch, 2, RuntimeError("boom: device fell over"))
    job = make_job(tmp_path / "f.zarr", [TCGA, TINY])
    _run_expecting(job, encoder, failed="tcga-cr-7395-01a-01-ts1", reason="boom", done="tiny-aperio")


def test_a_failed_commit_fails_that_slide_alone(tmp_path, encoder, monkeypatch):
    """Commits run on a thread beside the encoder: one that fails leaves nothing of its slide."""
    real_commit = FeatureStore._commit

    def commit(self, slide_id, staging, held):
        if slide_id == "tcga-cr-7395-01a-01-ts1":
            raise OSError(28, "No space left on device")
        return real_commit(self, slide_id, staging, held)

    monkeypatch.setattr(FeatureStore, "_commit", commit)
    job = make_job(tmp_path / "f.zarr", [TCGA, TINY])
    _run_expecting(job, encoder, failed="tcga-cr-7395-01a-01-ts1", reason="No space left", done="tiny-aperio")


CMU = REAL / "cmu-1-small-region.svs"


def _fail_last_append_of(monkeypatch, slide_id, exc):
    """SlideWriter.append raises ``exc`` for the last (partial) batch of ``slide_id``."""
    from wsi.store import SlideWriter

    real_append = SlideWriter.append

    def append(self, features, coords, tissue=None):
        if self.attrs.get("slide_id") == slide_id and len(coords) < 16:
            raise exc
        return real_append(self, features, coords, tissue)

    monkeypatch.setattr(SlideWriter, "append", append)


def test_a_failure_on_a_slides_last_batch_fails_that_slide_not_the_next(tmp_path, encoder, monkeypatch):
    """A slide's last batch is fetched while the next slide's first computes: its error is its own."""
    _fail_last_append_of(monkeypatch, "cmu-1-small-region", OSError(5, "Input/output error"))
    job = make_job(tmp_path / "f.zarr", [CMU, TCGA])
    _run_expecting(job, encoder, failed="cmu-1-small-region", reason="Input/output error",
                   done="tcga-cr-7395-01a-01-ts1")  # fmt: skip
    assert len(FeatureStore(job.out, mode="r").read("tcga-cr-7395-01a-01-ts1")) > 0


def test_extract_slide_reports_a_failed_last_batch_instead_of_raising(tmp_path, encoder, monkeypatch):
    _fail_last_append_of(monkeypatch, "tcga-cr-7395-01a-01-ts1", OSError(28, "No space left on device"))
    job = make_job(tmp_path / "f.zarr", [TCGA])
    res = extract_slide(TCGA, job, encoder=encoder)
    assert res.status == "failed" and "No space left" in res.reason
    assert FeatureStore(job.out, mode="r").slide_ids() == []


def test_an_interrupted_run_leaves_no_claim_or_staging_of_slides_queued_ahead(tmp_path, encoder, monkeypatch):
    """Ctrl-C while the reader thread has the next slides opened, claimed and staged ahead."""
    # the pause lets the reader thread run ahead: next slides claimed, their "start" queued
    _fail_launch(monkeypatch, 2, KeyboardInterrupt(), delay=1.0)
    job = make_job(tmp_path / "f.zarr", [CMU, TCGA, TINY, REAL / "kidney-48-5.tif"])
    with pytest.raises(KeyboardInterrupt):
        run_extract(job, encoder=encoder)
    store = FeatureStore(job.out, mode="r")
    assert not list((store.path / ".claims").iterdir())
    assert not list((store.path / ".staging").iterdir())
    assert "cmu-1-small-region" not in store.slide_ids()


def test_a_slide_is_reported_done_only_once_it_is_in_the_store(tmp_path, encoder):
    out = tmp_path / "f.zarr"
    seen = []

    class Progress:
        def slide_started(self, slide_id, n):
            pass

        def patches_done(self, n):
            pass

        def slide_finished(self, res):
            store = FeatureStore(out, mode="r")
            seen.append((res.slide_id, res.status, store.is_complete(res.slide_id),
                         (out / ".claims" / f"{res.slide_id}.claim").exists(), res.n_patches,
                         store.read(res.slide_id).features.shape[0] if store.is_complete(res.slide_id) else None))

    summary = run_extract(make_job(out, [TCGA, TINY, REAL / "kidney-48-5.tif"]), encoder=encoder, progress=Progress())
    assert [r.status for r in summary.results] == ["done"] * 3
    # in commit order: a slide without patches may be done before the previous one's last batch
    assert sorted(s[0] for s in seen) == ["kidney-48-5", "tcga-cr-7395-01a-01-ts1", "tiny-aperio"]
    for sid, status, complete, claimed, n, stored in seen:
        assert (status, complete, claimed) == ("done", True, False), sid
        assert n == stored, sid
    assert sum(s[4] for s in seen) > 0


def test_stain_normalisation_is_applied_and_recorded(tmp_path, encoder, extracted):
    target = SHARED / "thumbnails" / "tcga-lung-rgb.png"
    if not target.exists():
        pytest.skip("stain target thumbnail not available")
    job = make_job(tmp_path / "f.zarr", [TCGA], stain={"method": "reinhard", "target": target})
    res = run_extract(job, encoder=encoder).results[0]
    assert res.status == "done", res.reason
    store = FeatureStore(job.out, mode="r")
    assert store.identity["stain"]["method"] == "reinhard"
    assert store.identity["stain"]["target_hash"].startswith("sha256:")
    plain = FeatureStore(extracted[0].out, mode="r").read("tcga-cr-7395-01a-01-ts1")
    normed = store.read("tcga-cr-7395-01a-01-ts1")
    np.testing.assert_array_equal(normed.coords, plain.coords)  # same patches ...
    assert not np.allclose(normed.features, plain.features, atol=1e-2)  # ... different pixels


def test_thread_and_process_readers_write_identical_stores(tmp_path, encoder, extracted, monkeypatch):
    """``--reader thread`` (reader threads here) and the default child process: same bytes,
    with stain normalisation applied in the child for the process reader."""
    from wsi import reader_process

    target = SHARED / "thumbnails" / "tcga-lung-rgb.png"
    stain = {"method": "reinhard", "target": target} if target.exists() else {"method": "none"}
    child_reads: list[str] = []  # slides whose patches a child process read
    real_start = reader_process.ReaderProcess.start

    def start(self, path, grid, **kw):
        child_reads.append(Path(path).stem)
        return real_start(self, path, grid, **kw)

    monkeypatch.setattr(reader_process.ReaderProcess, "start", start)
    stores, reads = {}, {}
    for mode in ("thread", "process"):
        job = make_job(tmp_path / f"{mode}.zarr", [TCGA, REAL / "cmu-1-small-region.svs"], reader=mode, stain=stain)
        assert {r.status for r in run_extract(job, encoder=encoder).results} == {"done"}
        stores[mode] = FeatureStore(job.out, mode="r")
        reads[mode], child_reads[:] = sorted(child_reads), []
    assert reads == {"thread": [], "process": ["cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"]}
    for sid in ("tcga-cr-7395-01a-01-ts1", "cmu-1-small-region"):
        a, b = stores["thread"].read(sid), stores["process"].read(sid)
        assert len(a) > 0
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.features, b.features)


@pytest.mark.slow
def test_extract_benchmark_smoke_run():
    """bench/extract.py runs end to end and reports every column it promises."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "extract.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--quick", "--encoders", "tiny-vit", "--rounds", "1", "--threads", "2",
         "--store-rows", "2000"],
        capture_output=True, text=True, check=True, timeout=600,
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("tiny-vit"))
    cells = row.replace("|", " ").split()
    assert cells[1] == "32px@0.5" and int(cells[2]) > 0 and cells[3] == "2"
    bare, e2e, ratio = float(cells[4]), float(cells[5]), float(cells[6])
    assert bare > 0 and e2e > 0 and ratio == pytest.approx(e2e / bare, abs=0.01)
    assert cells[10] == "1"  # matched: the encoder on one thread, reading on the other core
    assert "fp16 zarr" in out and "expected, not measured" in out
