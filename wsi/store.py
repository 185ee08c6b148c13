"""The Zarr v3 feature store (layout in DESIGN.md).

```
features.zarr/                 root attrs: format_version, encoder, tiling, stain (the identity)
  slides/<slide_id>/           attrs: source identity, mpp + source, read level, n_tiles, created, complete
    features [N, D] float16    chunks of whole rows, >= ~1 MiB
    coords   [N, 2] int64      level-0 (x, y) top-left of each patch
    tissue   [N]    float32    tissue fraction of each patch
  .staging/<slide_id>-<hex>/   slides being written (moved into slides/ with one rename)
  .staging/.trash-<hex>/       slides being removed (dot-prefixed: no slide id can take the name)
  .claims/<slide_id>.claim     exclusive per-slide claims: JSON {host, pid, time, ...}
```

Every chunk carries a crc32c checksum (Zarr v3 ``crc32c`` codec after zstd), checked on every
read; every committed slide records, per array, its chunk count and a digest of its chunk files'
names and sizes (attr ``chunks``). Before reading a slide, and when deciding whether a slide is
finished (``is_complete``, ``check_slide``), the chunk files are listed and stat-ed (nothing is
read): a missing, empty, truncated or extra chunk file makes the slide corrupt
(``StoreCorruptError`` on read; extract redoes it). Slides written before these records derive
the expected chunks from the array shape and have no checksum (``verify_store(deep=True)`` can
only decode their chunks). ``verify_store`` checks every slide of a store.

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
import hashlib
import itertools
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

from wsi.errors import StoreCorruptError, StoreError, StoreMismatchError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20  # features are chunked in whole rows of at least ~1 MiB
IDENTITY_KEYS = ("encoder", "tiling", "stain")
SLIDE_IDENTITY_KEYS = ("size", "quick_hash", "slide_mpp")
DEFAULT_CLAIM_TTL = 600.0
ARRAYS = ("features", "coords", "tissue")  # the arrays every slide has (checked in older slides)
TRASH_PREFIX = ".trash-"  # rubbish in .staging/: slide ids never start with "."


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


_STORE_ENTRIES = frozenset({"zarr.json", "slides", ".staging", ".claims", ".lock", "runs"})


def _refuse_foreign(path: Path) -> None:
    """A directory that holds other things than a store (a user's folder, another Zarr group) is
    never adopted as one: writing slides into it would mix them with what is there."""
    root = path / "zarr.json"
    if root.is_file():
        try:
            attrs = json.loads(root.read_text()).get("attributes") or {}
        except (OSError, ValueError):
            attrs = {}
        if "format_version" in attrs:
            return  # a slidepipe store
    elif _has_slides(path):
        return  # a store whose root metadata was lost: handled by the caller
    others = sorted(p.name for p in path.iterdir() if p.name not in _STORE_ENTRIES)
    if others or (root.is_file() and any((path / "slides").iterdir())):
        shown = ", ".join(others[:5]) or "zarr.json"
        raise StoreError(
            f"{path}: not a slidepipe feature store (it holds {shown}{' ...' if len(others) > 5 else ''}). "
            "Fix: pass a new or empty directory as --out (or the path of an existing store)"
        )


# ---------------------------------------------------------------------- chunk integrity
def _compressors() -> list[Any]:
    """zstd, then a crc32c checksum of each compressed chunk, verified whenever it is decoded."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=0), Crc32cCodec()]


@dataclass(frozen=True)
class ChunkProblem:
    """What is wrong with one array (or the metadata, ``array="zarr.json"``) of a slide."""

    array: str
    reason: str

    def __str__(self) -> str:
        return f"array {self.array!r}: {self.reason}" if self.array != "zarr.json" else self.reason


@dataclass
class SlideCheck:
    """The verdict on one slide (``slide_id=None``: the store's root metadata)."""

    slide_id: str | None
    problems: list[ChunkProblem] = field(default_factory=list)
    recorded: bool = True  # the slide records its chunk counts and digests (False: written before)
    checksummed: bool = True  # its chunks carry crc32c checksums (False: written before)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        what = "store root" if self.slide_id is None else f"slide {self.slide_id!r}"
        return f"{what}: {'ok' if self.ok else '; '.join(map(str, self.problems))}"


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _chunk_files(array_dir: Path) -> dict[str, int]:
    """``{chunk key: size}`` of an array's chunk files (every file but its ``zarr.json``)."""
    files: dict[str, int] = {}
    for here, _dirs, names in os.walk(array_dir):
        rel = Path(here).relative_to(array_dir).as_posix()
        for name in names:
            if rel == "." and name == "zarr.json":
                continue
            with contextlib.suppress(FileNotFoundError):
                files[name if rel == "." else f"{rel}/{name}"] = os.stat(os.path.join(here, name)).st_size
    return files


def _digest(files: Mapping[str, int]) -> str:
    """sha256 of the sorted ``"<chunk key>\t<size>\n"`` lines: checkable from a listing alone."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\t{files[name]}\n".encode())
    return f"sha256:{h.hexdigest()}"


def _array_meta(array_dir: Path) -> dict[str, Any]:
    meta = json.loads((array_dir / "zarr.json").read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("shape"), list):
        raise ValueError("not a Zarr v3 array")
    return meta


def _chunk_keys(meta: Mapping[str, Any]) -> set[str] | None:
    """The keys of every chunk the array's shape needs (None: a key encoding not known here)."""
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    encoding = meta.get("chunk_key_encoding", {})
    name = encoding.get("name", "default")
    sep = encoding.get("configuration", {}).get("separator", "/" if name == "default" else ".")
    grid = [math.ceil(n / c) for n, c in zip(shape, chunks, strict=True)]
    index = itertools.product(*(range(g) for g in grid))
    if name == "default":
        return {sep.join(["c", *map(str, i)]) for i in index}
    if name == "v2":
        return {sep.join(map(str, i)) or "0" for i in index}
    return None


def _chunk_record(slide_dir: Path) -> dict[str, dict[str, Any]] | None:
    """``{array: {"count", "digest"}}`` of a staged slide (kept in its attrs as ``chunks``)."""
    record = {}
    for name in ARRAYS:
        files = _chunk_files(slide_dir / name)
        wanted = _chunk_keys(_array_meta(slide_dir / name))
        for key in set(files) - wanted if wanted is not None else ():  # beyond the trimmed shape
            (slide_dir / name / key).unlink()
            del files[key]
        if wanted is not None and set(files) != wanted:
            raise StoreError(
                f"{slide_dir}: array {name!r} has chunk files {_few(sorted(files))} but its shape needs "
                f"{_few(sorted(wanted))}. Fix: this is a bug in slidepipe's writer; please report it"
            )
        record[name] = {"count": len(files), "digest": _digest(files)}
    return record


def _check_array(
    array_dir: Path, name: str, record: Any, n_rows: Any, *, deep: bool
) -> tuple[list[ChunkProblem], bool]:
    """Problems of one array (shallow: listing and sizes; ``deep``: every chunk decoded too) and
    whether its chunks carry checksums."""
    try:
        meta = _array_meta(array_dir)
        wanted = _chunk_keys(meta)
    except FileNotFoundError:
        return [ChunkProblem(name, "the array is missing (no zarr.json)")], False
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [ChunkProblem(name, f"unreadable array metadata ({err})")], False
    checksummed = any(isinstance(c, dict) and c.get("name") == "crc32c" for c in meta.get("codecs", []))
    record = record if isinstance(record, dict) else {}
    out: list[str] = []
    if isinstance(n_rows, int) and meta["shape"] and meta["shape"][0] != n_rows:
        out.append(f"{meta['shape'][0]} rows, the slide records n_tiles={n_rows}")
    files = _chunk_files(array_dir)
    if wanted is not None:
        if missing := sorted(wanted - files.keys()):
            out.append(f"{len(missing)} of {len(wanted)} chunk files missing ({_few(missing)})")
        if extra := sorted(files.keys() - wanted):
            out.append(f"{len(extra)} chunk files beyond its shape ({_few(extra)})")
    count = record.get("count")
    if isinstance(count, int) and count != len(files) and not out:
        out.append(f"{len(files)} chunk files, {count} recorded at commit")
    if empty := sorted(k for k, size in files.items() if size == 0):
        out.append(f"{len(empty)} empty chunk files ({_few(empty)})")
    if not out and record.get("digest") not in (None, _digest(files)):
        out.append("chunk file sizes differ from those recorded at commit (a chunk was truncated or rewritten)")
    if deep:
        out += _decode_chunks(array_dir, files)
    return [ChunkProblem(name, reason) for reason in out], checksummed


def _decode_chunks(array_dir: Path, files: Mapping[str, int]) -> list[str]:
    """Decode every chunk file present (its crc32c is checked on the way); the failures."""
    try:
        array = zarr.open_array(array_dir, mode="r")
    except Exception as err:  # noqa: BLE001 - any failure to open it is the finding
        return [f"cannot be opened ({type(err).__name__}: {err})"]
    bad = []
    for index in itertools.product(*(range(n) for n in array.cdata_shape)):
        key = array.metadata.encode_chunk_key(index)
        if key not in files:
            continue  # reported as missing already
        try:
            array.get_block_selection(index)
        except MemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - a chunk that does not decode is the finding
            bad.append(f"{key} ({type(err).__name__}: {err})")
    return [f"{len(bad)} of {len(files)} chunks fail to decode or their checksum: {_few(bad, 2)}"] if bad else []


def check_slide_dir(slide_dir: str | Path, *, deep: bool = False) -> SlideCheck:
    """Check one slide directory of a store (see ``verify_store``)."""
    slide_dir = Path(slide_dir)
    result = SlideCheck(slide_dir.name)
    try:
        attrs = json.loads((slide_dir / "zarr.json").read_text()).get("attributes", {})
    except FileNotFoundError:
        result.problems.append(ChunkProblem("zarr.json", "its metadata (zarr.json) is missing"))
        return result
    except (OSError, ValueError, AttributeError) as err:
        result.problems.append(ChunkProblem("zarr.json", f"its metadata (zarr.json) is unreadable ({err})"))
        return result
    if attrs.get("complete") is not True:
        result.problems.append(ChunkProblem("zarr.json", "not marked complete (complete=true missing)"))
    records = attrs.get("chunks")
    result.recorded = isinstance(records, dict)
    for name in records if isinstance(records, dict) else ARRAYS:
        problems, checksummed = _check_array(
            slide_dir / name, name, records.get(name) if result.recorded else None, attrs.get("n_tiles"), deep=deep
        )
        result.problems += problems
        result.checksummed = result.checksummed and checksummed
    return result


def verify_store(path: str | Path, *, deep: bool = False) -> list[SlideCheck]:
    """Check every slide of a store: shallow (default), every chunk file present, non-empty and
    of the recorded sizes (a listing, nothing read); ``deep``, every chunk decoded as well (its
    crc32c checked). Returns one ``SlideCheck`` per directory under ``slides/`` (sorted), after
    one with ``slide_id=None`` if the root metadata is lost. ``StoreError`` if ``path`` is no store.
    """
    path = Path(path)
    slides = path / "slides"
    results = []
    if not (path / "zarr.json").is_file():
        if not slides.is_dir():
            raise StoreError(
                f"{path}: not a slidepipe feature store (no zarr.json, no slides/). Fix: check the path"
            )
        results.append(SlideCheck(None, [ChunkProblem("zarr.json", "the root metadata (zarr.json: the "
                                                      "store's encoder, tiling, stain) is missing")]))
    elif _root_attrs(path).get("identity_lost"):
        results.append(SlideCheck(None, [ChunkProblem("zarr.json", "the root metadata was lost and "
                                                      "recreated without the store's identity")]))
    dirs = sorted(p for p in slides.iterdir() if p.is_dir()) if slides.is_dir() else []
    return results + [check_slide_dir(d, deep=deep) for d in dirs]


def _root_attrs(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / "zarr.json").read_text()).get("attributes", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def _has_slides(path: Path) -> bool:
    slides = path / "slides"
    return slides.is_dir() and any(p.is_dir() for p in slides.iterdir())


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
                if _has_slides(self.path):
                    raise StoreError(
                        f"{self.path}: the store's root metadata (zarr.json: encoder, tiling, stain) is "
                        "missing, so what its slides were extracted with is unknown. Fix: rerun "
                        "`slidepipe extract` with the store's settings (it rebuilds the root from the "
                        "slides' records where they agree), or pass --overwrite to replace its contents"
                    )
                raise StoreError(
                    f"{self.path}: not a slidepipe feature store (no zarr.json). "
                    "Fix: check the path, or create it with `slidepipe extract --out`"
                )
        else:
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path}: is a file, not a feature store. Fix: pass a directory (new, empty "
                                 "or an existing store) as --out")  # fmt: skip
            if self.path.is_dir():
                _refuse_foreign(self.path)  # before anything is written into it
            for sub in ("slides", ".staging", ".claims"):
                (self.path / sub).mkdir(parents=True, exist_ok=True)
            with self._lock():
                lost = not (self.path / "zarr.json").is_file() and _has_slides(self.path)
                root = zarr.open_group(self.path, mode="a")
                if "format_version" not in root.attrs:
                    root.attrs["format_version"] = FORMAT_VERSION
                if lost:  # its slides' identity is unknown: nothing is written until it is settled
                    log.warning("%s: root metadata (zarr.json) is missing but the store holds slides", self.path)
                    root.attrs["identity_lost"] = True
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
        the identity is replaced and the slides written under the old one are deleted. A store
        whose root metadata was lost (``identity_lost``) gets back the identity its slides record
        when they all agree; otherwise it is a mismatch too.
        """
        self._require_writable()
        wanted = _jsonable({k: identity[k] for k in IDENTITY_KEYS if k in identity})
        with self._lock():
            root = zarr.open_group(self.path, mode="a")
            if root.attrs.get("identity_lost"):
                if overwrite:
                    log.warning("%s: root metadata was lost; --overwrite deletes its %d slides",
                                self.path, len(self.slide_ids()))
                    self._drop_all_slides()
                    root.attrs.update(wanted)
                    del root.attrs["identity_lost"]
                    self._expected = wanted
                    return
                self._restore_identity(root)
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

    def _restore_identity(self, root: Any) -> None:
        """Put back the identity every slide records (``store_identity``), or raise."""
        seen = set()
        for d in (p for p in (self.path / "slides").iterdir() if p.is_dir()):
            try:
                seen.add(json.dumps(self.slide_attrs(d.name).get("store_identity"), sort_keys=True))
            except (StoreError, AttributeError):
                seen.add("null")
        if len(seen) != 1 or seen == {"null"} or not json.loads(next(iter(seen))):
            why = "they do not all record it" if "null" in seen else "they record different ones"
            raise StoreMismatchError(
                f"{self.path}: the store's root metadata (zarr.json) was lost, so the encoder, tiling and "
                f"stain of its slides are unknown ({why}). Fix: pass --overwrite to replace its "
                "contents, or write to a new store with --out"
            )
        restored = json.loads(next(iter(seen)))
        log.warning("%s: root metadata was lost; identity rebuilt from its slides: %s", self.path, restored)
        root.attrs.update(restored)
        del root.attrs["identity_lost"]

    def save_config(self, config: Mapping[str, Any]) -> None:
        """Keep the resolved run config in the root attrs (``config``)."""
        self._require_writable()
        with self._lock():
            zarr.open_group(self.path, mode="a").attrs["config"] = _jsonable(dict(config))

    def _drop_all_slides(self) -> None:
        slides = self.path / "slides"
        for child in list(slides.iterdir()):
            if child.is_dir():
                trash = self.path / ".staging" / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                os.rename(child, trash)
                shutil.rmtree(trash, ignore_errors=True)

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: store opened read-only. Fix: open with mode='a'")

    # ------------------------------------------------------------------ reading
    def _slide_dir(self, slide_id: str) -> Path:
        if not slide_id or "/" in slide_id or slide_id.startswith(".") or slide_id == "zarr.json":
            raise StoreError(f"{self.path}: invalid slide id {slide_id!r}. Fix: use the file name without '/'")
        return self.path / "slides" / slide_id

    def slide_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a slide present under ``slides/`` (complete or not), else None."""
        meta = self._slide_dir(slide_id) / "zarr.json"
        try:
            return dict(json.loads(meta.read_text()).get("attributes", {}))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, AttributeError) as err:
            raise StoreCorruptError(self.path, slide_id, None, f"unreadable metadata {meta} ({err})") from err

    def _committed(self, slide_id: str) -> bool:
        attrs = self.slide_attrs(slide_id)
        return bool(attrs and attrs.get("complete") is True)

    def check(self, slide_id: str, *, deep: bool = False) -> SlideCheck:
        """The slide's chunks checked: shallow (listing and sizes) or ``deep`` (every chunk decoded)."""
        return check_slide_dir(self._slide_dir(slide_id), deep=deep)

    def _require_intact(self, slide_id: str) -> None:
        """``StoreCorruptError`` if a chunk file of the slide is missing, empty or of another size."""
        problems = self.check(slide_id).problems
        if problems:
            raise StoreCorruptError(self.path, slide_id, problems[0].array, "; ".join(map(str, problems)))

    def is_complete(self, slide_id: str) -> bool:
        """True if the slide is in ``slides/`` with ``complete=true`` and all its chunk files are
        there with the recorded sizes (a listing: nothing is read); a corrupt slide is absent."""
        try:
            return self._committed(slide_id) and self.check(slide_id).ok
        except StoreCorruptError:
            return False

    def slide_ids(self) -> list[str]:
        """Ids of committed slides (``complete=true``), sorted. Their chunks are not checked here:
        reading a corrupt one raises ``StoreCorruptError`` (it is never silently left out)."""
        slides = self.path / "slides"
        if not slides.is_dir():
            return []
        return sorted(p.name for p in slides.iterdir() if p.is_dir() and self._committed(p.name))

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and self._committed(slide_id)

    def __len__(self) -> int:
        return len(self.slide_ids())

    def read(self, slide_id: str) -> SlideFeatures:
        """Read one complete slide into memory; ``StoreCorruptError`` if a chunk is missing, empty,
        truncated or fails its checksum."""
        if not self._committed(slide_id):
            raise StoreError(
                f"{self.path}: slide {slide_id!r} is not in the store (or not complete). "
                f"Fix: extract it first; the store has {len(self.slide_ids())} complete slides"
            )
        self._require_intact(slide_id)
        return SlideFeatures(
            slide_id=slide_id,
            features=self._read_array(slide_id, "features"),
            coords=self._read_array(slide_id, "coords"),
            tissue=self._read_array(slide_id, "tissue"),
            attrs=self.slide_attrs(slide_id) or {},
        )

    def _read_array(self, slide_id: str, name: str) -> np.ndarray:
        try:
            return np.asarray(zarr.open_array(self._slide_dir(slide_id) / name, mode="r")[...])
        except MemoryError:
            raise
        except Exception as err:  # a chunk that fails to decode or its crc32c: name the slide
            raise StoreCorruptError(
                self.path, slide_id, name, f"array {name!r}: a chunk fails to decode or its checksum "
                f"({type(err).__name__}: {err})"
            ) from err

    def load_bags(self, slide_ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All features of the given (default: all complete) slides in memory, float16 (N, D)."""
        ids = self.slide_ids() if slide_ids is None else list(slide_ids)
        bags: dict[str, np.ndarray] = {}
        for sid in ids:
            if not self._committed(sid):
                raise StoreError(
                    f"{self.path}: slide {sid!r} is not in the store. "
                    "Fix: extract it, or drop it from the label table"
                )
            self._require_intact(sid)
            bags[sid] = self._read_array(sid, "features")
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
        A slide with a missing, empty or resized chunk file (or unreadable metadata) is corrupt:
        False, it is written again.
        """
        try:
            attrs = self.slide_attrs(slide_id)
            problems = self.check(slide_id).problems if attrs and attrs.get("complete") is True else None
        except StoreCorruptError as err:
            attrs, problems = None, [ChunkProblem("zarr.json", err.reason)]
        if problems:
            log.warning("%s: slide %r is corrupt (%s): extracting it again",
                        self.path, slide_id, "; ".join(map(str, problems)))
            return False
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
            if p.name.startswith("."):  # rubbish being removed by whoever made it
                continue
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
            # rubbish is dot-prefixed (TRASH_PREFIX); a slide's staging is "<slide id>-<32 hex>",
            # so a slide may be called "trash" (the rubbish of older versions, "trash-<hex>", is
            # taken for that slide's and removed unless a live process holds its claim)
            if p.name.startswith(".") or not sid or len(tail) != 32:
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
        if self._expected:  # lets a store whose root metadata is lost get its identity back
            attrs = {**(attrs or {}), "store_identity": self._expected}
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
                    old = self.path / ".staging" / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                    os.rename(target, old)
                os.rename(staging, target)  # the one atomic step that makes the slide visible
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.debug("%s: committed slide %s", self.path, slide_id)

    def _refuse_if_identity_changed(self, slide_id: str) -> None:
        """``StoreError`` if the root identity differs from the one this object writes under (set
        by ``ensure_identity``, else by its first ``writer``; a store without one checks nothing)."""
        attrs = self.attrs
        if attrs.get("identity_lost"):
            raise StoreMismatchError(
                f"{self.path}: slide {slide_id!r} was not written: the store's root metadata (zarr.json) "
                "was lost, so the encoder, tiling and stain of its slides are unknown. Fix: rerun "
                "`slidepipe extract` with the store's settings (it rebuilds the root from the slides' "
                "records where they agree), pass --overwrite to replace its contents, or use a new --out"
            )
        current = {k: attrs[k] for k in IDENTITY_KEYS if k in attrs}
        expected = self._expected or {}
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
                trash = self.path / ".staging" / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
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
        # every chunk is written, all-zero ones too (its absence is damage) and checksummed
        opts: dict[str, Any] = {"compressors": _compressors(), "config": {"write_empty_chunks": True}}
        self.features = self.group.create_array(
            "features", shape=(shape, self.dim), dtype="float16", chunks=(self.rows, self.dim), **opts
        )
        # coords and tissue: chunks of a whole number of feature chunks, >= 65,536 rows
        side_rows = self.rows * max(1, -(-(1 << 16) // self.rows))
        self.coords = self.group.create_array(
            "coords", shape=(shape, 2), dtype="int64", chunks=(side_rows, 2), **opts
        )
        self.tissue = self.group.create_array("tissue", shape=(shape,), dtype="float32", chunks=(side_rows,), **opts)
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
        record = _chunk_record(self.path)
        if record is not None:
            attrs["chunks"] = record
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
