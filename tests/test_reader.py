"""wsi.reader: direct tile decoding vs OpenSlide, ordering, bounded memory, corrupt tiles, Dask view."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from wsi import reader as reader_mod
from wsi.errors import CorruptTileError
from wsi.reader import PatchBatch, PatchReader, ReadSpec, patches_dask_array, prefetch, resize_patch
from wsi.slide import open_slide
from wsi.tiff_tiles import TiffTileSource
from wsi.tiling import make_grid

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "slides" / "real"
BAD = SHARED / "slides" / "bad"
CMU = REAL / "cmu-1-small-region.svs"


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Real H&E pixels (1800 x 1500) to write synthetic TIFFs from."""
    with openslide.OpenSlide(str(CMU)) as s:
        return np.asarray(s.read_region((300, 600), 0, (1800, 1500)).convert("RGB"))


def write_tiff(
    path: Path, rgb: np.ndarray, *, levels: int = 1, aperio: bool = False, mpp: float = 0.25
) -> Path:
    """Tiled JPEG pyramid (downsample 2 per level); Aperio-style description when ``aperio``."""
    h, w = rgb.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        img = rgb
        for k in range(levels):
            desc = (
                f"Aperio Image Library v12.0.0 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=85"
                f"|AppMag = 40|MPP = {mpp}"
                if aperio
                else None
            )
            tif.write(
                img,
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 85},
                subfiletype=0 if k == 0 else 1,
                metadata=None,
                description=desc if k == 0 else None,
            )
            hh, ww = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
            img = (
                img[:hh, :ww].reshape(hh // 2, 2, ww // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
            )
    return path


def read_all(reader: PatchReader) -> PatchBatch:
    batches = list(reader)
    if not batches:
        return PatchBatch(
            np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0, 2), np.int64), np.zeros(0, np.int64)
        )
    return PatchBatch(
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.coords for b in batches]),
        np.concatenate([b.indices for b in batches]),
    )


def openslide_patches(path: Path, grid) -> np.ndarray:
    """Reference: one OpenSlide read_region per patch (RGB, alpha composited on white)."""
    with openslide.OpenSlide(str(path)) as s:
        out = []
        for x, y in grid.coords:
            rgba = np.asarray(
                s.read_region((int(x), int(y)), grid.read_level, (grid.patch_size_read,) * 2)
            )
            a = rgba[..., 3:4].astype(np.uint16)
            rgb = (rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
            out.append(rgb.astype(np.uint8))
    return np.stack(out)


def shifted(grid, coords):
    coords = np.asarray(coords, np.int64)
    return dataclasses.replace(grid, coords=coords, tissue=np.ones(len(coords), np.float32))


# ---------------------------------------------------------------------------------------------
# bit-identity with OpenSlide


def test_cmu_svs_bit_identical_to_openslide():
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        # add patches off the 256 grid so they straddle the 240 px stored tiles differently
        extra = np.array([[13, 7], [1000, 1111], [2220 - 256, 2967 - 256]], np.int64)
        grid = shifted(grid, np.concatenate([grid.coords, extra]))
        reader = PatchReader(slide, grid, batch_size=16)
        got = read_all(reader)
    assert reader.stats["mode"] == "direct"
    assert got.images.shape == (len(grid), 256, 256, 3)
    np.testing.assert_array_equal(got.images, openslide_patches(CMU, grid))


def test_slide_edge_matches_slide_read_region(tissue, tmp_path):
    path = write_tiff(tmp_path / "edge.svs", tissue[:1000, :1300], aperio=True)
    with open_slide(path) as slide:
        assert slide.vendor == "aperio"
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        # last whole patches at the right/bottom edge (inside partial stored tiles) and patches
        # hanging over the edge (white outside, like Slide.read_region)
        edge = np.array(
            [[1300 - 256, 1000 - 256], [1300 - 256, 0], [1200, 900], [-20, 100]], np.int64
        )
        grid = shifted(grid, np.concatenate([grid.coords, edge]))
        got = read_all(PatchReader(slide, grid, batch_size=8))
        want = np.stack(
            [slide.read_region((int(x), int(y)), 0, (256, 256)) for x, y in grid.coords]
        )
    np.testing.assert_array_equal(got.images, want)
    assert (got.images[-2][100:, 100:] == 255).all()  # beyond the slide: white


def test_generic_pyramid_levels_bit_identical(tissue, tmp_path):
    path = write_tiff(tmp_path / "pyr.tif", tissue, levels=3)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.level_count == 3
        for mpp in (0.25, 0.5, 1.0):  # read levels 0, 1 and 2 as stored
            grid = make_grid(slide, None, patch_size=128, mpp=mpp, min_tissue=0.0)
            assert not grid.needs_resize and grid.read_level == round(np.log2(mpp / 0.25))
            reader = PatchReader(slide, grid, batch_size=7)
            got = read_all(reader)
            assert reader.stats["mode"] == "direct"
            np.testing.assert_array_equal(got.images, openslide_patches(path, grid))


@pytest.mark.parametrize(
    ("name", "mpp"),
    [("tcga-cr-7395-01a-01-ts1.svs", 0.25), ("boxes-pyramid.tiff", 0.5)],
)
def test_other_codecs_bit_identical(name, mpp):
    """JPEG 2000 (Aperio 33005) and Deflate generic TIFF decode directly, exactly."""
    path = REAL / name
    with open_slide(path, mpp=mpp) as slide:
        grid = make_grid(slide, None, patch_size=64, mpp=slide.mpp, min_tissue=0.0)
        grid = shifted(grid, grid.coords[:: max(1, len(grid) // 40)])
        reader = PatchReader(slide, grid, batch_size=8)
        got = read_all(reader)
    assert reader.stats["mode"] == "direct"
    np.testing.assert_array_equal(got.images, openslide_patches(path, grid))


def test_region_fallback_matches_direct():
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=slide.mpp, min_tissue=0.0)
        direct = read_all(PatchReader(slide, grid, batch_size=10))
        region = PatchReader(slide, grid, batch_size=10, direct=False, workers=2)
        got = read_all(region)
    assert region.stats["mode"] == "region"
    np.testing.assert_array_equal(got.images, direct.images)
    np.testing.assert_array_equal(got.indices, direct.indices)


def test_direct_decode_that_disagrees_with_backend_falls_back(monkeypatch):
    """A vendor colour-space quirk (here: Aperio RGB-in-JPEG decoded as YCbCr) is caught by the
    first-tile check at open, and the slide is read through the backend, still exactly."""
    from wsi import tiff_tiles

    monkeypatch.setattr(tiff_tiles, "_jpeg_colorspaces", lambda page: (None, 2))
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        grid = shifted(grid, grid.coords[::6])
        reader = PatchReader(slide, grid)
        got = read_all(reader)
    assert reader.stats["mode"] == "region"
    np.testing.assert_array_equal(got.images, openslide_patches(CMU, grid))


def test_striped_tiff_uses_region_reads():
    path = REAL / "kidney-48-5.tif"
    with open_slide(path, mpp=0.5) as slide:
        assert TiffTileSource.open(path, slide.level_dimensions) is None  # not tiled
        grid = make_grid(slide, None, patch_size=256, mpp=0.5, min_tissue=0.0)
        reader = PatchReader(slide, grid)
        got = read_all(reader)
        want = np.stack(
            [slide.read_region((int(x), int(y)), 0, (256, 256)) for x, y in grid.coords]
        )
    assert reader.stats["mode"] == "region" and len(grid) > 0
    np.testing.assert_array_equal(got.images, want)


# ---------------------------------------------------------------------------------------------
# resizing


def test_resized_mpp_within_resampling_tolerance(tissue, tmp_path):
    odd = tissue[:1499, :1799]  # odd width and height
    path = write_tiff(tmp_path / "base025.svs", odd, aperio=True, mpp=0.25)
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=0.5, min_tissue=0.0)
        assert grid.needs_resize and grid.patch_size_read == 448
        # plus patches hanging over the odd right/bottom edge (white outside, averaged in)
        grid = shifted(grid, np.concatenate([grid.coords, [[1400, 1200], [1700, 0], [0, 1400]]]))
        got = read_all(PatchReader(slide, grid))
        # an odd-placed patch makes the reader resize patch by patch instead of tile by tile
        per_patch = read_all(
            PatchReader(slide, shifted(grid, np.concatenate([grid.coords, [[101, 3]]])))
        )
        np.testing.assert_array_equal(per_patch.images[:-1], got.images)
        lanczos = np.stack(
            [slide.read_region_mpp((int(x), int(y)), (224, 224), 0.5) for x, y in grid.coords]
        )
        native = np.stack(
            [slide.read_region((int(x), int(y)), 0, (448, 448)) for x, y in grid.coords]
        )
    assert got.images.shape == (len(grid), 224, 224, 3)
    # exactly the 2 x 2 area average of the native pixels (up to rounding)
    area = native.reshape(-1, 224, 2, 224, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(got.images - area).max() <= 0.5 + 1e-9
    # and close to the Lanczos resize of Slide.read_region_mpp (Lanczos sharpens edges a little)
    diff = np.abs(got.images.astype(np.int16) - lanczos.astype(np.int16))
    assert diff.mean() < 1.5
    assert np.percentile(diff[:-3], 99) <= 16


def test_read_positions_snap_near_integer_downsamples():
    odd = ReadSpec(Path("x.svs"), level=1, downsample=4.00012, size_read=256, patch_size=256)
    assert odd.scale == 4.0  # odd level sizes, not a real 4.00012 resampling
    np.testing.assert_array_equal(odd.read_positions([[1792 * 40, 4 * 1001]]), [[448 * 40, 1001]])
    fractional = ReadSpec(Path("x.svs"), level=1, downsample=1.5, size_read=256, patch_size=256)
    np.testing.assert_array_equal(fractional.read_positions([[3, 4]]), [[2, 3]])


def test_resize_patch_is_area_average():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    r = resize_patch(a, 4)
    want = a.reshape(4, 2, 4, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(r.astype(float) - want).max() <= 0.5 + 1e-9
    assert resize_patch(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8), 4).shape == (4, 4, 3)


# ---------------------------------------------------------------------------------------------
# planning, ordering, bounded memory


def test_order_indices_and_batches_with_workers(tissue, tmp_path):
    path = write_tiff(tmp_path / "order.svs", tissue, aperio=True)
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=200, mpp=slide.mpp, overlap=40, min_tissue=0.0)
        # keep a sparse, irregular subset, as a tissue mask would
        grid = shifted(grid, grid.coords[np.random.default_rng(1).random(len(grid)) < 0.6])
        one = list(PatchReader(slide, grid, batch_size=9))
        two = list(PatchReader(slide, grid, batch_size=9, workers=2))
    assert [len(b) for b in one] == [9] * (len(grid) // 9) + (
        [len(grid) % 9] if len(grid) % 9 else []
    )
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.indices, b.indices)
    idx = np.concatenate([b.indices for b in two])
    np.testing.assert_array_equal(idx, np.arange(len(grid)))
    np.testing.assert_array_equal(np.concatenate([b.coords for b in two]), grid.coords)
    assert one[0].images.dtype == np.uint8 and one[0].coords.dtype == np.int64


def test_each_stored_tile_decoded_once(tissue, tmp_path):
    path = write_tiff(tmp_path / "once.svs", tissue, aperio=True)
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=300, mpp=slide.mpp, overlap=60, min_tissue=0.0)
        reader = PatchReader(slide, grid, batch_size=5, workers=2)
        n = sum(len(b) for b in reader)
    touched = {
        (tx, ty)
        for x, y in grid.coords
        for ty in range(y // 256, (y + 299) // 256 + 1)
        for tx in range(x // 256, (x + 299) // 256 + 1)
    }
    assert n == len(grid)
    assert reader.stats["tiles_decoded"] == len(touched)


def test_bounded_inflight_and_tile_memory(tissue, tmp_path, monkeypatch):
    big = np.concatenate([np.concatenate([tissue] * 2, axis=1)] * 2, axis=0)  # 3600 x 3000
    path = write_tiff(tmp_path / "bounded.svs", big, aperio=True)
    started, consumed, lock = [0], [0], threading.Lock()
    worst = [0]
    real = reader_mod._read_batch

    def counting(*args, **kwargs):
        with lock:
            started[0] += 1
            worst[0] = max(worst[0], started[0] - consumed[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(reader_mod, "_read_batch", counting)
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=slide.mpp, min_tissue=0.0)
        reader = PatchReader(slide, grid, batch_size=4, workers=2, max_inflight=3)
        for _ in reader:
            with lock:
                consumed[0] += 1
    tiles_across = -(-3600 // 256)
    assert len(reader) > 40  # many more batches than may be in flight
    assert worst[0] <= 3 + 1  # max_inflight queued + the one being handed to the consumer
    # decoded tiles are dropped after their last patch: about a row of tiles, not the slide
    assert reader.stats["peak_cached_tiles"] <= 2 * tiles_across + 3 * 4 * 4
    cols, rows = -(-(3600 // 224 * 224) // 256), -(-(3000 // 224 * 224) // 256)
    assert reader.stats["tiles_decoded"] == cols * rows  # every touched tile once


# ---------------------------------------------------------------------------------------------
# corrupt tiles


def corrupt_tile(path: Path, tx: int, ty: int) -> Path:
    """Break one stored JPEG tile of level 0 (bogus marker length right after SOI)."""
    page = tifffile.TiffFile(path).pages[0]
    i = ty * -(-page.imagewidth // page.tilewidth) + tx
    off = page.dataoffsets[i]
    page.parent.close()
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\xff\xc4\x00\x01")
    return path


# 256 px patches on 256 px tiles take the decode-into-the-patch path
@pytest.mark.parametrize(("size", "n_hit"), [(224, 4), (256, 1)])
def test_corrupt_tile_raises_or_is_skipped(tissue, tmp_path, size, n_hit):
    clean = write_tiff(tmp_path / "clean.svs", tissue, aperio=True)
    bad = write_tiff(tmp_path / "bad.svs", tissue, aperio=True)
    corrupt_tile(bad, 3, 2)  # the tile at x 768..1023, y 512..767
    with open_slide(clean) as slide:
        grid = make_grid(slide, None, patch_size=size, mpp=slide.mpp, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid))
    with open_slide(bad) as slide, pytest.raises(CorruptTileError) as info:
        read_all(PatchReader(slide, grid, workers=2))
    err = info.value
    assert err.path == bad and err.region == (768, 512, 256, 256)
    assert "could not be decoded" in str(err) and "skip-corrupt-tiles" in str(err)

    hit = {
        i
        for i, (x, y) in enumerate(grid.coords)
        if x < 1024 and x + size > 768 and y < 768 and y + size > 512
    }
    for workers in (1, 2):
        with open_slide(bad) as slide:
            reader = PatchReader(
                slide, grid, skip_corrupt_tiles=True, workers=workers, batch_size=6
            )
            got = read_all(reader)
        assert {i for i, _ in reader.skipped} == hit and len(hit) == n_hit
        assert all("column 3, row 2" in why for _, why in reader.skipped)
        keep = np.array([i not in hit for i in range(len(grid))])
        np.testing.assert_array_equal(got.indices, np.flatnonzero(keep))
        np.testing.assert_array_equal(got.images, want.images[keep])


@pytest.mark.parametrize("direct", [True, False])
def test_unreadable_svs(direct):
    path = BAD / "unreadable.svs"
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=16, mpp=slide.mpp, min_tissue=0.0)
        assert len(grid) == 1
        with pytest.raises(CorruptTileError, match="unreadable.svs"):
            read_all(PatchReader(slide, grid, direct=direct))
        reader = PatchReader(slide, grid, direct=direct, skip_corrupt_tiles=True)
        assert read_all(reader).indices.size == 0
    assert [i for i, _ in reader.skipped] == [0]


def test_patch_smaller_slide_gives_no_batches():
    with open_slide(REAL / "tiny-aperio.svs") as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp)
        assert list(PatchReader(slide, grid)) == []
        assert patches_dask_array(slide, grid).shape == (0, 256, 256, 3)


# ---------------------------------------------------------------------------------------------
# Dask view and prefetch


def test_dask_array_matches_reader():
    import dask

    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=224, mpp=slide.mpp, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid))
    arr = patches_dask_array(CMU, grid, chunk_size=16)
    assert arr.shape == (len(grid), 224, 224, 3) and arr.dtype == np.uint8
    assert arr.chunks[0][0] == 16
    with dask.config.set(scheduler="threads", num_workers=2):
        got = arr.compute()
        part = arr[20:37].compute()
    np.testing.assert_array_equal(got, want.images)
    np.testing.assert_array_equal(part, want.images[20:37])
    reader_mod._SOURCES.clear()


def test_prefetch_order_errors_and_early_stop():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise CorruptTileError("x.svs", "boom", region=(0, 0, 1, 1))

    with pytest.raises(CorruptTileError, match="boom"):
        list(prefetch(failing()))

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for i in prefetch(endless(), depth=2):
        if i == 5:
            break
    assert closed.wait(5)


def test_prefetch_feeds_reader_in_background():
    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid, batch_size=8))
        got = list(prefetch(PatchReader(CMU, grid, batch_size=8, workers=2), depth=2))
    np.testing.assert_array_equal(np.concatenate([b.images for b in got]), want.images)


def test_tiffslide_backend_reads_directly_too():
    with open_slide(CMU, backend="tiffslide") as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        grid = shifted(grid, grid.coords[::5])
        reader = PatchReader(slide, grid)
        got = read_all(reader)
    assert reader.stats["mode"] == "direct"
    np.testing.assert_array_equal(got.images, openslide_patches(CMU, grid))


# ---------------------------------------------------------------------------------------------
# longer: the benchmark slide generator, and a Dask cluster


def _load_make_slide():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "make_slide.py"
    spec = importlib.util.spec_from_file_location("bench_make_slide", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generated_benchmark_slide_reads_exactly(tmp_path):
    make_slide = _load_make_slide().make_slide
    path = make_slide(
        tmp_path / "gen.svs", width=6000, height=4500, mpp=0.25, tissue_fraction=0.4, workers=1
    )
    with open_slide(path) as slide:
        assert slide.vendor == "aperio" and slide.mpp == pytest.approx(0.25)
        assert slide.level_downsamples == (1.0, 4.0) and slide.mpp_source == "vendor"
        for mpp in (0.25, 1.0):  # level 0 and level 1 (downsample 4)
            grid = make_grid(slide, None, patch_size=256, mpp=mpp, min_tissue=0.0)
            grid = shifted(grid, grid.coords[:: max(1, len(grid) // 60)])
            reader = PatchReader(slide, grid, workers=2)
            got = read_all(reader)
            assert reader.stats["mode"] == "direct"
            np.testing.assert_array_equal(got.images, openslide_patches(path, grid))
        level0 = openslide_patches(
            path, make_grid(slide, None, patch_size=1000, mpp=0.25, min_tissue=0.0)
        )
    glass = (level0.reshape(-1, 3).astype(int).max(axis=1) - level0.reshape(-1, 3).min(axis=1)) < 12
    assert 0.3 < glass.mean() < 0.9  # tissue islands on glass


@pytest.mark.cluster
def test_dask_array_on_distributed_processes():
    from distributed import Client, LocalCluster

    with open_slide(CMU) as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        want = read_all(PatchReader(slide, grid))
    arr = patches_dask_array(CMU, grid, chunk_size=20)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        got = client.compute(arr).result()
    np.testing.assert_array_equal(got, want.images)


@pytest.mark.slow
def test_tiling_benchmark_smoke_run():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "tiling.py"),
            "--quick",
            "--size",
            "4096x3072",
            "--sample",
            "20",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    for needle in (
        "decode limit",
        "naive openslide",
        "naive tiffslide",
        "slidepipe 2 workers",
        "slidepipe 1w / decode limit",
        "peak RSS",
        "logical cores",
    ):
        assert needle in out


def test_non_integer_downsample_level_gives_stored_pixels():
    """tcga level 1 reports downsample 2.0005 (odd sizes): patches are the stored level-1 pixels
    at x / 2 (OpenSlide would resample at a sub-pixel offset)."""
    path = REAL / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path, mpp=0.25) as slide:
        grid = make_grid(slide, None, patch_size=128, mpp=0.5, min_tissue=0.0)
        assert grid.read_level == 1 and not grid.needs_resize and grid.read_downsample != 2.0
        grid = shifted(grid, grid.coords[:: max(1, len(grid) // 25)])
        got = read_all(PatchReader(slide, grid))
    with tifffile.TiffFile(path) as tif:
        level1 = tif.series[0].levels[1].asarray()
    want = np.stack([level1[y // 2 : y // 2 + 128, x // 2 : x // 2 + 128] for x, y in grid.coords])
    np.testing.assert_array_equal(got.images, want)


def test_batched_reads_of_stored_bytes(tissue, tmp_path):
    """Stored tiles are read in runs (one pread per run of back-to-back tiles): each tile's bytes
    are exactly its own, and native aligned patches decoded from them equal per-tile decodes."""
    path = write_tiff(tmp_path / "runs.svs", tissue, aperio=True)
    with open_slide(path) as slide:
        grid = make_grid(slide, None, patch_size=256, mpp=slide.mpp, min_tissue=0.0)
        spec = ReadSpec.from_grid(path, grid)
        source = reader_mod._open_source(spec, slide)
        try:
            lv = source.lv
            keys = np.arange(lv.tiles_across * lv.tiles_down)
            spans = source.read_spans(keys[::-1])
            assert sorted(spans) == keys.tolist()
            for key in keys.tolist():
                ty, tx = divmod(key, lv.tiles_across)
                assert bytes(spans[key]) == source.tiles.tile_bytes(0, tx, ty)
        finally:
            source.close()
        one = read_all(PatchReader(slide, grid, batch_size=7, workers=2))
    for (x, y), img in zip(grid.coords, one.images, strict=True):
        with TiffTileSource.open(path, ((tissue.shape[1], tissue.shape[0]),)) as src:
            np.testing.assert_array_equal(img, src.decode(0, x // 256, y // 256))
