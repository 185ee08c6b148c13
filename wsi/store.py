"""The Zarr v3 feature store (layout in DESIGN.md).

```
features.zarr/                 root attrs: format_version, encoder, tiling, stain (the identity)
  slides/<slide_id>/           attrs: source identity, mpp + source, read level, n_tiles, created, complete
    features [N, D] float16    chunks of whole rows, >= ~1 MiB
    coords   [N, 2] int64      level-0 (x, y) top-left of each patch
    tissue   [N]    float32    tissue fraction of each patch
  .staging/<slide_id>-<hex>/   slides being written (moved into slides/ with one rename)
  .claims/<slide_id>.claim     exclusive per-slide claims: JSON {host, pid, time, ...}
```

A slide is visible only once complete: it is written under ``.staging`` and moved into
``slides/`` with a single ``os.rename`` (atomic on POSIX within one filesystem). Claims are
created with ``O_CREAT | O_EXCL``; a claim is stale when its process is gone (same host and pid
namespace) or its heartbeat (the file's mtime) is older than a TTL (other hosts, other containers).
A writer commits only while its claim is still its own (checked under the lock at the rename), so a
process whose claim was taken over (paused past the TTL, say) never publishes a slide. Staged files
are fsynced before the rename, so a power cut cannot leave a visible slide with missing chunks.
Root attribute updates, stale-claim recovery and commits are serialised with ``fcntl.flock`` on a
lock file in the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from wsi.errors import StoreError, StoreMismatchError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # features are chunked in whole rows of at least ~1 MiB
IDENTITY_KEYS = ("encoder", "tiling", "stain")
SLIDE_IDENTITY_KEYS = ("size", "quick_hash", "slide_mpp")
DEFAULT_CLAIM_TTL = 600.0


class SlideClaimedError(StoreError):
    """Another live process holds the claim on this slide."""


@dataclass
class SlideFeatures:
    """One slide read back from a store."""

    slide_id: str
    features: np.ndarray  # (N, D) float16
    coords: np.ndarray  # (N, 2) int64
    tissue: np.ndarray  # (N,) float32
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def rows_per_chunk(dim: int, itemsize: int = 2) -> int:
    """Rows per feature chunk so that a chunk holds whole rows and at least ~1 MiB."""
    return max(1, math.ceil(CHUNK_BYTES / (max(1, dim) * itemsize)))


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so identities compare the way they are stored."""
    return json.loads(json.dumps(value, default=str))


def _pid_alive(pid: int, create_time: float | None) -> bool:
    import psutil

    if not psutil.pid_exists(pid):
        return False
    if create_time is None:
        return True
    try:
        return abs(psutil.Process(pid).create_time() - create_time) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _pid_namespace() -> int | None:
    """The inode of this process's pid namespace (Linux), telling containers on one host apart."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then the directories (children before parents)."""
    dirs = []
    for here, _subdirs, files in os.walk(root):
        dirs.append(here)
        for name in files:
            _fsync(os.path.join(here, name))
    for d in reversed(dirs):
        _fsync(d)


def _fsync(path: str | Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (glibc ≥ 2.28), or None."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so
    that a reader sees either one or the other, never neither; False where unsupported."""
    import ctypes
    import errno

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def _own_create_time() -> float | None:
    import psutil

    try:
        return psutil.Process(os.getpid()).create_time()
    except psutil.Error:  # pragma: no cover - platform without process info
        return None


class Claim:
    """A held claim on one slide; refreshes its heartbeat (file mtime) in a daemon thread."""

    def __init__(self, path: Path, token: str, heartbeat: float) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self.is_ours():  # taken over: never keep another process's claim alive
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def is_ours(self) -> bool:
        """The claim file still carries this claim's token."""
        info = _read_claim(self.path)
        return info is not None and info.get("token") == self.token

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still ours."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.is_ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return {}  # being written or corrupt: judged by its age
    return info if isinstance(info, dict) else {}


class FeatureStore:
    """A Zarr v3 store of per-slide patch features.

    ``mode="a"`` creates the store if needed; ``mode="r"`` requires it to exist and never writes.
    ``claim_ttl`` (seconds) is how long a claim from another host lives without a heartbeat.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        mode: Literal["a", "r"] = "a",
        claim_ttl: float = DEFAULT_CLAIM_TTL,
    ) -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' or 'r', not {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.claim_ttl = float(claim_ttl)
        self._held: dict[str, Claim] = {}
        self._host = socket.gethostname()
        self._expected: dict[str, Any] | None = None  # the identity this object's slides are written under
        if mode == "r":
            if not (self.path / "zarr.json").is_file():
                raise StoreError(
                    f"{self.path}: not a slidepipe feature store (no zarr.json). "
                    "Fix: check the path, or create it with `slidepipe extract --out`"
                )
        else:
            for sub in ("slides", ".staging", ".claims"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            with self._lock():
                root = zarr.open_group(self.path, mode="a")
                if "format_version" not in root.attrs:
                    root.attrs["format_version"] = FORMAT_VERSION
                if not (self.path / "slides" / "zarr.json").is_file():
                    root.require_group("slides")
        version = self.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {version!r}, this slidepipe reads "
                f"{FORMAT_VERSION}. Fix: re-extract into a new store"
            )

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ root identity
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise root-attribute updates and claim recovery between processes."""
        with open(self.path / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes (a copy): format version, encoder, tiling, stain, config."""
        return dict(zarr.open_group(self.path, mode="r").attrs.asdict())

    @property
    def identity(self) -> dict[str, Any]:
        """The store identity: the root attrs named in ``IDENTITY_KEYS`` that are set."""
        attrs = self.attrs
        return {k: attrs[k] for k in IDENTITY_KEYS if k in attrs}

    def ensure_identity(self, identity: Mapping[str, Any], *, overwrite: bool = False) -> None:
        """Record ``identity`` (encoder, tiling, stain) in a new store, or check it matches.

        A mismatch raises ``StoreMismatchError`` naming both values; with ``overwrite=True``
        the identity is replaced and the slides written under the old one are deleted.
        """
        self._require_writable()
        wanted = _jsonable({k: identity[k] for k in IDENTITY_KEYS if k in identity})
        with self._lock():
            root = zarr.open_group(self.path, mode="a")
            current = {k: root.attrs[k] for k in IDENTITY_KEYS if k in root.attrs}
            if not current:
                root.attrs.update(wanted)
                self._expected = wanted
                return
            diffs = [k for k in wanted if current.get(k) != wanted[k]]
            if not diffs:
                self._expected = wanted
                return
            if not overwrite:
                detail = "; ".join(f"{k}: store has {current.get(k)!r}, this run has {wanted[k]!r}" for k in diffs)
                raise StoreMismatchError(
                    f"{self.path}: store was written with a different {', '.join(diffs)} ({detail}). "
                    "Fix: pass --overwrite to replace its contents, or write to a new store with --out"
                )
            log.warning("%s: identity changed (%s); --overwrite deletes its %d slides",
                        self.path, ", ".join(diffs), len(self.slide_ids()))
            self._drop_all_slides()
            root.attrs.update(wanted)
            self._expected = wanted

    def save_config(self, config: Mapping[str, Any]) -> None:
        """Keep the resolved run config in the root attrs (``config``)."""
        self._require_writable()
        with self._lock():
            zarr.open_group(self.path, mode="a").attrs["config"] = _jsonable(dict(config))

    def _drop_all_slides(self) -> None:
        slides = self.path / "slides"
        for child in list(slides.iterdir()):
            if child.is_dir():
                trash = self.path / ".staging" / f"trash-{uuid.uuid4().hex}"
                os.rename(child, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: store opened read-only. Fix: open with mode='a'")

    # ------------------------------------------------------------------ reading
    def _slide_dir(self, slide_id: str) -> Path:
        if not slide_id or "/" in slide_id or slide_id.startswith("."):
            raise StoreError(f"{self.path}: invalid slide id {slide_id!r}. Fix: use the file name without '/'")
        return self.path / "slides" / slide_id

    def slide_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a slide present under ``slides/`` (complete or not), else None."""
        meta = self._slide_dir(slide_id) / "zarr.json"
        try:
            return dict(json.loads(meta.read_text()).get("attributes", {}))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as err:
            raise StoreError(f"{meta}: unreadable metadata ({err}). Fix: re-extract with --overwrite") from err

    def is_complete(self, slide_id: str) -> bool:
        """True if the slide is in ``slides/`` with ``complete=true``."""
        attrs = self.slide_attrs(slide_id)
        return bool(attrs and attrs.get("complete") is True)

    def slide_ids(self) -> list[str]:
        """Ids of complete slides, sorted."""
        slides = self.path / "slides"
        if not slides.is_dir():
            return []
        return sorted(p.name for p in slides.iterdir() if p.is_dir() and self.is_complete(p.name))

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and self.is_complete(slide_id)

    def __len__(self) -> int:
        return len(self.slide_ids())

    def read(self, slide_id: str) -> SlideFeatures:
        """Read one complete slide into memory."""
        if not self.is_complete(slide_id):
            raise StoreError(
                f"{self.path}: slide {slide_id!r} is not in the store (or not complete). "
                f"Fix: extract it first; the store has {len(self.slide_ids())} complete slides"
            )
        group = zarr.open_group(self._slide_dir(slide_id), mode="r")
        return SlideFeatures(
            slide_id=slide_id,
            features=np.asarray(group["features"][...]),
            coords=np.asarray(group["coords"][...]),
            tissue=np.asarray(group["tissue"][...]),
            attrs=dict(group.attrs.asdict()),
        )

    def load_bags(self, slide_ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All features of the given (default: all complete) slides in memory, float16 (N, D)."""
        ids = self.slide_ids() if slide_ids is None else list(slide_ids)
        bags: dict[str, np.ndarray] = {}
        for sid in ids:
            if not self.is_complete(sid):
                raise StoreError(
                    f"{self.path}: slide {sid!r} is not in the store. "
                    "Fix: extract it, or drop it from the label table"
                )
            bags[sid] = np.asarray(zarr.open_array(self._slide_dir(sid) / "features", mode="r")[...])
        return bags

    # ------------------------------------------------------------------ slide identity
    def check_slide(
        self, slide_id: str, identity: Mapping[str, Any], *, overwrite: bool = False, run_started: float | None = None
    ) -> bool:
        """Decide what to do with a slide before extracting it.

        Returns True when a complete slide with the same identity (``SLIDE_IDENTITY_KEYS`` of the
        ``source`` attr) is present (skip it), False when it must be (re)written. A complete slide
        with a different identity raises ``StoreMismatchError`` unless ``overwrite``. With
        ``overwrite``, a same-identity slide committed at or after ``run_started`` (a Unix time:
        the overwriting run's start) is that run's own work, or a concurrent run's, and is kept.
        """
        attrs = self.slide_attrs(slide_id)
        if not attrs or attrs.get("complete") is not True:
            return False
        stored = attrs.get("source", {})
        wanted = _jsonable(dict(identity))
        diffs = [k for k in SLIDE_IDENTITY_KEYS if k in wanted and stored.get(k) != wanted[k]]
        if not diffs:
            written = attrs.get("written_at")
            fresh = run_started is not None and isinstance(written, int | float) and written >= run_started
            return fresh or not overwrite
        if overwrite:
            return False
        detail = "; ".join(f"{k}: store has {stored.get(k)!r}, file has {wanted[k]!r}" for k in diffs)
        raise StoreMismatchError(
            f"{self.path}: slide {slide_id!r} is stored from a different file ({detail}). "
            "Fix: pass --overwrite to re-extract it, or use a new store"
        )

    # ------------------------------------------------------------------ claims
    def _claim_path(self, slide_id: str) -> Path:
        self._slide_dir(slide_id)  # validates the id
        return self.path / ".claims" / f"{slide_id}.claim"

    def claim_info(self, slide_id: str) -> dict[str, Any] | None:
        """The JSON of the current claim on a slide, or None."""
        return _read_claim(self._claim_path(slide_id))

    def _is_stale(self, path: Path, info: dict[str, Any]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False  # gone: not ours to recover, just retry
        # another container may share the hostname (claims without a namespace: same as ours)
        same_ns = info.get("pid_ns") in (None, _pid_namespace())
        if info.get("host") == self._host and same_ns and isinstance(info.get("pid"), int):
            return not _pid_alive(info["pid"], info.get("create_time"))
        return age > self.claim_ttl

    @contextlib.contextmanager
    def claim(self, slide_id: str) -> Iterator[Claim]:
        """Hold the exclusive claim on ``slide_id`` for the ``with`` block.

        Raises ``SlideClaimedError`` if a live process holds it. Stale claims (dead pid on this
        host, or no heartbeat for ``claim_ttl`` seconds from another host) are recovered: renamed
        away under the store lock, then re-created exclusively. Leftover staging directories of
        this slide are removed once the claim is ours.
        """
        self._require_writable()
        if slide_id in self._held:
            raise SlideClaimedError(f"{self.path}: slide {slide_id!r} is already claimed by this store object")
        path = self._claim_path(slide_id)
        token = uuid.uuid4().hex
        payload = json.dumps({
            "host": self._host, "pid": os.getpid(), "pid_ns": _pid_namespace(),
            "create_time": _own_create_time(), "time": time.time(), "token": token,
        }).encode()
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._recover_stale(path):
                    continue
                info = _read_claim(path)
                if info is None:  # released meanwhile
                    continue
                raise SlideClaimedError(
                    f"{self.path}: slide {slide_id!r} is being extracted by "
                    f"{info.get('host')}:{info.get('pid')} (claim {path}). "
                    "Fix: wait for that process, or delete the claim file if it is dead on another host"
                ) from None
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            break
        else:
            raise SlideClaimedError(f"{self.path}: could not claim slide {slide_id!r} (contended). Fix: retry")
        held = Claim(path, token, heartbeat=max(0.5, min(30.0, self.claim_ttl / 10)))
        self._held[slide_id] = held
        try:
            self._clean_staging(slide_id)
            yield held
        finally:
            self._held.pop(slide_id, None)
            held.release()

    def _recover_stale(self, path: Path) -> bool:
        """Rename a stale claim away (under the store lock). True if one was recovered."""
        with self._lock():
            info = _read_claim(path)
            if info is None or not self._is_stale(path, info):
                return False
            grave = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                return False
            log.warning("%s: recovered stale claim of %s:%s", path, info.get("host"), info.get("pid"))
            grave.unlink(missing_ok=True)
            return True

    # ------------------------------------------------------------------ staging
    def _staging_dirs(self) -> list[Path]:
        staging = self.path / ".staging"
        return sorted(p for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []

    def _clean_staging(self, slide_id: str) -> None:
        for p in self._staging_dirs():
            sid, _, tail = p.name.rpartition("-")
            if sid == slide_id and len(tail) == 32:
                log.info("%s: removing leftover staging dir %s", self.path, p.name)
                shutil.rmtree(p, ignore_errors=True)

    def clean_staging(self) -> int:
        """Remove staging dirs whose slide is not claimed by a live process; returns the count."""
        self._require_writable()
        removed = 0
        for p in self._staging_dirs():
            sid, _, tail = p.name.rpartition("-")
            if sid == "trash" or len(tail) != 32:
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
                continue
            claim = self._claim_path(sid)
            info = _read_claim(claim)
            if info is not None and not self._is_stale(claim, info):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
        return removed

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def writer(
        self, slide_id: str, *, dim: int, capacity: int = 0, attrs: Mapping[str, Any] | None = None
    ) -> Iterator[SlideWriter]:
        """Stream one slide into staging; on a clean exit it is committed with one rename.

        Takes the slide's claim unless this store object already holds it. On an exception the
        staging directory is removed and nothing becomes visible.
        """
        self._require_writable()
        if self._expected is None:
            self._expected = _jsonable(self.identity)
        self._refuse_if_identity_changed(slide_id)  # fail early, not only after all the work
        with contextlib.ExitStack() as stack:
            if slide_id not in self._held:
                stack.enter_context(self.claim(slide_id))
            held = self._held[slide_id]
            staging = self.path / ".staging" / f"{slide_id}-{uuid.uuid4().hex}"
            w = SlideWriter(staging, dim=dim, capacity=capacity, attrs=attrs)
            try:
                yield w
                w.finish()
                self._commit(slide_id, staging, held)
            except BaseException:
                w.close()  # no write may land after the staging directory is gone
                shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                w.close()

    def write(
        self,
        slide_id: str,
        features: np.ndarray,
        coords: np.ndarray,
        tissue: np.ndarray | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one slide from arrays (features from any source); replaces an existing slide."""
        features = np.asarray(features)
        if features.ndim != 2:
            raise StoreError(f"{self.path}: features of {slide_id!r} must be (N, D), got {features.shape}")
        with self.writer(slide_id, dim=features.shape[1], capacity=features.shape[0], attrs=attrs) as w:
            w.append(features, coords, tissue)

    def _commit(self, slide_id: str, staging: Path, held: Claim) -> None:
        """Make a staged slide visible: its files are made durable, then, under the store lock
        and only while ``held`` is still this slide's claim, one rename moves it in."""
        target = self._slide_dir(slide_id)
        _fsync_tree(staging)
        with self._lock():
            self._refuse_if_identity_changed(slide_id)
            if not held.is_ours():
                info = _read_claim(held.path) or {}
                raise StoreError(
                    f"{self.path}: slide {slide_id!r} was not committed: its claim {held.path} was taken "
                    f"over by {info.get('host')}:{info.get('pid')} while this process wrote it (it "
                    f"looked dead or stalled past claim_ttl={self.claim_ttl:.0f} s), so that process "
                    "writes it instead. Fix: give processes that share a store distinct hostnames, or "
                    "raise claim_ttl if processes may pause that long"
                )
            old = None
            replacing = target.exists()
            if replacing and _exchange(staging, target):  # replaced in one step: never absent
                old = staging  # now holds the replaced slide
            else:
                if replacing:  # no atomic exchange here: absent between the two renames
                    old = self.path / ".staging" / f"trash-{uuid.uuid4().hex}"
                    os.rename(target, old)
                os.rename(staging, target)  # the one atomic step that makes the slide visible
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.debug("%s: committed slide %s", self.path, slide_id)

    def _refuse_if_identity_changed(self, slide_id: str) -> None:
        """``StoreError`` if the root identity differs from the one this object writes under (set
        by ``ensure_identity``, else by its first ``writer``; a store without one checks nothing)."""
        current, expected = self.identity, self._expected or {}
        changed = ", ".join(k for k in sorted(expected) if current.get(k) != expected[k])
        if changed:
            raise StoreError(
                f"{self.path}: slide {slide_id!r} was not committed: the store's {changed} changed while "
                "it was written (another run replaced the store's contents with --overwrite), so its "
                "features belong to the old settings. Fix: rerun with the store's new settings, or "
                "write to a new store with --out"
            )

    def delete(self, slide_id: str) -> None:
        """Remove a slide (under its claim)."""
        target = self._slide_dir(slide_id)
        with contextlib.ExitStack() as stack:
            if slide_id not in self._held:
                stack.enter_context(self.claim(slide_id))
            if target.exists():
                trash = self.path / ".staging" / f"trash-{uuid.uuid4().hex}"
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)


class _Column:
    """Rows bound for one Zarr array, written in whole chunks only (no read-modify-write)."""

    def __init__(self, array: zarr.Array, rows: int) -> None:
        self.array = array
        self.rows = rows  # rows per chunk
        self.n = 0  # rows handed out for writing
        self._pending: list[np.ndarray] = []
        self._n_pending = 0

    def add(self, block: np.ndarray) -> None:
        self._pending.append(block)
        self._n_pending += len(block)

    def take(self, *, final: bool) -> tuple[int, np.ndarray] | None:
        """``(start, rows)`` of the whole chunks pending (everything if ``final``), or None."""
        n = self._n_pending if final else (self._n_pending // self.rows) * self.rows
        if n == 0:
            return None
        data = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending = [data[n:]] if n < len(data) else []
        self._n_pending = len(data) - n
        start, self.n = self.n, self.n + n
        return start, data[:n]


def _write_rows(array: zarr.Array, start: int, data: np.ndarray) -> None:
    stop = start + len(data)
    if stop > array.shape[0]:
        array.resize((max(stop, 2 * array.shape[0]), *array.shape[1:]))
    array[start:stop] = data


class SlideWriter:
    """Appends batches of one slide into a staging Zarr group.

    Each array is written in whole chunks, by one background thread (compression and file writes
    never hold up the caller, e.g. an encoder loop); at most ``max_pending`` writes wait for it.
    Errors of a write are raised by the next ``append`` or by ``finish``. ``close()`` (done by
    ``FeatureStore.writer``) waits for writes under way.
    """

    max_pending = 2

    def __init__(self, path: Path, *, dim: int, capacity: int = 0, attrs: Mapping[str, Any] | None = None) -> None:
        if dim < 1:
            raise StoreError(f"{path}: feature dim must be >= 1, got {dim}")
        self.path = path
        self.dim = int(dim)
        self.rows = rows_per_chunk(self.dim)
        self.attrs = dict(attrs or {})
        self.n = 0
        shape = max(0, int(capacity))
        self.group = zarr.open_group(path, mode="w")
        self.features = self.group.create_array(
            "features", shape=(shape, self.dim), dtype="float16", chunks=(self.rows, self.dim)
        )
        # coords and tissue: chunks of a whole number of feature chunks, >= 65,536 rows
        side_rows = self.rows * max(1, -(-(1 << 16) // self.rows))
        self.coords = self.group.create_array("coords", shape=(shape, 2), dtype="int64", chunks=(side_rows, 2))
        self.tissue = self.group.create_array("tissue", shape=(shape,), dtype="float32", chunks=(side_rows,))
        self._columns = [_Column(self.features, self.rows), _Column(self.coords, side_rows),
                         _Column(self.tissue, side_rows)]  # fmt: skip
        self._io: ThreadPoolExecutor | None = None
        self._writes: list[Future] = []

    def append(self, features: np.ndarray, coords: np.ndarray, tissue: np.ndarray | None = None) -> None:
        """Add rows; features are cast to float16."""
        features = np.asarray(features)
        coords = np.asarray(coords, dtype=np.int64)
        n = features.shape[0]
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise StoreError(f"{self.path}: expected features (N, {self.dim}), got {features.shape}")
        if coords.shape != (n, 2):
            raise StoreError(f"{self.path}: expected coords ({n}, 2), got {coords.shape}")
        tissue = np.ones(n, np.float32) if tissue is None else np.asarray(tissue, dtype=np.float32)
        if tissue.shape != (n,):
            raise StoreError(f"{self.path}: expected tissue ({n},), got {tissue.shape}")
        if n == 0:
            return
        with np.errstate(over="ignore"):
            f16 = features.astype(np.float16, copy=False)
        if not np.isfinite(f16).all():
            raise StoreError(
                f"{self.path}: non-finite features (NaN/inf after float16 cast). "
                "Fix: check the encoder weights and precision"
            )
        if f16 is features:  # the caller's own array: it may reuse it before the write
            f16 = f16.copy()
        for column, block in zip(self._columns, (f16, coords.copy(), tissue.copy()), strict=True):
            column.add(block)
        self.n += n
        self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        jobs = [(c.array, *t) for c in self._columns if (t := c.take(final=final)) is not None]
        if not jobs:
            return
        self._reap(keep=self.max_pending - 1)
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="slide-writer")
        self._writes.append(self._io.submit(lambda: [_write_rows(*job) for job in jobs]))

    def _reap(self, keep: int) -> None:
        """Wait until at most ``keep`` writes are under way; raise the first failed one's error."""
        while self._writes and (len(self._writes) > keep or self._writes[0].done()):
            self._writes.pop(0).result()

    def finish(self) -> None:
        """Write what is pending, trim arrays to the rows written, set ``n_tiles`` and ``complete``."""
        self._flush(final=True)
        self._reap(keep=0)
        for array in (self.features, self.coords, self.tissue):
            if array.shape[0] != self.n:
                array.resize((self.n, *array.shape[1:]))
        attrs = _jsonable(self.attrs)
        attrs.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        attrs["n_tiles"] = self.n
        attrs["feature_dim"] = self.dim
        attrs["complete"] = True
        self.group.attrs.update(attrs)
        # when it was written, by the clock of the store's file system (shared by every host that
        # writes it): the mtime of the metadata just written (``check_slide(run_started=)``)
        self.group.attrs["written_at"] = (self.path / "zarr.json").stat().st_mtime
        self.close()

    def close(self) -> None:
        """Wait for writes under way (their errors are dropped: use ``finish`` to see them)."""
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._writes.clear()
