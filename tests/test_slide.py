"""wsi.slide: opening real and synthetic slides, the mpp chain, typed errors, region reads."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import downsample2
from PIL import Image

import wsi.slide as slide_mod
from wsi.errors import CorruptTileError, MissingMPPError, SlideOpenError, UnsupportedSlideError
from wsi.slide import file_identity, open_slide, resize_rgb, slide_id_for
from wsi.tiff_tiles import TiffTileSource

BACKENDS = ["openslide", "tiffslide"]


# --------------------------------------------------------------------------- real slides


REAL = {
    # name: (dimensions, level_count, mpp, mpp_source, backend under auto, vendor)
    "cmu-1-small-region.svs": ((2220, 2967), 1, 0.499, "vendor", "openslide", "aperio"),
    "tcga-cr-7395-01a-01-ts1.svs": ((4443, 3567), 2, None, None, "openslide", "aperio"),
    "kidney-48-5.tif": ((1493, 901), 1, None, None, "tiffslide", None),
    "tiny-aperio.svs": ((16, 16), 1, 0.499, "vendor", "openslide", "aperio"),
    "boxes-pyramid.tiff": ((300, 250), 4, None, None, "openslide", "generic-tiff"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_slide_metadata(real_slides_dir, name):
    dims, n_levels, mpp, source, backend, vendor = REAL[name]
    path = real_slides_dir / name
    with open_slide(path, require_mpp=False) as s:
        assert s.dimensions == dims
        assert s.level_count == n_levels == len(s.levels)
        assert s.levels[0].dimensions == dims
        assert s.backend == backend
        assert s.vendor == vendor
        assert s.mpp_source == source
        if mpp is None:
            assert s.mpp_x is None
        else:
            assert s.mpp == pytest.approx(mpp)
            assert [lv.mpp for lv in s.levels] == pytest.approx([mpp * d for d in s.level_downsamples])
        info = s.info()
        assert info["dimensions"] == list(dims) and info["backend"] == backend
    if mpp is None:
        with pytest.raises(MissingMPPError) as err:
            open_slide(path)
        assert name in str(err.value) and "--slide-mpp" in str(err.value)


@pytest.mark.parametrize("name", ["tcga-cr-7395-01a-01-ts1.svs", "kidney-48-5.tif", "boxes-pyramid.tiff"])
def test_real_slide_mpp_override(real_slides_dir, name):
    with open_slide(real_slides_dir / name, mpp=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert s.levels[-1].mpp == pytest.approx(0.25 * s.level_downsamples[-1])


def test_vendor_mpp_wins_over_override(real_slides_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="wsi.slide"), open_slide(
        real_slides_dir / "cmu-1-small-region.svs", mpp=0.25
    ) as s:
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "vendor"
    assert "not used" in caplog.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_reads_agree_across_backends(real_slides_dir, backend):
    """cmu-1 (JPEG) and the TCGA frozen section (JPEG 2000) decode identically with both backends."""
    for name, mpp in (("cmu-1-small-region.svs", None), ("tcga-cr-7395-01a-01-ts1.svs", 0.25)):
        with open_slide(real_slides_dir / name, mpp=mpp) as ref, open_slide(
            real_slides_dir / name, mpp=mpp, backend=backend
        ) as s:
            assert s.backend == backend
            a = ref.read_region((700, 900), 0, (200, 150))
            b = s.read_region((700, 900), 0, (200, 150))
            assert a.shape == b.shape == (150, 200, 3) and b.dtype == np.uint8
            assert b.flags.writeable and b.flags.c_contiguous
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
            assert b.std() > 10  # real tissue, not a blank fill


def test_kidney_needs_tiffslide(real_slides_dir):
    path = real_slides_dir / "kidney-48-5.tif"
    with pytest.raises(SlideOpenError) as err:
        open_slide(path, backend="openslide", mpp=1.0)
    assert "kidney-48-5.tif" in str(err.value) and "openslide:" in str(err.value)
    with open_slide(path, mpp=1.0) as s:
        assert s.backend == "tiffslide"
        thumb, mx, my = s.thumbnail_at_mpp(8.0)
        assert thumb.shape == (round(901 / 8), round(1493 / 8), 3)
        assert mx == pytest.approx(8.0, rel=0.01) and my == pytest.approx(8.0, rel=0.01)


def test_tiny_slide_reads_white_outside(real_slides_dir):
    with open_slide(real_slides_dir / "tiny-aperio.svs") as s:
        r = s.read_region((8, 8), 0, (32, 32))
        assert r.shape == (32, 32, 3)
        assert (r[8:, :] == 255).all() and (r[:, 8:] == 255).all()


# --------------------------------------------------------------------------- bad slides


BAD = {
    "broken.svs": (SlideOpenError, "no backend could open"),
    "unopenable.tiff": (SlideOpenError, "compression 52479"),
    "small_dicom.dcm": (SlideOpenError, "no backend could open"),
    "small_vectra.qptiff": (UnsupportedSlideError, "fluorescence"),
    "uint16-grayscale.tif": (UnsupportedSlideError, "16-bit single-channel"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_slide_typed_error(bad_slides_dir, name):
    err_type, phrase = BAD[name]
    with pytest.raises(err_type) as err:
        open_slide(bad_slides_dir / name, mpp=0.5)
    msg = str(err.value)
    assert type(err.value) is err_type
    assert name in msg and phrase in msg and "Fix:" in msg
    assert err.value.path.name == name


def test_open_error_lists_and_chains_every_backend(bad_slides_dir):
    with pytest.raises(SlideOpenError) as err:
        open_slide(bad_slides_dir / "broken.svs")
    assert "openslide:" in str(err.value) and "tiffslide:" in str(err.value)
    first = err.value.__cause__
    assert type(first).__module__.startswith("openslide")
    assert first.__cause__ is not None and "TIFF" in str(first.__cause__)


def test_corrupt_tile_names_slide_and_region(bad_slides_dir):
    path = bad_slides_dir / "unreadable.svs"
    with open_slide(path) as s:  # opens fine: the header is valid
        assert s.mpp == pytest.approx(0.499)
        for _ in range(2):  # the handle is reopened after a failure: same typed error again
            with pytest.raises(CorruptTileError) as err:
                s.read_region((0, 0), 0, (16, 16))
            assert "unreadable.svs" in str(err.value)
            assert err.value.region == (0, 0, 16, 16)
            assert "x=0 y=0 w=16 h=16" in str(err.value)
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, CorruptTileError) and again.region == (0, 0, 16, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_synthetic_tile_then_reads_go_on(corrupt_slide, backend):
    with open_slide(corrupt_slide, backend=backend) as s:
        with pytest.raises(CorruptTileError) as err:
            s.read_region((100, 100), 0, (50, 50))
        assert "corrupt.svs" in str(err.value) and err.value.region == (100, 100, 50, 50)
        good = s.read_region((256, 0), 0, (64, 64))  # the handle still works after the failure
        assert good.std() > 0
        assert s.thumbnail_at_mpp(8.0)[0].shape == (96, 128, 3)  # coarse levels are intact


def test_poisoned_openslide_handle_is_reopened_and_read_retried(aperio_pyramid):
    """openslide poisons a handle on any error (maybe another thread's corrupt tile): a good
    region read on a poisoned handle is retried on a fresh one instead of being called corrupt."""
    import openslide

    with open_slide(aperio_pyramid.path, backend="openslide") as s:
        expected = s.read_region((64, 64), 0, (32, 32))
        poisoned = s._handle

        class Poisoned:
            def read_region(self, *args):
                raise openslide.OpenSlideError("Bogus marker length (another thread)")

        s._handle = Poisoned()
        np.testing.assert_array_equal(s.read_region((64, 64), 0, (32, 32)), expected)
        assert s._handle is not poisoned and not isinstance(s._handle, Poisoned)
        poisoned.close()


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(ValueError, match="backend"):
        open_slide(tmp_path, backend="bioformats")  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", ["uint16_rgb_tiff", "gray8_tiff", "multichannel_tiff"])
def test_synthetic_non_brightfield_rejected(request, fixture):
    path = request.getfixturevalue(fixture)
    with pytest.raises(UnsupportedSlideError) as err:
        open_slide(path, mpp=0.5)
    assert path.name in str(err.value) and "brightfield" in str(err.value)


# --------------------------------------------------------------------------- mpp chain


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_from_vendor_metadata(aperio_pyramid, backend):
    with open_slide(aperio_pyramid.path, backend=backend) as s:
        assert s.vendor == "aperio" and s.mpp_source == "vendor"
        assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))
        assert [lv.mpp for lv in s.levels] == pytest.approx([0.25, 0.5, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_from_resolution_tags(resolution_pyramid, backend):
    with open_slide(resolution_pyramid.path, backend=backend, mpp=0.3) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "tiff-resolution"


@pytest.mark.parametrize("fixture", ["no_mpp_pyramid", "screen_dpi_pyramid", "aperio_no_mpp"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_mpp(request, fixture, backend):
    syn = request.getfixturevalue(fixture)
    with pytest.raises(MissingMPPError) as err:
        open_slide(syn.path, backend=backend)
    assert syn.path.name in str(err.value) and "--slide-mpp" in str(err.value)
    with open_slide(syn.path, backend=backend, mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "override"
    with open_slide(syn.path, backend=backend, require_mpp=False) as s:
        assert s.mpp_x is None and s.mpp_source is None
        with pytest.raises(MissingMPPError):
            s.read_region_mpp((0, 0), (8, 8), 1.0)


# --------------------------------------------------------------------------- reads


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_is_exact_on_lossless_pyramid(resolution_pyramid, backend):
    truth0 = resolution_pyramid.image
    truth1 = downsample2(truth0)
    with open_slide(resolution_pyramid.path, backend=backend) as s:
        np.testing.assert_array_equal(s.read_region((96, 40), 0, (200, 120)), truth0[40:160, 96:296])
        np.testing.assert_array_equal(s.read_region((96, 40), 1, (100, 60)), truth1[20:80, 48:148])


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_pads_white_outside(resolution_pyramid, backend):
    truth = resolution_pyramid.image
    with open_slide(resolution_pyramid.path, backend=backend) as s:
        r = s.read_region((600, -10), 0, (64, 32))  # 40 px inside on the right, 10 rows above
        np.testing.assert_array_equal(r[10:, :40], truth[:22, 600:640])
        assert (r[:10] == 255).all() and (r[:, 40:] == 255).all()
        assert (s.read_region((5000, 5000), 0, (8, 8)) == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_composited_on_white(rgba_slide, backend):
    with open_slide(rgba_slide.path, backend=backend) as s:
        r = s.read_region((0, 0), 0, (256, 128))
        assert r.shape == (128, 256, 3)
        np.testing.assert_array_equal(r[:, :128], rgba_slide.image[:, :128])
        assert (r[:, 128:] == 255).all()


def test_best_level_for_mpp(aperio_pyramid):
    with open_slide(aperio_pyramid.path) as s:
        expect = {0.1: 0, 0.25: 0, 0.26: 0, 0.48: 1, 0.5: 1, 0.7: 1, 1.0: 2, 1.04: 2, 8.0: 2}
        assert {m: s.best_level_for_mpp(m) for m in expect} == expect
        assert s.best_level_for_mpp(0.48, tolerance=0.0) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_mpp_level_and_resize(aperio_pyramid, backend):
    truth = aperio_pyramid.image
    with open_slide(aperio_pyramid.path, backend=backend) as s:
        # 0.5 µm/px is level 1 exactly: read as is
        np.testing.assert_array_equal(
            s.read_region_mpp((200, 100), (64, 48), 0.5), s.read_region((200, 100), 1, (64, 48))
        )
        # 0.7 µm/px: level 1 (0.5) resized by 1.4
        out = s.read_region_mpp((200, 100), (100, 80), 0.7)
        assert out.shape == (80, 100, 3)
        ref = resize_rgb(truth[100 : 100 + 224, 200 : 200 + 280], (100, 80))
        assert np.abs(out.astype(int) - ref.astype(int)).mean() < 3


def test_read_region_mpp_is_antialiased(stripes_slide):
    with open_slide(stripes_slide.path) as s:
        out = s.read_region_mpp((0, 0), (64, 32), 1.0)  # 4x down from 1-px stripes
    assert out.shape == (32, 64, 3)
    assert abs(float(out.mean()) - 127.5) < 3 and out[:, 2:-2].std() < 3
    naive = stripes_slide.image[:128:4, :256:4]  # point sampling aliases to flat white
    assert naive.std() == 0 and naive.mean() == 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_uses_coarse_level(aperio_pyramid, backend, monkeypatch):
    with open_slide(aperio_pyramid.path, backend=backend) as s:
        levels_read = []
        orig = s.read_region

        def spy(location, level, size):
            levels_read.append(level)
            return orig(location, level, size)

        monkeypatch.setattr(s, "read_region", spy)
        thumb, mx, my = s.thumbnail_at_mpp(2.0)
        assert thumb.shape == (96, 128, 3) and mx == pytest.approx(2.0) and my == pytest.approx(2.0)
        assert set(levels_read) == {2}
        levels_read.clear()
        fine, mx, _ = s.thumbnail_at_mpp(0.6)
        assert set(levels_read) == {1} and mx == pytest.approx(0.6, rel=0.01)
        assert fine.shape == (320, 427, 3)
    ref = np.asarray(Image.fromarray(aperio_pyramid.image).resize((128, 96), Image.Resampling.BOX))
    assert np.abs(thumb.astype(int) - ref.astype(int)).mean() < 3


def test_thumbnail_band_reading_matches_whole(resolution_pyramid, monkeypatch):
    """Through the backend, the thumbnail level is read in full-width bands, each reduced; the
    result equals one read (and the direct stored-tile path)."""
    with open_slide(resolution_pyramid.path) as s:
        direct, *_ = s.thumbnail_at_mpp(4.0)
        monkeypatch.setattr(slide_mod, "_DIRECT_THUMBNAIL", False)
        whole, *_ = s.thumbnail_at_mpp(4.0)  # level 2 (2.0 µm/px, 160 x 128), factor 2
        np.testing.assert_array_equal(direct, whole)
        monkeypatch.setattr(slide_mod, "_BAND_BYTES", 160 * 3 * 9)  # 9 rows -> bands of 8
        sizes = []
        orig = s.read_region

        def spy(location, level, size):
            sizes.append(size)
            return orig(location, level, size)

        monkeypatch.setattr(s, "read_region", spy)
        banded, mx, my = s.thumbnail_at_mpp(4.0)
    assert sizes == [(160, 8)] * 16
    np.testing.assert_array_equal(banded, whole)
    assert banded.shape == (64, 80, 3) and mx == pytest.approx(4.0) and my == pytest.approx(4.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mpp", [1.2, 2.0, 8.0])
def test_thumbnail_from_stored_tiles_matches_backend(aperio_pyramid, backend, mpp, monkeypatch):
    """Thumbnails decoded from stored tiles (2 threads, each tile reduced) equal the backend's
    band reads (partial edge tiles included)."""
    with open_slide(aperio_pyramid.path, backend=backend) as s:
        calls = []
        orig = s.read_region

        def spy(location, level, size):
            calls.append(size)
            return orig(location, level, size)

        monkeypatch.setattr(s, "read_region", spy)
        reduced = []
        orig_reduce = TiffTileSource.read_level_reduced

        def spy_reduce(self, level, factor, **kw):
            reduced.append((level, factor))
            return orig_reduce(self, level, factor, **kw)

        monkeypatch.setattr(TiffTileSource, "read_level_reduced", spy_reduce)
        direct, dx, dy = s.thumbnail_at_mpp(mpp)
        assert len(reduced) == 1 and len(calls) == 1  # one first-tile check against the backend
        monkeypatch.setattr(slide_mod, "_DIRECT_THUMBNAIL", False)
        banded, bx, by = s.thumbnail_at_mpp(mpp)
    assert direct.shape == banded.shape and (dx, dy) == (bx, by)
    diff = np.abs(direct.astype(int) - banded.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


# --------------------------------------------------------------------------- identity, ids, misc


def test_identity_changes_with_content(resolution_pyramid, tmp_path):
    copy = tmp_path / "copy.tiff"
    shutil.copy(resolution_pyramid.path, copy)
    with open_slide(copy) as s:
        ident = s.identity()
    assert set(ident) == {"path", "size", "mtime", "quick_hash"}
    assert ident == file_identity(copy) and ident["quick_hash"].startswith("sha256:")
    with copy.open("ab") as f:
        f.write(b"\0")
    assert file_identity(copy)["quick_hash"] != ident["quick_hash"]


@pytest.mark.parametrize(
    ("name", "sid"),
    [("a.b.svs", "a.b"), ("X.SVS", "X"), ("case.ome.tiff", "case"), ("k.tif", "k"), ("plain", "plain")],
)
def test_slide_id_for(name, sid):
    assert slide_id_for(f"/data/{name}") == sid


def test_slide_pickles_by_reopening(aperio_pyramid):
    with open_slide(aperio_pyramid.path, backend="tiffslide") as s, pickle.loads(pickle.dumps(s)) as t:
        assert t.backend == "tiffslide" and t.mpp == s.mpp
        np.testing.assert_array_equal(t.read_region((0, 0), 1, (16, 16)), s.read_region((0, 0), 1, (16, 16)))


def test_closed_slide_raises(aperio_pyramid):
    s = open_slide(aperio_pyramid.path)
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.read_region((0, 0), 0, (4, 4))


def test_wsi_does_not_import_torch():
    code = "import sys, wsi.slide, wsi.tiling; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
