"""Patient-grouped, stratified, seeded cross-validation splits that are saved and reusable.

A split is ``k`` folds x ``r`` repeats (``StratifiedGroupKFold``, one seed per repeat); inside
each training part a validation share is split off the same way, for early stopping and
checkpoint selection. An optional held-out test set is split off once, before everything
else. No patient is ever in two of (train, val, test, held-out) of one fold; ``check`` proves
it and runs again when a saved file is reused.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

log = logging.getLogger(__name__)

SPLITS_VERSION = 1


class SplitError(ValueError):
    """Splits cannot be made or reused (too few patients per class, leakage, unknown slides)."""


@dataclass
class Fold:
    """One training fold: slide ids of the train, validation and test parts."""

    repeat: int
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    @property
    def name(self) -> str:
        return f"fold{self.fold}" if self.repeat == 0 else f"repeat{self.repeat}-fold{self.fold}"


@dataclass
class Splits:
    """All folds of a run plus the held-out test slides."""

    folds: list[Fold]
    heldout: list[str] = field(default_factory=list)
    seed: int = 0
    n_folds: int = 5
    repeats: int = 1
    test_frac: float = 0.0
    val_frac: float = 0.2

    def slide_ids(self) -> set[str]:
        ids = set(self.heldout)
        for f in self.folds:
            ids.update(f.train, f.val, f.test)
        return ids

    def check(self, patients: Mapping[str, str]) -> None:
        """Raise ``SplitError`` if any patient appears in two parts of one fold."""
        held = {patients[s] for s in self.heldout}
        for f in self.folds:
            parts = {"train": f.train, "val": f.val, "test": f.test}
            groups = {k: {patients[s] for s in v} for k, v in parts.items()}
            names = list(groups)
            for i, a in enumerate(names):
                shared = groups[a] & held
                for b in names[i + 1 :]:
                    shared |= groups[a] & groups[b]
                if shared:
                    raise SplitError(
                        f"{f.name}: patient(s) {sorted(shared)[:5]} are in more than one part "
                        "(train/val/test/held-out). Fix: regenerate the splits (drop --splits)"
                    )

    def to_dict(self) -> dict:
        return {"version": SPLITS_VERSION, **asdict(self)}

    def save(self, out_dir: str | Path, patients: Mapping[str, str] | None = None) -> Path:
        """Write ``splits.json`` (reusable with ``--splits``) and a long ``splits.csv``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "splits.json"
        path.write_text(json.dumps(self.to_dict(), indent=1))
        rows = [
            {"slide_id": s, "repeat": f.repeat, "fold": f.fold, "part": part}
            for f in self.folds
            for part in ("train", "val", "test")
            for s in getattr(f, part)
        ]
        rows += [{"slide_id": s, "repeat": -1, "fold": -1, "part": "heldout"} for s in self.heldout]
        df = pd.DataFrame(rows, columns=["slide_id", "repeat", "fold", "part"])
        if patients is not None:
            df.insert(1, "patient_id", [patients[s] for s in df["slide_id"]])
        df.to_csv(out_dir / "splits.csv", index=False)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        """Read a ``splits.json`` written by ``save`` (or a run directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "splits.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise SplitError(f"{path}: splits file not found. Fix: pass a run's splits.json") from err
        except json.JSONDecodeError as err:
            raise SplitError(f"{path}: not valid JSON ({err}). Fix: pass a run's splits.json") from err
        if data.pop("version", None) != SPLITS_VERSION:
            raise SplitError(f"{path}: unknown splits format. Fix: regenerate the splits")
        folds = [Fold(**f) for f in data.pop("folds")]
        return cls(folds=folds, **data)


def _kfold(n_splits: int, seed: int, ids, y, groups):
    # We check class sizes ourselves; sklearn's "least populated class" notice is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            return list(skf.split(np.zeros(len(ids)), y, groups))
        except ValueError as err:  # e.g. fewer patients than parts
            per = _patients_per_class(np.asarray(y), np.asarray(groups, dtype=object))
            raise SplitError(
                f"cannot split {len(set(groups))} patient(s) into {n_splits} parts (patients per stratum, class "
                f"or bin: patients: {per}; {err}). Fix: use fewer --folds (a training part must still hold "
                "patients to split off its validation part), a smaller --test-frac, or more data"
            ) from err


def _patients_per_class(y: np.ndarray, groups: np.ndarray) -> dict[int, int]:
    return {int(c): len(set(groups[y == c])) for c in np.unique(y)}


def make_splits(
    slide_ids: Sequence[str],
    labels: Sequence[int],
    patients: Sequence[str],
    *,
    folds: int = 5,
    repeats: int = 1,
    test_frac: float = 0.0,
    val_frac: float = 0.2,
    seed: int = 0,
) -> Splits:
    """Stratified, patient-grouped ``folds`` x ``repeats`` splits with validation parts."""
    ids = np.asarray(slide_ids, dtype=object)
    y = np.asarray(labels)
    groups = np.asarray(patients, dtype=object)
    heldout: list[str] = []
    if test_frac > 0:
        n_test = max(2, round(1 / test_frac))
        _, test_idx = _kfold(n_test, seed + 7919, ids, y, groups)[0]
        heldout = sorted(ids[test_idx].tolist())
        keep = np.setdiff1d(np.arange(len(ids)), test_idx)
        ids, y, groups = ids[keep], y[keep], groups[keep]
    per_class = _patients_per_class(y, groups)
    if min(per_class.values()) < folds:
        raise SplitError(
            f"{folds}-fold cross-validation needs at least {folds} patients per class, found "
            f"{per_class} (class index: patients). Fix: use fewer --folds or more data"
        )
    n_val = max(2, round(1 / val_frac))
    out: list[Fold] = []
    for r in range(repeats):
        for k, (train_idx, test_idx) in enumerate(_kfold(folds, seed + r, ids, y, groups)):
            # Small cohorts: the inner split cannot have more parts than patients per class.
            inner_k = max(2, min(n_val, *_patients_per_class(y[train_idx], groups[train_idx]).values()))
            inner = _kfold(inner_k, seed + 1000 * (r + 1) + k, ids[train_idx], y[train_idx], groups[train_idx])
            fit_idx, val_idx = inner[0]
            out.append(
                Fold(
                    repeat=r,
                    fold=k,
                    train=sorted(ids[train_idx][fit_idx].tolist()),
                    val=sorted(ids[train_idx][val_idx].tolist()),
                    test=sorted(ids[test_idx].tolist()),
                )
            )
    splits = Splits(out, heldout, seed, folds, repeats, test_frac, val_frac)
    splits.check(dict(zip(slide_ids, patients, strict=True)))
    return splits
