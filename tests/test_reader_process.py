"""wsi.reader_process: the child-process reader gives what PatchReader gives, errors included."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_reader import CMU, corrupt_tile, read_all, write_tiff

from wsi import reader_process
from wsi.errors import CorruptTileError
from wsi.patch_cut import cut_from_tile
from wsi.reader import PatchReader
from wsi.reader_process import ProcessPatchReader, ReaderProcess, ReaderProcessError
from wsi.slide import open_slide
from wsi.stain import load_normalizer
from wsi.tiling import make_grid

pytestmark = pytest.mark.skipif(not reader_process.available(), reason="needs POSIX")


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    import openslide

    with openslide.OpenSlide(str(CMU)) as s:
        return np.asarray(s.read_region((300, 600), 0, (1800, 1500)).convert("RGB"))


@pytest.mark.parametrize(("size", "mpp_factor", "batch"), [(32, 1, 64), (224, 1, 7), (112, 2, 5), (100, 1.5, 16)])
def test_same_batches_as_thread_reader(size, mpp_factor, batch):
    """Small patches (many per tile), straddling patches, 2x area reduction, non-integer resize."""
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=size, mpp=slide.mpp * mpp_factor, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid, batch_size=batch))
        got = read_all(ProcessPatchReader(slide.path, grid, batch_size=batch, backend=slide.backend))
    assert len(grid) > 0 and got.images.shape == want.images.shape
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.coords, want.coords)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_corrupt_tile_is_typed_or_skipped_in_the_child(tissue, tmp_path):
    bad = corrupt_tile(write_tiff(tmp_path / "bad.svs", tissue, aperio=True), 3, 2)
    with open_slide(bad) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=slide.mpp, min_tissue=0.0)
        with pytest.raises(CorruptTileError) as info:
            read_all(ProcessPatchReader(bad, grid, backend=slide.backend))
        assert info.value.path == bad and info.value.region == (768, 512, 256, 256)
        here = PatchReader(slide, grid, skip_corrupt_tiles=True, batch_size=6)
        want = read_all(here)
        there = ProcessPatchReader(bad, grid, skip_corrupt_tiles=True, batch_size=6, backend=slide.backend)
        got = read_all(there)
    assert there.skipped == here.skipped and len(there.skipped) == 4
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_stop_early_then_read_again_and_transform_in_child():
    norm = load_normalizer("macenko")
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=64, mpp=slide.mpp, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid, batch_size=8))
    dirs = [Path(d) for d in ("/dev/shm", tempfile.gettempdir()) if os.path.isdir(d)]

    def entries() -> set[Path]:  # files (a ring with a name would be one)
        return {p for d in dirs for p in d.iterdir() if p.is_file()}

    before = entries()
    rp = ReaderProcess()
    try:
        it = rp.read(CMU, grid, batch_size=8)
        assert entries() == before  # the ring has no name, so nothing can be left behind
        first = next(it)
        it.close()  # cancels the read; the child must be ready for the next one
        np.testing.assert_array_equal(first.images, want.images[:8])
        got = list(rp.read(CMU, grid, batch_size=8, transform=norm))
        np.testing.assert_array_equal(np.concatenate([b.images for b in got]), norm.transform(want.images))
        assert entries() == before
    finally:
        rp.close()
    assert not rp.alive


def test_child_killed_mid_slide_raises_and_the_pool_recovers():
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=32, mpp=slide.mpp, min_tissue=0.0)
    rp = ReaderProcess()
    it = rp.read(CMU, grid, batch_size=4)
    next(it)
    os.kill(rp.proc.pid, signal.SIGKILL)
    with pytest.raises(ReaderProcessError, match="reader process died") as info:
        list(it)
    assert info.value.path == CMU and "--reader thread" in str(info.value)
    rp.close()
    assert len(read_all(ProcessPatchReader(CMU, grid, batch_size=512)).indices) == len(grid)


def test_missing_file_error_comes_back_typed(tmp_path):
    from wsi.errors import SlideError

    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=64, mpp=slide.mpp, min_tissue=0.0)
    with pytest.raises(SlideError, match="gone.svs"):
        list(ProcessPatchReader(tmp_path / "gone.svs", grid))


def test_cut_from_tile_clips_to_tile_and_level_edges():
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (256, 240, 3), dtype=np.uint8)
    out = np.zeros((4, 32, 32, 3), np.uint8)
    xs, ys = np.array([0, 230, 100, 200]), np.array([0, 10, 250, 100])
    # placed at (0, 0) on a level 1000 px wide, 120 px high: patch 3 crosses the level's bottom
    cut_from_tile(tile, 0, 0, xs, ys, np.arange(4), 32, 1000, 120, out)
    np.testing.assert_array_equal(out[0], tile[:32, :32])
    np.testing.assert_array_equal(out[1, :, :10], tile[10:42, 230:240])
    assert not out[1, :, 10:].any()  # beyond the tile: left for the next tile
    assert not out[2].any()  # below the level's edge (y 250 >= 120)
    np.testing.assert_array_equal(out[3, :20], tile[100:120, 200:232])
    assert not out[3, 20:].any()
    with pytest.raises(ValueError, match="C-contiguous"):
        cut_from_tile(tile, 0, 0, xs, ys, np.arange(4), 32, 1000, 1000, out[:, :16])
    with pytest.raises(IndexError):
        cut_from_tile(tile, 0, 0, xs, ys, np.array([5]), 32, 1000, 1000, out)


def _grid(size: int):
    with open_slide(CMU) as slide:
        return make_grid(slide, None, patch_size=size, mpp=slide.mpp, min_tissue=0.0)


def test_queued_reads_are_served_in_turn_and_a_cancelled_one_is_dropped():
    """Reads queue on one child (the next slide decodes while the current one is consumed)."""
    small, large = _grid(64), _grid(32)
    with open_slide(CMU) as slide:
        want_small = read_all(PatchReader(slide, small, batch_size=16))
        want_large = read_all(PatchReader(slide, large, batch_size=64))
    rp = ReaderProcess()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    try:
        a = rp.start(CMU, small, batch_size=16)
        dropped = rp.start(CMU, large, batch_size=64)
        b = rp.start(CMU, large, batch_size=64)
        dropped.close()  # cancelled while still queued behind a
        got_a = read_all(a)
        # b was queued at start: the child goes on to it by itself, before b is iterated
        assert rp.resp.poll(5.0)
        got_b = read_all(b)
        np.testing.assert_array_equal(got_a.images, want_small.images)
        np.testing.assert_array_equal(got_b.images, want_large.images)
        np.testing.assert_array_equal(got_b.indices, want_large.indices)
        assert not rp._live and not rp._inbox  # nothing left over for the next read
        if fds is not None:  # every read's ring and pipe are closed with it
            assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        rp.close()


def test_batches_without_copy_view_shared_memory_until_the_next_one():
    grid = _grid(64)
    with open_slide(CMU) as slide:
        want = read_all(PatchReader(slide, grid, batch_size=8))
    reader = ProcessPatchReader(CMU, grid, batch_size=8, copy=False)
    seen = 0
    for k, batch in enumerate(reader):
        assert not batch.images.flags.owndata  # a view of the ring, not a copy
        if k < 2 * reader_process.SLOTS:  # a slow consumer: the child fills every other slot meanwhile
            time.sleep(0.05)
        np.testing.assert_array_equal(batch.images, want.images[seen : seen + len(batch)])
        np.testing.assert_array_equal(batch.coords, want.coords[seen : seen + len(batch)])
        seen += len(batch)
    assert seen == len(grid) > 2 * reader_process.SLOTS * 8


def test_a_read_queued_on_a_child_that_dies_starts_again_on_a_fresh_one():
    grid = _grid(32)
    rp = ReaderProcess()
    try:
        first = ProcessPatchReader(CMU, grid, batch_size=4, process=rp).start()
        second = ProcessPatchReader(CMU, grid, batch_size=512, process=rp).start()
        it = iter(first)
        next(it)
        os.kill(rp.proc.pid, signal.SIGKILL)
        with pytest.raises(ReaderProcessError):
            list(it)
        assert len(read_all(second).indices) == len(grid)  # not started when the child died: retried
    finally:
        rp.close()


def test_a_large_request_never_waits_on_a_full_reply_pipe():
    """Queuing a read whose grid pickles to more than a pipe buffer, while the child is blocked
    sending batches nobody reads yet, must not deadlock (the child drains requests at once)."""
    import threading

    grid = _grid(32)  # ~6,000 patches: a grid of >64 KB pickled, replies of ~48 KB per batch
    with open_slide(CMU) as slide:
        want = read_all(PatchReader(slide, grid, batch_size=2000))
    rp = ReaderProcess()
    try:
        a = rp.start(CMU, grid, batch_size=2000)
        assert rp.resp.poll(30)  # the first reply is in the pipe ...
        time.sleep(1.0)  # ... and the child is blocked sending the second
        started: list = []
        t = threading.Thread(target=lambda: started.append(rp.start(CMU, grid, batch_size=2000)), daemon=True)
        t.start()
        t.join(30)
        if t.is_alive():  # deadlocked: unblock it so the failure is reported, not a hang
            os.kill(rp.proc.pid, signal.SIGKILL)
            t.join(10)
            pytest.fail("start() blocked behind the child's replies")
        np.testing.assert_array_equal(read_all(a).images, want.images)
        np.testing.assert_array_equal(read_all(started[0]).images, want.images)
    finally:
        rp.close()


def test_an_unpicklable_request_leaves_the_child_in_step():
    import pickle

    grid = _grid(64)
    with open_slide(CMU) as slide:
        want = read_all(PatchReader(slide, grid, batch_size=8))
    rp = ReaderProcess()
    try:
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            rp.start(CMU, grid, batch_size=8, transform=lambda x: x)
        assert rp.alive and not rp._live  # nothing was sent: the next read gets its own ring
        np.testing.assert_array_equal(read_all(rp.start(CMU, grid, batch_size=8)).images, want.images)
    finally:
        rp.close()


def test_a_stream_closed_mid_iteration_writes_nowhere(tmp_path):
    """Closed while its consumer holds a batch (e.g. the slide failed): the slot is never handed
    back through the closed descriptor, whose number the next open file may already have."""
    rp = ReaderProcess()
    try:
        stream = rp.start(CMU, _grid(64), batch_size=8, copy=False)
        it = iter(stream)
        next(it)
        number = stream._free_w
        stream.close()
        with open(tmp_path / "other", "wb") as other:
            os.dup2(other.fileno(), number)  # the closed descriptor's number now names another file
            try:
                with pytest.raises((StopIteration, ReaderProcessError)):
                    while True:
                        next(it)
            finally:
                os.close(number)
        assert (tmp_path / "other").stat().st_size == 0
        got = read_all(rp.start(CMU, _grid(64), batch_size=8))  # the child is still in step
        assert len(got.indices) == len(_grid(64))
    finally:
        rp.close()


def test_a_stream_dropped_unread_closes_its_pipe_and_is_forgotten():
    """An interrupted run drops queued reads without closing them: nothing of theirs stays open,
    and the child goes on serving the next read."""
    import gc

    rp = ReaderProcess()
    gc.collect()  # earlier tests' garbage closes its files now, not during the count
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    try:
        dropped = rp.start(CMU, _grid(64), batch_size=8)
        number, rid = dropped._free_w, dropped.rid
        del dropped
        gc.collect()
        with pytest.raises(OSError):
            os.fstat(number)
        assert rid not in rp._live and rid not in rp._inbox
        got = read_all(rp.start(CMU, _grid(64), batch_size=8))
        assert len(got.indices) == len(_grid(64))
        assert not rp._live and not rp._inbox
        if fds is not None:
            assert len(os.listdir("/proc/self/fd")) == fds
    finally:
        rp.close()


@pytest.mark.parametrize("failing", ["subprocess.Popen", "socket.socketpair"])
def test_a_child_that_cannot_start_leaves_no_descriptor_open(monkeypatch, failing):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    import gc

    gc.collect()
    before = len(os.listdir("/proc/self/fd"))

    def no_resources(*args, **kwargs):
        raise BlockingIOError("Resource temporarily unavailable")

    module, name = failing.split(".")
    monkeypatch.setattr(getattr(reader_process, module), name, no_resources)
    with pytest.raises(BlockingIOError):
        ReaderProcess()
    assert len(os.listdir("/proc/self/fd")) == before
