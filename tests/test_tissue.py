"""Tissue detection on real slides, pen-ink thumbnails and synthetic images (wsi/tissue.py).

Assumed resolutions of the PNG thumbnails (they carry none): the TCGA green/red pen crops and
the lung crop show single nuclei and fat cells, so about 2 µm/px (0.5 µm/px for the lung crop,
whose nuclei are ~20 px); the whole-slide thumbnails (blue pen, diagnostic slide) 8 µm/px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import polygon as draw_polygon
from skimage.filters import threshold_otsu
from skimage.measure import label
from skimage.morphology import disk

from wsi import tissue as T
from wsi.slide import open_slide
from wsi.tissue import TissueMask, detect_tissue

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "slides" / "real"
THUMBS = SHARED / "thumbnails"

needs_shared = pytest.mark.skipif(not REAL.is_dir(), reason="../shared test slides not present")


def _thumb(name: str) -> np.ndarray:
    with Image.open(THUMBS / f"{name}.png") as im:
        return np.asarray(im.convert("RGB"))


def _rasterise(tm: TissueMask) -> np.ndarray:
    """Draw the GeoJSON polygons (level-0 px) back onto the mask grid."""
    h, w = tm.mask.shape
    sx, sy = tm.scale
    out = np.zeros((h, w), bool)
    for feature in tm.to_geojson()["features"]:
        geom = feature["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polys:
            poly = np.zeros((h, w), bool)
            for i, ring in enumerate(rings):
                xy = np.asarray(ring, dtype=float)
                rr, cc = draw_polygon(xy[:, 1] / sy - 0.5, xy[:, 0] / sx - 0.5, shape=(h, w))
                poly[rr, cc] = i == 0
            out |= poly
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _level0_mask_pixels(tm: TissueMask) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (x, y) of the centre of every mask pixel that is tissue."""
    rows, cols = np.nonzero(tm.mask)
    return (cols + 0.5) * tm.scale[0], (rows + 0.5) * tm.scale[1]


# ---------------------------------------------------------------- kernels against skimage


def test_morphology_matches_skimage_disk():
    rng = np.random.default_rng(0)
    m = (rng.random((60, 80)) > 0.8).astype(np.uint8)
    for r in (1, 2, 3, 5):
        ref_d = ndi.binary_dilation(m.astype(bool), structure=disk(r))
        assert np.array_equal(T._dilate(m, r).astype(bool), ref_d)
        # erosion: pixels outside the image count as foreground
        ref_e = ndi.binary_erosion(m.astype(bool), structure=disk(r), border_value=1)
        assert np.array_equal(T._erode(m, r).astype(bool), ref_e)


def test_labelling_hole_filling_and_size_filter_match_skimage():
    rng = np.random.default_rng(1)
    m = (rng.random((70, 90)) > 0.55).astype(np.uint8)
    lab8 = label(m.astype(bool), connectivity=2)
    sizes = np.bincount(lab8.ravel())
    sizes[0] = 0
    ref = sizes[lab8] >= 6
    assert np.array_equal(T._remove_small(m, 6.0).astype(bool), ref)
    # holes: background 4-components off the border smaller than the limit become foreground
    bg = label(~m.astype(bool), connectivity=1)
    border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    bsizes = np.bincount(bg.ravel())
    small = (bsizes < 5) & ~np.isin(np.arange(len(bsizes)), border)
    small[0] = False
    ref_fill = m.astype(bool) | small[bg]
    assert np.array_equal(T._fill_holes(m, 5.0).astype(bool), ref_fill)


def test_otsu_matches_skimage():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(0.05, 0.02, 5000), rng.normal(0.4, 0.08, 3000)])
    v = np.clip(v, 0, 1).astype(np.float32).reshape(80, 100)
    none = np.zeros(v.shape, np.uint8)
    ours = T._otsu(v, none, none, 256)
    assert abs(ours - threshold_otsu(v, nbins=256)) < 0.02


# ---------------------------------------------------------------- synthetic images


def test_white_and_noisy_glass_give_empty_mask():
    white = np.full((300, 400, 3), 255, np.uint8)
    tm = detect_tissue(white, mpp=8.0)
    assert tm.mask.shape == (300, 400) and tm.fraction == 0.0
    assert tm.to_geojson() == {"type": "FeatureCollection", "features": []}
    rng = np.random.default_rng(3)
    glass = np.clip(rng.normal(236, 3, (300, 400, 3)), 0, 255).astype(np.uint8)
    assert detect_tissue(glass, mpp=8.0).fraction == 0.0


def test_uneven_tinted_glass_keeps_only_the_tissue():
    """An illumination gradient with a yellow tint, a grey smudge, dust, and one pale pink
    tissue blob: only the blob is tissue."""
    h, w = 400, 600
    yy, xx = np.mgrid[0:h, 0:w]
    shade = 1.0 - 0.15 * xx / w  # 15 % darker to the right
    glass = np.stack([250 * shade, 247 * shade, 238 * shade], axis=-1)  # yellowish, uneven
    img = glass.copy()
    smudge = (yy - 100) ** 2 + (xx - 450) ** 2 < 40**2
    img[smudge] *= 0.93  # grey smudge
    img[(yy - 300) ** 2 + (xx - 500) ** 2 < 3**2] = 20  # a dust speck
    blob = (yy - 220) ** 2 / 70**2 + (xx - 200) ** 2 / 110**2 < 1
    img[blob] = glass[blob] * np.array([0.92, 0.72, 0.85])  # pale H&E pink
    tm = detect_tissue(img.clip(0, 255).astype(np.uint8), mpp=8.0)
    assert _iou(tm.mask, blob) > 0.9
    assert not tm.mask[smudge].any()


def test_array_needs_mpp_and_rgb():
    with pytest.raises(ValueError, match="mpp"):
        detect_tissue(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        detect_tissue(np.zeros((10, 10), np.float32), mpp=8.0)


def test_fine_array_is_reduced_and_scale_maps_to_level0():
    img = np.full((2000, 3000, 3), 245, np.uint8)
    img[500:1500, 1000:2000] = (200, 120, 170)
    tm = detect_tissue(img, mpp=0.5)  # 1.5 x 1 mm; analysed at 1.5 mm / 1024 px ≈ 1.46 µm/px
    assert tm.mask.shape[1] < 3000 and tm.mpp > 0.5
    x0, y0 = _level0_mask_pixels(tm)
    assert x0.min() >= 990 and x0.max() <= 2010 and y0.min() >= 490 and y0.max() <= 1510
    assert abs(tm.area_mm2 - 0.25) < 0.02  # 1000 x 1000 px at 0.5 µm


# ---------------------------------------------------------------- pen ink thumbnails


def _strong_ink(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Independent, deliberately simple colour rules for unmistakable ink pixels."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return {
        "green": (g - r >= 25) & (g >= b - 40),
        "blue": (b - r >= 60) & (b - g >= 20),
        "red": (r >= 150) & (g <= 60) & (b <= 90),
        "black": rgb.max(axis=2) <= 60,
    }


def _stained(rgb: np.ndarray) -> np.ndarray:
    """Clear H&E pink/purple pixels (not red ink)."""
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r - g >= 40) & (b - g >= 15) & (rgb.max(axis=2) > 100) & ~((g <= 60) & (b <= 90))


PEN_CASES = [
    # name, assumed mpp, ink colours to check, plausible tissue fraction, min stained recall
    ("tcga-green-pen", 2.0, ("green",), (0.6, 0.9), 0.95),
    ("tcga-red-pen", 2.0, ("red",), (0.4, 0.75), 0.85),
    ("wsi-blue-pen", 8.0, ("blue",), (0.15, 0.5), 0.95),
    ("diagnostic-slide-thumb-rgb", 8.0, ("red", "green", "black"), (0.25, 0.6), 0.7),
]


@needs_shared
@pytest.mark.parametrize(
    ("name", "mpp", "colours", "fraction", "recall"), PEN_CASES, ids=[c[0] for c in PEN_CASES]
)
def test_pen_ink_is_excluded(name, mpp, colours, fraction, recall):
    rgb = _thumb(name)
    tm = detect_tissue(rgb, mpp=mpp)
    assert tm.mask.shape == rgb.shape[:2]
    ink = _strong_ink(rgb)
    for colour in colours:
        px = ink[colour]
        assert px.sum() > 300, f"reference rule found too little {colour} ink"
        inside = (px & tm.mask).sum() / px.sum()
        assert inside <= 0.05, f"{inside:.1%} of strong {colour} ink pixels are in the tissue mask"
    assert fraction[0] <= tm.fraction <= fraction[1]
    stained = _stained(rgb)
    assert (stained & tm.mask).sum() / stained.sum() >= recall  # tissue is kept
    # with pen removal off, the ink-covered tissue comes back
    if name in ("tcga-green-pen", "tcga-red-pen"):
        assert detect_tissue(rgb, mpp=mpp, remove_pen=False).fraction > tm.fraction + 0.08


@needs_shared
def test_pen_ink_mask_covers_the_blue_strokes_only():
    rgb = _thumb("wsi-blue-pen")
    ink = T.pen_ink_mask(rgb, 8.0)
    blue = _strong_ink(rgb)["blue"]
    assert (ink & blue).sum() / blue.sum() >= 0.95
    assert ink.mean() < 0.1
    stained = _stained(rgb)
    assert (ink & stained).sum() <= 0.01 * stained.sum()  # only the rim next to a stroke


@needs_shared
def test_all_tissue_lung_crop():
    rgb = _thumb("tcga-lung-rgb")
    tm = detect_tissue(rgb, mpp=0.5)
    assert tm.fraction > 0.7
    assert (_stained(rgb) & tm.mask).sum() / _stained(rgb).sum() > 0.95


# ---------------------------------------------------------------- real slides


@needs_shared
def test_cmu_he_with_holes():
    with open_slide(REAL / "cmu-1-small-region.svs") as slide:
        tm = detect_tissue(slide)
        dims = slide.dimensions
    assert tm.slide_dimensions == dims
    assert 0.25 <= tm.fraction <= 0.60
    assert tm.scale[0] == pytest.approx(dims[0] / tm.mask.shape[1])
    polys = tm.polygons()
    assert sum(len(rings) - 1 for rings in polys) >= 1  # the white hole in the upper dermis is kept
    assert tm.thumbnail is not None and tm.thumbnail.shape[:2] == tm.mask.shape


@needs_shared
def test_kidney_keeps_only_the_fragment():
    with open_slide(REAL / "kidney-48-5.tif", mpp=0.5) as slide:
        tm = detect_tissue(slide)
    # the slide is 0.75 x 0.45 mm at the assumed 0.5 µm/px: analysed finer than 8 µm/px
    assert tm.mpp < 1.0 and max(tm.mask.shape) >= 1000
    n_components = label(tm.mask, connectivity=2).max()
    assert 1 <= n_components <= 2
    # the fragment occupies level-0 x 284..401, y 503..568 (found by eye and a darkness map)
    x0, y0 = _level0_mask_pixels(tm)
    assert x0.min() >= 270 and x0.max() <= 415 and y0.min() >= 490 and y0.max() <= 580
    area_px0 = tm.mask.sum() * tm.scale[0] * tm.scale[1]
    assert 3000 <= area_px0 <= 7600  # the fragment's outline encloses ~4-6k level-0 px
    # dust specks and smudges, level-0 boxes (x0, y0, x1, y1): none may be tissue
    dust = [
        (249, 200, 288, 223),  # curved grey smudge
        (1133, 127, 1242, 190),  # grey smudges, top right
        (852, 43, 908, 88),
        (1414, 82, 1450, 124),
        (775, 137, 779, 142),  # dark dust specks
        (1144, 516, 1148, 521),
        (1162, 102, 1166, 105),
        (1367, 891, 1370, 894),
    ]
    sx, sy = tm.scale
    for bx0, by0, bx1, by1 in dust:
        r0, r1 = int(by0 // sy), int(np.ceil(by1 / sy))
        c0, c1 = int(bx0 // sx), int(np.ceil(bx1 / sx))
        assert not tm.mask[r0:r1, c0:c1].any(), (
            f"dust/smudge at {(bx0, by0, bx1, by1)} is in the mask"
        )


@needs_shared
def test_frozen_section_jpeg2000_is_mostly_tissue():
    with open_slide(REAL / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as slide:
        tm = detect_tissue(slide)
    assert 0.5 <= tm.fraction <= 0.8
    assert label(tm.mask, connectivity=2).max() <= 5
    # the tinted scanner-tile background below the tissue (level-0 ~ x 600..1000, y 3450..3560) is glass
    sx, sy = tm.scale
    assert not tm.mask[int(3450 / sy) : int(3560 / sy), int(600 / sx) : int(1000 / sx)].any()


@needs_shared
@pytest.mark.parametrize(("name", "mpp"), [("boxes-pyramid.tiff", 0.5), ("tiny-aperio.svs", None)])
def test_no_tissue_slides_give_empty_mask(name, mpp):
    with open_slide(REAL / name, mpp=mpp) as slide:
        tm = detect_tissue(slide)
    assert tm.fraction == 0.0
    assert tm.to_geojson()["features"] == []


# ---------------------------------------------------------------- GeoJSON and overlay


@needs_shared
def test_geojson_round_trip_level0(tmp_path):
    with open_slide(REAL / "cmu-1-small-region.svs") as slide:
        tm = detect_tissue(slide)
        w0, h0 = slide.dimensions
    gj = tm.to_geojson()
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 1
    feat = gj["features"][0]
    assert feat["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert feat["properties"]["objectType"] == "annotation"
    assert feat["properties"]["classification"]["name"] == "Tissue"
    coords = np.concatenate([np.asarray(ring) for rings in tm.polygons() for ring in rings])
    assert coords[:, 0].min() >= 0 and coords[:, 0].max() <= w0
    assert coords[:, 1].min() >= 0 and coords[:, 1].max() <= h0
    assert coords[:, 0].max() > 0.5 * w0  # level-0 pixels, not mask pixels
    assert _iou(_rasterise(tm), tm.mask) >= 0.9
    path = tm.save_geojson(tmp_path / "cmu.geojson")
    assert json.loads(path.read_text()) == json.loads(json.dumps(gj))


@needs_shared
def test_geojson_round_trip_with_holes_and_islands():
    tm = detect_tissue(_thumb("diagnostic-slide-thumb-rgb"), mpp=8.0)
    polys = tm.polygons()
    assert len(polys) > 5 and sum(len(r) - 1 for r in polys) > 5  # islands inside ink rings, holes
    assert _iou(_rasterise(tm), tm.mask) >= 0.9


@needs_shared
def test_overlay_png_with_grid(tmp_path):
    from wsi.tiling import make_grid

    with open_slide(REAL / "cmu-1-small-region.svs") as slide:
        tm = detect_tissue(slide)
        grid = make_grid(slide, tm, patch_size=256, mpp=0.5, min_tissue=0.5)
    assert len(grid) > 10
    with Image.open(tm.save_overlay(tmp_path / "plain.png")) as im:
        plain = np.asarray(im.convert("RGB"))
    with Image.open(tm.save_overlay(tmp_path / "grid.png", grid=grid)) as im:
        gridded = np.asarray(im.convert("RGB"))
    assert plain.shape == gridded.shape and plain.shape[:2] == tm.mask.shape
    contour = (plain[..., 1] >= 190) & (plain[..., 0] <= 20) & (plain[..., 2] <= 20)
    assert contour.sum() > 500  # green contour lines are drawn
    boxes = (gridded[..., 2] >= 200) & (gridded[..., 0] <= 80) & ~contour
    assert boxes.sum() > 1000  # blue patch boxes are drawn


def test_overlay_without_thumbnail(tmp_path):
    mask = np.zeros((40, 60), bool)
    mask[10:30, 15:45] = True
    tm = TissueMask(mask=mask, mpp=8.0, scale=(16.0, 16.0), slide_dimensions=(960, 640))
    with Image.open(tm.save_overlay(tmp_path / "o.png")) as img:
        assert img.size[0] >= 60 and img.mode == "RGB"
