"""Study designs as registered tasks: ``create_task(job)``, ``task_from_dict(d)``, ``list_tasks()``.

Every task is a ``Task`` subclass registered by name (``classification``, ``regression``,
``survival``) with its losses as data; the trainer, ``predict`` and the reports only talk to
the interface in ``pipelines.tasks.base``.
"""

from __future__ import annotations

from typing import Any

from pipelines.tasks.base import Targets, Task
from pipelines.tasks.classification import ClassificationTask
from pipelines.tasks.regression import RegressionTask
from pipelines.tasks.survival import SurvivalTask

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Add a ``Task`` subclass to the registry under ``cls.name``."""
    if cls.name in _TASKS:
        raise ValueError(f"task {cls.name!r} is already registered")
    _TASKS[cls.name] = cls
    return cls


for _cls in (ClassificationTask, RegressionTask, SurvivalTask):
    register_task(_cls)


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task_class(name: str) -> type[Task]:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(list_tasks())}") from None


def task_columns(job: Any) -> list[str]:
    """Label-table columns a job's task reads: the targets, or survival's time and event."""
    if job.task == "survival":
        return [job.time, job.event]
    return [job.target] if isinstance(job.target, str) else list(job.target)


def create_task(job: Any) -> Task:
    """The (unfitted) task of a ``TrainJob``."""
    cls = get_task_class(job.task)
    options: dict[str, Any] = {"folds": job.folds}
    if job.task == "survival":
        options["bins"] = job.bins
    return cls(task_columns(job), loss=job.loss, balance=job.balance, **options)


def task_from_dict(data: dict[str, Any]) -> Task:
    """Rebuild a (fitted) task from ``Task.to_dict()`` (as kept in checkpoints)."""
    cls = get_task_class(data["name"])
    task = cls(data["columns"], loss=data.get("loss"), balance=data.get("balance", "none"), **data.get("options", {}))
    task.state = dict(data.get("state", {}))
    return task


def legacy_task(classes: list[str], target: str) -> Task:
    """The task of a checkpoint written before tasks existed (single-target classification)."""
    task = ClassificationTask([target])
    task.state["classes"] = [list(classes)]
    return task


__all__ = ["ClassificationTask", "RegressionTask", "SurvivalTask", "Targets", "Task", "create_task",
           "get_task_class", "legacy_task", "list_tasks", "register_task", "task_columns", "task_from_dict"]  # fmt: skip
