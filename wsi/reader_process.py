"""Read a grid's patches in a child process, handing batches back through shared memory.

In one process, reader threads and an encoder loop share the GIL: every small torch op of the
encoder gives the GIL up and waits to get it back from a reader thread busy in Python (cutting,
bookkeeping), which halves the throughput of small encoders even with a core to spare (and slows
the CUDA launch loop on a GPU). :class:`ReaderProcess` runs :class:`~wsi.reader.PatchReader` in
a child Python process instead, as PyTorch's ``DataLoader`` workers do:

- the child is started with ``subprocess`` (``python -m wsi.reader_process``), not
  ``multiprocessing``, so it never re-imports the caller's ``__main__`` and works inside daemonic
  processes (Dask workers); it exits when its parent goes away (its pipe closes);
- batches travel through a ring of slots in a memory-mapped temporary file (on ``/dev/shm`` when
  there is one), unlinked as soon as both sides have it open, so nothing is left behind even if
  either side is killed; only small messages (coords, indices, errors) are pickled;
- typed errors (``CorruptTileError``, ``SlideOpenError``...) are re-raised in the parent as they
  were raised in the child; a child that dies mid-slide raises :class:`ReaderProcessError` and the
  next read starts a fresh child.

``read_patches(path, grid, ...)`` takes a process from a small pool (one per concurrent reader),
so a run pays the child's start-up (~1 s of imports) once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi.errors import SlideError

if TYPE_CHECKING:
    from wsi.reader import PatchBatch
    from wsi.tiling import TileGrid

logger = logging.getLogger(__name__)

SLOTS = 4  # batches in flight between child and parent
_POLL_S = 0.5  # how often a waiting side checks that the other is alive


class ReaderProcessError(SlideError):
    """The child reader process died while reading a slide."""


def _shm_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def available() -> bool:
    """Process reading works here (POSIX: fd passing to a ``subprocess`` and unlink-while-open)."""
    return os.name == "posix"


class ReaderProcess:
    """One child process serving one read at a time (see the module docstring)."""

    def __init__(self) -> None:
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsi.reader_process", str(req_r), str(resp_w)],
            pass_fds=(req_r, resp_w), env=env, stdin=subprocess.DEVNULL, close_fds=True,
        )
        os.close(req_r)
        os.close(resp_w)
        self.req = Connection(req_w, readable=False)
        self.resp = Connection(resp_r, writable=False)
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.req.send(("quit",))
        for conn in (self.req, self.resp):
            conn.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _recv(self, path: Path) -> tuple:
        while not self.resp.poll(_POLL_S):
            if not self.alive:
                break
        try:
            return self.resp.recv()
        except (EOFError, OSError):
            code = self.proc.wait()
            raise ReaderProcessError(
                path,
                f"the reader process died while reading (exit code {code})",
                "check the file (a decoder crash on a damaged tile?); rerun, or read in threads "
                "with --reader thread",
            ) from None

    def read(
        self, path: str | Path, grid: TileGrid, *, batch_size: int = 64, transform: Any = None,
        **reader_kw: Any,
    ) -> Iterator[PatchBatch]:
        """Yield the grid's :class:`~wsi.reader.PatchBatch` es read by the child; ``transform``
        (picklable, e.g. a stain normaliser: uint8 batch → uint8 batch) runs in the child;
        ``reader_kw`` are :class:`~wsi.reader.PatchReader` options. ``skipped`` holds the skipped
        patches after iteration."""
        from wsi.reader import PatchBatch

        path = Path(path)
        self._next_id += 1
        rid = self._next_id
        p = int(grid.patch_size)
        slot_bytes = max(1, batch_size * p * p * 3)
        fd, ring_path = tempfile.mkstemp(prefix="slidepipe-ring-", dir=_shm_dir())
        unlinked = False
        try:
            os.ftruncate(fd, slot_bytes * SLOTS)
            ring = mmap.mmap(fd, slot_bytes * SLOTS)
        finally:
            os.close(fd)
        self.skipped: list[tuple[int, str]] = []
        self.stats: dict[str, Any] = {}
        ended = False
        try:
            self.req.send(("read", rid, str(path), grid, batch_size, transform, reader_kw, ring_path, slot_bytes,
                           SLOTS))
            while True:
                msg = self._recv(path)
                kind = msg[0]
                if msg[1] != rid:  # left over from an earlier read that was stopped
                    continue
                if not unlinked:  # the child has the ring open (its first message says so)
                    os.unlink(ring_path)
                    unlinked = True
                if kind == "batch":
                    _, _, slot, n, coords, indices = msg
                    view = np.frombuffer(ring, np.uint8, n * p * p * 3, slot * slot_bytes)
                    images = view.reshape(n, p, p, 3).copy()
                    del view
                    self.req.send(("free", rid, slot))
                    yield PatchBatch(images, coords, indices)
                elif kind == "end":
                    ended = True
                    self.skipped, self.stats = msg[2], msg[3]
                    return
                elif kind == "error":
                    ended = True
                    raise msg[2]
        finally:
            if not ended and self.alive:  # stopped early: cancel and wait for the child to finish
                try:
                    self.req.send(("cancel", rid))
                    while True:
                        msg = self._recv(path)
                        if msg[1] == rid and msg[0] in ("end", "error"):
                            break
                except (ReaderProcessError, OSError):
                    pass
            if not unlinked:
                with contextlib.suppress(OSError):
                    os.unlink(ring_path)
            ring.close()


# ------------------------------------------------------------------------------------- pool
_POOL: list[ReaderProcess] = []
_POOL_LOCK = threading.Lock()


def _take() -> ReaderProcess:
    with _POOL_LOCK:
        while _POOL:
            rp = _POOL.pop()
            if rp.alive:
                return rp
            rp.close()
    return ReaderProcess()


def _give_back(rp: ReaderProcess) -> None:
    if not rp.alive:
        rp.close()
        return
    with _POOL_LOCK:
        _POOL.append(rp)


def shutdown() -> None:
    """Stop the pooled child processes (also at interpreter exit)."""
    with _POOL_LOCK:
        procs, _POOL[:] = list(_POOL), []
    for rp in procs:
        rp.close()


atexit.register(shutdown)


class ProcessPatchReader:
    """Like :class:`~wsi.reader.PatchReader` (same options, ``skipped`` after iteration), reading
    in a pooled child process."""

    def __init__(
        self, path: str | Path, grid: TileGrid, *, batch_size: int = 64, transform: Any = None, **reader_kw: Any
    ) -> None:
        self.path = Path(path)
        self.grid = grid
        self.batch_size = int(batch_size)
        self.transform = transform
        self.reader_kw = reader_kw
        self.skipped: list[tuple[int, str]] = []
        self.stats: dict[str, Any] = {}

    def __len__(self) -> int:
        return -(-len(self.grid) // self.batch_size)

    def __iter__(self) -> Iterator[PatchBatch]:
        rp = _take()
        try:
            yield from rp.read(
                self.path, self.grid, batch_size=self.batch_size, transform=self.transform, **self.reader_kw
            )
            self.skipped, self.stats = rp.skipped, rp.stats
        finally:
            _give_back(rp)


# ------------------------------------------------------------------------------------- child
def _serve(req: Connection, resp: Connection) -> None:
    from wsi.reader import PatchReader

    free: set[int] = set()
    cancelled: set[int] = set()
    current = [0]  # id of the read being served

    def handle(msg: tuple) -> bool:
        """Book-keep a control message; False on quit."""
        if msg[0] == "free" and msg[1] == current[0]:  # (frees of a stopped read are stale)
            free.add(msg[2])
        elif msg[0] == "cancel":
            cancelled.add(msg[1])
        elif msg[0] == "quit":
            return False
        return True

    while True:
        try:
            msg = req.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg[0] != "read":
            if not handle(msg):
                return
            continue
        _, rid, path, grid, batch_size, transform, reader_kw, ring_path, slot_bytes, n_slots = msg
        current[0] = rid
        free.clear()
        free.update(range(n_slots))
        cancelled.clear()
        ring = None
        try:
            with open(ring_path, "r+b") as f:
                ring = mmap.mmap(f.fileno(), slot_bytes * n_slots)
            reader = PatchReader(path, grid, batch_size=batch_size, **reader_kw)
            for batch in reader:
                while req.poll():  # frees and cancels that arrived meanwhile
                    if not handle(req.recv()):
                        return
                while not free and rid not in cancelled:
                    if not handle(req.recv()):
                        return
                if rid in cancelled:
                    break
                slot = free.pop()
                n = len(batch)
                images = batch.images if transform is None else transform.transform(batch.images)
                dst = np.frombuffer(ring, np.uint8, images.size, slot * slot_bytes)
                dst[:] = images.reshape(-1)
                del dst
                resp.send(("batch", rid, slot, n, batch.coords, batch.indices))
            resp.send(("end", rid, list(reader.skipped), dict(reader.stats)))
        except (EOFError, BrokenPipeError):
            return  # parent gone
        except BaseException as err:  # typed slide errors go back to the parent
            try:
                resp.send(("error", rid, err))
            except (EOFError, OSError):
                return
            except Exception:  # unpicklable: keep type name and message
                resp.send(("error", rid, SlideError(path, f"{type(err).__name__}: {err}")))
        finally:
            if ring is not None:
                ring.close()


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m wsi.reader_process REQUEST_FD RESPONSE_FD``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we exit on EOF
    args = sys.argv[1:] if argv is None else argv
    req = Connection(int(args[0]), writable=False)
    resp = Connection(int(args[1]), readable=False)
    _serve(req, resp)


if __name__ == "__main__":
    main()
