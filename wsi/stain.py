"""Stain normalisation: Macenko, Reinhard and Vahadane on batches of RGB patches.

One interface for every method::

    norm = create_normalizer("macenko").fit(reference_rgb)   # or load_normalizer("macenko", "ref.png")
    out = norm.transform(batch)                              # (N, H, W, 3) uint8 -> same
    norm.save("stain.json"); norm = StainNormalizer.load("stain.json")

CPU batches run in Numba kernels (:mod:`wsi.stain_kernels`, one patch per thread);
:meth:`StainNormalizer.transform_torch` runs the same maths on a torch tensor on the encoder's
device (torch is imported lazily). Macenko follows torchstain's numpy implementation (Io=240,
alpha=1, beta=0.15, stain matrix estimated per patch); Reinhard follows torchstain's LAB
conventions; Vahadane is a sparse non-negative dictionary (staintools' lambda=0.1 for the
stains, 0.01 for the concentrations) with the source stains fitted once per slide
(:meth:`VahadaneNormalizer.fit_source`) or, failing that, once per batch.

A patch with almost no stain-like tissue (white glass, pen ink) is returned unchanged and
counted in ``n_passthrough``; fitting on a reference with too little tissue raises
:class:`~wsi.errors.StainError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numba
import numpy as np

from wsi import stain_kernels as K
from wsi.errors import StainError

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

METHODS = ("none", "macenko", "reinhard", "vahadane")
FORMAT_VERSION = 1

# torchstain's default Macenko reference (from the original HEnorm code)
DEFAULT_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
DEFAULT_MAX_C_REF = np.array([1.9705, 1.0308])
# Ruifrok & Johnston optical densities: initial guess of the Vahadane dictionary
_RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
_WORKQUEUE_LOCK = threading.Lock()


def _kernel_guard() -> contextlib.AbstractContextManager:
    """Numba's fallback "workqueue" threading layer must not run parallel kernels from two
    threads at once (the OpenMP and TBB layers may): serialise calls only then."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = None
    return _WORKQUEUE_LOCK if layer in (None, "workqueue") else contextlib.nullcontext()


def _as_batch(x: np.ndarray, what: str = "batch") -> tuple[np.ndarray, bool]:
    """Validate an RGB uint8 image or batch; return a C-contiguous (N, H, W, 3) and whether
    the input was a single image."""
    a = np.asarray(x)
    if a.dtype != np.uint8:
        raise StainError(
            f"{what} must be uint8 RGB, got dtype {a.dtype}. Fix: pass raw 0-255 pixels "
            "(e.g. `arr.astype(np.uint8)` after clipping)"
        )
    single = a.ndim == 3
    if single:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise StainError(
            f"{what} must have shape (N, H, W, 3) or (H, W, 3), got {np.shape(x)}. Fix: drop the "
            "alpha channel / convert to RGB"
        )
    return np.ascontiguousarray(a), single


def _as_pixels(rgb: np.ndarray, what: str) -> np.ndarray:
    """An image (H, W, 3) or a stack of patches (N, H, W, 3) as one (1, P, 1, 3) 'image'."""
    batch, _ = _as_batch(rgb, what)
    return batch.reshape(1, -1, 1, 3)


def _image_digest(rgb: np.ndarray) -> dict[str, Any]:
    return {
        "shape": list(np.shape(rgb)),
        "sha256": hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest(),
    }


class StainNormalizer:
    """Base class: validation, passthrough accounting, JSON round trip."""

    method: ClassVar[str] = "none"

    def __init__(self, *, io: float = 240.0, beta: float = 0.15, min_tissue: float = 0.05) -> None:
        self.io = float(io)
        self.beta = float(beta)
        self.min_tissue = float(min_tissue)
        self.n_passthrough = 0
        self.n_seen = 0
        self.fitted_on: dict[str, Any] | None = None
        self._warned = False
        self._od = K.od_lut(self.io)

    # ---- fitting ---------------------------------------------------------------------------

    def fit(self, rgb: np.ndarray) -> StainNormalizer:
        """Fit the target appearance on an RGB reference image (H, W, 3) or patches (N, H, W, 3)."""
        _as_batch(rgb, "reference image")
        self.fitted_on = _image_digest(rgb)
        return self

    def _check_reference(self, px: np.ndarray, what: str = "reference image") -> None:
        frac = float(K.stain_like_fraction(px, self._od, self.beta)[0])
        if frac < self.min_tissue or frac * px.shape[1] < 100:
            raise StainError(
                f"{what}: too little stain-like tissue to fit {self.method} "
                f"({100 * frac:.1f}% of pixels, need at least {100 * self.min_tissue:.0f}% and 100 "
                "pixels; white glass and pen ink do not count). Fix: use a reference that is "
                "mostly stained tissue, e.g. a tissue crop or the slide's tissue thumbnail"
            )

    # ---- transform -------------------------------------------------------------------------

    def transform(self, batch: np.ndarray) -> np.ndarray:
        """Normalise ``(N, H, W, 3) uint8`` patches (or one ``(H, W, 3)`` image); same shape out."""
        x, single = _as_batch(batch)
        out = self._transform(x) if x.shape[0] and x.shape[1] * x.shape[2] else x.copy()
        return out[0] if single else out

    def _transform(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def transform_torch(self, tensor: torch.Tensor, *, dtype: Any = None) -> torch.Tensor:
        """Normalise a ``(N, H, W, 3)`` (or ``(H, W, 3)``) uint8 tensor on its own device.

        ``dtype`` is the compute precision: float64 on CPU, float32 on accelerators by default.
        """
        import torch

        if tensor.dtype != torch.uint8 or tensor.shape[-1] != 3 or tensor.ndim not in (3, 4):
            raise StainError(
                f"tensor must be uint8 with shape (N, H, W, 3), got {tensor.dtype} "
                f"{tuple(tensor.shape)}. Fix: pass raw 0-255 channels-last patches"
            )
        single = tensor.ndim == 3
        x = tensor[None] if single else tensor
        if dtype is None:
            dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        if x.shape[0] == 0 or x.shape[1] * x.shape[2] == 0:
            out = x.clone()
        else:
            out = self._transform_torch(x.contiguous(), dtype)
        return out[0] if single else out

    def _transform_torch(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        return x.clone()

    def _count(self, status: np.ndarray) -> None:
        n_pass = int(np.count_nonzero(status))
        self.n_seen += int(status.shape[0])
        if not n_pass:
            return
        self.n_passthrough += n_pass
        msg = (
            "stain %s: %d of %d patches left unchanged (less than %.0f%% stain-like tissue: "
            "white glass, pen ink or a degenerate stain estimate); %d so far"
        )
        args = (self.method, n_pass, status.shape[0], 100 * self.min_tissue, self.n_passthrough)
        if self._warned:
            logger.debug(msg, *args)
        else:
            logger.warning(msg + " (further ones are logged at debug level)", *args)
            self._warned = True

    # ---- persistence -----------------------------------------------------------------------

    def _params(self) -> dict[str, Any]:
        return {"io": self.io, "beta": self.beta, "min_tissue": self.min_tissue}

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fit: method, parameters, stain matrix / target statistics."""
        return {
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "params": self._params(),
            "fitted_on": self.fitted_on,
            **self._state(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser from :meth:`to_dict` output (any method)."""
        method = d.get("method")
        if method not in _REGISTRY:
            raise StainError(
                f"unknown stain method {method!r} in saved fit. Fix: use one of {', '.join(METHODS)}"
            )
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise StainError(
                f"saved stain fit has format version {d['format_version']}, this slidepipe reads "
                f"up to {FORMAT_VERSION}. Fix: upgrade slidepipe"
            )
        norm = _REGISTRY[method](**d.get("params", {}))
        norm._set_state(d)
        norm.fitted_on = d.get("fitted_on")
        return norm

    def save(self, path: str | Path) -> Path:
        """Write the fit as JSON (reload with :meth:`load` or :func:`load_normalizer`)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StainNormalizer:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StainError(
                f"{path}: cannot read saved stain fit ({err}). Fix: pass a JSON written by "
                "`StainNormalizer.save` or an RGB reference image"
            ) from err
        return cls.from_dict(d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self._params().items())})"


class IdentityNormalizer(StainNormalizer):
    """``"none"``: patches pass unchanged (no passthrough counting)."""

    method = "none"


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. (ISBI 2009), numerically as torchstain's numpy normaliser.

    Per patch: optical density, tissue pixels (OD >= beta in every channel), the plane of the
    two largest eigenvectors of their covariance, the alpha / 100-alpha percentile angles as
    stain vectors, least-squares concentrations scaled by their 99th percentile, and
    reconstruction with the reference stain matrix ``stain_matrix`` (3x2) and
    ``max_concentrations``. Unfitted, it uses torchstain's default reference.
    """

    method = "macenko"

    def __init__(
        self,
        *,
        io: float = 240.0,
        alpha: float = 1.0,
        beta: float = 0.15,
        min_tissue: float = 0.05,
    ) -> None:
        super().__init__(io=io, beta=beta, min_tissue=min_tissue)
        self.alpha = float(alpha)
        self.stain_matrix = DEFAULT_HE_REF.copy()
        self.max_concentrations = DEFAULT_MAX_C_REF.copy()
        self.last_stain_matrices: np.ndarray | None = None

    def estimate(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stain matrix (3x2, H then E) and 99th-percentile concentrations of an image."""
        px = _as_pixels(rgb, "image")
        self._check_reference(px)
        flat = px.reshape(-1, 3)
        n = flat.shape[0]
        he, max_c, pinv = np.empty((3, 2)), np.empty(2), np.empty((2, 3))
        ok, _ = K.macenko_estimate(
            flat,
            self._od,
            self.alpha,
            self.beta,
            he,
            max_c,
            pinv,
            *(np.empty(n) for _ in range(4)),
            np.empty(n, np.int32),
        )
        if not ok:
            raise StainError(
                "reference image: the Macenko stain estimate is degenerate (one colour only, or "
                "no spread between the stains). Fix: use a reference with both hematoxylin and "
                "eosin visible"
            )
        return he, max_c

    def fit(self, rgb: np.ndarray) -> MacenkoNormalizer:
        self.stain_matrix, self.max_concentrations = self.estimate(rgb)
        super().fit(rgb)
        return self

    def _transform(self, x: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        he = np.zeros((x.shape[0], 3, 2))
        maxc = np.zeros((x.shape[0], 2))
        with _kernel_guard():
            status = K.macenko_batch(
                x,
                self._od,
                self.io,
                self.alpha,
                self.beta,
                self.stain_matrix,
                self.max_concentrations,
                self.min_tissue,
                out,
                he,
                maxc,
                numba.get_num_threads(),
            )
        self.last_stain_matrices = he
        self._count(status)
        return out

    def _transform_torch(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        import torch

        dev = x.device
        n, h, w, _ = x.shape
        idx = x.reshape(n, h * w, 3).long()
        od = torch.as_tensor(self._od, dtype=dtype, device=dev)[idx]  # (N, P, 3)
        keep = _torch_stain_like(od, self.beta) >= max(self.min_tissue * h * w, 3.0)
        tissue = (od >= self.beta).all(dim=2)
        nt = tissue.sum(dim=1)
        keep &= nt >= 3
        ntf = nt.clamp(min=2).to(dtype)
        tmask = tissue.to(dtype).unsqueeze(2)
        mean = (od * tmask).sum(dim=1) / ntf[:, None]
        d = (od - mean[:, None, :]) * tmask
        cov = d.transpose(1, 2) @ d / (ntf - 1)[:, None, None]
        cov = torch.where(keep[:, None, None], cov, torch.eye(3, dtype=dtype, device=dev))
        _, vecs = torch.linalg.eigh(cov)
        e = vecs[:, :, 1:3]  # (N, 3, 2)
        that = od @ e
        phi = torch.atan2(that[..., 1], that[..., 0])
        phi = torch.where(tissue, phi, torch.full_like(phi, float("inf")))
        phi_sorted = torch.sort(phi, dim=1).values
        min_phi = _torch_percentile_sorted(phi_sorted, nt, self.alpha)
        max_phi = _torch_percentile_sorted(phi_sorted, nt, 100.0 - self.alpha)
        vmin = e @ torch.stack((torch.cos(min_phi), torch.sin(min_phi)), dim=1)[..., None]
        vmax = e @ torch.stack((torch.cos(max_phi), torch.sin(max_phi)), dim=1)[..., None]
        swap = (vmin[:, 0, 0] > vmax[:, 0, 0])[:, None, None]
        he = torch.where(swap, torch.cat((vmin, vmax), 2), torch.cat((vmax, vmin), 2))  # (N,3,2)
        g = he.transpose(1, 2) @ he
        det = g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] ** 2
        keep &= det > 1e-10 * g[:, 0, 0] * g[:, 1, 1]
        g = torch.where(keep[:, None, None], g, torch.eye(2, dtype=dtype, device=dev))
        pinv = torch.linalg.solve(g, he.transpose(1, 2))  # (N, 2, 3)
        conc = od @ pinv.transpose(1, 2)  # (N, P, 2)
        full = torch.full((n,), h * w, device=dev)
        max_c = torch.stack(
            [
                _torch_percentile_sorted(torch.sort(conc[..., k], dim=1).values, full, 99.0)
                for k in range(2)
            ],
            dim=1,
        )
        keep &= (max_c > 1e-6).all(dim=1) & torch.isfinite(max_c).all(dim=1)
        max_c = torch.where(keep[:, None], max_c, torch.ones_like(max_c))
        he_ref = torch.as_tensor(self.stain_matrix, dtype=dtype, device=dev)
        ref_c = torch.as_tensor(self.max_concentrations, dtype=dtype, device=dev)
        m = he_ref[None] @ ((ref_c[None, :] / max_c)[:, :, None] * pinv)  # (N, 3, 3)
        val = (self.io * torch.exp(-(od @ m.transpose(1, 2)))).clamp(max=255.0)
        out = val.to(torch.uint8).reshape(n, h, w, 3)
        self._count((~keep).cpu().numpy())
        return torch.where(keep[:, None, None, None], out, x)

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "alpha": self.alpha}

    def _state(self) -> dict[str, Any]:
        return {
            "stain_matrix": self.stain_matrix.tolist(),
            "max_concentrations": self.max_concentrations.tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.stain_matrix = _matrix(state, "stain_matrix", (3, 2))
        self.max_concentrations = _matrix(state, "max_concentrations", (2,))


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. (2001) colour transfer in LAB, as torchstain's numpy normaliser: each
    patch's L, a, b channels are standardised and given the target's mean and std."""

    method = "reinhard"

    def __init__(self, *, io: float = 240.0, beta: float = 0.15, min_tissue: float = 0.05) -> None:
        super().__init__(io=io, beta=beta, min_tissue=min_tissue)
        self.target_means: np.ndarray | None = None
        self.target_stds: np.ndarray | None = None

    def fit(self, rgb: np.ndarray) -> ReinhardNormalizer:
        px = _as_pixels(rgb, "reference image")
        self._check_reference(px)
        mean, std = np.empty(3), np.empty(3)
        K.lab_stats(px.reshape(-1, 3), self._od, self.beta, mean, std)
        self.target_means, self.target_stds = mean, std
        super().fit(rgb)
        return self

    def _require_fit(self) -> None:
        if self.target_means is None or self.target_stds is None:
            raise StainError(
                "reinhard normaliser is not fitted. Fix: call `.fit(reference_rgb)` or use "
                "`load_normalizer('reinhard', 'ref.png')`"
            )

    def _transform(self, x: np.ndarray) -> np.ndarray:
        self._require_fit()
        out = np.empty_like(x)
        stats = np.zeros((x.shape[0], 2, 3))
        with _kernel_guard():
            status = K.reinhard_batch(
                x,
                self._od,
                self.beta,
                self.min_tissue,
                self.target_means,
                self.target_stds,
                out,
                stats,
                numba.get_num_threads(),
            )
        self._count(status)
        return out

    def _transform_torch(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        import torch

        self._require_fit()
        dev = x.device
        n, h, w, _ = x.shape
        idx = x.reshape(n, h * w, 3).long()
        od = torch.as_tensor(self._od, dtype=dtype, device=dev)[idx]
        keep = _torch_stain_like(od, self.beta) >= max(self.min_tissue * h * w, 3.0)
        lab = _torch_rgb_to_lab(torch.as_tensor(K.srgb_linear_lut(), dtype=dtype, device=dev)[idx])
        mean = lab.mean(dim=1)
        std = lab.std(dim=1, correction=0)
        keep &= (std > 1e-6).all(dim=1)
        std = torch.where(keep[:, None], std, torch.ones_like(std))
        t_mean = torch.as_tensor(self.target_means, dtype=dtype, device=dev)
        t_std = torch.as_tensor(self.target_stds, dtype=dtype, device=dev)
        lab = (lab - mean[:, None]) * (t_std / std)[:, None] + t_mean
        fy = (lab[..., 0] + 16.0) / 116.0
        f = torch.stack((lab[..., 1] / 500.0 + fy, fy, fy - lab[..., 2] / 200.0), dim=-1)
        xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
        xyz = xyz * torch.as_tensor(K.WHITE, dtype=dtype, device=dev)
        lin = xyz @ torch.as_tensor(K.XYZ2RGB, dtype=dtype, device=dev).T
        thr = torch.as_tensor(K.srgb_thresholds(), dtype=dtype, device=dev)
        out = torch.bucketize(lin, thr, right=True).to(torch.uint8).reshape(n, h, w, 3)
        self._count((~keep).cpu().numpy())
        return torch.where(keep[:, None, None, None], out, x)

    def _state(self) -> dict[str, Any]:
        self._require_fit()
        return {
            "target_means": np.asarray(self.target_means).tolist(),
            "target_stds": np.asarray(self.target_stds).tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.target_means = _matrix(state, "target_means", (3,))
        self.target_stds = _matrix(state, "target_stds", (3,))


class VahadaneNormalizer(StainNormalizer):
    """Vahadane et al. (2016) structure-preserving normalisation: stains by sparse
    non-negative dictionary learning (lambda 0.1), concentrations by a non-negative lasso
    (lambda 0.01), each stain scaled to the target's 99th percentile concentration.

    ``fit`` learns the target stains; :meth:`fit_source` learns the source stains once per
    slide (from its tissue thumbnail or a representative set of patches). Without a source
    fit, each batch's pooled tissue pixels give its source stains.
    """

    method = "vahadane"

    def __init__(
        self,
        *,
        io: float = 240.0,
        beta: float = 0.15,
        min_tissue: float = 0.05,
        lambda_dict: float = 0.1,
        lambda_conc: float = 0.01,
        n_iter: int = 100,
        max_fit_pixels: int = 20000,
    ) -> None:
        super().__init__(io=io, beta=beta, min_tissue=min_tissue)
        self.lambda_dict = float(lambda_dict)
        self.lambda_conc = float(lambda_conc)
        self.n_iter = int(n_iter)
        self.max_fit_pixels = int(max_fit_pixels)
        self.stain_matrix: np.ndarray | None = None  # (2, 3) target, rows H, E
        self.max_concentrations: np.ndarray | None = None
        self.source_stain_matrix: np.ndarray | None = None
        self._od255 = K.od_lut_255()

    def _dictionary(self, px: np.ndarray) -> np.ndarray:
        n_like = int(K.stain_like_fraction(px, self._od, self.beta).sum() * px.shape[1])
        stride = max(1, -(-n_like // self.max_fit_pixels))
        od = K.gather_stain_like_od(px, self._od, self._od255, self.beta, stride)
        d = _RUIFROK_HE / np.linalg.norm(_RUIFROK_HE, axis=1, keepdims=True)
        K.vahadane_dictionary(od, d, self.lambda_dict, self.n_iter)
        return d

    def estimate_stains(self, rgb: np.ndarray) -> np.ndarray:
        """Stain matrix (2x3, rows H then E, unit norm) of an image or a stack of patches."""
        px = _as_pixels(rgb, "image")
        self._check_reference(px)
        return self._dictionary(px)

    def fit(self, rgb: np.ndarray) -> VahadaneNormalizer:
        px = _as_pixels(rgb, "reference image")
        self._check_reference(px)
        d = self._dictionary(px)
        flat = px.reshape(-1, 3)
        max_c = np.empty(2)
        work = np.empty((3, len(flat)))
        K.vahadane_max_conc(
            flat, self._od255, d, self.lambda_conc, work[0], work[1], max_c, work[2]
        )
        if not (max_c > 1e-6).all():
            raise StainError(
                "reference image: one stain is absent in the Vahadane fit. Fix: use a reference "
                "with both stains visible"
            )
        self.stain_matrix, self.max_concentrations = d, max_c
        super().fit(rgb)
        return self

    def fit_source(self, rgb: np.ndarray) -> VahadaneNormalizer:
        """Fix the source stains (e.g. from a slide's tissue thumbnail) for later batches."""
        self.source_stain_matrix = self.estimate_stains(rgb)
        return self

    def reset_source(self) -> None:
        """Forget the source stains (call between slides if reusing one normaliser)."""
        self.source_stain_matrix = None

    def _require_fit(self) -> None:
        if self.stain_matrix is None or self.max_concentrations is None:
            raise StainError(
                "vahadane normaliser is not fitted. Fix: call `.fit(reference_rgb)` or use "
                "`load_normalizer('vahadane', 'ref.png')`"
            )

    def _source_for(self, x: np.ndarray) -> np.ndarray | None:
        if self.source_stain_matrix is not None:
            return self.source_stain_matrix
        px = x.reshape(1, -1, 1, 3)
        frac = float(K.stain_like_fraction(px, self._od, self.beta)[0])
        if frac * px.shape[1] < 100:
            return None
        return self._dictionary(px)

    def _transform(self, x: np.ndarray) -> np.ndarray:
        self._require_fit()
        d_src = self._source_for(x)
        if d_src is None:
            self._count(np.ones(x.shape[0], np.int8))
            return x.copy()
        out = np.empty_like(x)
        maxc = np.zeros((x.shape[0], 2))
        with _kernel_guard():
            status = K.vahadane_batch(
                x,
                self._od,
                self._od255,
                self.beta,
                self.min_tissue,
                d_src,
                self.stain_matrix,
                self.max_concentrations,
                self.lambda_conc,
                out,
                maxc,
                numba.get_num_threads(),
            )
        self._count(status)
        return out

    def _transform_torch(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        import torch

        self._require_fit()
        d_np = self.source_stain_matrix
        if d_np is None:
            d_np = self._source_for(np.ascontiguousarray(x.cpu().numpy()))
        if d_np is None:
            self._count(np.ones(x.shape[0], np.int8))
            return x.clone()
        dev = x.device
        n, h, w, _ = x.shape
        idx = x.reshape(n, h * w, 3).long()
        od240 = torch.as_tensor(self._od, dtype=dtype, device=dev)[idx]
        keep = _torch_stain_like(od240, self.beta) >= max(self.min_tissue * h * w, 3.0)
        od = torch.as_tensor(self._od255, dtype=dtype, device=dev)[idx]
        d = torch.as_tensor(d_np, dtype=dtype, device=dev)
        a = _torch_nn_lasso2(od, d, self.lambda_conc)  # (N, P, 2)
        full = torch.full((n,), h * w, device=dev)
        max_c = torch.stack(
            [
                _torch_percentile_sorted(torch.sort(a[..., k], dim=1).values, full, 99.0)
                for k in range(2)
            ],
            dim=1,
        )
        keep &= (max_c > 1e-6).all(dim=1)
        max_c = torch.where(keep[:, None], max_c, torch.ones_like(max_c))
        ref_c = torch.as_tensor(self.max_concentrations, dtype=dtype, device=dev)
        d_t = torch.as_tensor(self.stain_matrix, dtype=dtype, device=dev)
        val = 255.0 * torch.exp(-((a * (ref_c / max_c)[:, None, :]) @ d_t))
        out = val.to(torch.uint8).reshape(n, h, w, 3)
        self._count((~keep).cpu().numpy())
        return torch.where(keep[:, None, None, None], out, x)

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "lambda_dict": self.lambda_dict,
            "lambda_conc": self.lambda_conc,
            "n_iter": self.n_iter,
            "max_fit_pixels": self.max_fit_pixels,
        }

    def _state(self) -> dict[str, Any]:
        self._require_fit()
        src = self.source_stain_matrix
        return {
            "stain_matrix": np.asarray(self.stain_matrix).tolist(),
            "max_concentrations": np.asarray(self.max_concentrations).tolist(),
            "source_stain_matrix": None if src is None else src.tolist(),
        }

    def _set_state(self, state: dict[str, Any]) -> None:
        self.stain_matrix = _matrix(state, "stain_matrix", (2, 3))
        self.max_concentrations = _matrix(state, "max_concentrations", (2,))
        if state.get("source_stain_matrix") is not None:
            self.source_stain_matrix = _matrix(state, "source_stain_matrix", (2, 3))


_REGISTRY: dict[str, type[StainNormalizer]] = {
    "none": IdentityNormalizer,
    "macenko": MacenkoNormalizer,
    "reinhard": ReinhardNormalizer,
    "vahadane": VahadaneNormalizer,
}


def _matrix(state: dict[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        a = np.asarray(state[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as err:
        raise StainError(
            f"saved stain fit lacks a valid {key!r}. Fix: re-fit and save the normaliser"
        ) from err
    if a.shape != shape or not np.isfinite(a).all():
        raise StainError(
            f"saved stain fit has {key!r} of shape {a.shape}, expected {shape} with finite "
            "values. Fix: re-fit and save the normaliser"
        )
    return a


# ---- torch helpers (torch imported by the callers) -------------------------------------------


def _torch_stain_like(od: torch.Tensor, beta: float) -> torch.Tensor:
    """Per patch count of stain-like pixels (same rule as the Numba kernels)."""
    o0, o1, o2 = od[..., 0], od[..., 1], od[..., 2]
    absorbs = (o0 >= beta) & (o1 >= beta) & (o2 >= beta)
    pen = (o0 > K._PEN_RED_OVER_GREEN * o1) | (
        (o0 < K._RED_INK_RED_OVER_GREEN * o1) & (o2 > K._RED_INK_BLUE_OVER_GREEN * o1)
    )
    return (absorbs & ~pen).sum(dim=1)


def _torch_percentile_sorted(v: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """numpy-linear percentile of the first ``n[i]`` values of each sorted row of ``v``."""
    import torch

    nf = n.to(v.dtype)
    qq = q / 100.0
    virtual = nf * qq - qq
    prev = torch.floor(virtual).clamp(min=0)
    prev = torch.minimum(prev, (nf - 1).clamp(min=0))
    gamma = (virtual - prev)[:, None]
    lo_i = prev.long()[:, None]
    hi_i = torch.minimum(lo_i + 1, (n.long() - 1).clamp(min=0)[:, None])
    lo = v.gather(1, lo_i)
    hi = v.gather(1, hi_i)
    diff = hi - lo
    res = torch.where(gamma >= 0.5, hi - diff * (1 - gamma), lo + diff * gamma)
    return res[:, 0]


def _torch_rgb_to_lab(lin: torch.Tensor) -> torch.Tensor:
    import torch

    dt, dev = lin.dtype, lin.device
    xyz = lin @ torch.as_tensor(K.RGB2XYZ, dtype=dt, device=dev).T
    xyz = xyz / torch.as_tensor(K.WHITE, dtype=dt, device=dev)
    f = torch.where(xyz > 0.008856, torch.pow(xyz.clamp(min=0), 1.0 / 3.0), 7.787 * xyz + 16 / 116)
    return torch.stack(
        (
            116.0 * f[..., 1] - 16.0,
            500.0 * (f[..., 0] - f[..., 1]),
            200.0 * (f[..., 1] - f[..., 2]),
        ),
        dim=-1,
    )


def _torch_nn_lasso2(od: torch.Tensor, d: torch.Tensor, lam: float) -> torch.Tensor:
    """Exact non-negative 2-atom lasso per pixel (as ``stain_kernels._nn_lasso2``)."""
    import torch

    g = d @ d.T
    c = od @ d.T - lam  # (N, P, 2)
    det = g[0, 0] * g[1, 1] - g[0, 1] ** 2
    both = torch.stack(
        (g[1, 1] * c[..., 0] - g[0, 1] * c[..., 1], g[0, 0] * c[..., 1] - g[0, 1] * c[..., 0]),
        dim=-1,
    ) / det.clamp(min=1e-12)
    both_ok = (det > 1e-12) & (both > 0).all(dim=-1)
    u0 = (c[..., 0] / g[0, 0]).clamp(min=0)
    u1 = (c[..., 1] / g[1, 1]).clamp(min=0)
    f0 = 0.5 * g[0, 0] * u0**2 - c[..., 0] * u0
    f1 = 0.5 * g[1, 1] * u1**2 - c[..., 1] * u1
    zero = torch.zeros_like(u0)
    face = torch.where(
        (f0 <= f1)[..., None], torch.stack((u0, zero), -1), torch.stack((zero, u1), -1)
    )
    return torch.where(both_ok[..., None], both, face)


# ---- factory ---------------------------------------------------------------------------------


def create_normalizer(name: str, **kwargs: Any) -> StainNormalizer:
    """A new (unfitted) normaliser by name: ``"none"``, ``"macenko"``, ``"reinhard"``, ``"vahadane"``."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise StainError(f"unknown stain method {name!r}. Fix: use one of {', '.join(METHODS)}")
    return _REGISTRY[key](**kwargs)


def read_rgb(path: str | Path) -> np.ndarray:
    """An RGB uint8 image from PNG / JPEG / TIFF (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            if im.mode not in ("RGB", "RGBA", "L", "P", "CMYK", "YCbCr"):
                raise StainError(
                    f"{path}: image mode {im.mode} is not 8-bit RGB. Fix: save the reference as "
                    "an 8-bit RGB PNG or JPEG"
                )
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        try:
            import tifffile

            a = tifffile.imread(path)
        except Exception:  # noqa: BLE001 - report the PIL error, the clearer one
            raise StainError(
                f"{path}: cannot read the stain reference image ({err}). Fix: pass an RGB "
                "PNG/JPEG/TIFF or a JSON saved by `StainNormalizer.save`"
            ) from err
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] not in (3, 4):
            raise StainError(
                f"{path}: TIFF is {a.dtype} {a.shape}, not 8-bit RGB. Fix: save the reference "
                "as an 8-bit RGB image"
            ) from err
        return np.ascontiguousarray(a[..., :3])


def load_normalizer(
    method: str, target: str | Path | None = None, **kwargs: Any
) -> StainNormalizer:
    """A ready normaliser: fitted on ``target`` (RGB image path) or loaded from a saved JSON.

    ``method="none"`` ignores the target. For Macenko, ``target=None`` uses torchstain's default
    reference; the other methods need a target.
    """
    norm = create_normalizer(method, **kwargs)
    if norm.method == "none":
        return norm
    if target is None:
        if norm.method == "macenko":
            return norm
        raise StainError(
            f"stain method {method!r} needs a target. Fix: pass `--stain-target ref.png` "
            "(an RGB reference image) or a JSON saved by `StainNormalizer.save`"
        )
    path = Path(target)
    if not path.is_file():
        raise StainError(
            f"{path}: stain target not found. Fix: pass an existing RGB image or saved JSON"
        )
    if path.suffix.lower() == ".json":
        loaded = StainNormalizer.load(path)
        if loaded.method != norm.method:
            raise StainError(
                f"{path}: saved fit is for {loaded.method!r}, not {norm.method!r}. Fix: pass "
                f"`--stain {loaded.method}` or a fit saved for {norm.method!r}"
            )
        return loaded
    rgb = read_rgb(path)
    try:
        norm.fit(rgb)
    except StainError as err:
        raise StainError(f"{path}: {err}") from err
    norm.fitted_on = {**(norm.fitted_on or {}), "path": str(path)}
    return norm
