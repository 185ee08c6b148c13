"""``slidepipe info``: what a slide file is — dimensions, pyramid levels, mpp and its source, vendor, backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipelines.commands._common import console, fail, setup_logging


def command(
    slides: Annotated[list[str], typer.Argument(help="slide files, directories or glob patterns")],
    slide_mpp: Annotated[
        float | None, typer.Option(help="µm/px of level 0 to use when a file has none in its metadata")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="slide reader: auto (openslide, then tiffslide), openslide, tiffslide")
    ] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (one object per slide) instead of tables")] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML with `slide_mpp` / `backend` keys; flags override it")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
) -> None:
    """Describe slides: dimensions, levels (size, downsample, µm/px), mpp and where it came from
    (vendor, tiff-resolution, override, or missing), vendor and the backend that opened it.

    Exit code 1 if any file could not be opened (the reason is printed), 2 for a usage error.
    """
    from pipelines.inputs import InputError, expand_slides
    from wsi.errors import SlideError
    from wsi.slide import open_slide

    setup_logging(verbose)
    if config is not None:
        import yaml

        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise fail(f"{config}: cannot read config ({err}). Fix: check the --config path") from err
        tiling = data.get("tiling", {}) if isinstance(data.get("tiling"), dict) else {}
        slide_mpp = slide_mpp if slide_mpp is not None else data.get("slide_mpp", tiling.get("slide_mpp"))
        if backend == "auto":
            backend = data.get("backend", tiling.get("backend", "auto"))
    if backend not in ("auto", "openslide", "tiffslide"):
        raise fail(f"--backend {backend!r}: choose auto, openslide or tiffslide")
    try:
        paths = expand_slides(slides)
    except InputError as err:
        raise fail(str(err)) from err

    from rich.console import Console

    stdout = Console()
    failed = 0
    for path in paths:
        try:
            with open_slide(path, backend=backend, mpp=slide_mpp, require_mpp=False) as s:
                info = s.info()
        except SlideError as err:
            failed += 1
            if as_json:
                typer.echo(json.dumps({"path": str(path), "error": type(err).__name__, "reason": str(err)}))
            else:
                console.print(f"[red]{type(err).__name__}[/red] {err}")
            continue
        if as_json:
            typer.echo(json.dumps(info))
        else:
            stdout.print(_table(info))
    if failed:
        raise typer.Exit(1)


def _table(info: dict):
    """A key/value summary above the table of levels (a rich Group)."""
    from rich.console import Group
    from rich.table import Table

    mpp = info["mpp"]
    mpp_txt = (
        "[yellow]missing[/yellow] (pass --slide-mpp)" if mpp is None else f"{mpp:.4f} µm/px ({info['mpp_source']})"
    )
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    w, h = info["dimensions"]
    rows = [
        ("slide", f"{info['slide_id']}  [dim]{info['path']}[/dim]"),
        ("dimensions", f"{w} x {h} px"),
        ("mpp", mpp_txt),
        ("vendor", info["vendor"] or "-"),
        ("backend", info["backend"]),
    ]
    if info.get("objective_power"):
        rows.append(("objective", f"{info['objective_power']}x (not used: resolution comes from mpp)"))
    for key, value in rows:
        head.add_row(key, value)
    levels = Table()
    for col in ("level", "width", "height", "downsample", "µm/px"):
        levels.add_column(col, justify="right")
    for lv in info["levels"]:
        lv_mpp = "-" if lv["mpp"] is None else f"{lv['mpp']:.4f}"
        levels.add_row(
            str(lv["index"]), str(lv["dimensions"][0]), str(lv["dimensions"][1]), f"{lv['downsample']:.3f}", lv_mpp
        )
    return Group(head, levels, "")
