"""Shared CLI plumbing: console, logging, config loading from flags, batch exit codes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

console = Console(stderr=True)
M = TypeVar("M", bound=BaseModel)

CONFIG_HELP = "YAML file with the verb's options (see configs/<verb>/default.yaml); flags override it."


def setup_logging(verbose: bool = False) -> None:
    """Install a rich log handler (only the CLI does this; library code adds no handlers)."""
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("distributed", "numba", "PIL", "urllib3", "fsspec", "asyncio", "tornado", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_config(model: type[M], config: Path | None, overrides: dict[str, Any]) -> M:
    """Load ``config`` and apply flag overrides; a bad value exits with code 2 and the reason."""
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(model, config, overrides)
    except ConfigError as err:
        console.print(f"[red]config error:[/red] {err}")
        raise typer.Exit(2) from err


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print an error line and return the Exit to raise."""
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


ClusterOption = Annotated[
    str | None,
    typer.Option(
        "--cluster",
        help="where to run: local (Dask worker processes), slurm, pbs, or a scheduler address "
        "tcp://host:port [default: this process]",
    ),
]
ClusterConfigOption = Annotated[
    Path | None,
    typer.Option("--cluster-config", help="YAML of cluster options (queue, cores, memory, gpus...; see configs/cluster/)"),
]


def apply_cluster(job: M, cluster: str | None, cluster_config: Path | None) -> M:
    """Set ``job.cluster`` from ``--cluster`` / ``--cluster-config`` (over the job file's section)."""
    if not (cluster or cluster_config):
        return job
    from pipelines.cluster import resolve_cluster
    from pipelines.config import ConfigError

    try:
        job.cluster = resolve_cluster(job.cluster, cluster, cluster_config)
    except ConfigError as err:
        raise fail(str(err)) from err
    return job
