"""Never a silently wrong result: damaged stores are refused, named, verified and redone.

Each test damages a store the way disks, copies and people do (a deleted or truncated chunk, a lost
root ``zarr.json``, a slide whose id looks like rubbish) and checks it is refused with a typed error
naming the store, the slide and the array, never read back as zeros.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.export import export_h5
from wsi.errors import StoreCorruptError, StoreError, StoreMismatchError
from wsi.store import FeatureStore, rows_per_chunk, verify_store

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO.parent / "shared" / "slides" / "real" / "cmu-1-small-region.svs"  # 13 patches at 1 µm/px
DIM = 384  # rows_per_chunk(384) = 1366: 3000 rows are three feature chunks
IDENTITY = {
    "encoder": {"name": "tiny-vit", "weights_id": "random", "dim": DIM},
    "tiling": {"mpp": 0.5, "patch_size": 224, "overlap": 0, "min_tissue": 0.5},
    "stain": {"method": "none", "target": None},
}
SOURCE = {"size": 1, "quick_hash": "sha256:x", "slide_mpp": 0.5}
needs_slide = pytest.mark.skipif(not SLIDE.is_file(), reason="shared test slides not available")


def _arrays(n: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, DIM)).astype(np.float16), rng.integers(0, 50_000, (n, 2), dtype=np.int64)


def _store(path: Path, *ids: str) -> FeatureStore:
    store = FeatureStore(path)
    store.ensure_identity(IDENTITY)
    for i, sid in enumerate(ids):
        store.write(sid, *_arrays(seed=i), attrs={"source": SOURCE})
    return store


def _chunk(store: FeatureStore, sid: str, key: str = "c/1/0", array: str = "features") -> Path:
    path = store.path / "slides" / sid / array / key
    assert path.is_file()
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    """Same size, other content: only the chunk's checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- 1. deleted chunk
def test_a_deleted_chunk_is_refused_naming_slide_and_array(tmp_path):
    store = _store(tmp_path / "f.zarr", "A", "ok")
    assert rows_per_chunk(DIM) * 2 < 3000 and store.slide_attrs("A")["chunks"]["features"]["count"] == 3
    _chunk(store, "A").unlink()  # Zarr would read those 1366 rows back as zeros

    match = r"f\.zarr: slide 'A' is corrupt: array 'features': 1 of 3 chunk files missing \(c/1/0\)\. Fix: re-extract"
    with pytest.raises(StoreCorruptError, match=match) as err:
        store.read("A")
    assert err.value.slide_id == "A" and err.value.array == "features" and "slidepipe verify" in str(err.value)
    with pytest.raises(StoreCorruptError, match="'A'.*'features'"):
        store.load_bags()
    assert store.read("ok").features.shape == (3000, DIM)  # the other slide is fine
    # listed (so a cohort never silently loses it) but not complete: extract's skip check redoes it
    assert store.slide_ids() == ["A", "ok"] and not store.is_complete("A") and store.is_complete("ok")
    assert store.check_slide("A", SOURCE) is False and store.check_slide("ok", SOURCE) is True


@needs_slide
def test_extract_redoes_a_slide_with_a_deleted_chunk(tmp_path):
    from test_extract import make_job

    from pipelines.extract import load_encoder, run_extract

    job = make_job(tmp_path / "f.zarr", [SLIDE])
    encoder = load_encoder(job)
    assert run_extract(job, encoder=encoder).results[0].status == "done"
    store = FeatureStore(job.out, mode="r")
    first = store.read("cmu-1-small-region").features
    _chunk(store, "cmu-1-small-region", "c/0/0").unlink()
    res = run_extract(job, encoder=encoder).results[0]
    assert res.status == "done", res.reason  # not "skipped: already in the store"
    np.testing.assert_array_equal(store.read("cmu-1-small-region").features, first)
    assert run_extract(job, encoder=encoder).results[0].status == "skipped"  # intact now


# ---------------------------------------------------------------------- 2. truncated / damaged chunk
def test_a_truncated_chunk_is_a_store_error_naming_the_slide_not_a_raw_runtime_error(tmp_path):
    store = _store(tmp_path / "f.zarr", "B", "C")
    _truncate(_chunk(store, "B", "c/2/0"))
    with pytest.raises(StoreCorruptError, match=r"slide 'B' is corrupt: array 'features': .*truncated.*Fix"):
        store.read("B")
    assert not store.is_complete("B") and store.check_slide("B", SOURCE) is False

    _flip_a_byte(_chunk(store, "C", "c/0/0"))  # same size: found when read, by its crc32c
    assert store.is_complete("C")  # the shallow check cannot see it ...
    with pytest.raises(StoreCorruptError, match=r"slide 'C' is corrupt: array 'features': .*checksum"):
        store.read("C")  # ... the read does
    (bad,) = [r for r in verify_store(store.path, deep=True) if not r.ok and r.slide_id == "C"]
    assert "c/0/0" in str(bad) and "checksum" in str(bad)


def test_a_store_from_before_checksums_still_reads_and_is_checked(tmp_path, monkeypatch):
    """Slides written before this change have no crc32c codec and no recorded chunk counts: their
    expected chunks come from the array shape, and a damaged chunk fails to decode (zstd)."""
    import wsi.store

    with monkeypatch.context() as old:
        old.setattr(wsi.store, "_compressors", lambda: "auto")  # zarr's default: zstd, no crc32c
        old.setattr(wsi.store, "_chunk_record", lambda slide_dir: None)
        store = _store(tmp_path / "f.zarr", "old1", "old2", "old3")
    meta = json.loads((store.path / "slides" / "old1" / "features" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd"] and "chunks" not in store.slide_attrs("old1")
    store.write("new", *_arrays(seed=9))

    np.testing.assert_array_equal(store.read("old1").features, _arrays(seed=0)[0])
    checks = {r.slide_id: r for r in verify_store(store.path, deep=True)}
    assert all(r.ok for r in checks.values())
    assert not checks["old1"].recorded and not checks["old1"].checksummed
    assert checks["new"].recorded and checks["new"].checksummed

    _chunk(store, "old1").unlink()
    with pytest.raises(StoreCorruptError, match=r"'old1' is corrupt: array 'features': 1 of 3 chunk files missing"):
        store.read("old1")
    assert not store.is_complete("old1")
    _truncate(_chunk(store, "old2", "c/0/0"))
    assert store.is_complete("old2")  # no recorded sizes: the listing cannot tell ...
    with pytest.raises(StoreCorruptError, match=r"'old2' is corrupt: array 'features': .*decode"):
        store.read("old2")  # ... but its decoding fails, with the slide named
    assert {r.slide_id for r in verify_store(store.path, deep=True) if not r.ok} == {"old1", "old2"}


# ---------------------------------------------------------------------- 3. slidepipe verify
def test_verify_names_damaged_slides_and_exits_1_and_0_when_clean(tmp_path):
    clean = _store(tmp_path / "clean.zarr", "A", "B")
    result = CliRunner().invoke(app, ["verify", str(clean.path), "--deep"])
    assert result.exit_code == 0, result.output
    assert "2 slides checked (deep): 2 ok, 0 bad" in result.output

    store = _store(tmp_path / "f.zarr", "A", "B", "C")
    _chunk(store, "A").unlink()
    _truncate(_chunk(store, "B", "c/2/0"))
    deep = CliRunner().invoke(app, ["verify", str(store.path), "--deep"])
    assert deep.exit_code == 1, deep.output
    lines = [line for line in deep.output.splitlines() if line.startswith("BAD")]
    assert len(lines) == 2, deep.output
    assert "slide 'A'" in lines[0] and "'features'" in lines[0] and "missing (c/1/0)" in lines[0]
    assert "slide 'B'" in lines[1] and "'features'" in lines[1] and "c/2/0" in lines[1]
    assert "3 slides checked (deep): 1 ok, 2 bad" in deep.output
    shallow = CliRunner().invoke(app, ["verify", str(store.path)])
    assert shallow.exit_code == 1 and "slide 'A'" in shallow.output and "slide 'B'" in shallow.output

    usage = CliRunner().invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert usage.exit_code == 2 and "not a slidepipe feature store" in usage.output


# ---------------------------------------------------------------------- 4. export-h5
def test_export_h5_refuses_a_corrupt_slide(tmp_path):
    store = _store(tmp_path / "f.zarr", "A", "B")
    _chunk(store, "B").unlink()
    result = CliRunner().invoke(app, ["export-h5", str(store.path), str(tmp_path / "h5")])
    assert result.exit_code == 2, result.output
    assert "slide 'B' is corrupt" in " ".join(result.output.split())
    assert not list((tmp_path / "h5").glob("*.h5"))  # nothing exported, not even the good slide

    other = _store(tmp_path / "g.zarr", "A", "B")
    _flip_a_byte(_chunk(other, "A", "c/0/0"))  # found only when read
    with pytest.raises(StoreCorruptError, match="'A'.*'features'"):
        export_h5(other.path, tmp_path / "h5b")
    assert not (tmp_path / "h5b" / "A.h5").exists()


# ---------------------------------------------------------------------- 5. lost root metadata
def test_a_store_whose_root_metadata_is_lost_is_not_written_under_another_identity(tmp_path):
    store = _store(tmp_path / "f.zarr", "A")
    (store.path / "zarr.json").unlink()
    other = {**IDENTITY, "encoder": {"name": "other", "weights_id": "random", "dim": 8}}

    with pytest.raises(StoreError, match=r"root metadata.*missing.*--overwrite"):
        FeatureStore(store.path, mode="r")
    (root, slide) = verify_store(store.path)
    assert root.slide_id is None and "root metadata" in str(root) and slide.ok
    again = FeatureStore(store.path)
    assert "recreated without" in str(verify_store(store.path)[0])
    with pytest.raises(StoreMismatchError, match=r"root metadata .*lost.*--overwrite"):
        again.write("B", *_arrays(10))  # nothing is written under an unknown identity
    with pytest.raises(StoreMismatchError, match=r"encoder: store has .*tiny-vit.*--overwrite"):
        again.ensure_identity(other)  # the slides' records say what the store was
    assert not (store.path / "slides" / "B").exists()
    # the same identity as the slides record: the root is rebuilt and work goes on
    FeatureStore(store.path).ensure_identity(IDENTITY)
    assert FeatureStore(store.path, mode="r").identity == IDENTITY
    FeatureStore(store.path).write("B", *_arrays(10))


def test_a_lost_root_with_slides_that_do_not_record_it_needs_overwrite(tmp_path, monkeypatch):
    store = _store(tmp_path / "f.zarr")
    monkeypatch.setattr(store, "_expected", {})  # slides written before they recorded the identity
    store.write("A", *_arrays(10))
    assert "store_identity" not in store.slide_attrs("A")
    (store.path / "zarr.json").unlink()
    with pytest.raises(StoreMismatchError, match=r"root metadata .*lost.*do not all record it.*--overwrite"):
        FeatureStore(store.path).ensure_identity(IDENTITY)
    fresh = FeatureStore(store.path)
    fresh.ensure_identity(IDENTITY, overwrite=True)
    assert fresh.slide_ids() == [] and fresh.identity == IDENTITY
    fresh.write("A", *_arrays(10))


@needs_slide
def test_extract_refuses_a_store_whose_root_metadata_is_lost(tmp_path):
    from test_extract import make_job

    from pipelines.extract import load_encoder, run_extract

    job = make_job(tmp_path / "f.zarr", [SLIDE])
    encoder = load_encoder(job)
    run_extract(job, encoder=encoder)
    (Path(job.out) / "zarr.json").unlink()
    other = make_job(tmp_path / "f.zarr", [SLIDE], tiling={"mpp": 2.0})
    with pytest.raises(StoreMismatchError, match=r"tiling.*--overwrite"):
        run_extract(other, encoder=encoder)  # not "skipped" under the new tiling
    assert run_extract(job, encoder=encoder).results[0].status == "skipped"  # its own settings: rebuilt
    assert FeatureStore(job.out, mode="r").identity["tiling"]["mpp"] == 1.0


# ---------------------------------------------------------------------- 6. staging names
@pytest.mark.parametrize("slide_id", ["trash", f"trash-{'a' * 32}"])
def test_a_slide_called_trash_survives_another_process_cleanup(tmp_path, slide_id):
    store = FeatureStore(tmp_path / "f.zarr")
    feats, coords = _arrays(3000)
    cleanup = f"from wsi.store import FeatureStore; print(FeatureStore({str(store.path)!r}).clean_staging())"
    with store.writer(slide_id, dim=DIM) as w:
        w.append(feats[:2000], coords[:2000])
        w._reap(keep=0)  # the first chunk is in staging
        out = subprocess.run([sys.executable, "-c", cleanup], cwd=REPO, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "0", out  # another process starting up removes nothing of ours
        w.append(feats[2000:], coords[2000:])
    got = store.read(slide_id)
    np.testing.assert_array_equal(got.features, feats)
    np.testing.assert_array_equal(got.coords, coords)


def test_rubbish_of_old_and_new_names_is_still_cleaned(tmp_path):
    store = FeatureStore(tmp_path / "f.zarr")
    old = store.path / ".staging" / f"trash-{'1' * 32}"  # rubbish of a version before this change
    new = store.path / ".staging" / f".trash-{'2' * 32}"
    old.mkdir()
    new.mkdir()
    assert store.clean_staging() == 2 and not old.exists() and not new.exists()
    store.write("s", *_arrays(10))
    store.write("s", *_arrays(12, seed=1))  # replaced: the old copy goes through .trash-
    store.delete("s")
    assert not list((store.path / ".staging").iterdir()) and store.slide_ids() == []


def test_a_foreign_directory_or_a_file_is_not_adopted_as_a_store(tmp_path):
    """A user's folder, another Zarr group or a file as --out: refused, nothing written into it."""
    import zarr

    from wsi.errors import StoreError
    from wsi.store import FeatureStore

    folder = tmp_path / "my-notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("x")
    with pytest.raises(StoreError, match=r"my-notes: not a slidepipe feature store \(it holds todo.txt\).*Fix"):
        FeatureStore(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["todo.txt"]  # nothing written into it
    other = tmp_path / "other.zarr"
    zarr.open_group(other, mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="other.zarr: not a slidepipe feature store"):
        FeatureStore(other)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(StoreError, match="afile: is a file, not a feature store"):
        FeatureStore(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    FeatureStore(empty).write("a", np.zeros((2, 4), np.float16), np.zeros((2, 2), np.int64))
    assert FeatureStore(empty).slide_ids() == ["a"]  # an empty folder, and then the store, are fine
