"""`slidepipe tile` never gives a silently wrong result: slides of the same id from other files,
the same file named twice, empty inputs, leftovers of interrupted runs, hidden files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipelines.tile as tile_mod
from pipelines.cli import app
from pipelines.config import TileJob
from pipelines.inputs import InputError, expand_slides
from pipelines.tile import OutputConflictError, run_tile, tile_slide

runner = CliRunner()


def _flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long lines


def _identity(out: Path, slide_id: str) -> dict:
    meta = json.loads((out / "coords" / f"{slide_id}.zarr" / "zarr.json").read_text())
    return meta["attributes"]["identity"]


@pytest.fixture
def two_x(real_slides_dir, tmp_path) -> tuple[Path, Path]:
    """dirA/x.svs and dirB/x.svs: the same slide id, two different files."""
    a, b = tmp_path / "dirA" / "x.svs", tmp_path / "dirB" / "x.svs"
    for p in (a, b):
        p.parent.mkdir()
        shutil.copyfile(real_slides_dir / "tiny-aperio.svs", p)
    with b.open("ab") as f:  # bytes after the TIFF: opens the same, another file
        f.write(b"another scan")
    return a, b


def test_tile_refuses_to_replace_a_slide_from_another_file(two_x, tmp_path):
    """It used to replace dirA's x with dirB's x without a word."""
    a, b = two_x
    out = tmp_path / "T"
    res = runner.invoke(app, ["tile", str(a.parent), "--out", str(out)])
    assert res.exit_code == 0, res.output
    before = _identity(out, "x")
    assert before["path"] == str(a.resolve())

    res = runner.invoke(app, ["tile", str(b.parent), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "--overwrite" in _flat(res.output)
    assert _identity(out, "x") == before  # untouched
    with pytest.raises(OutputConflictError, match=rf"{b}: .*slide 'x' .*another file, {a.resolve()} .*Fix: pass --overwrite"):
        run_tile(TileJob(slides=[str(b)], out=out))

    res = runner.invoke(app, ["tile", str(a), "--out", str(out)])  # the same file: redone
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["tile", str(b.parent), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert _identity(out, "x")["path"] == str(b.resolve())


def test_the_same_file_named_twice_is_one_slide(two_x, tmp_path, monkeypatch):
    """`tile dirA/x.svs $PWD/dirA/x.svs` used to be refused as a slide-id collision."""
    a, b = two_x
    monkeypatch.chdir(tmp_path)
    assert expand_slides(["dirA/x.svs", str(a), "dirA"]) == [Path("dirA/x.svs")]
    res = runner.invoke(app, ["tile", "dirA/x.svs", str(a), "--out", str(tmp_path / "T")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "T" / "summary.json").read_text())
    assert summary["n_slides"] == 1 and summary["n_done"] == 1
    with pytest.raises(InputError, match="slide id 'x' is also the id of"):  # two files: still refused
        expand_slides([a, b])


def test_an_empty_directory_or_one_without_slides_is_a_usage_error(two_x, tmp_path):
    """It used to exit 0 with empty outputs (tile's library call, extract, or next to a good dir)."""
    a, _ = two_x
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=rf"{empty}: no slides found in this directory.*Fix"):
        expand_slides([empty])
    with pytest.raises(InputError, match="no slides found"):
        run_tile(TileJob(slides=[str(empty)], out=tmp_path / "lib"))
    assert not (tmp_path / "lib").exists()
    for argv in (["tile", str(empty), str(a.parent), "--out", str(tmp_path / "T")],
                 ["extract", str(empty), "--out", str(tmp_path / "F.zarr"), "--weights", "random"]):
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and "no slides found in this directory" in _flat(res.output), res.output
    assert not (tmp_path / "T").exists() and not (tmp_path / "F.zarr").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_are_removed_at_the_start_of_a_run(two_x, tmp_path):
    """A Ctrl-C'd `tile --save-patches` used to leave images/.x.tmp-<pid> behind for good."""
    a, _ = two_x
    out = tmp_path / "T"
    dead, live, host = _dead_pid(), os.getppid(), socket.gethostname()
    stale = [out / "images" / f".x.tmp-{dead}", out / "coords" / f".y.zarr.tmp-{dead}@{host}",
             out / "patches" / f".y_patches.h5.tmp-{dead}"]
    kept = [out / "images" / f".z.tmp-{live}", out / "images" / f".w.tmp-{dead}@not-{host}",
            out / "images" / "x.tmp-1"]
    for p in stale + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        if "h5" in p.name:
            p.write_bytes(b"partial")
        else:
            p.mkdir()
            (p / "0_0.png").write_bytes(b"partial")
    summary = run_tile(TileJob(slides=[str(a)], out=out))
    assert summary.n_failed == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)  # a live process's, another host's, not a temp name


def test_an_interrupted_save_patches_leaves_no_temp_folder(real_slides_dir, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into KeyboardInterrupt) while patches are saved."""
    save = tile_mod._save_images

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tile_mod, "_save_images", save_then_interrupt)
    job = TileJob(out=tmp_path, save_patches="png", tiling={"mpp": 0.5, "patch_size": 256})
    with pytest.raises(KeyboardInterrupt):
        tile_slide(real_slides_dir / "cmu-1-small-region.svs", job)
    assert list((tmp_path / "images").iterdir()) == []


def test_a_hidden_slide_file_is_skipped_in_directories_and_refused_with_the_right_fix(two_x, tmp_path):
    """extract used to fail it with "invalid slide id '.x'. Fix: use the file name without '/'"
    (it has none); tile wrote hidden outputs (coords/.x.zarr) that extract cannot take."""
    a, _ = two_x
    hidden = a.parent / ".x.svs"
    shutil.copyfile(a, hidden)
    (a.parent / "._y.svs").write_bytes(b"\0" * 4096)  # a macOS resource fork
    assert expand_slides([a.parent]) == [a]
    with pytest.raises(InputError, match=r"\.x\.svs: hidden file.*Fix: rename it.*ln -s \.x\.svs x\.svs"):
        expand_slides([hidden])
    for verb, out in (("tile", "T"), ("extract", "F.zarr")):
        res = runner.invoke(app, [verb, str(hidden), "--out", str(tmp_path / out)])
        text = _flat(res.output)
        assert res.exit_code == 2 and "hidden file" in text and "rename it" in text, res.output
        assert "without '/'" not in text
        assert not (tmp_path / out).exists()
