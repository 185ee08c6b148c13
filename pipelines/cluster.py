"""Where work runs: a local Dask cluster, SLURM/PBS through dask-jobqueue, or an existing scheduler.

``cluster_client(cfg)`` opens a ``distributed.Client`` for a :class:`~pipelines.config.ClusterConfig`;
``map_slides(fn, paths, job, cfg)`` runs ``fn(path, job) -> SlideResult`` once per slide on it.

Fault tolerance is Dask's: a task whose worker dies is rescheduled on another worker, up to
``cfg.retries`` times (``distributed.scheduler.allowed-failures``); after that the slide is reported
failed with the reason and the other slides go on. ``fn`` catches its own errors and returns a
failed ``SlideResult``; anything it lets escape is retried ``cfg.retries`` times, then reported.
Partial slides never reach the store because ``fn`` writes each slide aside and renames it in.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import uuid4

import dask

from pipelines.config import ClusterConfig, load_config
from pipelines.summary import SlideResult
from wsi.slide import slide_id_for

if TYPE_CHECKING:
    from distributed import Client, Future

logger = logging.getLogger(__name__)

T = TypeVar("T")
SlideFn = Callable[..., SlideResult]
Progress = Callable[[SlideResult], None]

#: jobqueue options that may come from the site config (``~/.config/dask/jobqueue.yaml``) when the
#: project config does not set them explicitly.
_JOBQUEUE_FIELDS = {
    "queue": "queue",
    "account": "account",
    "cores": "cores",
    "memory": "memory",
    "processes": "processes",
    "walltime": "walltime",
    "local_directory": "local-directory",
    "log_directory": "log-directory",
    "interface": "interface",
    "job_extra_directives": "job-extra-directives",
    "job_script_prologue": "job-script-prologue",
}


#: native thread pools sized per worker (processes for tiling, threads inside)
THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class ClusterError(RuntimeError):
    """The cluster could not be started or reached; the message names the reason and the fix."""


class ClusterTaskError(RuntimeError):
    """One or more tasks of a ``run_calls`` batch failed; the message names them and why."""


def scheduler_settings(cfg: ClusterConfig) -> dict[str, Any]:
    """Dask config for a cluster we start: bounded retries after worker deaths, one task per
    worker thread (so a dying worker takes no queued, innocent slide down with it), and local
    workers whose native thread pools (Numba, OpenMP, BLAS) match ``threads_per_worker``."""
    settings: dict[str, Any] = {
        "distributed.scheduler.allowed-failures": cfg.retries,
        "distributed.scheduler.worker-saturation": 1.0,
    }
    if cfg.kind == "local":
        for var in THREAD_VARS:
            settings[f"distributed.nanny.pre-spawn-environ.{var}"] = cfg.threads_per_worker
    return settings


def local_workers(cfg: ClusterConfig) -> int:
    """Worker processes for a local cluster: ``cfg.n_workers`` or all usable cores / threads."""
    if cfg.n_workers is not None:
        return cfg.n_workers
    from dask.system import CPU_COUNT

    return max(1, CPU_COUNT // cfg.threads_per_worker)


def gpu_resources(cfg: ClusterConfig | None) -> dict[str, float] | None:
    """Task resources for GPU work: ``{"GPU": 1}`` when the cluster declares GPUs, else None."""
    return {"GPU": 1} if cfg is not None and cfg.gpus > 0 else None


def _gpus_per_worker(cfg: ClusterConfig) -> int:
    per = cfg.gpus // cfg.processes
    if cfg.gpus and per < 1:
        raise ClusterError(
            f"cluster config: {cfg.gpus} GPU(s) per job cannot be shared by {cfg.processes} worker "
            "processes. Fix: set processes to at most the number of GPUs per job"
        )
    return per


def jobqueue_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for ``SLURMCluster`` / ``PBSCluster``.

    Options set explicitly in the project config win; the others come from the site's dask
    config (``jobqueue.<kind>.*``) when it sets them, else from the ``ClusterConfig`` defaults.
    """
    site = dask.config.get(f"jobqueue.{cfg.kind}", default={}) or {}
    kwargs: dict[str, Any] = {}
    for field, key in _JOBQUEUE_FIELDS.items():
        value = getattr(cfg, field)
        if field not in cfg.model_fields_set and site.get(key) not in (None, [], ""):
            continue  # dask-jobqueue reads the site value itself
        if value is None or value == []:
            continue
        kwargs[field] = list(value) if isinstance(value, list) else value
    worker_args = list(site.get("worker-extra-args") or [])
    gpus = _gpus_per_worker(cfg)
    if gpus:
        worker_args += ["--resources", f"GPU={gpus}"]
        directives = list(kwargs.get("job_extra_directives", site.get("job-extra-directives") or []))
        if cfg.kind == "slurm" and not any("gres" in d or "gpus" in d for d in directives):
            directives.append(f"--gres=gpu:{cfg.gpus}")
        kwargs["job_extra_directives"] = directives
    if worker_args:
        kwargs["worker_extra_args"] = worker_args
    cores = kwargs.get("cores", site.get("cores") or 1)
    threads = max(1, int(cores) // int(kwargs.get("processes", site.get("processes") or 1)))
    prologue = list(kwargs.get("job_script_prologue", site.get("job-script-prologue") or []))
    kwargs["job_script_prologue"] = [f"export NUMBA_NUM_THREADS={threads}", *prologue]
    scheduler_options = dict(site.get("scheduler-options") or {})
    if cfg.scheduler_host:
        scheduler_options["host"] = cfg.scheduler_host
    scheduler_options.update({k: v for k, v in _dashboard_kwargs(cfg).items() if k not in scheduler_options})
    kwargs["scheduler_options"] = scheduler_options
    return kwargs


def _dashboard_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Scheduler options for the dashboard. Without one (``dashboard_address: null``) the
    scheduler's HTTP server still listens, so it gets a free port instead of Dask's 8787."""
    if cfg.dashboard_address is None:
        return {"dashboard": False, "dashboard_address": ":0"}
    return {"dashboard_address": cfg.dashboard_address}


def _make_cluster(cfg: ClusterConfig):
    if cfg.kind == "local":
        from distributed import LocalCluster

        n = local_workers(cfg)
        kwargs: dict[str, Any] = {
            "n_workers": n,
            "threads_per_worker": cfg.threads_per_worker,
            "processes": True,
            "dashboard_address": _dashboard_kwargs(cfg)["dashboard_address"],
        }
        if cfg.dashboard_address is None:
            kwargs["scheduler_kwargs"] = {"dashboard": False}
        if cfg.local_directory:
            kwargs["local_directory"] = cfg.local_directory
        if cfg.gpus:
            kwargs["resources"] = {"GPU": cfg.gpus}
        logger.info("starting a local Dask cluster: %d processes x %d threads", n, cfg.threads_per_worker)
        return LocalCluster(**kwargs)
    import dask_jobqueue

    submit = {"slurm": "sbatch", "pbs": "qsub"}[cfg.kind]
    if shutil.which(submit) is None:
        raise ClusterError(
            f"--cluster {cfg.kind}: `{submit}` is not on PATH, so no worker job can be submitted. "
            f"Fix: run slidepipe on a {cfg.kind.upper()} login node, or use --cluster local"
        )
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[cfg.kind]
    kwargs = jobqueue_kwargs(cfg)
    cluster = cls(**kwargs)
    cluster.adapt(minimum_jobs=cfg.minimum, maximum_jobs=cfg.maximum)
    logger.info("%s cluster: adaptive scaling between %d and %d jobs", cfg.kind, cfg.minimum, cfg.maximum)
    logger.debug("%s job script:\n%s", cfg.kind, cluster.job_script())
    return cluster


def _log_dashboard(client: Client) -> None:
    link = client.dashboard_link
    if importlib.util.find_spec("bokeh") is None:
        logger.info("Dask scheduler %s; dashboard %s (install bokeh to see it)", client.scheduler.address, link)
    else:
        logger.info("Dask dashboard: %s", link)


def _import_distributed() -> None:
    """Import distributed without letting its import-time logging setup (``distributed: info``)
    undo the levels the application already chose (the CLI quiets Dask to warnings)."""
    if "distributed" in sys.modules:
        return
    names = ("distributed", "distributed.client", "tornado", "bokeh")
    saved = {name: logging.getLogger(name).level for name in names}
    import distributed  # noqa: F401

    for name, level in saved.items():
        if level != logging.NOTSET:
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def cluster_client(cfg: ClusterConfig | None = None) -> Iterator[Client]:
    """A ``distributed.Client`` on the cluster ``cfg`` describes (default: a local cluster).

    ``local``: a ``LocalCluster`` of worker processes sized to the machine; ``slurm``/``pbs``: a
    dask-jobqueue cluster scaled adaptively between ``minimum`` and ``maximum`` jobs; an address
    such as ``tcp://host:port``: an existing scheduler (its own retry settings apply).
    The cluster we start is closed on exit; an existing scheduler is left running.
    """
    _import_distributed()
    from distributed import Client

    cfg = cfg or ClusterConfig()
    if "://" in cfg.kind:
        try:
            client = Client(cfg.kind)  # timeout: distributed.comm.timeouts.connect
        except OSError as err:
            raise ClusterError(
                f"{cfg.kind}: cannot reach the Dask scheduler ({err}). "
                "Fix: start it (`dask scheduler`) or check the address and firewall"
            ) from err
        with client:
            _log_dashboard(client)
            yield client
        return
    with dask.config.set(scheduler_settings(cfg)):
        try:
            cluster = _make_cluster(cfg)
        except (OSError, RuntimeError, ValueError) as err:
            raise ClusterError(
                f"cannot start the {cfg.kind} cluster: {err}. Fix: check the cluster config "
                "(configs/cluster/*.yaml) and that the scheduler commands (sbatch/qsub) work"
            ) from err
        with cluster, Client(cluster) as client:
            _log_dashboard(client)
            yield client


def _failure_reason(future: Future, cfg_retries: int | None) -> tuple[str, str]:
    """(reason, error type) for a future that did not return a result."""
    from distributed import KilledWorker

    if future.status == "cancelled":
        return "task cancelled: the Dask scheduler lost it. Fix: rerun; finished slides are skipped", "CancelledError"
    err = future.exception()
    if isinstance(err, KilledWorker):
        tries = (cfg_retries if cfg_retries is not None else err.allowed_failures) + 1
        return (
            f"its worker died {tries} times while processing it (out of memory or a crash in "
            "the reader or the model). Fix: check this slide alone, or give workers more memory",
            "KilledWorker",
        )
    return f"{err}", type(err).__name__


def map_tasks(
    client: Client,
    fn: Callable[..., T],
    items: Sequence[Any],
    *args: Any,
    names: Sequence[str] | None = None,
    prefix: str | None = None,
    retries: int = 0,
    resources: dict[str, float] | None = None,
    on_done: Callable[[int, Future], None] | None = None,
) -> list[Future]:
    """Run ``fn(item, *args)`` as one task per item; see :func:`submit_calls`."""
    calls = [((item, *args), {}) for item in items]
    return submit_calls(client, fn, calls, names=names, prefix=prefix, retries=retries,
                        resources=resources, on_done=on_done)


def submit_calls(
    client: Client,
    fn: Callable[..., T],
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    *,
    names: Sequence[str] | None = None,
    prefix: str | None = None,
    retries: int = 0,
    resources: dict[str, float] | None = None,
    on_done: Callable[[int, Future], None] | None = None,
) -> list[Future]:
    """Run ``fn(*args, **kwargs)`` for each ``(args, kwargs)`` as one task, wait for all, return
    the futures in input order. ``on_done(index, future)`` is called as each one finishes.

    Tasks are marked as data producers, so the scheduler queues them and hands each worker only
    as many as it has threads: a worker that dies takes down only the tasks it was running, not
    innocent ones waiting behind them. (Tasks with ``resources`` are assigned eagerly by Dask.)
    """
    from distributed import as_completed

    prefix = prefix or getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "task")
    names = list(names) if names is not None else [str(i) for i in range(len(calls))]
    group = f"{prefix}-{uuid4().hex[:8]}"
    keys = [(group, name) for name in names]
    try:
        from dask._task_spec import Task

        graph = {
            key: Task(key, fn, *args, _data_producer=True, **kwargs)
            for key, (args, kwargs) in zip(keys, calls, strict=True)
        }
    except (ImportError, TypeError):  # older dask: plain tasks (assigned to workers eagerly)
        futures = [
            client.submit(fn, *args, key=key, pure=False, retries=retries, resources=resources, **kwargs)
            for key, (args, kwargs) in zip(keys, calls, strict=True)
        ]
    else:
        futures = client.get(graph, keys, sync=False, retries=retries, resources=resources) if keys else []
    index = {f.key: i for i, f in enumerate(futures)}
    for fut in as_completed(futures):
        if on_done is not None:
            on_done(index[fut.key], fut)
    return futures


def run_calls(
    fn: Callable[..., T],
    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]],
    cfg: ClusterConfig | None = None,
    *,
    names: Sequence[str] | None = None,
    resources: dict[str, float] | None = None,
    on_result: Callable[[int, T], None] | None = None,
) -> list[T]:
    """Run ``fn(*args, **kwargs)`` for each call on the cluster ``cfg``; results in input order
    (e.g. the folds of ``slidepipe train --cluster``). When a task fails, the others still finish,
    then ``ClusterTaskError`` names the failed task(s) and chains the first error."""
    cfg = cfg or ClusterConfig()
    names = list(names) if names is not None else [str(i) for i in range(len(calls))]
    results: list[Any] = [None] * len(calls)
    errors: list[tuple[str, str, BaseException | None]] = []

    def on_done(i: int, fut: Future) -> None:
        if fut.status == "finished":
            results[i] = fut.result()
            if on_result is not None:
                on_result(i, results[i])
        else:
            reason, _ = _failure_reason(fut, cfg.retries if "://" not in cfg.kind else None)
            errors.append((names[i], reason, None if fut.status == "cancelled" else fut.exception()))
        fut.release()

    with cluster_client(cfg) as client:
        submit_calls(client, fn, calls, names=names, retries=cfg.retries, resources=resources, on_done=on_done)
    if errors:
        listed = "; ".join(f"{name}: {reason}" for name, reason, _ in errors)
        raise ClusterTaskError(f"{len(errors)} of {len(calls)} cluster task(s) failed: {listed}") from errors[0][2]
    return results


def map_slides(
    fn: SlideFn,
    paths: Iterable[str | Path],
    job: Any,
    cfg: ClusterConfig | None = None,
    *,
    resources: dict[str, float] | None = None,
    progress: Progress | None = None,
    client: Client | None = None,
) -> list[SlideResult]:
    """Run ``fn(path, job) -> SlideResult`` for every slide on a Dask cluster, one task per slide.

    Results come back in input order. A slide whose worker died more than ``cfg.retries`` times
    (``KilledWorker``) is a failed result naming the reason; the other slides go on. ``progress``
    is called with each result as it arrives. Pass ``client`` to reuse an open cluster.
    """
    paths = [Path(p) for p in paths]
    if client is None:
        with cluster_client(cfg) as opened:
            return map_slides(fn, paths, job, cfg, resources=resources, progress=progress, client=opened)
    cfg = cfg or ClusterConfig()
    ids = [slide_id_for(p) for p in paths]
    results: list[SlideResult | None] = [None] * len(paths)
    started = time.perf_counter()

    def on_done(i: int, fut: Future) -> None:
        if fut.status == "finished":
            result = fut.result()
        else:
            reason, error_type = _failure_reason(fut, cfg.retries if "://" not in cfg.kind else None)
            result = SlideResult(ids[i], str(paths[i]), "failed", reason=reason, error_type=error_type,
                                 seconds=round(time.perf_counter() - started, 3))
            logger.warning("%s: failed on the cluster: %s", paths[i], reason)
        fut.release()
        results[i] = result
        if progress is not None:
            progress(result)

    map_tasks(client, fn, paths, job, names=ids, retries=cfg.retries, resources=resources, on_done=on_done)
    return [r for r in results if r is not None]


def run_slides(
    fn: SlideFn,
    paths: Iterable[str | Path],
    job: Any,
    *,
    resources: dict[str, float] | None = None,
    progress: Progress | None = None,
) -> list[SlideResult]:
    """One dispatch for batch verbs: ``map_slides`` on ``job.cluster`` when it is set, else a plain
    loop in this process. ``fn`` must catch its own errors (one bad slide never stops a batch)."""
    cfg = getattr(job, "cluster", None)
    if cfg is not None:
        return map_slides(fn, paths, job, cfg, resources=resources, progress=progress)
    results = []
    for path in paths:
        result = fn(Path(path), job)
        if progress is not None:
            progress(result)
        results.append(result)
    return results


def resolve_cluster(
    base: ClusterConfig | None, kind: str | None = None, config: str | Path | None = None
) -> ClusterConfig | None:
    """The cluster a CLI run uses: the job file's ``cluster:`` section, then ``--cluster-config
    FILE`` on top, then ``--cluster KIND``. None (run in this process) when none is given."""
    if base is None and kind is None and config is None:
        return None
    data = base.model_dump(exclude_unset=True) if base is not None else {}
    overrides = {"kind": kind} if kind else {}
    if config is not None:
        from_file = load_config(ClusterConfig, config)
        data = {**data, **from_file.model_dump(exclude_unset=True)}
    return load_config(ClusterConfig, None, {**data, **overrides})


# --- tiny tasks for checks and benchmarks -----------------------------------------------------

def probe_slide(path: str | Path, job: Any = None) -> SlideResult:
    """A no-op slide task: reports where it ran (host, pid). Measures scheduling overhead and
    checks that workers can see the slide files."""
    path = Path(path)
    return SlideResult(
        slide_id_for(path), str(path), "done",
        extra={
            "host": socket.gethostname(), "pid": os.getpid(), "exists": path.exists(),
            "threads": {var: os.environ.get(var) for var in THREAD_VARS},
        },
    )


class ClusterProgress:
    """A rich progress bar for batch runs; call it with each ``SlideResult`` as it arrives.

    rich is imported lazily: only the CLI shows progress bars.
    """

    def __init__(self, total: int, *, title: str = "slides", console=None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.failed = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self._task = self._progress.add_task(title, total=total, status="")

    def __enter__(self) -> ClusterProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, result: SlideResult) -> None:
        self.failed += result.status == "failed"
        status = f"[red]{self.failed} failed[/red]" if self.failed else ""
        self._progress.update(self._task, advance=1, status=f"{result.slide_id} {result.status} {status}")
