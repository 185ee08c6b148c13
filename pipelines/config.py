"""Pydantic models for every YAML file in ``configs/``, and the load/override/save helpers.

Each CLI verb has a job model (``TileJob``, ``ExtractJob`` ...). A verb loads
``--config FILE.yaml`` (or the model defaults), then applies the flags the user passed
(flags override the file), validates, and writes the resolved config into its output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TilingConfig(_Model):
    """How patches are laid on a slide."""

    mpp: float = Field(0.5, gt=0, description="target resolution of patches, µm per pixel")
    patch_size: int = Field(256, gt=0, description="patch side in pixels at the target mpp")
    overlap: int = Field(0, ge=0, description="overlap between neighbouring patches, pixels")
    min_tissue: float = Field(0.5, ge=0, le=1, description="minimum tissue fraction per patch")
    slide_mpp: float | None = Field(None, gt=0, description="override when the file has no mpp")
    tissue_mpp: float = Field(8.0, gt=0, description="resolution of the tissue-detection thumbnail")
    backend: Literal["auto", "openslide", "tiffslide"] = "auto"


class StainConfig(_Model):
    """Stain normalisation applied to patches before they are saved or embedded."""

    method: Literal["none", "macenko", "reinhard", "vahadane"] = "none"
    target: Path | None = Field(None, description="reference RGB image (PNG/JPEG) or saved fit (JSON)")


class ClusterConfig(_Model):
    """Where work runs: ``local``, ``slurm``, ``pbs`` or a scheduler address ``tcp://host:port``."""

    kind: str = "local"
    n_workers: int | None = Field(None, ge=1, description="local: worker processes (default: cores)")
    threads_per_worker: int = Field(1, ge=1)
    queue: str | None = None
    account: str | None = None
    cores: int = Field(1, ge=1, description="cores per job (slurm/pbs)")
    memory: str = "8GB"
    walltime: str = "04:00:00"
    gpus: int = Field(0, ge=0, description="GPUs per job; declared as the worker resource GPU")
    processes: int = Field(1, ge=1, description="worker processes per job")
    minimum: int = Field(0, ge=0, description="adaptive scaling: minimum jobs")
    maximum: int = Field(4, ge=1, description="adaptive scaling: maximum jobs")
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(
        default_factory=list, description="shell lines run before each worker (module load, venv)"
    )
    local_directory: str | None = None
    log_directory: str | None = Field(None, description="slurm/pbs: where job stdout/stderr go")
    interface: str | None = Field(None, description="network interface for workers, e.g. ib0")
    scheduler_host: str | None = Field(None, description="slurm/pbs: address the scheduler listens on")
    dashboard_address: str | None = Field(":8787", description="':0' picks a free port; null: none")
    retries: int = Field(2, ge=0, description="times a slide is retried after its worker died")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value in ("local", "slurm", "pbs") or "://" in value:
            return value
        raise ValueError(
            f"unknown cluster {value!r}; choose local, slurm, pbs or a scheduler address tcp://host:port"
        )


class TileJob(_Model):
    """``slidepipe tile``."""

    slides: list[str] = Field(default_factory=list, description="files, directories or globs")
    out: Path = Path("tiles")
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    stain: StainConfig = Field(default_factory=StainConfig)
    workers: int = Field(1, ge=1, description="reader threads per slide")
    save_patches: Literal["none", "png", "jpeg"] = "none"
    skip_corrupt_tiles: bool = False
    overwrite: bool = Field(
        False, description="replace a slide that --out holds from another file with the same slide id"
    )
    cluster: ClusterConfig | None = None


class ExtractJob(_Model):
    """``slidepipe extract``."""

    slides: list[str] = Field(default_factory=list)
    out: Path = Path("features.zarr")
    encoder: str = "ctranspath"
    weights: str | None = Field(
        None, description="local file/dir, 'hf-hub:org/name', or 'random' (tests and demos only)"
    )
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    stain: StainConfig = Field(default_factory=StainConfig)
    batch_size: int = Field(64, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    workers: int | None = Field(
        None, ge=1, description="reader threads per slide (default: half the cores, at most 8)"
    )
    reader: Literal["process", "thread"] = Field(
        "process",
        description="read patches in a child process (no GIL contention with the encoder) "
        "or in a thread of this process",
    )
    overwrite: bool = False
    wait: bool = Field(
        False, description="after its own slides, wait for those other processes sharing the store are "
        "writing (taking over any whose process dies), so that the store is complete on exit",
    )
    skip_corrupt_tiles: bool = False
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch (1: bit-reproducible CPU runs; default: torch's)"
    )
    prefetch: int = Field(4, ge=1, description="batches read ahead (across slide boundaries)")
    claim_ttl: float = Field(
        600.0, gt=0, description="seconds a claim from another host lives without a heartbeat"
    )
    cluster: ClusterConfig | None = None


class TrainJob(_Model):
    """``slidepipe train``."""

    store: Path | None = None
    labels: Path | None = None
    out: Path = Path("run")
    model: str = "abmil"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    task: Literal["classification", "regression", "survival"] = Field(
        "classification", description="study design: classification (one or several label columns), "
        "regression (numeric columns) or survival (time and event columns)",
    )
    target: str | list[str] = Field(
        "label", description="label column(s) to predict (classification, regression); several are "
        "trained jointly, a missing value is masked out of its own target's loss only",
    )
    time: str = Field("time", description="survival: column of follow-up times")
    event: str = Field("event", description="survival: column of events (1 = event, 0 = censored)")
    loss: str | None = Field(
        None, description="the task's loss: classification cross_entropy; regression mse (default) or "
        "huber; survival cox (default, Breslow ties) or discrete (time bins)",
    )
    bins: int = Field(4, ge=2, description="survival with loss: discrete — quantile bins of event times")
    overwrite: bool = Field(
        False, description="replace an existing run directory (swapped out only once the new run is complete)"
    )
    report: bool = Field(True, description="write report.html (pooled out-of-fold metrics with CIs, plots)")
    n_boot: int = Field(200, ge=0, description="bootstrap replicates of the report's CIs over patients")
    features: dict[str, Any] | None = Field(
        None, description="written by train: identity of the training store's features (encoder, weights, "
        "dim, patch size, mpp); predict and heatmap refuse other features",
    )
    level: Literal["slide", "patient"] = Field(
        "slide", description="slide: one bag per slide; patient: all slides of a patient pooled in one bag",
    )
    folds: int = Field(5, ge=2)
    repeats: int = Field(1, ge=1)
    test_frac: float = Field(0.0, ge=0, lt=1, description="held-out test share (0: none)")
    val_frac: float = Field(0.2, gt=0, lt=1, description="validation share inside each training fold")
    splits: Path | None = Field(None, description="reuse a saved splits file")
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_size: int | None = Field(
        None, ge=1, description="bags per optimizer step; default: the task's — 1 for classification and "
        "regression (the ABMIL/CLAM recipe: small cohorts get enough optimizer steps; see bench/mil_classic.py), "
        "16 for Cox survival (its loss compares the bags of a batch)",
    )
    max_batch_tokens: int | Literal["auto"] | None = Field(
        "auto",
        description="most padded instances per forward/backward pass; a larger batch is split into "
        "passes whose gradients add up to the batch's (same optimizer step). 'auto': the head's "
        "default (TransMIL 4096, others no limit), on CPU at most 16 MiB of float32 features per "
        "pass (5,461 patches of 768-d: cache-sized, faster); null or 0: no limit",
    )
    max_instances: int | None = Field(None, ge=1, description="subsample bags above this size in training")
    balance: Literal["loss", "sampler", "none"] = "loss"
    standardize: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch during training (default: torch's)"
    )
    allow_missing: bool = False
    log_csv: bool = True
    tensorboard: bool = Field(
        False, description="also write TensorBoard scalars to <out>/tensorboard/<fold> (needs tensorboard)"
    )
    cluster: ClusterConfig | None = None

    @field_validator("target", mode="before")
    @classmethod
    def _one_target_as_text(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == 1:
            return value[0]
        return value

    @property
    def targets(self) -> list[str]:
        """The label columns the task reads (survival: time and event)."""
        if self.task == "survival":
            return [self.time, self.event]
        return [self.target] if isinstance(self.target, str) else list(self.target)

    @property
    def target_name(self) -> str:
        """The targets as one short text (titles, logs)."""
        return ", ".join(self.targets)

    @field_validator("max_batch_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("none", "null", "0"):
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError("max_batch_tokens must be 'auto', a positive number, or 0/null (no limit)")
            return value or None
        return value


class HeatmapJob(_Model):
    """``slidepipe heatmap``."""

    run: Path | None = None
    store: Path | None = None
    slide: Path | None = None
    out: Path = Path("heatmaps")
    fold: int | None = Field(None, description="fold checkpoint to use (default: average of folds)")
    thumb_mpp: float = Field(8.0, gt=0)
    cmap: str = "jet"
    alpha: float = Field(0.45, ge=0, le=1)
    slide_mpp: float | None = Field(None, gt=0)


class PredictJob(_Model):
    """``slidepipe predict``."""

    run: Path | None = Field(None, description="run directory of `slidepipe train`")
    store: Path | None = Field(None, description="feature store of the cohort to score")
    labels: Path | None = Field(None, description="label table: metrics with bootstrap CIs when given")
    out: Path = Path("predictions")
    slides: list[str] = Field(default_factory=list, description="score only these slide ids (default: all)")
    folds: list[int] = Field(default_factory=list, description="use only these folds' checkpoints (default: all)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    n_boot: int = Field(1000, ge=0, description="bootstrap replicates (resampling patients) for the CIs")
    seed: int = 0
    heatmaps: int = Field(0, ge=0, description="attention heatmaps of the K highest- and K lowest-scoring slides")


class VerifyJob(_Model):
    """``slidepipe verify``."""

    store: Path | None = Field(None, description="feature store to check")
    deep: bool = Field(False, description="also read every chunk and verify its crc32c checksum")


class ExportJob(_Model):
    """``slidepipe export-h5``."""

    store: Path | None = None
    out: Path = Path("h5")


class DemoJob(_Model):
    """``slidepipe demo``."""

    out: Path = Path("demo-out")
    slides: int = Field(24, ge=4)
    encoder: str = "tiny-vit"
    weights: str = "random"
    folds: int = Field(5, ge=2)
    seed: int = 0
    workers: int = Field(2, ge=1)
    task: Literal["classification", "regression", "survival"] = Field(
        "classification", description="what the generated cohort's labels are: classes (lesions or not), a "
        "value (driven by the number of lesions) or survival (hazard driven by the number of lesions)",
    )


JOBS: dict[str, type[_Model]] = {
    "tile": TileJob,
    "extract": ExtractJob,
    "train": TrainJob,
    "predict": PredictJob,
    "heatmap": HeatmapJob,
    "export-h5": ExportJob,
    "verify": VerifyJob,
    "demo": DemoJob,
}

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file or flag value is invalid; the message names the file and field."""


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge ``overrides`` into ``base`` recursively; ``None`` values in overrides are ignored."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and not value:
            continue
        else:
            out[key] = value
    return out


def load_config(model: type[M], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> M:
    """Build a job config from an optional YAML file plus flag overrides (flags win)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: config file not found. Fix: check the --config path") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err}). Fix: correct the file") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping. Fix: write `key: value` lines")
    data = deep_merge(data, _prune(overrides or {}))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        where = str(path) if path is not None else "command-line flags"
        raise ConfigError(f"{where}: invalid {model.__name__} config:\n{err}") from err


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _prune(v)
            if not v:
                continue
        if v is None:
            continue
        out[k] = v
    return out


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (paths as strings)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_resolved_config(config: BaseModel, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into ``out_dir`` so every output says how it was made."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(config_to_yaml(config))
    tmp.replace(path)
    return path
