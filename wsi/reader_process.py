"""Read a grid's patches in a child process, handing batches back through shared memory.

In one process, reader threads and an encoder loop share the GIL: every small torch op of the
encoder gives the GIL up and waits to get it back from a reader thread busy in Python (cutting,
bookkeeping), which halves the throughput of small encoders even with a core to spare (and slows
the CUDA launch loop on a GPU). :class:`ReaderProcess` runs :class:`~wsi.reader.PatchReader` in
a child Python process instead, as PyTorch's ``DataLoader`` workers do:

- the child is started with ``subprocess`` (``python -m wsi.reader_process``), not
  ``multiprocessing``, so it never re-imports the caller's ``__main__`` and works inside daemonic
  processes (Dask workers); it exits when its parent goes away (its pipe closes);
- batches travel through a ring of slots in shared memory: a nameless temporary file (on
  ``/dev/shm`` when there is one) whose descriptor is passed to the child over a Unix socket, so
  nothing is ever left behind, whichever side is killed. Images, coords and indices stay in the
  ring; per batch the child sends one tiny pickled message (read id, slot, count) and the parent
  hands the slot back with one byte on a pipe of its own (no pickling, no lock);
- reads are queued: :meth:`ReaderProcess.start` sends a request at once and the child serves
  requests in order, so the next slide is decoded while the current one is still being encoded
  (messages carry the read's id; those of cancelled reads are dropped);
- typed errors (``CorruptTileError``, ``SlideOpenError``...) are re-raised in the parent as they
  were raised in the child; a child that dies mid-slide raises :class:`ReaderProcessError` and the
  next read starts a fresh child.

:class:`ProcessPatchReader` takes a process from a small pool (one per concurrent reader), so a
run pays the child's start-up (~1 s of imports) once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi.errors import SlideError

if TYPE_CHECKING:
    from wsi.reader import PatchBatch
    from wsi.tiling import TileGrid

logger = logging.getLogger(__name__)

SLOTS = 4  # batches in flight between child and parent, per read
_POLL_S = 0.5  # how often a waiting side checks that the other is alive


class ReaderProcessError(SlideError):
    """The child reader process died while reading a slide."""


def _ring_file(nbytes: int) -> Any:
    """A nameless temporary file of ``nbytes`` with its pages reserved: on ``/dev/shm`` when
    there is room (containers often give it only 64 MB, and a full tmpfs would kill the child
    with SIGBUS mid-write), else in the temp dir (page cache)."""
    dirs = ["/dev/shm"] if os.access("/dev/shm", os.W_OK) else []
    for d in [*dirs, None]:
        f = tempfile.TemporaryFile(dir=d)  # noqa: SIM115 (returned open: the caller closes it)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                os.ftruncate(f.fileno(), nbytes)
            return f
        except OSError:
            f.close()
            if d is None:
                raise
    raise AssertionError("unreachable")


def available() -> bool:
    """Process reading works here (POSIX: fd passing over Unix sockets)."""
    return os.name == "posix" and hasattr(socket, "send_fds")


def _died(path: Path, code: int | None) -> ReaderProcessError:
    return ReaderProcessError(
        path,
        f"the reader process died while reading (exit code {code})",
        "check the file (a decoder crash on a damaged tile?); rerun, or read in threads with --reader thread",
    )


class ReaderProcess:
    """One child process serving queued reads in order (see the module docstring).

    ``start`` may be called from any thread; a read's batches are received by the thread that
    iterates it (one at a time).
    """

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        with contextlib.ExitStack() as ours, contextlib.ExitStack() as childs:  # childs: closed here in any case
            req_r, req_w = os.pipe()
            childs.callback(os.close, req_r)
            ours.callback(os.close, req_w)
            resp_r, resp_w = os.pipe()
            childs.callback(os.close, resp_w)
            ours.callback(os.close, resp_r)
            self._fds, child_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            childs.callback(child_fds.close)
            ours.callback(self._fds.close)
            fds = (req_r, resp_w, child_fds.fileno())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "wsi.reader_process", *map(str, fds)],
                pass_fds=fds, env=env, stdin=subprocess.DEVNULL, close_fds=True,
            )
            ours.pop_all()  # started: this side's ends stay open (an error, e.g. out of processes, closed them)
        self.req = Connection(req_w, readable=False)
        self.resp = Connection(resp_r, writable=False)
        self._next_id = 0
        self._send_lock = threading.Lock()
        self._live: set[int] = set()  # reads started and neither finished nor closed
        self._inbox: dict[int, deque] = {}  # messages received for a read other than the one asked for
        self.broken = False  # interrupted mid-message: never reused
        _ALL.add(self)

    @property
    def alive(self) -> bool:
        """The child runs and its pipes are in step (a usable reader)."""
        return not self.broken and self.proc.poll() is None

    def close(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError, ReaderProcessError):
                self._send(("quit",))
        for conn in (self.req, self.resp):
            conn.close()
        self._fds.close()
        if self.broken:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _io(self, path: Path | None, fn: Any, *args: Any) -> Any:
        """Run one pipe operation: a dead child is a ``ReaderProcessError``; anything else that
        interrupts it (Ctrl-C mid-message) leaves the pipes out of step, so the child is retired."""
        try:
            return fn(*args)
        except (EOFError, OSError):
            self.broken = True
            raise _died(path or Path("?"), self.proc.poll()) from None
        except BaseException:
            self.broken = True
            raise

    def _send(self, msg: tuple, fds: list[int] | None = None, path: Path | None = None) -> None:
        data = ForkingPickler.dumps(msg)  # before anything is written: a pickling error leaves nothing half-sent

        def send() -> None:
            if fds:  # the ring's and the free pipe's descriptors, then their request
                socket.send_fds(self._fds, [b"r"], fds)
            self.req.send_bytes(data)

        with self._send_lock:
            self._io(path, send)

    def _recv(self, path: Path) -> tuple:
        def recv() -> tuple:
            while not self.resp.poll(_POLL_S):
                if self.proc.poll() is not None:
                    break
            return self.resp.recv()

        return self._io(path, recv)

    def _next(self, rid: int, path: Path) -> tuple:
        """The next message of read ``rid``; those of other live reads are kept for them, those of
        finished or cancelled reads dropped."""
        kept = self._inbox.get(rid)
        if kept:
            return kept.popleft()
        while True:
            msg = self._recv(path)
            if msg[1] == rid:
                return msg
            if msg[1] in self._live:
                self._inbox.setdefault(msg[1], deque()).append(msg)

    def _forget(self, rid: int, *, cancel: bool) -> None:
        self._live.discard(rid)
        self._inbox.pop(rid, None)
        if cancel and self.alive:
            with contextlib.suppress(ReaderProcessError):
                self._send(("cancel", rid))

    def cancel_all(self) -> None:
        """Cancel every read started and not finished (the child drops them in turn)."""
        for rid in list(self._live):
            self._forget(rid, cancel=True)

    def start(
        self, path: str | Path, grid: TileGrid, *, batch_size: int = 64, transform: Any = None,
        copy: bool = True, **reader_kw: Any,
    ) -> ReadStream:
        """Queue a read of the grid's patches; the child starts on it as soon as it is free.

        ``transform`` (picklable, e.g. a stain normaliser: uint8 batch → uint8 batch) runs in the
        child; ``reader_kw`` are :class:`~wsi.reader.PatchReader` options. With ``copy=False`` a
        batch's images view shared memory and stay valid only until the next batch is asked for.
        """
        path = Path(path)
        if not self.alive:
            raise _died(path, self.proc.poll())
        p = int(grid.patch_size)
        slot_bytes = max(1, batch_size * p * p * 3)
        layout = _Layout(batch_size, slot_bytes, SLOTS)
        free_r, free_w = os.pipe()  # the parent hands slots back: one byte each
        try:
            with _ring_file(layout.nbytes) as f:  # nameless: freed with its last user
                ring = mmap.mmap(f.fileno(), layout.nbytes)
                with self._send_lock:
                    self._next_id += 1
                    rid = self._next_id
                self._live.add(rid)  # before the request: its first message may come at once
                try:
                    self._send(("read", rid, str(path), grid, batch_size, transform, reader_kw, slot_bytes, SLOTS),
                               fds=[f.fileno(), free_r], path=path)  # fmt: skip
                except BaseException:
                    self._live.discard(rid)
                    ring.close()
                    raise
        except BaseException:
            os.close(free_w)
            raise
        finally:
            os.close(free_r)
        return ReadStream(self, rid, path, ring, layout, p, copy, free_w)

    def read(self, path: str | Path, grid: TileGrid, **kw: Any) -> Iterator[PatchBatch]:
        """``start(path, grid, **kw)`` and iterate it (stopping early cancels the read)."""
        yield from self.start(path, grid, **kw)


class _Layout:
    """Where a read's ring keeps each slot's images, coords ``(batch, 2)`` and indices ``(batch,)``
    (int64): all images first, then all coords, then all indices."""

    def __init__(self, batch_size: int, slot_bytes: int, slots: int) -> None:
        self.batch, self.slot_bytes, self.slots = batch_size, slot_bytes, slots
        self.coords_at = slot_bytes * slots
        self.indices_at = self.coords_at + slots * batch_size * 16
        self.nbytes = self.indices_at + slots * batch_size * 8

    def views(self, ring: mmap.mmap) -> tuple[np.ndarray, np.ndarray]:
        """(coords ``(slots, batch, 2)``, indices ``(slots, batch)``) viewing the ring."""
        s, b = self.slots, self.batch
        coords = np.frombuffer(ring, np.int64, s * b * 2, self.coords_at).reshape(s, b, 2)
        return coords, np.frombuffer(ring, np.int64, s * b, self.indices_at).reshape(s, b)


def _drop_stream(rp: ReaderProcess, rid: int, free_w: int) -> None:
    rp._forget(rid, cancel=False)  # no message from a finalizer: the closed pipe ends the read in the child
    os.close(free_w)


class ReadStream:
    """One read queued on a :class:`ReaderProcess`: iterate once for its batches (``skipped`` and
    ``stats`` are set at the end); ``close()`` cancels it."""

    def __init__(self, rp: ReaderProcess, rid: int, path: Path, ring: mmap.mmap, layout: _Layout, patch: int,
                 copy: bool, free_w: int) -> None:  # fmt: skip
        self.rp, self.rid, self.path = rp, rid, path
        self._ring, self._layout, self._patch, self._copy = ring, layout, patch, copy
        self._free_w = free_w  # one byte per slot handed back; closed with the stream
        # a stream dropped unread (an interrupted run's queued event) still closes its descriptor
        # (the child, waiting for a slot, then drops the read) and is forgotten by the process
        self._close_free = weakref.finalize(self, _drop_stream, rp, rid, free_w)
        self.skipped: list[tuple[int, str]] = []
        self.stats: dict[str, Any] = {}
        self.received = 0  # messages received (0: the child has not started on it)
        self._done = self._closed = False

    def _hand_back(self) -> None:
        """The slot just received may be overwritten (a closed stream has nothing to hand back:
        its descriptor's number may already belong to another file)."""
        if self._free_w < 0:
            return
        with contextlib.suppress(OSError):  # the child stopped reading: the read is over anyway
            os.write(self._free_w, b"\0")

    def __iter__(self) -> Iterator[PatchBatch]:
        from wsi.reader import PatchBatch

        p, rp, layout = self._patch, self.rp, self._layout
        all_coords, all_indices = layout.views(self._ring)
        try:
            while not self._done:
                msg = rp._next(self.rid, self.path)
                self.received += 1
                kind = msg[0]
                if kind == "batch":
                    _, _, slot, n = msg
                    coords, indices = all_coords[slot, :n].copy(), all_indices[slot, :n].copy()
                    view = np.frombuffer(self._ring, np.uint8, n * p * p * 3, slot * layout.slot_bytes)
                    images = view.reshape(n, p, p, 3)
                    if self._copy:
                        images = images.copy()
                        del view
                        self._hand_back()
                        yield PatchBatch(images, coords, indices)
                    else:
                        yield PatchBatch(images, coords, indices)
                        self._hand_back()  # the caller is done with it
                elif kind == "end":
                    self._done = True
                    self.skipped, self.stats = msg[2], msg[3]
                elif kind == "error":
                    self._done = True
                    raise msg[2]
        finally:
            del all_coords, all_indices  # so that close() can unmap the ring
            self.close()

    def close(self) -> None:
        """Release the ring; cancel the read if it has not finished."""
        if self._closed:
            return
        self._closed = True
        self.rp._forget(self.rid, cancel=not self._done)
        self._free_w = -1
        self._close_free()  # once only; a child waiting for a slot of this read sees the end of the pipe
        with contextlib.suppress(BufferError):  # a batch still views it: unmapped with that batch
            self._ring.close()


# ------------------------------------------------------------------------------------- pool
_POOL: list[ReaderProcess] = []
_POOL_LOCK = threading.Lock()
_ALL: weakref.WeakSet[ReaderProcess] = weakref.WeakSet()  # every child started, pooled or not


def take() -> ReaderProcess:
    """A live child from the pool, or a new one; hand it back with :func:`give_back`."""
    with _POOL_LOCK:
        while _POOL:
            rp = _POOL.pop()
            if rp.alive:
                return rp
            rp.close()
    return ReaderProcess()


def give_back(rp: ReaderProcess, *, reuse: bool = True) -> None:
    """Return a child to the pool (reads still under way on it are cancelled); a dead or broken
    one, or any with ``reuse=False`` (e.g. after an interrupted run), is stopped instead."""
    if reuse and rp.alive:
        rp.cancel_all()
    if not (reuse and rp.alive):
        rp.close()
        return
    with _POOL_LOCK:
        _POOL.append(rp)


def shutdown() -> None:
    """Stop every child reader process of this process (also at interpreter exit)."""
    with _POOL_LOCK:
        _POOL.clear()
    for rp in list(_ALL):
        rp.close()


atexit.register(shutdown)


class ProcessPatchReader:
    """Like :class:`~wsi.reader.PatchReader` (same options, ``skipped`` after iteration), reading
    in a child process: ``process`` (shared, e.g. by the slides of one run so reads queue on it),
    else one from the pool.

    ``start()`` queues the read before iteration (the child decodes ahead meanwhile); ``close()``
    cancels it. ``copy=False``: each batch's images are valid until the next batch is asked for.
    If the child dies before this read began (e.g. it crashed on the previous slide), the read is
    started again once on a fresh child.
    """

    def __init__(
        self, path: str | Path, grid: TileGrid, *, batch_size: int = 64, transform: Any = None,
        process: ReaderProcess | None = None, copy: bool = True, **reader_kw: Any,
    ) -> None:
        self.path = Path(path)
        self.grid = grid
        self.batch_size = int(batch_size)
        self.transform = transform
        self.process = process
        self.copy = copy
        self.reader_kw = reader_kw
        self.skipped: list[tuple[int, str]] = []
        self.stats: dict[str, Any] = {}
        self._stream: ReadStream | None = None
        self._owned: ReaderProcess | None = None  # taken from the pool by this reader

    def __len__(self) -> int:
        return -(-len(self.grid) // self.batch_size)

    def start(self) -> ProcessPatchReader:
        """Queue the read now (idempotent)."""
        if self._stream is None:
            rp = self.process if self.process is not None and self.process.alive else None
            if rp is None:
                rp = self._owned = take()
            self._stream = rp.start(self.path, self.grid, batch_size=self.batch_size, transform=self.transform,
                                    copy=self.copy, **self.reader_kw)  # fmt: skip
        return self

    def __iter__(self) -> Iterator[PatchBatch]:
        try:
            self.start()
            try:
                yield from self._stream
            except ReaderProcessError:
                if self._stream.received or self._owned is not None:
                    raise
                self._stream = None  # died before starting on this read: once more on a fresh child
                self.process = None
                self.start()
                yield from self._stream
            self.skipped, self.stats = self._stream.skipped, self._stream.stats
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the read if unfinished; return a pooled child."""
        if self._stream is not None:
            self._stream.close()
        if self._owned is not None:
            give_back(self._owned)
            self._owned = None


# ------------------------------------------------------------------------------------- child
def _serve(req: Connection, resp: Connection, fds: socket.socket) -> None:
    import queue
    import select

    from wsi.reader import PatchReader

    inbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()

    def receive() -> None:
        """Drain the request pipe at once (a large request never waits on this side's replies)."""
        try:
            while True:
                msg = req.recv()
                if msg[0] == "read":  # its ring's and free pipe's descriptors were sent just before it
                    _, read_fds, _, _ = socket.recv_fds(fds, 1, 2)
                    msg = (*msg, *read_fds)
                inbox.put(msg)
        except (EOFError, OSError):
            inbox.put(("quit",))  # parent gone

    threading.Thread(target=receive, name="requests", daemon=True).start()
    cancelled: set[int] = set()
    queued: deque[tuple] = deque()  # read requests (with their ring's and free pipe's fds) in arrival order

    def handle(msg: tuple) -> bool:
        """Book-keep a message; False on quit."""
        kind = msg[0]
        if kind == "read":
            queued.append(msg)
        elif kind == "cancel":
            cancelled.add(msg[1])
        elif kind == "quit":
            return False
        return True

    def pending() -> Iterator[tuple]:
        while True:
            try:
                yield inbox.get_nowait()
            except queue.Empty:
                return

    while True:
        while not queued:
            if not handle(inbox.get()):
                return
        _, rid, path, grid, batch_size, transform, reader_kw, slot_bytes, n_slots, ring_fd, free_fd = queued.popleft()
        layout = _Layout(batch_size, slot_bytes, n_slots)
        ring = coords = indices = None
        try:
            ring = mmap.mmap(ring_fd, layout.nbytes)
            os.close(ring_fd)
            ring_fd = -1
            coords, indices = layout.views(ring)
            if rid in cancelled:
                resp.send(("end", rid, [], {}))
                continue
            reader = PatchReader(path, grid, batch_size=batch_size, **reader_kw)
            free, seq = n_slots, 0  # slots are filled in turn; the parent hands each back in turn
            for batch in reader:
                for msg in pending():  # cancels and new reads that arrived meanwhile
                    if not handle(msg):
                        return
                while not free and rid not in cancelled:
                    if select.select([free_fd], [], [], _POLL_S)[0]:
                        got = os.read(free_fd, n_slots)
                        if not got:  # the parent closed the read
                            cancelled.add(rid)
                        free += len(got)
                    for msg in pending():
                        if not handle(msg):
                            return
                if rid in cancelled:
                    break
                slot, n = seq % n_slots, len(batch)
                images = batch.images if transform is None else transform.transform(batch.images)
                dst = np.frombuffer(ring, np.uint8, images.size, slot * slot_bytes)
                dst[:] = images.reshape(-1)
                del dst
                coords[slot, :n] = batch.coords
                indices[slot, :n] = batch.indices
                free, seq = free - 1, seq + 1
                resp.send(("batch", rid, slot, n))
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
            del coords, indices
            if ring is not None:
                ring.close()
            if ring_fd >= 0:
                os.close(ring_fd)
            os.close(free_fd)
            cancelled.difference_update([r for r in cancelled if r <= rid])


def main(argv: list[str] | None = None) -> None:
    """Child entry point: ``python -m wsi.reader_process REQUEST_FD RESPONSE_FD FD_SOCKET``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we exit on EOF
    args = sys.argv[1:] if argv is None else argv
    req = Connection(int(args[0]), writable=False)
    resp = Connection(int(args[1]), readable=False)
    fds = socket.socket(fileno=int(args[2]))
    _serve(req, resp, fds)


if __name__ == "__main__":
    main()
