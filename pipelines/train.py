"""Cross-validated MIL training on a feature store: ``train_mil(store, labels, ...) -> Results``.

Bags are loaded from the store once, kept in memory as float16 and batched with padding and
masks (length-bucketed; on GPU prepared ahead by a background thread, on CPU just in time in one
reused buffer). A batch above the token budget (``max_batch_tokens``: padded instances per pass;
by default the head's own, e.g. TransMIL's, and on CPU at most a cache-sized pass) runs as several
forward/backward passes whose gradients add up to the whole batch's, with one optimizer step per
batch. Features are standardised with statistics of the training part of each fold only.
Training uses a class-balanced loss (or a balanced sampler), AdamW with a cosine schedule and
early stopping on a validation part split off each training fold; the reported checkpoint is
fixed by ``CHECKPOINT_RULE``. On CPU a run is repeatable bit-for-bit for a given seed; on CUDA it
uses mixed precision.

Run directory: ``config.yaml`` (resolved), ``labels.csv`` (the cohort used), ``splits.json`` /
``splits.csv``, ``<fold>.pt`` checkpoints, ``log.csv`` (one row per epoch and fold),
``predictions.csv``, ``metrics.json`` (``folds`` and ``summary``) and a short ``README.md``;
with ``tensorboard: true`` also ``tensorboard/<fold>/`` event files (train loss, validation loss
and AUC, learning rate per epoch).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from models.mil import create_mil, get_mil_spec
from pipelines.config import TrainJob, save_resolved_config
from pipelines.metrics import METRICS, classification_metrics, json_safe, summarize
from pipelines.splits import Fold, SplitError, Splits, make_splits
from wsi.store import FeatureStore

log = logging.getLogger(__name__)

CHECKPOINT_RULE = (
    "best validation: the epoch with the lowest cross-entropy (class-weighted when balance=loss) on "
    "the validation part split off each training fold (earliest epoch on ties); the test fold and the held-out "
    "set are never used for training, early stopping or checkpoint selection"
)
Progress = Callable[[dict[str, Any]], None]
FoldRunner = Callable[[Callable[..., "FoldResult"], list[dict[str, Any]]], Sequence["FoldResult"]]


class LabelTableError(ValueError):
    """The label table cannot be used; the message names the file, the reason and the fix."""


class TensorBoardUnavailableError(ImportError):
    """``tensorboard`` logging was asked for but the package is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "TensorBoard logging (tensorboard: true / --tensorboard) needs the 'tensorboard' package, "
            'which is not installed. Fix: pip install "slidepipe[tensorboard]" (or turn the option off)'
        )


class UnknownSlidesError(LabelTableError):
    """Slides of the label table are not in the feature store (or vice versa for splits)."""

    def __init__(self, message: str, slide_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.slide_ids = list(slide_ids)


# --------------------------------------------------------------------------- labels and cohort
def read_label_table(source: str | Path | pd.DataFrame, *, target: str = "label") -> pd.DataFrame:
    """Read CSV/TSV/parquet with ``slide_id``, optional ``patient_id`` and the ``target`` column.

    Returns columns ``slide_id``, ``patient_id`` (default: the slide id) and ``target``; rows
    with an empty target are dropped (logged by name).
    """
    name = "label table" if isinstance(source, pd.DataFrame) else str(source)
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    else:
        path = Path(source)
        if not path.is_file():
            raise LabelTableError(f"{path}: label table not found. Fix: check the --labels path")
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if suffix in (".tsv", ".tab") else ",", dtype={"slide_id": str})
    if "slide_id" not in df.columns:
        raise LabelTableError(
            f"{name}: no 'slide_id' column (columns: {list(df.columns)}). "
            "Fix: name the column of slide ids (file names without extension) 'slide_id'"
        )
    if target not in df.columns:
        raise LabelTableError(
            f"{name}: target column {target!r} not found (columns: {list(df.columns)}). "
            "Fix: pass --target with one of these columns"
        )
    df = df.assign(slide_id=df["slide_id"].astype(str))
    if "patient_id" not in df.columns:
        df["patient_id"] = df["slide_id"]
    df["patient_id"] = df["patient_id"].fillna(df["slide_id"]).astype(str)
    empty = df[target].isna()
    if empty.any():
        log.warning("%s: %d slide(s) without a %r value are left out: %s", name, int(empty.sum()),
                    target, ", ".join(df.loc[empty, "slide_id"].head(10)))  # fmt: skip
        df = df[~empty]
    dup = df.duplicated("slide_id", keep=False)
    if dup.any():
        raise LabelTableError(
            f"{name}: slide ids listed more than once: {sorted(set(df.loc[dup, 'slide_id']))[:10]}. "
            "Fix: keep one row per slide"
        )
    return df[["slide_id", "patient_id", target]].reset_index(drop=True)


@dataclass
class Cohort:
    """The slides a run trains on: ids, patients, label indices and class names."""

    slide_ids: list[str]
    patients: list[str]
    y: np.ndarray
    classes: list[str]

    @property
    def labels(self) -> dict[str, int]:
        return dict(zip(self.slide_ids, self.y.tolist(), strict=True))

    @property
    def patient_of(self) -> dict[str, str]:
        return dict(zip(self.slide_ids, self.patients, strict=True))


def build_cohort(
    table: pd.DataFrame,
    store_ids: Sequence[str],
    *,
    target: str,
    allow_missing: bool = False,
    table_name: str = "label table",
    store_name: str = "store",
) -> Cohort:
    """Match the label table with the store's slides; unknown slides are a named error."""
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
        table = table[table["slide_id"].isin(in_store)]
    unlabeled = sorted(in_store - set(table["slide_id"]))
    if unlabeled:
        log.info("%d slide(s) of %s have no label and are not used: %s", len(unlabeled), store_name,
                 ", ".join(unlabeled[:10]))  # fmt: skip
    values = table[target]
    order = sorted(values.unique().tolist())
    classes = [str(v) for v in order]
    if len(classes) < 2:
        raise LabelTableError(
            f"{table_name}: target {target!r} has {len(classes)} class(es) {classes}; need at least 2. "
            "Fix: check the target column"
        )
    index = {v: i for i, v in enumerate(order)}
    return Cohort(
        slide_ids=table["slide_id"].tolist(),
        patients=table["patient_id"].tolist(),
        y=np.array([index[v] for v in values], dtype=np.int64),
        classes=classes,
    )


# --------------------------------------------------------------------------- batching
def as_tensors(bags: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """float16 ``(N, D)`` tensors sharing memory with the arrays where possible."""
    out = {}
    for sid, arr in bags.items():
        arr = np.asarray(arr, dtype=np.float16)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr).copy()
        out[sid] = torch.from_numpy(arr)
    return out


def standardization_stats(bags: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and sd over all instances of ``bags`` (float64 sums, float32 result)."""
    dim = bags[0].shape[1]
    total, sq, n = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64), 0
    for b in bags:
        d = b.double()
        total += d.sum(0)
        sq += (d * d).sum(0)
        n += b.shape[0]
    mean = total / max(n, 1)
    std = (sq / max(n, 1) - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.float(), std.float()


def length_batches(
    lengths: Sequence[int], batch_size: int, *, generator: torch.Generator | None = None, pool: int = 16
) -> list[list[int]]:
    """Index batches of similar bag length.

    Without a generator: sorted by length, in order (evaluation). With one: shuffled, sorted
    inside pools of ``pool`` batches, batches in random order (training).
    """
    lengths = np.asarray(lengths)
    if generator is None:
        order = np.argsort(lengths, kind="stable").tolist()
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches: list[list[int]] = []
    step = batch_size * pool
    for start in range(0, len(perm), step):
        chunk = sorted(perm[start : start + step], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def token_chunks(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Split one batch into passes of consecutive bags whose padded size stays within budget.

    ``lengths`` are the batch's bag lengths (as padded: after any subsampling); a pass of ``k``
    bags costs ``k * longest`` instances and holds at most ``max_tokens`` of them, except that a
    bag longer than the budget is a pass on its own. ``None``: the whole batch is one pass.
    Returns positions into the batch.
    """
    if max_tokens is None or len(lengths) <= 1:
        return [list(range(len(lengths)))]
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        n = max(1, int(n))
        grown = max(longest, n)
        if current and grown * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, grown = [], n
        current.append(i)
        longest = grown
    chunks.append(current)
    return chunks


CPU_PASS_BYTES = 16 << 20
"""On CPU, ``max_batch_tokens="auto"`` keeps a pass's float32 input within this many bytes (about
5,500 patches of 768-d), so a pass's activations stay in cache: ABMIL epochs run ~1.6x faster
than with whole 16-bag passes (``bench/train.py --max-batch-tokens``)."""


def batch_token_budget(
    job: TrainJob, *, device: torch.device | str | None = None, in_dim: int | None = None
) -> int | None:
    """Padded instances per forward/backward pass: ``job.max_batch_tokens``, or with ``"auto"`` the
    head's default, on CPU (``device``) capped at ``CPU_PASS_BYTES`` of ``in_dim`` float32 rows."""
    if job.max_batch_tokens != "auto":
        return job.max_batch_tokens
    head = get_mil_spec(job.model).batch_tokens
    if device is None or torch.device(device).type != "cpu" or not in_dim:
        return head
    cpu = max(1, CPU_PASS_BYTES // (4 * int(in_dim)))
    return cpu if head is None else min(head, cpu)


class PassBuffer:
    """Float32 memory reused by one forward/backward pass after another (CPU training).

    A fresh tensor's pages are each faulted in on first write: collating into fresh tensors, an
    ABMIL epoch of bench/train.py waited 1.27 s for data (6.2 %), into this buffer 0.65 s (3.4 %).
    A view taken from here is valid until the next ``take``.
    """

    def __init__(self) -> None:
        self._flat = torch.empty(0, dtype=torch.float32)

    def take(self, *shape: int) -> torch.Tensor:
        size = math.prod(shape)
        if self._flat.numel() < size:
            self._flat = torch.empty(size, dtype=torch.float32)
        return self._flat[:size].view(shape)


def collate(
    bags: Sequence[torch.Tensor],
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    *,
    max_instances: int | None = None,
    generator: torch.Generator | None = None,
    out: PassBuffer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad float16 bags into a standardised float32 batch ``(B, N, D)`` and mask ``(B, N)``.

    Bags longer than ``max_instances`` are subsampled (random subset, original order kept).
    With ``out`` the batch is written into that buffer's memory.
    """
    if max_instances is not None:
        bags = [
            b[torch.randperm(len(b), generator=generator)[:max_instances].sort().values]
            if len(b) > max_instances
            else b
            for b in bags
        ]
    n_max = max(1, max(len(b) for b in bags))
    shape = (len(bags), n_max, bags[0].shape[1])
    x = torch.empty(shape, dtype=torch.float32) if out is None else out.take(*shape)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    scale = None if std is None else 1.0 / std
    for i, b in enumerate(bags):
        n = len(b)
        x[i, :n].copy_(b)  # float16 -> float32, then in place: 3x faster than a mixed-type sub
        if mean is not None and scale is not None:
            x[i, :n].sub_(mean).mul_(scale)
        x[i, n:] = 0.0
        mask[i, :n] = True
    return x, mask


class Prefetch:
    """Iterate ``make(0) ... make(n-1)``, computed ahead by one background thread (order kept).

    The thread starts at construction, so batches are prepared while the caller is still busy
    (e.g. the next epoch's first batches during validation). ``close()`` stops it early.
    """

    def __init__(self, make: Callable[[int], Any], n: int, depth: int = 2) -> None:
        self.n, self._i = n, 0
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._work, args=(make,), name="mil-batches", daemon=True)
        self._t.start()

    def _work(self, make: Callable[[int], Any]) -> None:
        try:
            for i in range(self.n):
                if self._stop.is_set():
                    return
                self._q.put((True, make(i)))
        except BaseException as err:  # handed to the consumer
            self._q.put((False, err))

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._i >= self.n:
            self.close()
            raise StopIteration
        ok, item = self._q.get()
        self._i += 1
        if not ok:
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._t.is_alive():
            with contextlib.suppress(queue.Empty):
                self._q.get(timeout=0.05)
        self._t.join()


# --------------------------------------------------------------------------- one fold
@dataclass
class FoldResult:
    """What one fold produced (picklable: safe to return from a Dask task)."""

    repeat: int
    fold: int
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    log: list[dict[str, Any]]
    checkpoint: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    bags: Sequence[torch.Tensor],
    mean: torch.Tensor | None,
    std: torch.Tensor | None,
    *,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Logits ``(n, C)`` for ``bags`` in their given order (model in eval mode).

    ``max_tokens`` bounds the padded instances per forward pass (see ``token_chunks``).
    """
    model.eval()
    device = torch.device(device)
    out = [None] * len(bags)
    for batch in length_batches([len(b) for b in bags], batch_size):
        for pos in token_chunks([len(bags[i]) for i in batch], max_tokens):
            idx = [batch[p] for p in pos]
            x, mask = collate([bags[i] for i in idx], mean, std)
            with _autocast(device):
                logits = model(x.to(device), mask.to(device)).logits.float().cpu()
            for j, i in enumerate(idx):
                out[i] = logits[j]
    return torch.stack(out) if out else torch.zeros(0)


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def _fold_seed(seed: int, repeat: int, fold: int) -> int:
    return (seed * 1_000_003 + repeat * 1009 + fold) % (2**63)


def _class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = len(y) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def train_fold(
    source: str | Path | Mapping[str, np.ndarray] | Mapping[str, torch.Tensor],
    split: Fold,
    cohort: Cohort,
    job: TrainJob,
    run_dir: str | Path,
    *,
    heldout: Sequence[str] = (),
    progress: Progress | None = None,
) -> FoldResult:
    """Train, select and evaluate one fold; write its checkpoint and epoch log.

    ``source`` is a store path (only this fold's bags are loaded) or an in-memory mapping of
    bags. A plain picklable function: folds can run as parallel Dask tasks.
    """
    run_dir = Path(run_dir)
    needed = [*split.train, *split.val, *split.test, *heldout]
    if isinstance(source, (str, Path)):
        source = FeatureStore(source, mode="r").load_bags(needed)
    wanted = set(needed)
    bags = {
        k: v if isinstance(v, torch.Tensor) else as_tensors({k: v})[k]
        for k, v in source.items()
        if k in wanted
    }
    labels = cohort.labels
    n_classes = len(cohort.classes)
    device = resolve_device(job.device)
    seed = _fold_seed(job.seed, split.repeat, split.fold)
    prev_det, prev_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    if job.torch_threads is not None:
        torch.set_num_threads(job.torch_threads)
    writer = _tensorboard_writer(run_dir / "tensorboard" / split.name) if job.tensorboard else None
    try:
        return _train_fold(bags, split, cohort, labels, n_classes, job, run_dir, heldout, device, seed, progress,
                           writer)  # fmt: skip
    finally:
        if writer is not None:
            writer.close()
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or ``TensorBoardUnavailableError``."""
    try:
        import tensorboard  # noqa: F401  (torch's module imports it lazily and may be cached)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise TensorBoardUnavailableError() from err
    return SummaryWriter


def _tensorboard_writer(log_dir: Path):
    return _summary_writer_class()(log_dir=str(log_dir))


def _log_scalars(writer, row: dict[str, Any]) -> None:
    """One epoch's scalars (step = epoch); a missing or undefined value (e.g. AUC) is skipped."""
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("val/auc", "val_auc"),
                     ("train/lr", "lr")):  # fmt: skip
        value = row.get(key)
        if value is not None and np.isfinite(value):
            writer.add_scalar(tag, float(value), row["epoch"])
    writer.flush()


def _train_fold(bags, split, cohort, labels, n_classes, job, run_dir, heldout, device, seed, progress, writer):
    torch.manual_seed(seed)
    g_batches = torch.Generator().manual_seed(seed + 1)
    g_sub = torch.Generator().manual_seed(seed + 2)
    train_bags = [bags[s] for s in split.train]
    train_y = np.array([labels[s] for s in split.train])
    in_dim = int(train_bags[0].shape[1])
    mean, std = standardization_stats(train_bags) if job.standardize else (None, None)
    model = create_mil(job.model, in_dim, n_classes, **job.model_kwargs).to(device)
    weights = _class_weights(train_y, n_classes)
    loss_weights = weights.to(device) if job.balance == "loss" else None
    steps = max(1, -(-len(train_bags) // job.batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=job.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=job.epochs * steps, eta_min=job.lr * 0.01)
    scaler = None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    val_bags = [bags[s] for s in split.val]
    val_y = torch.tensor([labels[s] for s in split.val])
    ytrain = torch.as_tensor(train_y)
    best = (float("inf"), -1)
    best_state: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    stale = 0
    lengths = [len(b) for b in train_bags]
    budget = batch_token_budget(job, device=device, in_dim=in_dim)
    cap = job.max_instances
    if progress:
        progress({"kind": "fold_start", "repeat": split.repeat, "fold": split.fold, "epochs": job.epochs})

    # On CPU, each pass is made just before it runs, on this thread (~0.4 ms per 4,000 x 768 bag),
    # into one reused buffer. A thread making batches ahead would run torch ops in a second OpenMP
    # team, and with more OpenMP threads than cores the compute team's barriers slow down: TransMIL
    # epochs took 15-25 % longer with such a thread alive, even while it was idle.
    inline = device.type == "cpu"
    buffer = PassBuffer() if inline else None

    def epoch_batches() -> Iterator[Any]:
        if job.balance == "sampler":
            p = weights[ytrain]
            draw = torch.multinomial(p, len(train_bags), replacement=True, generator=g_batches).tolist()
        else:
            draw = list(range(len(train_bags)))
        batches = [[draw[i] for i in b] for b in length_batches([lengths[i] for i in draw], job.batch_size,
                                                                 generator=g_batches)]  # fmt: skip

        def make(k: int, batches=batches):
            """Batch ``k``: its passes (each ``(x, mask)``, or on CPU a function making them when
            the pass runs) with their positions in the batch, and the batch's labels."""
            idx = batches[k]
            passes = []
            for pos in token_chunks([lengths[i] if cap is None else min(lengths[i], cap) for i in idx], budget):
                group = [train_bags[idx[p]] for p in pos]

                def prepare(group=group):
                    return collate(group, mean, std, max_instances=cap, generator=g_sub, out=buffer)

                passes.append((prepare if inline else prepare(), torch.tensor(pos)))
            return passes, ytrain[idx]

        return (make(k) for k in range(len(batches))) if inline else Prefetch(make, len(batches))

    it = epoch_batches()
    for epoch in range(job.epochs):
        t0 = time.perf_counter()
        model.train()
        total, n_seen, wait = 0.0, 0, 0.0
        while True:
            tw = time.perf_counter()
            try:
                passes, y = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - tw
            y = y.to(device)
            opt.zero_grad(set_to_none=True)
            # one pass: the batch's mean loss; several: each pass's share of it (its sum of
            # weighted losses over the batch's total weight; aux loss by its share of bags), so
            # the accumulated gradient is the whole batch's
            denom = None if len(passes) == 1 else (loss_weights[y].sum() if loss_weights is not None else len(y))
            batch_loss = 0.0
            for data, pos in passes:
                if callable(data):  # made now, into the buffer the previous pass is done with
                    tw = time.perf_counter()
                    data = data()
                    wait += time.perf_counter() - tw
                x, mask = data[0].to(device, non_blocking=True), data[1].to(device)
                yp = y if denom is None else y[pos.to(device)]
                with _autocast(device):
                    out = model(x, mask, labels=yp)
                    if denom is None:
                        loss = F.cross_entropy(out.logits.float(), yp, weight=loss_weights)
                    else:
                        loss = F.cross_entropy(out.logits.float(), yp, weight=loss_weights, reduction="sum") / denom
                    if out.aux_loss is not None:
                        aux = out.aux_loss.float()
                        loss = loss + (aux if denom is None else aux * (len(yp) / len(y)))
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                batch_loss += float(loss.detach())
                del out, loss, data, x  # free this pass's graph (and buffer view) before the next one is built
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            total += batch_loss * len(y)
            n_seen += len(y)
        train_seconds = time.perf_counter() - t0
        it = epoch_batches() if epoch + 1 < job.epochs else None  # prepared during validation
        val_logits = predict(model, val_bags, mean, std, batch_size=job.batch_size, device=device,
                             max_tokens=budget)  # fmt: skip
        val_loss = float(F.cross_entropy(val_logits, val_y, weight=loss_weights.cpu() if loss_weights is not None else None))
        val_auc = classification_metrics(val_y.numpy(), torch.softmax(val_logits, 1).numpy())["auc"]
        improved = val_loss < best[0]
        if improved:
            best = (val_loss, epoch)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            stale = 0
        else:
            stale += 1
        row = {
            "repeat": split.repeat, "fold": split.fold, "epoch": epoch, "lr": opt.param_groups[0]["lr"],
            "train_loss": total / max(n_seen, 1), "val_loss": val_loss, "val_auc": val_auc,
            "best": improved, "train_seconds": train_seconds, "data_wait_seconds": wait,
        }  # fmt: skip
        rows.append(row)
        if writer is not None:
            _log_scalars(writer, row)
        if progress:
            progress({"kind": "epoch", **row, "epochs": job.epochs})
        if stale >= job.patience:
            break
    if it is not None:
        it.close()
    if not best_state:  # validation loss never finite: keep the last weights, say so
        log.warning("%s: validation loss was never finite; keeping the last epoch", split.name)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best = (float("nan"), len(rows) - 1)
    model.load_state_dict(best_state)
    ckpt_path = run_dir / f"{split.name}.pt"
    torch.save(
        {
            "model": job.model, "model_kwargs": dict(job.model_kwargs), "in_dim": in_dim,
            "classes": list(cohort.classes), "target": job.target, "mean": mean, "std": std,
            "state_dict": {k: v.cpu() for k, v in best_state.items()}, "best_epoch": best[1],
            "val_loss": best[0], "repeat": split.repeat, "fold": split.fold,
            "checkpoint_rule": CHECKPOINT_RULE,
        },
        ckpt_path,
    )  # fmt: skip
    metrics: dict[str, Any] = {
        "repeat": split.repeat, "fold": split.fold, "best_epoch": best[1], "epochs_run": len(rows),
        "val_loss": best[0], "n_train": len(split.train), "n_val": len(split.val), "n_test": len(split.test),
    }  # fmt: skip
    predictions: list[dict[str, Any]] = []
    patient = cohort.patient_of
    for part, ids in (("test", split.test), ("heldout", list(heldout))):
        if not ids:
            continue
        logits = predict(model, [bags[s] for s in ids], mean, std, batch_size=job.batch_size, device=device,
                         max_tokens=budget)  # fmt: skip
        probs = torch.softmax(logits, 1).numpy()
        y = np.array([labels[s] for s in ids])
        m = classification_metrics(y, probs)
        prefix = "" if part == "test" else "heldout_"
        metrics.update({prefix + k: v for k, v in m.items()})
        for s, yi, p in zip(ids, y, probs, strict=True):
            predictions.append(
                {"slide_id": s, "patient_id": patient[s], "repeat": split.repeat, "fold": split.fold,
                 "part": part, "label": cohort.classes[yi], "pred": cohort.classes[int(p.argmax())],
                 **{f"prob_{c}": float(p[j]) for j, c in enumerate(cohort.classes)}}  # fmt: skip
            )
    if progress:
        progress({"kind": "fold_end", "repeat": split.repeat, "fold": split.fold, **metrics})
    return FoldResult(split.repeat, split.fold, metrics, predictions, rows, str(ckpt_path))


# --------------------------------------------------------------------------- the run
@dataclass
class Results:
    """A finished run: per-fold metrics, their summary, predictions and where it all is."""

    run_dir: Path
    classes: list[str]
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float | None]]
    predictions: pd.DataFrame
    splits: Splits
    config: TrainJob
    checkpoints: list[Path] = field(default_factory=list)

    def table(self):
        """A rich table of the summary (mean ± sd over folds)."""
        from rich.table import Table

        t = Table(title=f"{self.config.model} on {self.config.target}: {len(self.folds)} folds")
        t.add_column("metric")
        t.add_column("mean ± sd", justify="right")
        for k, v in self.summary.items():
            cell = "n/a" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"
            t.add_row(k, cell)
        return t


def _job_from(job: TrainJob | None, values: dict[str, Any]) -> TrainJob:
    data = job.model_dump() if job is not None else {}
    data.update({k: v for k, v in values.items() if v is not None})
    return TrainJob.model_validate(data)


def train_mil(
    store: str | Path | FeatureStore,
    labels: str | Path | pd.DataFrame,
    *,
    model: str | None = None,
    target: str | None = None,
    folds: int | None = None,
    repeats: int | None = None,
    out: str | Path | None = None,
    job: TrainJob | None = None,
    progress: Progress | None = None,
    fold_runner: FoldRunner | None = None,
    **options: Any,
) -> Results:
    """Cross-validated training of MIL head ``model`` on ``store`` with labels from ``labels``.

    ``job`` supplies defaults (e.g. from ``configs/train/*.yaml``); keyword arguments override it,
    ``options`` are any other ``TrainJob`` fields (``epochs``, ``lr``, ``seed``, ``splits`` ...).
    ``fold_runner(train_fold, calls)`` runs the folds elsewhere (e.g. as Dask tasks): ``calls``
    is a list of keyword dicts for ``train_fold`` whose ``source`` is the store path, so each
    worker loads only its fold's bags; it returns the ``FoldResult`` list.
    """
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, mode="r")
    job = _job_from(
        job,
        {"store": fs.path, "labels": None if isinstance(labels, pd.DataFrame) else Path(labels),
         "model": model, "target": target, "folds": folds, "repeats": repeats,
         "out": Path(out) if out is not None else None, **options},
    )  # fmt: skip
    create_mil(job.model, 4, 2, **job.model_kwargs)  # fail fast on a bad model name or option
    if job.tensorboard:
        _summary_writer_class()  # fail fast without the package
    run_dir = Path(job.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    table = read_label_table(labels, target=job.target)
    cohort = build_cohort(table, fs.slide_ids(), target=job.target, allow_missing=job.allow_missing,
                          table_name=str(labels) if not isinstance(labels, pd.DataFrame) else "label table",
                          store_name=f"store {fs.path}")  # fmt: skip
    log.info("loading %d bags from %s", len(cohort.slide_ids), fs.path)
    bags = as_tensors(fs.load_bags(cohort.slide_ids))
    empty = [s for s in cohort.slide_ids if len(bags[s]) == 0]
    if empty:
        log.warning("%d slide(s) have no patches and are left out: %s", len(empty), ", ".join(empty[:10]))
        keep = [i for i, s in enumerate(cohort.slide_ids) if len(bags[s])]
        cohort = Cohort([cohort.slide_ids[i] for i in keep], [cohort.patients[i] for i in keep],
                        cohort.y[keep], cohort.classes)  # fmt: skip
    log.info("loaded %d bags in %.1f s", len(bags), time.time() - t0)
    if job.splits is not None:
        splits = Splits.load(job.splits)
        unknown = sorted(splits.slide_ids() - set(cohort.slide_ids))
        if unknown:
            raise UnknownSlidesError(
                f"{job.splits}: {len(unknown)} slide(s) of the splits file are not in this cohort: "
                f"{', '.join(unknown[:20])}. Fix: train on the same store and labels, or drop --splits",
                unknown,
            )
        unused = sorted(set(cohort.slide_ids) - splits.slide_ids())
        if unused:
            log.warning("%d labelled slide(s) are not in the splits file and are not used: %s",
                        len(unused), ", ".join(unused[:10]))  # fmt: skip
        splits.check(cohort.patient_of)
    else:
        splits = make_splits(cohort.slide_ids, cohort.y, cohort.patients, folds=job.folds,
                             repeats=job.repeats, test_frac=job.test_frac, val_frac=job.val_frac,
                             seed=job.seed)  # fmt: skip
    splits.save(run_dir, cohort.patient_of)
    save_resolved_config(job, run_dir)
    pd.DataFrame({"slide_id": cohort.slide_ids, "patient_id": cohort.patients,
                  job.target: [cohort.classes[i] for i in cohort.y]}).to_csv(run_dir / "labels.csv", index=False)  # fmt: skip
    if fold_runner is None and job.cluster is not None:
        fold_runner = _cluster_runner(job, progress)
    if fold_runner is not None:
        calls = [dict(source=str(fs.path), split=f, cohort=cohort, job=job, run_dir=str(run_dir),
                      heldout=list(splits.heldout)) for f in splits.folds]  # fmt: skip
        results = list(fold_runner(train_fold, calls))
    else:
        results = [
            train_fold(bags, f, cohort, job, run_dir, heldout=splits.heldout, progress=progress)
            for f in splits.folds
        ]
    return write_results(results, cohort, splits, job, run_dir, seconds=time.time() - t0)


def _cluster_runner(job: TrainJob, progress: Progress | None) -> FoldRunner:
    """Folds as parallel Dask tasks on ``job.cluster`` (local, SLURM/PBS or an address)."""
    from pipelines.cluster import gpu_resources, run_calls

    def on_result(_: int, res: FoldResult) -> None:
        if progress:
            progress({"kind": "fold_end", "repeat": res.repeat, "fold": res.fold, **res.metrics})

    def runner(fn, calls):
        return run_calls(fn, [((), c) for c in calls], job.cluster, names=[c["split"].name for c in calls],
                         resources=gpu_resources(job.cluster), on_result=on_result)  # fmt: skip

    return runner


def write_results(
    results: Sequence[FoldResult], cohort: Cohort, splits: Splits, job: TrainJob, run_dir: Path, *, seconds: float
) -> Results:
    """Gather fold results into ``metrics.json``, ``predictions.csv``, ``log.csv``, ``README.md``."""
    results = sorted(results, key=lambda r: (r.repeat, r.fold))
    fold_metrics = [r.metrics for r in results]
    keys = list(METRICS) + [f"heldout_{m}" for m in METRICS if splits.heldout]
    summary = summarize(fold_metrics, keys)
    prob_cols = [f"prob_{c}" for c in cohort.classes]
    cols = ["slide_id", "patient_id", "fold", "repeat", "label", *prob_cols, "pred", "part"]
    predictions = pd.DataFrame([p for r in results for p in r.predictions], columns=cols)
    predictions.to_csv(run_dir / "predictions.csv", index=False)
    if job.log_csv:
        pd.DataFrame([row for r in results for row in r.log]).to_csv(run_dir / "log.csv", index=False)
    metrics = {
        "model": job.model, "model_kwargs": job.model_kwargs, "target": job.target,
        "classes": cohort.classes, "n_slides": len(cohort.slide_ids),
        "n_patients": len(set(cohort.patients)), "n_heldout": len(splits.heldout),
        "checkpoint_rule": CHECKPOINT_RULE, "seconds": round(seconds, 2),
        "folds": fold_metrics, "summary": summary,
    }  # fmt: skip
    (run_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2))
    lines = [f"# slidepipe train: {job.model} on `{job.target}`", "",
             f"{len(cohort.slide_ids)} slides, {len(set(cohort.patients))} patients, classes {cohort.classes}; "
             f"{job.folds} folds x {job.repeats} repeat(s), seed {job.seed}.", "",
             f"Checkpoint rule: {CHECKPOINT_RULE}.", "", "| metric | mean ± sd |", "|---|---|"]  # fmt: skip
    for k, v in summary.items():
        cell = "n/a" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"
        lines.append(f"| {k} | {cell} |")
    lines += ["", "Files: config.yaml, labels.csv, splits.json/.csv, <fold>.pt, log.csv, predictions.csv, metrics.json"
              + (", tensorboard/<fold>/ (tensorboard --logdir tensorboard)." if job.tensorboard else ".")]
    (run_dir / "README.md").write_text("\n".join(lines) + "\n")
    return Results(run_dir, cohort.classes, fold_metrics, summary, predictions, splits, job,
                   [Path(r.checkpoint) for r in results])  # fmt: skip


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a fold checkpoint (eval mode) and return it with the checkpoint dict."""
    ckpt = torch.load(Path(path), map_location=device, weights_only=True)
    model = create_mil(ckpt["model"], ckpt["in_dim"], len(ckpt["classes"]), **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


__all__ = [
    "CHECKPOINT_RULE", "Cohort", "FoldResult", "LabelTableError", "Results", "SplitError",
    "CPU_PASS_BYTES", "TensorBoardUnavailableError", "UnknownSlidesError", "batch_token_budget", "build_cohort", "collate",
    "length_batches", "load_checkpoint", "PassBuffer", "predict", "Prefetch", "read_label_table", "standardization_stats",
    "token_chunks", "train_fold", "train_mil",
]  # fmt: skip
