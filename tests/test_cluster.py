"""pipelines.cluster: cluster configs, map_slides on real Dask clusters, worker loss, real SLURM.

Tests that start a Dask cluster or SLURM are marked ``cluster`` (run them with ``-m cluster``).
Task functions live at module level: Dask's spawned workers import this module by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from slurm_harness import SlurmNode, slurm  # noqa: F401  (session fixture)

from pipelines.cluster import (
    ClusterError,
    ClusterProgress,
    ClusterTaskError,
    cluster_client,
    gpu_resources,
    jobqueue_kwargs,
    local_workers,
    map_slides,
    probe_slide,
    resolve_cluster,
    run_calls,
    run_slides,
)
from pipelines.config import ClusterConfig, ConfigError, load_config
from pipelines.summary import SlideResult
from wsi.slide import slide_id_for
from wsi.store import FeatureStore

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "slides" / "real"
REPO = Path(__file__).resolve().parents[1]


def real_slides() -> list[Path]:
    if not REAL.is_dir():
        pytest.skip(f"test slides not found in {REAL}")
    return sorted(p for p in REAL.iterdir() if p.suffix in (".svs", ".tif", ".tiff"))


def local_cfg(**kw) -> ClusterConfig:
    return ClusterConfig(kind="local", n_workers=2, dashboard_address=":0", **kw)


# --- a small store-writing task: real files, real store, deterministic -------------------------

@dataclass(frozen=True)
class StoreJob:
    out: Path
    markers: Path | None = None  # kill the worker the first time each slide is processed
    victim: str | None = None  # kill the worker every time this slide is processed
    preempt: Path | None = None  # SLURM: cancel the worker's own job the first time (node loss)


def write_slide(path: Path, job: StoreJob) -> SlideResult:
    """Features from the slide file's bytes, streamed into the store; optionally dies mid-slide."""
    sid = slide_id_for(path)
    store = FeatureStore(job.out)
    if store.is_complete(sid):
        return SlideResult(sid, str(path), "skipped")
    raw = np.frombuffer(path.read_bytes()[: 64 * 16], dtype=np.uint8).astype(np.float32)
    feats = raw.reshape(-1, 16) / 255.0
    coords = np.stack([np.arange(len(feats)), np.arange(len(feats)) * 2], axis=1)
    with store.writer(sid, dim=16, attrs={"source": str(path)}) as w:
        w.append(feats[:32], coords[:32])
        if job.victim == sid:
            os.kill(os.getpid(), signal.SIGKILL)
        if job.preempt is not None and not (job.preempt / sid).exists():
            (job.preempt / sid).write_text(os.environ["SLURM_JOB_ID"])
            subprocess.run(["scancel", os.environ["SLURM_JOB_ID"]], check=True)
            time.sleep(300)  # SLURM ends the job (and this worker) long before
        if job.markers is not None:
            marker = job.markers / f"{sid}.killed"
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        w.append(feats[32:], coords[32:])
    return SlideResult(sid, str(path), "done", n_patches=len(feats))


def store_content(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    store = FeatureStore(path, mode="r")
    out = {}
    for sid in store.slide_ids():
        s = store.read(sid)
        out[sid] = (np.asarray(s.features), np.asarray(s.coords), np.asarray(s.tissue))
    return out


def assert_same_store(a: Path, b: Path, *, atol: float = 0.0) -> None:
    ca, cb = store_content(a), store_content(b)
    assert sorted(ca) == sorted(cb)
    for sid in ca:
        fa, xa, ta = ca[sid]
        fb, xb, tb = cb[sid]
        np.testing.assert_array_equal(xa, xb, err_msg=sid)
        np.testing.assert_array_equal(ta, tb, err_msg=sid)
        np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), atol=atol, err_msg=sid)


# --- config (no cluster) ---------------------------------------------------------------------

def test_cluster_kind_is_validated():
    assert ClusterConfig(kind="tcp://10.0.0.1:8786").kind == "tcp://10.0.0.1:8786"
    with pytest.raises(ConfigError, match="choose local, slurm, pbs"):
        load_config(ClusterConfig, None, {"kind": "kubernetes"})


def test_resolve_cluster_layers_file_then_flag(tmp_path):
    assert resolve_cluster(None) is None
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"kind": "slurm", "queue": "gpu", "cores": 8}))
    base = ClusterConfig(kind="local", account="lab", cores=2)
    cfg = resolve_cluster(base, None, f)
    assert (cfg.kind, cfg.queue, cfg.cores, cfg.account) == ("slurm", "gpu", 8, "lab")
    cfg = resolve_cluster(base, "pbs", f)
    assert cfg.kind == "pbs" and cfg.queue == "gpu"
    assert resolve_cluster(None, "local").kind == "local"


def test_shipped_cluster_configs_validate():
    files = sorted((REPO / "configs" / "cluster").glob("*.yaml"))
    assert {f.stem for f in files} >= {"local", "slurm", "pbs"}
    for f in files:
        cfg = load_config(ClusterConfig, f)
        assert cfg.kind == f.stem


def test_local_cluster_is_sized_to_the_machine():
    from dask.system import CPU_COUNT

    assert local_workers(ClusterConfig()) == CPU_COUNT
    assert local_workers(ClusterConfig(threads_per_worker=2)) == max(1, CPU_COUNT // 2)
    assert local_workers(ClusterConfig(n_workers=3)) == 3
    assert gpu_resources(ClusterConfig(gpus=2)) == {"GPU": 1}
    assert gpu_resources(ClusterConfig()) is None and gpu_resources(None) is None


def test_jobqueue_kwargs_gpu_resources_and_site_config():
    cfg = ClusterConfig(kind="slurm", queue="gpu", account="lab", cores=8, memory="64GB", gpus=1)
    kw = jobqueue_kwargs(cfg)
    assert kw["worker_extra_args"] == ["--resources", "GPU=1"]
    assert "--gres=gpu:1" in kw["job_extra_directives"]
    assert (kw["queue"], kw["account"], kw["cores"], kw["memory"]) == ("gpu", "lab", 8, "64GB")
    # A site config (~/.config/dask/jobqueue.yaml) fills what the project config leaves unset.
    with dask.config.set({"jobqueue.slurm.queue": "site-q", "jobqueue.slurm.memory": "128GB"}):
        kw = jobqueue_kwargs(ClusterConfig(kind="slurm", memory="16GB"))
        assert "queue" not in kw  # dask-jobqueue reads it from the site config itself
        assert kw["memory"] == "16GB"  # explicitly set in the project config: wins
    with pytest.raises(ClusterError, match="GPU"):
        jobqueue_kwargs(ClusterConfig(kind="slurm", gpus=1, processes=2))


def test_slurm_job_script_has_the_directives():
    cfg = ClusterConfig(
        kind="slurm", queue="debug", account="lab", cores=4, memory="8GB", walltime="01:00:00",
        gpus=2, processes=2, job_extra_directives=["--constraint=a100"], dashboard_address=None,
        scheduler_host="127.0.0.1",
    )
    import dask_jobqueue

    with dask_jobqueue.SLURMCluster(**jobqueue_kwargs(cfg)) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p debug", "#SBATCH -A lab", "#SBATCH -t 01:00:00",
                 "#SBATCH --constraint=a100", "#SBATCH --gres=gpu:2", "--resources GPU=1", "--nworkers 2"):
        assert line in script, line


def test_pbs_job_script():
    import dask_jobqueue

    cfg = ClusterConfig(kind="pbs", queue="workq", account="proj", cores=2, memory="4GB",
                        dashboard_address=None, scheduler_host="127.0.0.1")
    with dask_jobqueue.PBSCluster(**jobqueue_kwargs(cfg)) as cluster:
        script = cluster.job_script()
    assert "#PBS -q workq" in script and "#PBS -A proj" in script and "ncpus=2" in script


def test_run_slides_without_cluster_runs_here(tmp_path):
    paths = real_slides()[:2]
    seen = []
    results = run_slides(probe_slide, paths, StoreJob(tmp_path), progress=seen.append)
    assert [r.slide_id for r in results] == [slide_id_for(p) for p in paths]
    assert {r.extra["pid"] for r in results} == {os.getpid()}
    assert seen == results


def test_missing_batch_system_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ClusterError, match="`qsub` is not on PATH"), cluster_client(ClusterConfig(kind="pbs")):
        pass


def test_progress_counts_failures():
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=120)
    with ClusterProgress(2, title="tiling", console=console) as progress:
        progress(SlideResult("a", "a.svs", "done"))
        progress(SlideResult("b", "b.svs", "failed", reason="bad"))
    assert progress.failed == 1
    assert "2/2" in console.file.getvalue() and "1 failed" in console.file.getvalue()


def test_unreachable_scheduler_is_a_clear_error():
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(ClusterError, match="cannot reach the Dask scheduler"), \
            cluster_client(ClusterConfig(kind="tcp://127.0.0.1:1")):
        pass


# --- local Dask cluster ----------------------------------------------------------------------

@pytest.mark.cluster
def test_map_slides_spreads_over_two_processes_in_input_order(tmp_path):
    paths = [tmp_path / f"s{i:02d}.svs" for i in range(12)]
    for p in paths:
        p.write_bytes(b"x")
    seen: list[SlideResult] = []
    cfg = local_cfg()
    with cluster_client(cfg) as client:
        client.wait_for_workers(2, timeout=60)
        results = map_slides(probe_slide, paths, None, cfg, progress=seen.append, client=client)
    assert [r.slide_id for r in results] == [p.stem for p in paths]
    assert all(r.status == "done" and r.extra["exists"] for r in results)
    assert len({r.extra["pid"] for r in results}) == 2
    assert os.getpid() not in {r.extra["pid"] for r in results}
    assert sorted(r.slide_id for r in seen) == [p.stem for p in paths]
    # processes for tiling, threads inside: native pools sized to threads_per_worker
    assert results[0].extra["threads"]["NUMBA_NUM_THREADS"] == "1"


@pytest.mark.cluster
def test_two_processes_same_store_and_worker_killed_mid_slide(tmp_path):
    paths = real_slides()
    serial = run_slides(write_slide, paths, StoreJob(tmp_path / "serial.zarr"))
    assert all(r.status == "done" for r in serial)

    markers = tmp_path / "markers"
    markers.mkdir()
    job = StoreJob(tmp_path / "cluster.zarr", markers=markers)
    results = map_slides(write_slide, paths, job, local_cfg(retries=2))
    assert [r.status for r in results] == ["done"] * len(paths), [r.reason for r in results]
    assert len(list(markers.iterdir())) == len(paths)  # every slide's first worker was killed
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "cluster.zarr")
    store = FeatureStore(tmp_path / "cluster.zarr", mode="r")
    assert not list((store.path / ".staging").iterdir())  # no partial slide left behind
    assert not list((store.path / ".claims").glob("*.claim"))


@pytest.mark.cluster
def test_slide_that_always_kills_its_worker_is_failed_and_the_rest_complete(tmp_path):
    paths = real_slides()
    victim = slide_id_for(paths[0])
    job = StoreJob(tmp_path / "s.zarr", victim=victim)
    results = map_slides(write_slide, paths, job, local_cfg(retries=1))
    by_id = {r.slide_id: r for r in results}
    assert by_id[victim].status == "failed"
    assert by_id[victim].error_type == "KilledWorker"
    assert "worker died 2 times" in by_id[victim].reason
    assert all(r.status == "done" for sid, r in by_id.items() if sid != victim)
    store = FeatureStore(job.out, mode="r")
    assert victim not in store.slide_ids()  # never a partial slide
    assert store.slide_ids() == sorted(set(by_id) - {victim})


def scaled(x: float, *, by: float = 1.0) -> tuple[float, int]:
    return x / by, os.getpid()


@pytest.mark.cluster
def test_run_calls_results_in_order_and_failures_named():
    calls = [((float(i),), {"by": 2.0}) for i in range(6)]
    results = run_calls(scaled, calls, local_cfg(), names=[f"fold{i}" for i in range(6)])
    assert [r[0] for r in results] == [i / 2 for i in range(6)]
    assert os.getpid() not in {r[1] for r in results}
    bad = [((1.0,), {"by": 1.0}), ((1.0,), {"by": 0.0})]
    with pytest.raises(ClusterTaskError, match="1 of 2 cluster task.*fold1: float division by zero") as info:
        run_calls(scaled, bad, local_cfg(retries=0), names=["fold0", "fold1"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


@pytest.mark.cluster
def test_existing_scheduler_by_address(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as lc:
        cfg = ClusterConfig(kind=lc.scheduler_address)
        results = map_slides(probe_slide, real_slides()[:2], None, cfg)
        assert all(r.status == "done" for r in results)
        assert len(lc.scheduler.workers) == 1  # the existing cluster is left running


# --- extraction on a local cluster ------------------------------------------------------------

#: slides with patches (killed mid-slide) and one smaller than a patch (no patches)
EXTRACT_SLIDES = ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "tiny-aperio.svs")


def extract_slides() -> list[Path]:
    return [p for p in real_slides() if p.name in EXTRACT_SLIDES]


def extract_job(out: Path, **kw):
    from pipelines.config import ExtractJob

    return ExtractJob(
        slides=[str(p) for p in extract_slides()], out=out, encoder="tiny-vit", weights="random",
        device="cpu", batch_size=32, torch_threads=1, tiling={"slide_mpp": 0.5}, **kw,
    )


def extract_killed_once(path: Path, job, *, markers: Path) -> SlideResult:
    """``extract_slide``, but the first time a slide is seen its worker is SIGKILLed right after
    the first batch of features went into the store's staging area (mid-slide)."""
    import wsi.store
    from pipelines.extract import extract_slide

    marker = markers / f"{slide_id_for(path)}.killed"
    if marker.exists():
        return extract_slide(path, job)
    marker.write_text(str(os.getpid()))
    append = wsi.store.SlideWriter.append

    def append_then_die(self, *args, **kwargs):
        append(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    wsi.store.SlideWriter.append = append_then_die
    try:
        return extract_slide(path, job)  # a slide without patches survives: nothing to append
    finally:
        wsi.store.SlideWriter.append = append


def assert_same_extraction(a: Path, b: Path) -> None:
    # Coords and tissue exactly; features to fp16 rounding (a slide alone on a worker is batched
    # differently from a serial run that packs batches across slides). Another slide's or a
    # corrupted slide's features would differ by O(1).
    assert_same_store(a, b, atol=0.02)
    sa, sb = FeatureStore(a, mode="r"), FeatureStore(b, mode="r")
    assert sa.identity == sb.identity
    for sid in sa.slide_ids():
        keep = ("n_tiles", "feature_dim", "complete")
        assert {k: sa.read(sid).attrs.get(k) for k in keep} == {k: sb.read(sid).attrs.get(k) for k in keep}


@pytest.mark.cluster
def test_extract_two_workers_killed_mid_slide_gives_the_single_process_store(tmp_path):
    from functools import partial

    from pipelines.extract import load_encoder, open_store, run_extract

    serial = run_extract(extract_job(tmp_path / "serial.zarr"))
    assert serial.n_failed == 0 and serial.n_patches > 0

    job = extract_job(tmp_path / "cluster.zarr")
    open_store(job, load_encoder(job))  # the store's identity, as run_extract records it
    markers = tmp_path / "markers"
    markers.mkdir()
    fn = partial(extract_killed_once, markers=markers)
    results = map_slides(fn, extract_slides(), job, local_cfg(retries=2))
    assert [r.status for r in results] == ["done"] * len(results), [r.reason for r in results]
    killed = {m.stem for m in markers.glob("*.killed")}
    assert killed == {r.slide_id for r in results}
    assert {r.slide_id: r.n_patches for r in results} == {r.slide_id: r.n_patches for r in serial.results}
    assert_same_extraction(tmp_path / "serial.zarr", tmp_path / "cluster.zarr")
    store = tmp_path / "cluster.zarr"
    assert not [p for p in (store / ".staging").iterdir()]  # no partial slide anywhere
    assert not list((store / ".claims").glob("*.claim"))


@pytest.mark.cluster
def test_whole_cluster_run_killed_then_rerun_resumes(tmp_path):
    """SIGKILL the CLI and its Dask workers mid-run (the job's whole process group), rerun:
    finished slides are kept, the rest completes, and the store equals a serial run's."""
    from pipelines.extract import run_extract

    serial = run_extract(extract_job(tmp_path / "serial.zarr"))
    assert serial.n_failed == 0
    store = tmp_path / "cluster.zarr"
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({"kind": "local", "n_workers": 2, "dashboard_address": ":0"}))
    args = ["extract", *map(str, extract_slides()), "--out", str(store), "--encoder", "tiny-vit",
            "--weights", "random", "--device", "cpu", "--batch-size", "32", "--threads", "1",
            "--slide-mpp", "0.5", "--cluster", "local", "--cluster-config", str(tmp_path / "local.yaml")]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def committed() -> list[str]:
        return sorted(p.parent.name for p in (store / "slides").glob("*/zarr.json"))

    try:
        deadline = time.monotonic() + 300
        def half_written() -> list[str]:  # claimed and not yet committed
            return [c.stem for c in (store / ".claims").glob("*.claim") if c.stem not in committed()]

        # one slide in the store and another one being written when the run is killed
        while not (committed() and half_written()) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = FeatureStore(store, mode="r").slide_ids()
    assert 1 <= len(finished) < len(extract_slides())
    kept = {sid: FeatureStore(store, mode="r").slide_attrs(sid) for sid in finished}
    rerun = cli(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_extraction(tmp_path / "serial.zarr", store)
    assert not list((store / ".claims").glob("*.claim"))
    (summary,) = (store / "runs").glob("*-summary.json")  # the killed run wrote none
    status = {s["slide_id"]: s["status"] for s in json.loads(summary.read_text())["slides"]}
    assert sorted(sid for sid, st in status.items() if st == "skipped") == finished  # resumed, not redone
    assert {sid: FeatureStore(store, mode="r").slide_attrs(sid) for sid in finished} == kept


# --- training folds as tasks ------------------------------------------------------------------

def small_cohort(tmp_path: Path) -> tuple[Path, Path]:
    """A store of 24 slides (two separable classes) written from arrays, and its label table."""
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "cohort.zarr")
    rows = []
    for i in range(24):
        label = i % 2
        feats = rng.normal(label * 1.5, 1.0, size=(20 + i, 8)).astype(np.float32)
        coords = np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats))], axis=1)
        store.write(f"s{i:02d}", feats, coords)
        rows.append(f"s{i:02d},{'tumour' if label else 'normal'}")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    return store.path, labels


@pytest.mark.cluster
def test_train_folds_as_cluster_tasks_match_a_sequential_run(tmp_path):
    from pipelines.config import TrainJob
    from pipelines.train import train_mil

    store, labels = small_cohort(tmp_path)
    base = {"model": "abmil", "folds": 2, "epochs": 3, "patience": 3, "batch_size": 4,
            "device": "cpu", "torch_threads": 1, "seed": 1}
    seq = train_mil(store, labels, job=TrainJob(**base), out=tmp_path / "seq")
    par = train_mil(store, labels, job=TrainJob(**base, cluster=local_cfg()), out=tmp_path / "par")
    assert len(par.folds) == len(seq.folds) == 2
    for a, b in zip(seq.folds, par.folds, strict=True):
        for k, v in a.items():
            if isinstance(v, float) and k != "seconds":
                assert b[k] == pytest.approx(v, abs=1e-4), k
    assert all(Path(c).exists() for c in par.checkpoints)


# --- real SLURM ------------------------------------------------------------------------------

def slurm_cfg(node: SlurmNode, tmp_path: Path, **kw) -> ClusterConfig:
    return ClusterConfig(
        kind="slurm", queue=node.partition, cores=1, memory="2GB", processes=1, walltime="00:10:00",
        minimum=0, maximum=2, scheduler_host="127.0.0.1", dashboard_address=None,
        log_directory=str(tmp_path / "slurm-logs"), local_directory=str(tmp_path / "dask-tmp"),
        job_script_prologue=[f"export PYTHONPATH={Path(__file__).parent}"], **kw,  # for write_slide
    )


@pytest.mark.cluster
def test_slurm_map_slides(slurm, tmp_path):  # noqa: F811
    paths = real_slides()
    results = map_slides(probe_slide, paths, None, slurm_cfg(slurm, tmp_path))
    assert [r.slide_id for r in results] == [slide_id_for(p) for p in paths]
    assert all(r.status == "done" and r.extra["exists"] for r in results)
    assert os.getpid() not in {r.extra["pid"] for r in results}
    assert list((tmp_path / "slurm-logs").glob("*.err"))  # the workers really were SLURM jobs


@pytest.mark.cluster
def test_slurm_store_equals_serial_store(slurm, tmp_path):  # noqa: F811
    paths = real_slides()
    run_slides(write_slide, paths, StoreJob(tmp_path / "serial.zarr"))
    job = StoreJob(tmp_path / "slurm.zarr")
    results = map_slides(write_slide, paths, job, slurm_cfg(slurm, tmp_path))
    assert all(r.status == "done" for r in results), [r.reason for r in results]
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "slurm.zarr")


@pytest.mark.cluster
def test_slurm_job_cancelled_mid_slide_is_retried_in_another_job(slurm, tmp_path):  # noqa: F811
    paths = [p for p in real_slides() if p.name in EXTRACT_SLIDES]
    run_slides(write_slide, paths, StoreJob(tmp_path / "serial.zarr"))
    (tmp_path / "preempted").mkdir()
    job = StoreJob(tmp_path / "slurm.zarr", preempt=tmp_path / "preempted")
    results = map_slides(write_slide, paths, job, slurm_cfg(slurm, tmp_path))
    assert all(r.status == "done" for r in results), [r.reason for r in results]
    assert len(list((tmp_path / "preempted").iterdir())) == len(paths)  # each slide lost a job once
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "slurm.zarr")


@pytest.mark.cluster
def test_cli_extract_on_slurm_equals_local_run(slurm, tmp_path):  # noqa: F811
    from pipelines.extract import run_extract

    local = run_extract(extract_job(tmp_path / "local.zarr"))
    assert local.n_failed == 0
    cfg = slurm_cfg(slurm, tmp_path).model_dump(mode="json", exclude_unset=True)
    cfg.pop("job_script_prologue")
    (tmp_path / "slurm.yaml").write_text(yaml.safe_dump(cfg))
    proc = cli(
        "extract", *map(str, extract_slides()), "--out", str(tmp_path / "slurm.zarr"),
        "--encoder", "tiny-vit", "--weights", "random", "--device", "cpu", "--batch-size", "32",
        "--threads", "1", "--slide-mpp", "0.5",
        "--cluster", "slurm", "--cluster-config", str(tmp_path / "slurm.yaml"), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_extraction(tmp_path / "local.zarr", tmp_path / "slurm.zarr")
    assert list((tmp_path / "slurm-logs").glob("*.err"))  # the work ran in SLURM jobs


@pytest.mark.cluster
def test_cli_tile_on_local_cluster_equals_serial_run(tmp_path):
    from pipelines.config import TileJob
    from pipelines.tile import run_tile

    slides = [str(p) for p in real_slides()]
    serial = run_tile(TileJob(slides=slides, out=tmp_path / "serial", tiling={"slide_mpp": 0.5}))
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({"kind": "local", "n_workers": 2, "dashboard_address": ":0"}))
    proc = cli("tile", *slides, "--out", str(tmp_path / "cluster"), "--slide-mpp", "0.5",
               "--cluster", "local", "--cluster-config", str(tmp_path / "local.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import zarr

    for r in serial.results:
        a = zarr.open_group(tmp_path / "serial" / "coords" / f"{r.slide_id}.zarr", mode="r")
        b = zarr.open_group(tmp_path / "cluster" / "coords" / f"{r.slide_id}.zarr", mode="r")
        np.testing.assert_array_equal(a["coords"][:], b["coords"][:])
        np.testing.assert_array_equal(a["tissue"][:], b["tissue"][:])


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=900, env={**os.environ, "COLUMNS": "200"},
    )
