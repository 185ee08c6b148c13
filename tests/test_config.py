"""Every YAML in configs/ validates; defaults files equal the models; flags override files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import (
    JOBS,
    ClusterConfig,
    ConfigError,
    TileJob,
    load_config,
    save_resolved_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_validates(path):
    verb = path.parent.name
    model = ClusterConfig if verb == "cluster" else JOBS[verb]
    load_config(model, path)


@pytest.mark.parametrize("verb", sorted(JOBS))
def test_default_files_equal_model_defaults(verb):
    data = yaml.safe_load((CONFIGS / verb / "default.yaml").read_text())
    assert JOBS[verb].model_validate(data) == JOBS[verb]()


def test_flags_override_file_and_resolved_config_round_trips(tmp_path):
    cfg = tmp_path / "tile.yaml"
    cfg.write_text("tiling:\n  mpp: 1.0\n  patch_size: 512\nworkers: 2\n")
    job = load_config(TileJob, cfg, {"tiling": {"mpp": 0.5, "overlap": None}, "workers": None})
    assert (job.tiling.mpp, job.tiling.patch_size, job.workers) == (0.5, 512, 2)
    saved = save_resolved_config(job, tmp_path / "out")
    assert load_config(TileJob, saved) == job


def test_bad_values_name_the_file_and_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("tiling:\n  mpp: -1\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*mpp"):
        load_config(TileJob, cfg)
    cfg.write_text("tilling: {}\n")
    with pytest.raises(ConfigError, match="tilling"):
        load_config(TileJob, cfg)
    with pytest.raises(ConfigError, match="not found"):
        load_config(TileJob, tmp_path / "missing.yaml")
