"""wsi.tiling: exact tissue fractions from the summed-area table, grid geometry, level choice."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from wsi.slide import open_slide
from wsi.tiling import TileGrid, box_fractions, make_grid, summed_area_table


def _exact_fraction(mask: np.ndarray, scale: tuple[float, float], box) -> float:
    """Reference: sum, over every mask pixel, of its overlap area with the box (independent of SAT)."""
    sx, sy = scale
    x, y, w, h = box
    total = 0.0
    for j, i in zip(*np.nonzero(mask), strict=True):
        ox = max(0.0, min(x + w, (i + 1) * sx) - max(x, i * sx))
        oy = max(0.0, min(y + h, (j + 1) * sy) - max(y, j * sy))
        total += ox * oy
    return total / (w * h)


def test_summed_area_table():
    m = np.random.default_rng(0).random((7, 9)) > 0.5
    sat = summed_area_table(m)
    assert sat.shape == (8, 10)
    for j in range(8):
        for i in range(10):
            assert sat[j, i] == m[:j, :i].sum()


def test_box_fractions_exact_with_fractional_scale():
    rng = np.random.default_rng(1)
    mask = rng.random((29, 37)) > 0.6
    scale = (7.3, 5.1)  # level-0 px per mask px, deliberately not integers
    boxes = np.column_stack(
        [rng.integers(-20, 260, 60), rng.integers(-20, 140, 60), rng.integers(1, 90, 60), rng.integers(1, 90, 60)]
    )
    got = box_fractions(mask, scale, boxes)
    want = np.array([_exact_fraction(mask, scale, b) for b in boxes])
    np.testing.assert_allclose(got, want, atol=1e-9)


def test_box_fractions_simple_cases():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    boxes = np.array([[0, 0, 40, 40], [10, 10, 20, 20], [5, 5, 10, 10], [15, 15, 10, 10], [35, 35, 10, 10], [50, 0, 10, 10]])
    np.testing.assert_allclose(box_fractions(m, (10, 10), boxes), [0.25, 1, 0.25, 1, 0, 0])
    assert box_fractions(m, (10, 10), np.zeros((0, 4))).shape == (0,)


@dataclass
class FakeMask:
    """What make_grid needs of a TissueMask: the boolean mask and level-0 px per mask px."""

    mask: np.ndarray
    scale: tuple[float, float]


def test_grid_level_choice_and_geometry(aperio_pyramid):
    with open_slide(aperio_pyramid.path) as s:  # 1024x768 at 0.25, levels 0.25 / 0.5 / 1.0
        g = make_grid(s, None, patch_size=64, mpp=0.5, min_tissue=0.0)
        assert (g.read_level, g.needs_resize, g.patch_size_read, g.patch_size_level0) == (1, False, 64, 128)
        assert g.effective_mpp == pytest.approx(0.5) and g.slide_mpp == pytest.approx(0.25)
        assert len(g) == 8 * 6 and g.coords.dtype == np.int64 and g.tissue.dtype == np.float32
        assert g.coords[:9].tolist() == [[x, 0] for x in range(0, 1024, 128)] + [[0, 128]]

        g = make_grid(s, None, patch_size=64, mpp=0.7, min_tissue=0.0)  # between levels: resize
        assert (g.read_level, g.needs_resize, g.patch_size_read) == (1, True, 90)
        assert g.effective_mpp == pytest.approx(90 * 0.5 / 64)
        assert g.patch_size_level0 == 180 and g.stride_level0 == 180

        g = make_grid(s, None, patch_size=64, mpp=1.04, min_tissue=0.0)  # within 5 %: as is
        assert (g.read_level, g.needs_resize, g.patch_size_level0) == (2, False, 256)

        g = make_grid(s, None, patch_size=64, mpp=0.1, min_tissue=0.0)  # finer than level 0: upsample
        assert (g.read_level, g.needs_resize, g.patch_size_read) == (0, True, 26)


def test_grid_overlap_and_order(aperio_pyramid):
    with open_slide(aperio_pyramid.path) as s:
        g = make_grid(s, None, patch_size=64, mpp=0.5, overlap=16, min_tissue=0.0)
        assert g.stride_level0 == 96 and g.patch_size_level0 == 128
        xs = sorted(set(g.coords[:, 0].tolist()))
        assert xs == list(range(0, 1024 - 128 + 1, 96))
        assert (g.coords[:, 0] + 128 <= 1024).all() and (g.coords[:, 1] + 128 <= 768).all()
        order = np.lexsort((g.coords[:, 0], g.coords[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(g)))  # row-major
        again = make_grid(s, None, patch_size=64, mpp=0.5, overlap=16, min_tissue=0.0)
        np.testing.assert_array_equal(again.coords, g.coords)
        with pytest.raises(ValueError, match="overlap"):
            make_grid(s, None, patch_size=64, overlap=64)


def test_grid_tissue_filter(aperio_pyramid):
    mask = np.zeros((48, 64), bool)  # 16 level-0 px per mask px over 1024x768
    mask[:, :20] = True  # tissue covers x < 320
    with open_slide(aperio_pyramid.path) as s:
        all_ = make_grid(s, FakeMask(mask, (16.0, 16.0)), patch_size=64, mpp=0.5, min_tissue=0.0)
        frac = dict(zip(all_.coords[:, 0].tolist(), all_.tissue.tolist(), strict=False))
        assert frac[0] == 1.0 and frac[128] == 1.0 and frac[256] == pytest.approx(0.5) and frac[384] == 0.0
        kept = make_grid(s, FakeMask(mask, (16.0, 16.0)), patch_size=64, mpp=0.5, min_tissue=0.5)
        assert sorted(set(kept.coords[:, 0].tolist())) == [0, 128, 256] and len(kept) == 3 * 6
        strict = make_grid(s, mask, patch_size=64, mpp=0.5, min_tissue=0.75)  # bare array: scale inferred
        assert sorted(set(strict.coords[:, 0].tolist())) == [0, 128]
        empty = make_grid(s, np.zeros_like(mask), patch_size=64, mpp=0.5, min_tissue=0.5)
        assert len(empty) == 0 and empty.coords.shape == (0, 2)


def test_grid_attrs_are_json(aperio_pyramid):
    with open_slide(aperio_pyramid.path) as s:
        g = make_grid(s, None, patch_size=64, mpp=0.7)
    attrs = json.loads(json.dumps(g.to_attrs()))
    assert attrs["n_patches"] == len(g) and attrs["read_level"] == 1 and attrs["needs_resize"] is True
    assert isinstance(g, TileGrid)


def test_slide_smaller_than_patch_gives_zero(real_slides_dir):
    with open_slide(real_slides_dir / "tiny-aperio.svs") as s:
        g = make_grid(s, None, patch_size=256, mpp=0.5, min_tissue=0.0)
    assert len(g) == 0 and g.coords.shape == (0, 2) and g.tissue.shape == (0,)


@pytest.mark.parametrize(
    ("name", "slide_mpp", "n_all", "level"),
    [
        ("cmu-1-small-region.svs", None, 8 * 11, 0),  # 2220x2967 at 0.499: read as is
        ("tcga-cr-7395-01a-01-ts1.svs", 0.25, 8 * 6, 1),  # level 1 is ~0.5 µm/px
        ("kidney-48-5.tif", 1.0, 11 * 7, 0),  # 1 µm/px: upsampled, 128 level-0 px per patch
        ("boxes-pyramid.tiff", 0.5, 0, 0),  # 300x250: smaller than a patch
    ],
)
def test_real_slide_grid_counts(real_slides_dir, name, slide_mpp, n_all, level):
    with open_slide(real_slides_dir / name, mpp=slide_mpp) as s:
        g = make_grid(s, None, patch_size=256, mpp=0.5, min_tissue=0.0)
        assert len(g) == n_all and g.read_level == level
        c = g.coords
        assert (c[:, 0] + g.patch_size_level0 <= s.dimensions[0]).all()
        assert (c[:, 1] + g.patch_size_level0 <= s.dimensions[1]).all()
