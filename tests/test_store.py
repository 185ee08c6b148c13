"""FeatureStore: layout, atomic commit, identity checks, claims (incl. stale recovery)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr

from wsi.errors import StoreError, StoreMismatchError
from wsi.store import FORMAT_VERSION, FeatureStore, SlideClaimedError, rows_per_chunk

IDENTITY = {
    "encoder": {"name": "tiny-vit", "weights_id": "random", "dim": 16},
    "tiling": {"mpp": 0.5, "patch_size": 224, "overlap": 0, "min_tissue": 0.5},
    "stain": {"method": "none", "target": None},
}


def _arrays(n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)).astype(np.float32)
    coords = rng.integers(0, 10_000, size=(n, 2), dtype=np.int64)
    tissue = rng.random(n, dtype=np.float32)
    return feats, coords, tissue


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_claim(store: FeatureStore, slide_id: str, **info) -> None:
    (store.path / ".claims" / f"{slide_id}.claim").write_text(json.dumps(info))


def test_layout_roundtrip_and_chunks(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    feats, coords, tissue = _arrays(1500, 768)
    store.write("s1", feats, coords, tissue, attrs={"source": {"size": 1, "quick_hash": "h"}})

    root = zarr.open_group(tmp_path / "f.zarr", mode="r")
    assert root.attrs["format_version"] == FORMAT_VERSION
    group = root["slides/s1"]
    assert group["features"].dtype == np.float16 and group["features"].shape == (1500, 768)
    assert group["coords"].dtype == np.int64 and group["coords"].shape == (1500, 2)
    assert group["tissue"].dtype == np.float32 and group["tissue"].shape == (1500,)
    rows, cols = group["features"].chunks
    assert cols == 768 and rows == rows_per_chunk(768) and rows * cols * 2 >= 1 << 20
    assert group.attrs["complete"] is True and group.attrs["n_tiles"] == 1500

    out = store.read("s1")
    np.testing.assert_array_equal(out.features, feats.astype(np.float16))
    np.testing.assert_array_equal(out.coords, coords)
    np.testing.assert_array_equal(out.tissue, tissue)
    assert out.attrs["source"] == {"size": 1, "quick_hash": "h"}
    assert store.load_bags()["s1"].dtype == np.float16
    assert not list((tmp_path / "f.zarr" / ".staging").iterdir())


def test_streaming_writer_matches_arrays_and_zero_rows(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    feats, coords, tissue = _arrays(2000, 512, seed=1)  # 1024 rows per chunk: crosses chunks unevenly
    with store.writer("s", dim=512, capacity=10) as w:
        for i in range(0, 2000, 300):
            w.append(feats[i : i + 300], coords[i : i + 300], tissue[i : i + 300])
    got = store.read("s")
    np.testing.assert_array_equal(got.features, feats.astype(np.float16))
    np.testing.assert_array_equal(got.coords, coords)

    store.write("empty", np.zeros((0, 512)), np.zeros((0, 2)))
    empty = store.read("empty")
    assert empty.features.shape == (0, 512) and empty.coords.shape == (0, 2) and len(empty) == 0
    assert store.slide_ids() == ["empty", "s"]


def test_only_complete_slides_are_listed_and_failures_leave_nothing(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    with pytest.raises(RuntimeError, match="boom"), store.writer("bad", dim=4) as w:
        w.append(*_arrays(10, 4)[:2])
        raise RuntimeError("boom")
    assert store.slide_ids() == [] and not store.is_complete("bad")
    assert not list((store.path / ".staging").iterdir())
    assert store.claim_info("bad") is None  # claim released

    # a group under slides/ without complete=true is not a slide
    zarr.open_group(store.path / "slides" / "partial", mode="w").attrs["complete"] = False
    assert store.slide_ids() == []
    with pytest.raises(StoreError, match="not in the store"):
        store.read("partial")


def test_write_replaces_existing_slide(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    store.write("s", *_arrays(5, 8, seed=1))
    new = _arrays(7, 8, seed=2)
    store.write("s", *new)
    np.testing.assert_array_equal(store.read("s").coords, new[1])
    assert store.slide_ids() == ["s"]


def test_a_replaced_slide_is_never_absent(tmp_path, monkeypatch):
    """Replacing a slide swaps old and new in one step (renameat2 RENAME_EXCHANGE on Linux):
    a reader at any moment of the commit finds the old or the new slide."""
    import wsi.store

    store = FeatureStore(tmp_path / "f.zarr")
    store.write("s", *_arrays(5, 8, seed=1))
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        seen.append(store.is_complete("s"))
        return real_rename(src, dst)

    monkeypatch.setattr(wsi.store.os, "rename", rename)
    new = _arrays(7, 8, seed=2)
    store.write("s", *new)
    assert all(seen), "the slide was absent while it was replaced"
    np.testing.assert_array_equal(store.read("s").coords, new[1])
    assert not [p for p in (store.path / ".staging").iterdir() if p.name.startswith("s-")]  # old copy removed


def test_identity_set_match_mismatch_overwrite(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    store.ensure_identity(IDENTITY)
    store.ensure_identity(IDENTITY)  # same: fine
    store.write("s", *_arrays(3, 16))
    assert FeatureStore(tmp_path / "f.zarr", mode="r").identity == IDENTITY

    other = {**IDENTITY, "encoder": {"name": "tiny-swin", "weights_id": "random", "dim": 16}}
    with pytest.raises(StoreMismatchError) as err:
        store.ensure_identity(other)
    msg = str(err.value)
    assert "tiny-vit" in msg and "tiny-swin" in msg and "--overwrite" in msg
    assert store.slide_ids() == ["s"]

    store.ensure_identity(other, overwrite=True)
    assert store.identity["encoder"]["name"] == "tiny-swin"
    assert store.slide_ids() == []  # slides of the old identity are gone


def test_check_slide_skip_mismatch_overwrite(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    ident = {"size": 100, "quick_hash": "abc", "slide_mpp": 0.5, "path": "/a/x.svs"}
    assert store.check_slide("x", ident) is False  # absent: extract it
    store.write("x", *_arrays(3, 4), attrs={"source": ident})
    assert store.check_slide("x", {**ident, "path": "/moved/x.svs"}) is True  # same content: skip
    changed = {**ident, "quick_hash": "def"}
    with pytest.raises(StoreMismatchError, match="abc.*def|def.*abc"):
        store.check_slide("x", changed)
    assert store.check_slide("x", changed, overwrite=True) is False


def test_overwrite_keeps_slides_committed_since_the_run_started(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    ident = {"size": 100, "quick_hash": "abc", "slide_mpp": 0.5}
    store.write("old", *_arrays(3, 4), attrs={"source": ident})
    time.sleep(0.05)  # past the file system clock's tick
    mark = tmp_path / "run-started"
    mark.touch()
    started = mark.stat().st_mtime  # the run's start by the store's clock, as run_extract takes it
    time.sleep(0.05)
    store.write("new", *_arrays(3, 4), attrs={"source": ident})
    assert store.slide_attrs("old")["written_at"] < started <= store.slide_attrs("new")["written_at"]
    assert store.check_slide("old", ident, overwrite=True, run_started=started) is False  # from before: redo
    assert store.check_slide("new", ident, overwrite=True, run_started=started) is True  # this run's: keep
    assert store.check_slide("new", ident, overwrite=True) is False  # no start given: every slide is redone
    with pytest.raises(StoreMismatchError):  # a changed file is still refused without overwrite
        store.check_slide("new", {**ident, "quick_hash": "def"}, run_started=started)


def test_a_slide_written_under_an_identity_replaced_meanwhile_is_not_committed(tmp_path):
    old_run = FeatureStore(tmp_path / "f.zarr")
    old_run.ensure_identity(IDENTITY)
    other = {**IDENTITY, "tiling": {**IDENTITY["tiling"], "mpp": 1.0}}
    changed = r"tiling changed while it was written.*--overwrite"
    with pytest.raises(StoreError, match=changed) as err, old_run.writer("s", dim=4) as w:
        w.append(*_arrays(3, 4))
        FeatureStore(tmp_path / "f.zarr").ensure_identity(other, overwrite=True)  # a new run replaces it
    assert "'s'" in str(err.value) and "Fix:" in str(err.value)
    new_run = FeatureStore(tmp_path / "f.zarr", mode="r")
    assert new_run.identity["tiling"]["mpp"] == 1.0 and new_run.slide_ids() == []
    assert not [p for p in (tmp_path / "f.zarr" / ".staging").iterdir() if p.name.startswith("s-")]
    fresh = FeatureStore(tmp_path / "f.zarr")  # a writer that never ensured an identity pins the current one
    fresh.write("t", *_arrays(2, 4))
    assert fresh.slide_ids() == ["t"]


def test_read_only_and_missing_store(tmp_path):
    with pytest.raises(StoreError, match="not a slidepipe feature store"):
        FeatureStore(tmp_path / "nope.zarr", mode="r")
    FeatureStore(tmp_path / "f.zarr").write("s", *_arrays(2, 4))
    ro = FeatureStore(tmp_path / "f.zarr", mode="r")
    assert ro.slide_ids() == ["s"]
    with pytest.raises(StoreError, match="read-only"):
        ro.write("t", *_arrays(2, 4))


def test_claim_is_exclusive_and_released(tmp_path):
    a = FeatureStore(tmp_path / "f.zarr")
    b = FeatureStore(tmp_path / "f.zarr")
    with a.claim("s"):
        info = a.claim_info("s")
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert abs(info["time"] - time.time()) < 60
        with pytest.raises(SlideClaimedError, match=f"{socket.gethostname()}:{os.getpid()}"), b.claim("s"):
            pass
    assert a.claim_info("s") is None
    with b.claim("s"):
        pass


def test_claim_race_has_one_winner(tmp_path):
    FeatureStore(tmp_path / "f.zarr")
    n = 8
    barrier = threading.Barrier(n)
    done = threading.Barrier(n)
    wins, busy = [], []

    def contender(i: int) -> None:
        store = FeatureStore(tmp_path / "f.zarr")
        barrier.wait()
        try:
            with store.claim("s"):
                wins.append(i)
                done.wait()
        except SlideClaimedError:
            busy.append(i)
            done.wait()

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1 and len(busy) == n - 1


def test_stale_claim_of_dead_pid_is_recovered(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    dead = _dead_pid()
    _write_claim(store, "s", host=socket.gethostname(), pid=dead, time=time.time())
    leftover = store.path / ".staging" / f"s-{'0' * 32}"
    leftover.mkdir()
    with store.claim("s"):
        assert store.claim_info("s")["pid"] == os.getpid()
        assert not leftover.exists()  # the dead writer's staging dir is cleaned
    store.write("s", *_arrays(3, 4))
    assert store.slide_ids() == ["s"]
    assert not [p for p in (store.path / ".claims").iterdir()]


def test_live_claims_are_respected(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr", claim_ttl=5)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_claim(store, "s", host=socket.gethostname(), pid=sleeper.pid, time=time.time())
        with pytest.raises(SlideClaimedError, match=str(sleeper.pid)), store.claim("s"):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with store.claim("s"):  # its process is gone now
        pass


def _busy_until_its_heartbeat_lapses(store: FeatureStore, match: str) -> None:
    """The claim on "s" is respected while fresh; 60 s without a heartbeat (TTL 5 s), it is ours."""
    with pytest.raises(SlideClaimedError, match=match), store.claim("s"):
        pass
    path = store.path / ".claims" / "s.claim"
    old = time.time() - 60
    os.utime(path, (old, old))
    with store.claim("s"):
        info = store.claim_info("s")
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()


def test_other_host_claim_expires_without_heartbeat(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr", claim_ttl=5)
    _write_claim(store, "s", host="node-elsewhere", pid=1, time=time.time())
    _busy_until_its_heartbeat_lapses(store, "node-elsewhere")


def test_same_hostname_other_pid_namespace_is_judged_by_heartbeat(tmp_path):
    """A container sharing this hostname has its own pids: a pid that is dead here is not proof."""
    store = FeatureStore(tmp_path / "f.zarr", claim_ttl=5)
    dead = _dead_pid()
    _write_claim(store, "s", host=socket.gethostname(), pid=dead, pid_ns=1, time=time.time())
    _busy_until_its_heartbeat_lapses(store, str(dead))


def test_a_writer_whose_claim_was_taken_over_commits_nothing(tmp_path):
    """Paused past the TTL, a writer's claim is recovered by another process: the first writer's
    slide must not be published over (or beside) the new owner's work."""
    store = FeatureStore(tmp_path / "f.zarr")
    feats, coords, tissue = _arrays(10, 4)
    taken = r"'s' was not committed: its claim .* taken over by node-b:77"
    with pytest.raises(StoreError, match=taken), store.writer("s", dim=4) as w:
        w.append(feats, coords, tissue)
        _write_claim(store, "s", host="node-b", pid=77, time=time.time(), token="theirs")
    assert store.slide_ids() == [] and not (store.path / "slides" / "s").exists()
    assert not store._staging_dirs()  # the staged copy is removed
    assert store.claim_info("s")["token"] == "theirs"  # the new owner's claim is left alone


def test_heartbeat_stops_once_the_claim_is_someone_elses(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr", claim_ttl=5)  # heartbeat every 0.5 s
    with store.claim("s"):
        _write_claim(store, "s", host="node-b", pid=77, time=time.time(), token="theirs")
        path = store.path / ".claims" / "s.claim"
        old = time.time() - 60
        os.utime(path, (old, old))
        time.sleep(1.5)  # three heartbeats
        assert path.stat().st_mtime < time.time() - 30  # not kept alive by us
    assert store.claim_info("s")["token"] == "theirs"  # release leaves a claim that is not ours


def test_heartbeat_refreshes_claim_mtime(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr", claim_ttl=5)  # heartbeat every 0.5 s
    with store.claim("s"):
        path = store.path / ".claims" / "s.claim"
        old = time.time() - 60
        os.utime(path, (old, old))
        deadline = time.time() + 10
        while path.stat().st_mtime < time.time() - 30 and time.time() < deadline:
            time.sleep(0.1)
        assert path.stat().st_mtime > time.time() - 30


def test_clean_staging_keeps_live_work(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    stale = store.path / ".staging" / f"a-{'1' * 32}"
    live = store.path / ".staging" / f"b-{'2' * 32}"
    stale.mkdir()
    live.mkdir()
    _write_claim(store, "a", host=socket.gethostname(), pid=_dead_pid(), time=time.time())
    with store.claim("b"):
        live.mkdir(exist_ok=True)  # claim() cleaned b's leftovers; pretend b is writing now
        assert store.clean_staging() == 1
        assert live.exists() and not stale.exists()


def test_load_bags_subset_and_missing(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    for i in range(3):
        store.write(f"s{i}", *_arrays(4 + i, 8, seed=i))
    bags = store.load_bags(["s2", "s0"])
    assert list(bags) == ["s2", "s0"] and bags["s2"].shape == (6, 8) and bags["s0"].dtype == np.float16
    with pytest.raises(StoreError, match="'nope' is not in the store"):
        store.load_bags(["s1", "nope"])
