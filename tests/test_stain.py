"""Stain normalisation on real patches: torchstain agreement, moving TCGA stains to a CMU
reference, JSON round trips, pen/white passthrough, Numba vs torch, typed errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from PIL import Image

from wsi import stain_kernels as K
from wsi.errors import StainError
from wsi.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    StainNormalizer,
    VahadaneNormalizer,
    create_normalizer,
    load_normalizer,
)

openslide = pytest.importorskip("openslide")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "slides" / "real"
THUMBS = SHARED / "thumbnails"
METHODS = ("macenko", "reinhard", "vahadane")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path}")
    return path


def _read(path: Path, x: int, y: int, size: int) -> np.ndarray:
    with openslide.OpenSlide(str(_need(path))) as sl:
        return np.array(sl.read_region((x, y), 0, (size, size)).convert("RGB"))


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """512x512 tissue-rich region of CMU-1: the target appearance."""
    return _read(REAL / "cmu-1-small-region.svs", 700, 1400, 512)


def _tissue_tiles(path: Path, x: int, y: int, n: int) -> np.ndarray:
    """The first ``n`` (row-major) of the 16 256x256 tiles of a 1024x1024 region that are
    at least half stain-like tissue."""
    region = _read(path, x, y, 1024)
    tiles = region.reshape(4, 256, 4, 256, 3).transpose(0, 2, 1, 3, 4).reshape(16, 256, 256, 3)
    tiles = np.ascontiguousarray(tiles)
    keep = tiles[_stain_like(tiles) >= 0.5][:n]
    assert len(keep) == n
    return keep


@pytest.fixture(scope="module")
def tcga() -> np.ndarray:
    """Eight 256x256 tissue patches of the TCGA frozen section (JPEG 2000)."""
    return _tissue_tiles(REAL / "tcga-cr-7395-01a-01-ts1.svs", 1000, 1000, 8)


@pytest.fixture(scope="module")
def cmu() -> np.ndarray:
    """Four 256x256 tissue patches of CMU-1 (not overlapping the reference)."""
    return _tissue_tiles(REAL / "cmu-1-small-region.svs", 1000, 2000, 4)


@pytest.fixture(scope="module")
def pen() -> np.ndarray:
    """Two 64x64 all-ink crops: green and red pen on TCGA H&E."""
    g = np.asarray(Image.open(_need(THUMBS / "tcga-green-pen.png")).convert("RGB"))
    r = np.asarray(Image.open(_need(THUMBS / "tcga-red-pen.png")).convert("RGB"))
    return np.stack([g[480:544, 190:254], r[180:244, 20:84]])


def _stain_like(batch: np.ndarray) -> np.ndarray:
    return K.stain_like_fraction(np.ascontiguousarray(batch), K.od_lut(240.0), 0.15)


def test_fixture_patches_are_tissue_and_pen_is_not(tcga, cmu, pen):
    assert (_stain_like(tcga) >= 0.5).all() and (_stain_like(cmu) >= 0.5).all()
    assert (_stain_like(pen) < 0.05).all()


def test_import_does_not_pull_torch():
    code = "import sys, wsi.stain; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- exact percentile kernels ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 5000])
@pytest.mark.parametrize("q", [0.0, 1.0, 50.0, 99.0, 100.0])
def test_percentile_kernels_equal_numpy(n, q):
    rng = np.random.default_rng(n)
    a = np.round(rng.normal(size=n), 2)  # with ties
    want = np.percentile(a, q)
    assert K.percentile(a.copy(), n, q) == pytest.approx(want, abs=1e-12)
    got = K.percentile_fast(a.copy(), n, q, a.min(), a.max(), np.empty(n))
    assert got == pytest.approx(want, abs=1e-12)


# ---- agreement with torchstain --------------------------------------------------------------


def test_macenko_matches_torchstain_numpy(reference, tcga, cmu):
    torchstain = pytest.importorskip("torchstain")
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(reference)
    ours = MacenkoNormalizer().fit(reference)
    np.testing.assert_allclose(ours.stain_matrix, ts.HERef, atol=1e-9)
    np.testing.assert_allclose(ours.max_concentrations, ts.maxCRef, rtol=1e-9)
    batch = np.concatenate([tcga, cmu])
    out = ours.transform(batch)
    want = np.stack([ts.normalize(p, stains=False)[0] for p in batch])
    diff = np.abs(out.astype(int) - want)
    assert diff.mean() <= 0.01  # issue target: <= 1.0
    assert (diff > 0).mean() < 1e-3
    assert ours.n_passthrough == 0


def test_reinhard_matches_torchstain_numpy(reference, tcga):
    torchstain = pytest.importorskip("torchstain")
    ts = torchstain.normalizers.ReinhardNormalizer(backend="numpy")
    ts.fit(reference)
    ours = ReinhardNormalizer().fit(reference)
    np.testing.assert_allclose(ours.target_means, ts.target_means, atol=1e-3)
    np.testing.assert_allclose(ours.target_stds, ts.target_stds, atol=1e-3)
    out = ours.transform(tcga)
    want = np.stack([ts.normalize(p) for p in tcga])
    diff = np.abs(out.astype(int) - want)
    assert diff.mean() < 0.05
    assert diff.max() <= 1


# ---- normalisation moves the source towards the reference -----------------------------------


def _angle(u: np.ndarray, v: np.ndarray) -> float:
    c = np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(np.clip(c, -1, 1))))


def test_macenko_moves_tcga_stain_vectors_to_reference(reference, tcga):
    norm = MacenkoNormalizer().fit(reference)
    probe = MacenkoNormalizer()
    ref_he = norm.stain_matrix
    before = [probe.estimate(p)[0] for p in tcga]
    after = [probe.estimate(p)[0] for p in norm.transform(tcga)]
    for k in range(2):  # hematoxylin, eosin
        err_before = np.mean([_angle(he[:, k], ref_he[:, k]) for he in before])
        err_after = np.mean([_angle(he[:, k], ref_he[:, k]) for he in after])
        assert err_after < 0.6 * err_before, (k, err_before, err_after)
        assert err_after < 5.0, (k, err_before, err_after)


def _lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = np.empty(3), np.empty(3)
    K.lab_stats(np.ascontiguousarray(rgb).reshape(-1, 3), K.od_lut(240.0), 0.15, mean, std)
    return mean, std


def test_reinhard_moves_each_patch_to_the_reference_lab_statistics(reference, tcga):
    norm = ReinhardNormalizer().fit(reference)
    out = norm.transform(tcga)
    for src, dst in zip(tcga, out, strict=True):
        m0, s0 = _lab_stats(src)
        m1, s1 = _lab_stats(dst)
        before = np.abs(m0 - norm.target_means) + np.abs(s0 - norm.target_stds)
        after = np.abs(m1 - norm.target_means) + np.abs(s1 - norm.target_stds)
        # per channel, at least 55 % closer (not exact: 8-bit sRGB clips the LAB gamut)
        assert (after < 0.45 * before).all(), (before, after)


def test_vahadane_moves_tcga_stains_to_reference(reference, tcga):
    norm = VahadaneNormalizer().fit(reference)
    d = norm.stain_matrix
    assert d.shape == (2, 3) and (d >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-9)
    assert d[0, 0] > d[1, 0]  # hematoxylin first (more red absorbed)
    norm.fit_source(tcga)
    src = norm.source_stain_matrix
    after = VahadaneNormalizer().estimate_stains(norm.transform(tcga))
    for k in range(2):
        assert _angle(after[k], d[k]) < 0.5 * _angle(src[k], d[k]) + 0.5
        assert _angle(after[k], d[k]) < 3.0


def test_vahadane_without_source_fit_uses_the_batch(reference, tcga):
    norm = VahadaneNormalizer().fit(reference)
    out = norm.transform(tcga)
    assert norm.source_stain_matrix is None
    fixed = VahadaneNormalizer().fit(reference).fit_source(tcga)
    np.testing.assert_array_equal(out, fixed.transform(tcga))


# ---- robustness -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_white_and_pen_patches_pass_through_with_one_warning(method, reference, tcga, pen, caplog):
    norm = create_normalizer(method).fit(reference)
    if method == "vahadane":
        norm.fit_source(tcga)
    white = np.full((1, 64, 64, 3), 250, np.uint8)
    tissue = tcga[:1, :64, :64]
    batch = np.concatenate([tissue, white, pen])
    with caplog.at_level(logging.DEBUG, logger="wsi.stain"):
        out = norm.transform(batch)
        out2 = norm.transform(batch)
    np.testing.assert_array_equal(out[1:], batch[1:])
    assert np.abs(out[0].astype(int) - tissue[0]).mean() > 1.0  # the tissue patch did change
    np.testing.assert_array_equal(out, out2)
    assert norm.n_passthrough == 6 and norm.n_seen == 8
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 4 patches left unchanged" in warnings[0].getMessage()


@pytest.mark.parametrize("method", METHODS)
def test_fit_on_too_little_tissue_is_a_clear_error(method, pen):
    white = np.full((128, 128, 3), 245, np.uint8)
    for ref in (white, pen[0]):
        with pytest.raises(StainError, match="too little stain-like tissue.*Fix:"):
            create_normalizer(method).fit(ref)


def test_load_normalizer_names_the_bad_reference_file(tmp_path):
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(path)
    with pytest.raises(StainError, match=r"blank\.png.*too little"):
        load_normalizer("macenko", path)
    with pytest.raises(StainError, match="not found"):
        load_normalizer("macenko", tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(StainError, match="cannot read"):
        load_normalizer("reinhard", tmp_path / "junk.png")


def test_bad_inputs_are_typed_errors(reference):
    norm = MacenkoNormalizer().fit(reference)
    with pytest.raises(StainError, match="uint8"):
        norm.transform(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(StainError, match="shape"):
        norm.transform(np.zeros((2, 8, 8, 4), np.uint8))
    with pytest.raises(StainError, match="one of none, macenko, reinhard, vahadane"):
        create_normalizer("staintools")
    with pytest.raises(StainError, match="not fitted"):
        create_normalizer("reinhard").transform(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(StainError, match="needs a target"):
        load_normalizer("vahadane", None)


@pytest.mark.parametrize("method", METHODS)
def test_shapes_single_image_and_empty_batch(method, reference, tcga):
    norm = create_normalizer(method).fit(reference)
    one = norm.transform(tcga[0])
    assert one.shape == tcga[0].shape and one.dtype == np.uint8
    np.testing.assert_array_equal(one, norm.transform(tcga[:1])[0])
    empty = np.zeros((0, 256, 256, 3), np.uint8)
    assert norm.transform(empty).shape == empty.shape


def test_none_is_identity(tcga):
    norm = load_normalizer("none", None)
    np.testing.assert_array_equal(norm.transform(tcga), tcga)
    assert norm.n_passthrough == 0


# ---- persistence ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip_reproduces_the_output(method, reference, tcga, tmp_path):
    norm = create_normalizer(method).fit(reference)
    path = norm.save(tmp_path / f"{method}.json")
    saved = json.loads(path.read_text())
    assert saved["method"] == method and saved["fitted_on"]["sha256"]
    for again in (
        StainNormalizer.from_dict(norm.to_dict()),
        StainNormalizer.load(path),
        load_normalizer(method, path),
    ):
        assert type(again) is type(norm)
        np.testing.assert_array_equal(again.transform(tcga[:2]), norm.transform(tcga[:2]))
    other = "reinhard" if method != "reinhard" else "macenko"
    with pytest.raises(StainError, match="saved fit is for"):
        load_normalizer(other, path)


def test_saved_fit_with_bad_matrix_is_rejected(reference, tmp_path):
    d = MacenkoNormalizer().fit(reference).to_dict()
    d["stain_matrix"] = [[1.0, 2.0]]
    with pytest.raises(StainError, match="stain_matrix"):
        StainNormalizer.from_dict(d)


@pytest.mark.parametrize("fmt", ["png", "tiff", "jpeg"])
def test_load_normalizer_from_reference_images(fmt, reference, tmp_path):
    path = tmp_path / f"ref.{fmt}"
    Image.fromarray(reference).save(path, **({"quality": 95} if fmt == "jpeg" else {}))
    norm = load_normalizer("macenko", path)
    assert norm.fitted_on["path"] == str(path)
    want = MacenkoNormalizer().fit(reference).stain_matrix
    tol = 1e-12 if fmt != "jpeg" else 0.15  # JPEG is lossy
    np.testing.assert_allclose(norm.stain_matrix, want, atol=tol)


# ---- Numba vs torch, threads ----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_torch_path_agrees_with_numba(method, reference, tcga, pen):
    torch = pytest.importorskip("torch")
    norm = create_normalizer(method).fit(reference)
    if method == "vahadane":
        norm.fit_source(tcga)
    white = np.full((1, 64, 64, 3), 255, np.uint8)
    batch = np.ascontiguousarray(np.concatenate([tcga[:3, :64, :64], pen, white]))
    want = norm.transform(batch)
    for dtype, mean_tol in ((torch.float64, 0.01), (torch.float32, 0.05)):
        got = norm.transform_torch(torch.from_numpy(batch.copy()), dtype=dtype).numpy()
        diff = np.abs(got.astype(int) - want)
        assert diff.mean() <= mean_tol, (dtype, diff.mean())
        assert (diff > 1).mean() < 1e-3, (dtype, (diff > 1).mean())
        np.testing.assert_array_equal(got[3:], batch[3:])  # pen and white pass through
    assert norm.n_passthrough == 3 * 3


def test_results_do_not_depend_on_thread_count(reference, tcga):
    norm = MacenkoNormalizer().fit(reference)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = norm.transform(tcga)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one, norm.transform(tcga))


def test_concurrent_transforms_from_threads_agree(reference, tcga):
    from concurrent.futures import ThreadPoolExecutor

    norm = ReinhardNormalizer().fit(reference)
    want = norm.transform(tcga)
    with ThreadPoolExecutor(max_workers=3) as pool:
        outs = list(pool.map(norm.transform, [tcga] * 4))
    for out in outs:
        np.testing.assert_array_equal(out, want)


@pytest.mark.slow
def test_bench_quick_runs_and_matches_torchstain():
    pytest.importorskip("torchstain")
    bench = Path(__file__).resolve().parents[1] / "bench" / "stain.py"
    res = subprocess.run(
        [sys.executable, str(bench), "--quick"], capture_output=True, text=True, check=True
    )
    out = res.stdout
    for method in METHODS:
        assert f"{method} " in out
    assert "MAD vs torchstain-numpy 0.0" in out and "cores=" in out
