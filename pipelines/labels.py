"""Label tables (CSV/TSV/parquet): one row per slide with ``slide_id``, optional ``patient_id`` and
the columns a task reads (a class label, several targets, a value, survival time and event)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


class LabelTableError(ValueError):
    """The label table cannot be used; the message names the file, the reason and the fix."""


class UnknownSlidesError(LabelTableError):
    """Slides of the label table are not in the feature store (or vice versa for splits)."""

    def __init__(self, message: str, slide_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.slide_ids = list(slide_ids)


def _read(source: str | Path | pd.DataFrame) -> tuple[pd.DataFrame, str]:
    if isinstance(source, pd.DataFrame):
        return source.copy(), "label table"
    path = Path(source)
    if not path.is_file():
        raise LabelTableError(f"{path}: label table not found. Fix: check the --labels path")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path), str(path)
    sep = "\t" if suffix in (".tsv", ".tab") else ","
    return pd.read_csv(path, sep=sep, dtype={"slide_id": str, "patient_id": str}), str(path)


def read_label_table(
    source: str | Path | pd.DataFrame,
    *,
    target: str | Sequence[str] = "label",
    drop_empty: str = "all",
) -> pd.DataFrame:
    """Read the table; returns ``slide_id``, ``patient_id`` (default: the slide id) and the
    ``target`` column(s).

    Rows whose target columns are empty are dropped and logged by name: with ``drop_empty="all"``
    only rows where every target is empty (a missing value in one of several targets is masked
    out of that target's loss only), with ``"any"`` rows missing any of them (survival time and
    event belong together).
    """
    columns = [target] if isinstance(target, str) else list(target)
    df, name = _read(source)
    if "slide_id" not in df.columns:
        raise LabelTableError(
            f"{name}: no 'slide_id' column (columns: {list(df.columns)}). "
            "Fix: name the column of slide ids (file names without extension) 'slide_id'"
        )
    absent = [c for c in columns if c not in df.columns]
    if absent:
        what = f"target column {absent[0]!r}" if len(absent) == 1 else f"target columns {absent}"
        raise LabelTableError(
            f"{name}: {what} not found (columns: {list(df.columns)}). "
            "Fix: pass --target (or --time/--event for survival) with columns of this table"
        )
    df = df.assign(slide_id=df["slide_id"].astype(str))
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    df["patient_id"] = df["patient_id"].fillna(df["slide_id"]).astype(str)
    missing = df[columns].isna()
    empty = missing.all(axis=1) if drop_empty == "all" else missing.any(axis=1)
    if empty.any():
        log.warning("%s: %d slide(s) without a value of %s are left out: %s", name, int(empty.sum()),
                    columns, ", ".join(df.loc[empty, "slide_id"].head(10)))  # fmt: skip
        df = df[~empty]
    dup = df.duplicated("slide_id", keep=False)
    if dup.any():
        raise LabelTableError(
            f"{name}: slide ids listed more than once: {sorted(set(df.loc[dup, 'slide_id']))[:10]}. "
            "Fix: keep one row per slide"
        )
    return df[["slide_id", "patient_id", *columns]].reset_index(drop=True)


__all__ = ["LabelTableError", "UnknownSlidesError", "read_label_table"]
