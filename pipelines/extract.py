"""``slidepipe extract``: slides → tissue → grid → tiles → (stain) → encoder → Zarr feature store.

Resumable and safe to share: each slide is claimed in the store, written aside and moved in by one
rename (see :mod:`wsi.store`). A background thread opens slides, detects tissue, lays the grid and
reads (and, on CPU, stain-normalises) patches, running ahead across slide boundaries, so the
encoder does not idle while the next slide is prepared; it also makes each slide's staging arrays.
The main thread runs the encoder and hands features to the slide's writer; a finished slide is
committed on a committer thread while the encoder goes on with the next one. A slide that fails is
reported with its reason; the batch goes on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipelines.config import ExtractJob, config_to_yaml
from pipelines.summary import RunSummary, SlideResult
from wsi.errors import StoreMismatchError
from wsi.reader import prefetch
from wsi.store import FeatureStore, SlideClaimedError, SlideWriter

if TYPE_CHECKING:
    import torch

    from models.encoders import Encoder
    from wsi.tiling import TileGrid

log = logging.getLogger(__name__)
WAIT_POLL_S = 2.0  # with job.wait: how often slides other processes hold are looked at again


class ExtractProgress(Protocol):
    """What the CLI's progress display is told (all methods optional to act on)."""

    def slide_started(self, slide_id: str, n_patches: int) -> None: ...
    def patches_done(self, n: int) -> None: ...
    def slide_finished(self, result: SlideResult) -> None: ...


class _NoProgress:
    def slide_started(self, slide_id: str, n_patches: int) -> None:
        pass

    def patches_done(self, n: int) -> None:
        pass

    def slide_finished(self, result: SlideResult) -> None:
        pass


# ---------------------------------------------------------------------------- identities
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def store_identity(job: ExtractJob, encoder: Encoder) -> dict[str, Any]:
    """Root identity of the store this job writes: encoder + weights, tiling, stain."""
    t = job.tiling
    target = job.stain.target
    stain: dict[str, Any] = {"method": job.stain.method, "target": None, "target_hash": None}
    if job.stain.method != "none" and target is not None:
        stain["target"] = str(Path(target).name)
        stain["target_hash"] = _file_sha256(Path(target)) if Path(target).is_file() else None
    return {
        "encoder": {"name": encoder.spec.name, "weights_id": encoder.weights_id, "dim": int(encoder.embed_dim)},
        "tiling": {
            "mpp": t.mpp,
            "patch_size": t.patch_size,
            "overlap": t.overlap,
            "min_tissue": t.min_tissue,
            "tissue_mpp": t.tissue_mpp,
        },
        "stain": stain,
    }


# ---------------------------------------------------------------------------- encoder runtime
_ENCODERS: dict[tuple[str, str, str, bool], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_encoder(job: ExtractJob) -> Encoder:
    """The job's encoder on its device, tuned for inference; cached per process (Dask workers)."""
    from models.encoders import create_encoder, prepare_for_inference, resolve_device

    if job.torch_threads is not None:
        import torch

        torch.set_num_threads(job.torch_threads)
    device = resolve_device(job.device)
    key = (job.encoder, str(job.weights), str(device), job.compile)
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            enc = create_encoder(job.encoder, weights=job.weights, device=device)
            _ENCODERS[key] = prepare_for_inference(enc, compile=job.compile)
            native = enc.spec.native_mpp
            if native and abs(job.tiling.mpp / native - 1) > 0.1:
                log.warning(
                    "%s was trained at %.2f µm/px; extracting at %.2f µm/px (set --mpp %.2f to match)",
                    enc.spec.name, native, job.tiling.mpp, native,
                )
        return _ENCODERS[key]


class _Embedder:
    """Runs encoder forwards; results are fetched one batch late so CUDA copies overlap compute."""

    def __init__(self, encoder: Encoder, precision: str) -> None:
        import torch

        from models.encoders import resolve_precision

        self.torch = torch
        self.encoder = encoder
        self.device = encoder.device
        self.dtype = resolve_precision(precision, self.device)
        self.cuda = self.device.type == "cuda"

    def to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 batch → tensor: a copy in pinned memory for CUDA, a plain copy for other
        accelerators (their copies may run after the reader reuses ``images``), as is on CPU."""
        x = self.torch.from_numpy(np.ascontiguousarray(images))
        if self.cuda:
            return x.pin_memory()
        return x if self.device.type == "cpu" else x.clone()

    def launch(self, images: torch.Tensor, normalizer: Any = None) -> torch.Tensor:
        torch = self.torch
        with torch.inference_mode():
            x = images.to(self.device, non_blocking=True)
            if normalizer is not None:
                x = normalizer.transform_torch(x)
            x = self.encoder.preprocess(x)
            if self.dtype == torch.float32:
                return self.encoder(x)
            with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                return self.encoder(x)

    def fetch(self, out: torch.Tensor) -> np.ndarray:
        return out.float().cpu().numpy()


# ---------------------------------------------------------------------------- per-slide work
@dataclass
class _Work:
    """One slide travelling from the reader thread to the encoder thread."""

    path: Path
    slide_id: str
    t0: float
    stack: contextlib.ExitStack
    grid: TileGrid | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    writer: SlideWriter | None = None
    n_done: int = 0
    error: BaseException | None = None
    ended: bool = False  # every batch read: committed once its last batch is fetched
    taken: bool = False  # the consumer has its "start" event (from then on it closes ``stack``)

    def result(self, status: str, **kw: Any) -> SlideResult:
        return SlideResult(self.slide_id, str(self.path), status, seconds=round(time.perf_counter() - self.t0, 3), **kw)


@dataclass
class _Event:
    kind: str  # start | batch | read (a reader whose batches the consumer pulls) | end | fail | skip | busy
    work: _Work
    images: Any = None
    coords: np.ndarray | None = None
    indices: np.ndarray | None = None
    reason: str | None = None
    error: BaseException | None = None


def _stain_normalizer(job: ExtractJob):
    if job.stain.method == "none":
        return None
    from wsi.stain import load_normalizer

    return load_normalizer(job.stain.method, job.stain.target)


def _reader_options(job: ExtractJob) -> dict[str, Any]:
    workers = job.workers or default_reader_workers()
    return {"batch_size": job.batch_size, "workers": workers, "skip_corrupt_tiles": job.skip_corrupt_tiles}


def default_reader_workers() -> int:
    """Reader threads per slide when not given: half the cores this process may use (the rest
    for the encoder, tissue detection and the next slide), at least 1, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // 2))


def _reads_in_process(job: ExtractJob) -> bool:
    from wsi import reader_process

    return job.reader == "process" and reader_process.available()


class _Producer:
    """Generates events for all slides: open, claim, tissue, grid, read patches (reader thread).

    With the process reader, each slide's read is queued on one child process (see
    :mod:`wsi.reader_process`) as soon as its grid is laid, so the child decodes the next slide
    while the encoder finishes the current one; ``release()`` hands the child back.
    """

    def __init__(self, paths: Sequence[Path], job: ExtractJob, store: FeatureStore, embedder: _Embedder,
                 cpu_normalizer: Any, run_started: float) -> None:
        self.paths = paths
        self.job = job
        self.run_started = run_started  # --overwrite keeps slides committed since (this run's own)
        self.store = store
        self.embedder = embedder
        self.normalizer = cpu_normalizer
        self.process: Any = None  # the child reader process of this run (process reader)
        self.retired: list[Any] = []  # children that died during the run (closed by release())
        self.handed: list[_Work] = []  # slides whose "start" event was yielded

    def _process_reader(self, slide: Any, grid: TileGrid) -> Any:
        """The slide's read, queued now on this run's child process (the CPU stain normaliser runs
        there too); batches view shared memory until the next one is asked for."""
        from wsi import reader_process

        if self.process is None or not self.process.alive:
            if self.process is not None:  # the encoder thread may still be on its last read
                self.retired.append(self.process)
            self.process = reader_process.take()
        return reader_process.ProcessPatchReader(
            slide.path, grid, backend=slide.backend, mpp=self.job.tiling.slide_mpp, transform=self.normalizer,
            process=self.process, copy=False, **_reader_options(self.job),
        ).start()

    def release(self, *, reuse: bool = True) -> None:
        """Hand the child back to the pool (reads still queued on it are cancelled); after an
        interrupted run (``reuse=False``) it is stopped instead, as are children that died."""
        from wsi import reader_process

        for rp in [*self.retired, *([self.process] if self.process is not None else [])]:
            reader_process.give_back(rp, reuse=reuse and rp is self.process)
        self.process, self.retired = None, []

    def __iter__(self) -> Iterator[_Event]:
        for path in self.paths:
            yield from self._slide(Path(path))

    def _slide(self, path: Path) -> Iterator[_Event]:
        from wsi.slide import open_slide, slide_id_for
        from wsi.tiling import make_grid
        from wsi.tissue import detect_tissue

        job, store, t = self.job, self.store, self.job.tiling
        check = functools.partial(store.check_slide, overwrite=job.overwrite, run_started=self.run_started)
        work = _Work(path, slide_id_for(path), time.perf_counter(), contextlib.ExitStack())
        started = False  # from "start" on, work.stack (claim, then writer) belongs to the consumer
        try:
            # the slide handle stays with this thread: closed here, after its last patch is read
            with open_slide(path, backend=t.backend, mpp=t.slide_mpp) as slide:
                source = {**slide.identity(), "slide_mpp": float(slide.mpp), "mpp_source": slide.mpp_source}
                if check(work.slide_id, source):
                    yield _Event("skip", work, reason="already in the store with the same identity")
                    return
                try:
                    work.stack.enter_context(store.claim(work.slide_id))
                except SlideClaimedError as err:
                    yield _Event("busy", work, reason=str(err))
                    return
                if check(work.slide_id, source):
                    work.stack.close()  # finished by another process between our check and our claim
                    yield _Event("skip", work, reason="written by another process meanwhile")
                    return
                mask = detect_tissue(slide, target_mpp=t.tissue_mpp)
                grid = make_grid(
                    slide, mask, patch_size=t.patch_size, mpp=t.mpp, overlap=t.overlap, min_tissue=t.min_tissue
                )
                work.grid = grid
                work.attrs = {
                    "slide_id": work.slide_id,
                    "source": source,
                    "slide_mpp": float(slide.mpp),
                    "mpp_source": slide.mpp_source,
                    "backend": slide.backend,
                    "read_level": grid.read_level,
                    "read_level_dimensions": list(slide.level_dimensions[grid.read_level]),
                    "effective_mpp": grid.effective_mpp,
                    "tissue_fraction": float(getattr(mask, "fraction", float("nan"))),
                    "grid": grid.to_attrs(),
                    "written_by": {"host": socket.gethostname(), "pid": os.getpid()},
                }
                # the slide's staging arrays are made here, off the encoder's thread
                work.writer = work.stack.enter_context(
                    store.writer(work.slide_id, dim=self.embedder.encoder.embed_dim, capacity=len(grid),
                                 attrs=work.attrs)
                )
                started = True
                self.handed = [h for h in self.handed if not h.taken]  # only this thread writes it
                self.handed.append(work)
                yield _Event("start", work)
                if len(grid) == 0:
                    yield _Event("end", work)
                    return
                if _reads_in_process(job):
                    # batches are pulled by the encoder thread straight from the child process:
                    # no hop through this thread, whose GIL hand-offs would slow the encoder
                    yield _Event("read", work, images=self._process_reader(slide, grid))
                    yield _Event("end", work)
                    return
                from wsi.reader import PatchReader

                reader = PatchReader(slide, grid, **_reader_options(job))
                for batch in reader:
                    if work.error is not None:  # the encoder side gave up on this slide
                        break
                    images = batch.images
                    if self.normalizer is not None:
                        images = self.normalizer.transform(images)
                    yield _Event("batch", work, images=self.embedder.to_tensor(images),
                                 coords=np.asarray(batch.coords, np.int64), indices=np.asarray(batch.indices))
                skipped = [[int(i), str(r)] for i, r in reader.skipped]
                if skipped:
                    work.attrs["skipped_tiles"] = skipped
                yield _Event("end", work)
        except Exception as err:  # one bad slide never stops the batch
            if not started:
                work.stack.close()
            yield _Event("fail", work, error=err)
        finally:  # also on GeneratorExit (the consumer stopped early)
            if not started:
                work.stack.close()


class _Consumer:
    """Encodes batches and writes them; turns events into SlideResults (main thread).

    A slide whose last batch is fetched is committed (final chunks, attrs, the rename, its claim
    released) on a committer thread while the encoder goes on with the next slide; its result
    comes out of ``results()`` once the commit is done (``finish()`` waits for all).
    """

    def __init__(self, store: FeatureStore, embedder: _Embedder, gpu_normalizer: Any,
                 progress: ExtractProgress) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.store = store
        self.embedder = embedder
        self.normalizer = gpu_normalizer
        self.progress = progress
        self.pending: list[tuple[_Work, np.ndarray, np.ndarray, Any]] = []
        self.open: dict[int, _Work] = {}
        self.committer = ThreadPoolExecutor(1, thread_name_prefix="slidepipe-commit")
        self.commits: list[Any] = []  # futures of SlideResults, in commit order
        self.failed: list[SlideResult] = []  # slides that failed while their batches were fetched

    def handle(self, ev: _Event) -> SlideResult | None:
        w = ev.work
        if ev.kind == "fail" and not w.ended:  # its own launched batches are not worth fetching
            self.pending = [p for p in self.pending if p[0] is not w]
        if ev.kind in ("skip", "busy", "fail"):  # no batch follows soon: finish the slides before
            self._drain()
        if ev.kind in ("skip", "busy"):
            status = "skipped"
            res = w.result(status, reason=ev.reason, extra={"busy": ev.kind == "busy"})
            if ev.kind == "skip":
                attrs = self.store.slide_attrs(w.slide_id) or {}
                res.n_patches = int(attrs.get("n_tiles", 0))
            return res
        if ev.kind == "fail":
            if w.error is not None:  # already failed on the encoder side: keep that reason
                return None
            if w.ended:  # every patch was encoded; the slide is (being) committed
                log.warning("%s: after its last patch: %s", w.path, ev.error)
                return None
            return self._abort(w, ev.error)  # its launched batches were dropped above
        if w.error is not None:  # slide already failed on the encoder side: drop its events
            if ev.kind == "read":
                ev.images.close()  # cancels its queued read
            return None
        try:
            if ev.kind == "start":
                self.open[id(w)] = w
                w.taken = True
                self.progress.slide_started(w.slide_id, len(w.grid))
            elif ev.kind == "batch":
                self._encode(w, ev.images, ev.coords, ev.indices)
            elif ev.kind == "read":
                reader = ev.images  # each batch views shared memory until the next is asked for:
                for batch in reader:  # _encode has copied or consumed it by then
                    if w.error is not None:  # one of its batches failed when fetched: stop reading it
                        break
                    self._encode(w, self.embedder.to_tensor(batch.images), np.asarray(batch.coords, np.int64),
                                 np.asarray(batch.indices))
                if reader.skipped:
                    w.attrs["skipped_tiles"] = [[int(i), str(r)] for i, r in reader.skipped]
            elif ev.kind == "end":  # its last batch is fetched when the next slide's first computes
                w.ended = True
                self._commit_ended()
        except Exception as err:
            self.pending = [p for p in self.pending if p[0] is not w]
            if w.error is not None:  # already failed (a batch of it, when fetched): keep that reason
                return None
            return self._abort(w, err)
        return None

    def _commit_ended(self) -> None:
        """Hand slides whose every batch is fetched and written to the committer."""
        busy = {id(p[0]) for p in self.pending}
        for key, w in list(self.open.items()):
            if w.ended and key not in busy:
                self.commits.append(self.committer.submit(self._commit, w))
                del self.open[key]

    def _commit(self, w: _Work) -> SlideResult:
        """Committer thread: the writer commits (one rename), the claim is released, the slide
        closed. A failure here leaves nothing visible."""
        try:
            w.writer.attrs.update(w.attrs)  # e.g. skipped_tiles, known only after reading
            w.stack.close()
        except Exception as err:  # the stack has unwound: staging removed, claim released
            return self._failed(w, err)
        seconds = time.perf_counter() - w.t0
        log.info("encoded slide %s: %d patches in %.1f s (pid %d)", w.slide_id, w.n_done, seconds, os.getpid())
        extra = {"patches_per_s": round(w.n_done / seconds, 2) if seconds > 0 else None, "n_grid": len(w.grid)}
        if "skipped_tiles" in w.attrs:
            extra["skipped_tiles"] = len(w.attrs["skipped_tiles"])
        return w.result("done", n_patches=w.n_done, extra=extra)

    def results(self) -> list[SlideResult]:
        """Slides failed since last asked, then the commits done so far (in order; stops at the
        first still running)."""
        out, self.failed = self.failed, []
        while self.commits and self.commits[0].done():
            out.append(self.commits.pop(0).result())
        return out

    def finish(self) -> list[SlideResult]:
        """Fetch the last batches, commit what is left, wait for every commit; their results."""
        self._drain()  # which hands the slides it completes to the committer
        self.committer.shutdown(wait=True)
        return self.results()

    def _encode(self, w: _Work, images: Any, coords: np.ndarray, indices: np.ndarray) -> None:
        out = self.embedder.launch(images, self.normalizer)
        self._drain()  # fetch the previous batch while this one computes
        self.pending.append((w, coords, w.grid.tissue[indices], out))

    def _drain(self) -> None:
        """Fetch and write every launched batch; an error fails that batch's slide alone."""
        pending, self.pending = self.pending, []
        for w, coords, tissue, out in pending:
            if w.error is not None:
                continue
            try:
                feats = self.embedder.fetch(out)
                w.writer.append(feats, coords, tissue)
            except Exception as err:
                self.failed.append(self._abort(w, err))
                continue
            w.n_done += len(coords)
            self.progress.patches_done(len(coords))
        self._commit_ended()

    def _abort(self, w: _Work, err: BaseException) -> SlideResult:
        w.error = err
        self.open.pop(id(w), None)
        with contextlib.suppress(Exception):
            w.stack.__exit__(type(err), err, err.__traceback__)  # staging removed, claim released
        return self._failed(w, err)

    @staticmethod
    def _failed(w: _Work, err: BaseException) -> SlideResult:
        log.warning("%s: failed: %s", w.path, err)
        return SlideResult.failed(w.slide_id, w.path, err, seconds=round(time.perf_counter() - w.t0, 3))

    def close_all(self, err: BaseException) -> None:
        """On an interrupted run: slides being committed finish (they are complete), the others
        are aborted (nothing of them becomes visible)."""
        self.pending = []
        with contextlib.suppress(BaseException):  # a second Ctrl-C: the aborts below still run
            self.committer.shutdown(wait=True)
        for w in list(self.open.values()):
            self._abort(w, err)


def _run_slides(
    paths: Sequence[Path], job: ExtractJob, store: FeatureStore, encoder: Encoder, progress: ExtractProgress,
    run_started: float,
) -> list[SlideResult]:
    embedder = _Embedder(encoder, job.precision)
    normalizer = _stain_normalizer(job)
    on_gpu = embedder.cuda and normalizer is not None and hasattr(normalizer, "transform_torch")
    producer = _Producer(paths, job, store, embedder, None if on_gpu else normalizer, run_started)
    consumer = _Consumer(store, embedder, normalizer if on_gpu else None, progress)
    results: dict[str, SlideResult] = {}
    events: Any = None

    def report(res: SlideResult | None, *, last_pass: bool) -> None:
        if res is not None:
            results[res.path] = res
            if last_pass or not res.held_elsewhere:
                progress.slide_finished(res)

    def run_pass(consumer: _Consumer, *, last_pass: bool) -> None:
        nonlocal events
        events = prefetch(producer, job.prefetch)
        for ev in events:
            for res in [consumer.handle(ev), *consumer.results()]:
                report(res, last_pass=last_pass)
        for res in consumer.finish():
            report(res, last_pass=last_pass)

    try:
        def held_elsewhere() -> list[Path]:
            return [p for p in paths if str(p) in results and results[str(p)].held_elsewhere]

        run_pass(consumer, last_pass=False)
        # slides another process held: they may be done now, or free again if that process failed;
        # looked at once more, or (job.wait) until none is held any more
        held = held_elsewhere()
        while held:
            producer.paths = held
            consumer = _Consumer(store, embedder, normalizer if on_gpu else None, progress)
            run_pass(consumer, last_pass=not job.wait)
            held = held_elsewhere() if job.wait else []
            if held:
                log.info("waiting for %d slides other processes are writing", len(held))
                time.sleep(WAIT_POLL_S)
    except BaseException as err:
        if events is not None:
            with contextlib.suppress(BaseException):  # a second Ctrl-C: the cleanup below still runs
                events.close()  # the producer thread stops; events it queued are dropped
        consumer.close_all(err)
        with contextlib.suppress(Exception):  # slides whose commit finished are in the store: say so
            for res in consumer.results():
                report(res, last_pass=True)
        for w in producer.handed:  # started slides whose "start" the consumer never saw
            if not w.taken:
                with contextlib.suppress(Exception):
                    w.stack.__exit__(type(err), err, err.__traceback__)  # staging removed, claim released
        producer.release(reuse=False)  # an interrupted read may have left its pipes mid-message
        raise
    producer.release()
    return [results[str(p)] for p in paths]


# ---------------------------------------------------------------------------- public API
def open_store(job: ExtractJob, encoder: Encoder, *, replace_identity: bool | None = None) -> FeatureStore:
    """Open (or create) the job's store and check (or record) its identity; another identity is
    replaced if ``replace_identity`` (default: ``job.overwrite``), else ``StoreMismatchError``."""
    store = FeatureStore(job.out, claim_ttl=job.claim_ttl)
    replace = job.overwrite if replace_identity is None else replace_identity
    store.ensure_identity(store_identity(job, encoder), overwrite=replace)
    return store


def extract_slide(
    path: str | Path, job: ExtractJob, *, encoder: Encoder | None = None, store: FeatureStore | None = None,
    run_started: float | None = None, replace_identity: bool | None = None,
) -> SlideResult:
    """Extract one slide into ``job.out`` (safe in a Dask worker; returns a plain, picklable result).

    Errors of the slide are reported in the result, not raised; a store of another identity
    raises ``StoreMismatchError``, unless ``job.overwrite`` (or ``replace_identity``) replaces it.
    ``run_started`` (Unix time on the store's file system, default now): with ``job.overwrite``,
    a copy of the slide committed since then is kept, not redone.
    """
    run_started = time.time() if run_started is None else run_started
    encoder = encoder if encoder is not None else load_encoder(job)
    store = store if store is not None else open_store(job, encoder, replace_identity=replace_identity)
    return _run_slides([Path(path)], job, store, encoder, _NoProgress(), run_started)[0]


def _run_on_cluster(paths, job: ExtractJob, store, encoder, progress, run_started: float) -> list[SlideResult]:
    """One ``extract_slide`` task per slide on ``job.cluster`` (see :mod:`pipelines.cluster`);
    GPU slides go only to workers that declare a GPU resource."""
    from pipelines.cluster import gpu_resources, map_slides

    def done(res: SlideResult) -> None:
        progress.slide_started(res.slide_id, res.n_patches)
        progress.patches_done(res.n_patches)
        progress.slide_finished(res)

    resources = gpu_resources(job.cluster) if job.device != "cpu" else None
    # the driver has replaced the identity if --overwrite asked for it; a worker that replaced it
    # again would delete the slides of a concurrent run that changed it since
    task = functools.partial(extract_slide, run_started=run_started, replace_identity=False)
    return map_slides(task, paths, job, job.cluster, resources=resources, progress=done)


def run_extract(
    job: ExtractJob, *, progress: ExtractProgress | None = None, encoder: Encoder | None = None
) -> RunSummary:
    """Extract every slide of ``job``; writes the summary to ``<store>/runs/<time>-<pid>-summary.json``.

    Raises ``StoreMismatchError`` (before any work) if the store has another identity and
    ``job.overwrite`` is not set; per-slide failures are in the summary.
    """
    from pipelines.inputs import expand_slides

    summary = RunSummary("extract")
    paths = expand_slides(job.slides)
    encoder = encoder if encoder is not None else load_encoder(job)
    store = open_store(job, encoder)
    store.clean_staging()
    config = job.model_dump(mode="json")
    config["resolved"] = {"encoder": encoder.identity(), "device": str(encoder.device),
                          "n_slides": len(paths)}
    store.save_config(config)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    runs = Path(job.out) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_config = runs / f"{stamp}-{os.getpid()}-config.yaml"
    run_config.write_text(config_to_yaml(job))
    # the store's file system is the one clock of every host: --overwrite redoes slides whose
    # written_at (their zarr.json's mtime) is older than this run's config file
    run_started = run_config.stat().st_mtime
    log.info("extracting %d slides into %s with %s (%s)", len(paths), job.out, encoder.spec.name, encoder.device)
    seen = _Seen(progress or _NoProgress())
    try:
        run = _run_on_cluster if job.cluster is not None else _run_slides
        for res in run(paths, job, store, encoder, seen, run_started):
            summary.add(res)
    except BaseException as err:  # Ctrl-C, SIGTERM: the summary still says what this run committed
        summary.interrupted = str(err) or type(err).__name__
        summary.results = seen.partial(summary.interrupted)
        raise
    finally:
        summary.finished = time.time()
        summary.write(runs / f"{stamp}-{os.getpid()}-summary.json")
    return summary


class _Seen:
    """Passes progress on and remembers it, so an interrupted run's summary lists the slides it
    finished (committed, skipped, failed) and names those it stopped as ``interrupted``."""

    def __init__(self, inner: ExtractProgress) -> None:
        self.inner = inner
        self.started: dict[str, None] = {}
        self.finished: list[SlideResult] = []

    def slide_started(self, slide_id: str, n_patches: int) -> None:
        self.started[slide_id] = None
        self.inner.slide_started(slide_id, n_patches)

    def patches_done(self, n: int) -> None:
        self.inner.patches_done(n)

    def slide_finished(self, result: SlideResult) -> None:
        self.finished.append(result)
        self.inner.slide_finished(result)

    def partial(self, reason: str) -> list[SlideResult]:
        done = {r.slide_id for r in self.finished}
        stopped = [SlideResult(sid, "", "interrupted", reason=f"stopped: {reason}") for sid in self.started if sid not in done]
        return [*self.finished, *stopped]


__all__ = ["ExtractProgress", "StoreMismatchError", "extract_slide", "load_encoder", "open_store",
           "run_extract", "store_identity"]
