"""Turn the user's slide arguments (files, directories, glob patterns) into a sorted file list."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from wsi.slide import SLIDE_SUFFIXES, slide_id_for

__all__ = ["SLIDE_SUFFIXES", "InputError", "expand_slides", "slide_id_for"]


class InputError(ValueError):
    """A slide argument matched nothing; the message names it."""


def expand_slides(items: Iterable[str | Path]) -> list[Path]:
    """Files are kept as given; directories are searched (non-recursively) for slide files;
    anything else is treated as a glob pattern. Duplicates are removed; order is sorted."""
    found: dict[Path, None] = {}
    for item in items:
        p = Path(item).expanduser()
        if p.is_file():
            found[p] = None
        elif p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_file() and child.suffix.lower() in SLIDE_SUFFIXES:
                    found[child] = None
        else:
            matches = sorted(glob.glob(str(p), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                raise InputError(
                    f"{item}: no such file, directory or matching slide. "
                    "Fix: check the path or quote the glob pattern"
                )
            for f in files:
                found[f] = None
    paths = sorted(found)
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
