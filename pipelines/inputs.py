"""Turn the user's slide arguments (files, directories, glob patterns) into a sorted file list."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from wsi.slide import SLIDE_SUFFIXES, slide_id_for

__all__ = ["SLIDE_SUFFIXES", "InputError", "expand_slides", "slide_id_for"]


class InputError(ValueError):
    """A slide argument matched nothing, or named an unusable file; the message names it."""


def _key(p: Path) -> str:
    """The same file however it is spelled (relative or absolute, ``..``), but symbolic links of
    other names stay slides of their own (a link is how a file is given another slide id)."""
    return os.path.abspath(p)


def _not_hidden(p: Path) -> Path:
    """A hidden file (``.x.svs``) would give a hidden slide id, which stores refuse and outputs hide."""
    if p.name.startswith("."):
        raise InputError(
            f"{p}: hidden file (its name starts with '.'): a slide id cannot start with '.', and "
            "directories are searched without their hidden files. Fix: rename it, or link it under "
            f"a name without the dot (in its folder: ln -s {p.name} {p.name.lstrip('.')})"
        )
    return p


def expand_slides(items: Iterable[str | Path]) -> list[Path]:
    """Files are kept as given; directories are searched (non-recursively) for slide files,
    skipping hidden ones; anything else is treated as a glob pattern. A file named twice (say
    relative and absolute) is kept once; order is sorted. Raises ``InputError`` for an argument
    that matches no slide, a hidden file, or two files with the same slide id."""
    found: dict[str, Path] = {}  # absolute path -> as given (the first time)
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            found.setdefault(_key(p), _not_hidden(p))
        elif p.is_dir():
            children = [
                c for c in sorted(p.iterdir())
                if c.is_file() and c.suffix.lower() in SLIDE_SUFFIXES and not c.name.startswith(".")
            ]
            if not children:
                raise InputError(
                    f"{item}: no slides found in this directory (no slide files: names ending "
                    f"{', '.join(SLIDE_SUFFIXES[:4])}, ...; hidden files are skipped). "
                    "Fix: check the path, or pass the slide files themselves"
                )
            for child in children:
                found.setdefault(_key(child), child)
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise InputError(
                    f"{item}: no such file, directory or matching slide. "
                    "Fix: check the path or quote the glob pattern"
                )
            for f in files:
                found.setdefault(_key(f), _not_hidden(f))
    paths = sorted(found.values())
    ids: dict[str, Path] = {}
    for p in paths:
        sid = slide_id_for(p)
        if sid in ids:
            raise InputError(
                f"{p}: slide id '{sid}' is also the id of {ids[sid]}. "
                "Fix: rename one file or run the two directories separately"
            )
        ids[sid] = p
    return paths
