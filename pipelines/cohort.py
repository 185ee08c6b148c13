"""The cohort a run trains on: label table x store, encoded by the task, at slide or patient level.

``build_cohort`` matches the label table with the store's slides (unknown slides are a named
error) and encodes the targets with the task. ``pool_patients`` turns a slide-level cohort into a
patient-level one: every patient is one bag holding all of its slides' patches (in slide-id
order), and all its slides must carry the same labels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.labels import LabelTableError, UnknownSlidesError
from pipelines.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class Cohort:
    """Bags of a run: ids (slides, or patients at patient level), patients, targets, the task.

    ``y (n, k)`` float64, NaN = missing; ``strata`` stratify the splits; ``members`` maps each bag to
    its slides (one slide per bag at slide level).
    """

    slide_ids: list[str]
    patients: list[str]
    y: np.ndarray
    task: Task
    strata: np.ndarray
    level: str = "slide"
    members: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return self.slide_ids

    @property
    def classes(self) -> list[str]:
        """Class names of the (first) classification target; empty for other tasks."""
        classes = self.task.state.get("classes")
        return list(classes[0]) if classes else []

    @property
    def labels(self) -> dict[str, np.ndarray]:
        return dict(zip(self.slide_ids, self.y, strict=True))

    @property
    def patient_of(self) -> dict[str, str]:
        return dict(zip(self.slide_ids, self.patients, strict=True))

    def id_columns(self, bag_id: str) -> dict[str, Any]:
        """The identifying columns of a bag in prediction tables."""
        if self.level == "patient":
            return {"patient_id": bag_id, "slide_ids": ";".join(self.members.get(bag_id, []))}
        return {"slide_id": bag_id, "patient_id": self.patient_of[bag_id]}

    def subset(self, keep: Sequence[int]) -> Cohort:
        keep = list(keep)
        ids = [self.slide_ids[i] for i in keep]
        return Cohort(ids, [self.patients[i] for i in keep], self.y[keep], self.task, self.strata[keep], self.level,
                      {k: v for k, v in self.members.items() if k in set(ids)})  # fmt: skip

    def table(self) -> pd.DataFrame:
        """The cohort as a label table (written to the run's ``labels.csv``)."""
        ids = pd.DataFrame([self.id_columns(s) for s in self.slide_ids])
        return pd.concat([ids, pd.DataFrame(self.task.decode(self.y))], axis=1)


def build_cohort(
    table: pd.DataFrame,
    store_ids: Sequence[str],
    *,
    task: Task,
    allow_missing: bool = False,
    table_name: str = "label table",
    store_name: str = "store",
) -> Cohort:
    """Match the label table with the store's slides and encode the targets with ``task``."""
    in_store = set(store_ids)
    missing = [s for s in table["slide_id"] if s not in in_store]
    if missing:
        msg = (
            f"{table_name}: {len(missing)} slide(s) of the label table are not in {store_name}: "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        )
        if not allow_missing:
            raise UnknownSlidesError(
                msg + ". Fix: extract them, correct the slide ids, or pass --allow-missing to skip them",
                missing,
            )
        log.warning("%s; skipped (--allow-missing)", msg)
        table = table[table["slide_id"].isin(in_store)].reset_index(drop=True)
    unlabeled = sorted(in_store - set(table["slide_id"]))
    if unlabeled:
        log.info("%d slide(s) of %s have no label and are not used: %s", len(unlabeled), store_name,
                 ", ".join(unlabeled[:10]))  # fmt: skip
    targets = task.encode(table, name=table_name)
    ids = table["slide_id"].tolist()
    _warn_conflicting_patients(table, targets.y, table_name)
    return Cohort(ids, table["patient_id"].tolist(), targets.y, task, targets.strata,
                  members={s: [s] for s in ids})  # fmt: skip


def _warn_conflicting_patients(table: pd.DataFrame, y: np.ndarray, name: str) -> None:
    """Slides of one patient with different labels train fine at slide level, but usually mean a
    data error: say which patients."""
    codes = pd.DataFrame(np.nan_to_num(y, nan=-1.0)).astype(str).agg("|".join, axis=1)
    per = codes.groupby(table["patient_id"].to_numpy()).nunique()
    conflicting = per[per > 1].index.tolist()
    if conflicting:
        log.warning("%s: %d patient(s) have slides with different labels: %s", name, len(conflicting),
                    ", ".join(map(str, conflicting[:10])))  # fmt: skip


def pool_patients(cohort: Cohort, bags: Mapping[str, torch.Tensor]) -> tuple[Cohort, dict[str, torch.Tensor]]:
    """One bag per patient: its slides' patches concatenated (slides in id order).

    A patient whose slides carry different labels is a ``LabelTableError`` naming the patient.
    """
    order: dict[str, list[int]] = {}
    for i, p in enumerate(cohort.patients):
        order.setdefault(p, []).append(i)
    ids, ys, strata, members, pooled = [], [], [], {}, {}
    for patient, rows in order.items():
        rows = sorted(rows, key=lambda i: cohort.slide_ids[i])
        y = cohort.y[rows]
        if not np.all((y == y[0]) | (np.isnan(y) & np.isnan(y[0]))):
            raise LabelTableError(
                f"patient {patient}: slides {[cohort.slide_ids[i] for i in rows]} carry different labels "
                f"{cohort.task.decode(y)}. Fix: one label per patient for --level patient, or train at slide level"
            )
        slides = [cohort.slide_ids[i] for i in rows]
        ids.append(patient)
        ys.append(y[0])
        strata.append(cohort.strata[rows[0]])
        members[patient] = slides
        pooled[patient] = torch.cat([bags[s] for s in slides]) if len(slides) > 1 else bags[slides[0]]
    pc = Cohort(ids, list(ids), np.stack(ys), cohort.task, np.asarray(strata), "patient", members)
    return pc, pooled


__all__ = ["Cohort", "build_cohort", "pool_patients"]
