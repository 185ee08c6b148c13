"""Per-slide run summary shared by batch jobs: JSON on disk and a rich table on screen."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Status = Literal["done", "skipped", "failed", "interrupted"]


@dataclass
class SlideResult:
    """What happened to one slide."""

    slide_id: str
    path: str
    status: Status
    n_patches: int = 0
    seconds: float = 0.0
    reason: str | None = None
    error_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def held_elsewhere(self) -> bool:
        """Skipped because another live process held its claim (not in the output yet)."""
        return self.status == "skipped" and bool(self.extra.get("busy"))

    @classmethod
    def failed(cls, slide_id: str, path: str | Path, err: BaseException, seconds: float = 0.0) -> SlideResult:
        return cls(slide_id, str(path), "failed", seconds=seconds, reason=str(err), error_type=type(err).__name__)


@dataclass
class RunSummary:
    """All slides of one run, in input order."""

    job: str
    results: list[SlideResult] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    #: why the run stopped early (Ctrl-C, SIGTERM ...); None for a run that went through
    interrupted: str | None = None

    def add(self, result: SlideResult) -> None:
        self.results.append(result)

    @property
    def n_failed(self) -> int:
        return sum(r.status == "failed" for r in self.results)

    @property
    def n_busy(self) -> int:
        """Slides left to another live process that held their claim (not in the output yet)."""
        return sum(r.held_elsewhere for r in self.results)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {
            "job": self.job,
            "started": self.started,
            "seconds": round(end - self.started, 3),
            "n_slides": len(self.results),
            "n_done": sum(r.status == "done" for r in self.results),
            "n_skipped": sum(r.status == "skipped" for r in self.results),
            "n_failed": self.n_failed,
            "n_busy": self.n_busy,
            "n_patches": self.n_patches,
            "interrupted": self.interrupted,
            "slides": [asdict(r) for r in self.results],
        }

    def write(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename)."""
        self.finished = self.finished or time.time()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        tmp.replace(path)
        return path

    def table(self):
        """A rich Table of the slides (imported lazily: library code has no UI at import)."""
        from rich.table import Table

        busy = f", {self.n_busy} still being written by another process" if self.n_busy else ""
        t = Table(title=f"slidepipe {self.job}: {len(self.results)} slides, {self.n_failed} failed{busy}")
        for col in ("slide", "status", "patches", "seconds", "reason"):
            t.add_column(col, overflow="fold")
        style = {"done": "green", "skipped": "cyan", "failed": "red", "interrupted": "yellow"}
        for r in self.results:
            t.add_row(r.slide_id, f"[{style[r.status]}]{r.status}", str(r.n_patches), f"{r.seconds:.2f}", r.reason or "")
        return t
