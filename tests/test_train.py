"""Training API: label tables, patient-grouped splits, batching, witness-store accuracy of every
head, bit-for-bit reproducibility, run-directory outputs, the CLI, and the train/heatmap configs."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from models.mil import create_mil, list_mil
from pipelines.config import HeatmapJob, TrainJob, load_config
from pipelines.splits import SplitError, Splits, make_splits
from pipelines.train import (
    CHECKPOINT_RULE,
    LabelTableError,
    PassBuffer,
    Prefetch,
    TensorBoardUnavailableError,
    UnknownSlidesError,
    batch_token_budget,
    collate,
    length_batches,
    load_checkpoint,
    predict,
    read_label_table,
    standardization_stats,
    token_chunks,
    train_mil,
)
from wsi.store import FeatureStore

REPO = Path(__file__).resolve().parents[1]
D = 16
FAST = {"epochs": 10, "patience": 4, "lr": 2e-3, "batch_size": 4, "folds": 3, "device": "cpu"}
HEAD_KW = {
    "transmil": {"dim": 16, "heads": 2, "landmarks": 16},
    "clam-sb": {"hidden": 32, "attn_dim": 16},
    "clam-mb": {"hidden": 32, "attn_dim": 16},
    "dsmil": {"hidden": 32, "query_dim": 16},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: steadier on a shared machine


def write_witness_store(root: Path, *, n: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Bags of 100-300 N(0, 1) instances; positive bags hide ~10 % witnesses shifted by +3 in
    8 of the 16 dimensions. The first 20 slides pair up into 10 two-slide patients."""
    rng = np.random.default_rng(seed)
    fs = FeatureStore(root / "features.zarr")
    rows = []
    for i in range(n):
        y = i % 2
        m = int(rng.integers(100, 300))
        x = rng.normal(size=(m, D))
        if y:
            x[: max(3, m // 10), :8] += 3.0
            rng.shuffle(x)
        coords = np.stack([np.arange(m) % 20 * 256, np.arange(m) // 20 * 256], 1)
        fs.write(f"s{i:03d}", x.astype(np.float16), coords)
        rows.append({"slide_id": f"s{i:03d}", "patient_id": f"p{i // 2 if i < 20 else i}",
                     "label": ["neg", "pos"][y]})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "features.zarr", root / "labels.csv"


@pytest.fixture(scope="module")
def witness(tmp_path_factory) -> tuple[Path, Path]:
    return write_witness_store(tmp_path_factory.mktemp("witness"))


# --------------------------------------------------------------------------- configs
def _yaml_files(verb: str) -> list[Path]:
    return sorted((REPO / "configs" / verb).glob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files("train") + _yaml_files("heatmap"), ids=lambda p: p.name)
def test_every_train_and_heatmap_config_validates(path):
    job = load_config(TrainJob if path.parent.name == "train" else HeatmapJob, path)
    if isinstance(job, TrainJob):
        create_mil(job.model, 8, 2, **job.model_kwargs)  # the model options are valid too


def test_default_configs_match_the_models():
    for verb, model in (("train", TrainJob), ("heatmap", HeatmapJob)):
        data = yaml.safe_load((REPO / "configs" / verb / "default.yaml").read_text())
        assert data == model().model_dump(mode="json"), f"configs/{verb}/default.yaml is out of date"


# --------------------------------------------------------------------------- labels
def test_label_table_errors_name_file_and_fix(tmp_path, witness):
    store, _ = witness
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\na,1\n")
    with pytest.raises(LabelTableError, match=r"bad.csv: no 'slide_id' column.*Fix"):
        read_label_table(bad)
    with pytest.raises(LabelTableError, match=r"target column 'grade' not found"):
        read_label_table(pd.DataFrame({"slide_id": ["a"], "label": [1]}), target="grade")
    tsv = tmp_path / "labels.tsv"
    pd.DataFrame({"slide_id": ["s000", "s001", "ghost-1", "ghost-2"], "label": [0, 1, 0, 1]}).to_csv(
        tsv, sep="\t", index=False
    )
    with pytest.raises(UnknownSlidesError, match=r"labels.tsv: 2 slide\(s\).*ghost-1, ghost-2.*--allow-missing") as e:
        train_mil(store, tsv, out=tmp_path / "run", epochs=1)
    assert e.value.slide_ids == ["ghost-1", "ghost-2"]


def test_allow_missing_skips_unknown_slides(tmp_path, witness):
    store, labels = witness
    table = pd.read_csv(labels)
    table = pd.concat([table, pd.DataFrame([{"slide_id": "ghost", "patient_id": "px", "label": "pos"}])])
    res = train_mil(store, table, out=tmp_path / "run", allow_missing=True, epochs=1, folds=2,
                    model_kwargs={"hidden": 8}, device="cpu")  # fmt: skip
    assert "ghost" not in set(res.predictions["slide_id"])
    assert len(res.predictions) == 60


# --------------------------------------------------------------------------- splits
def _cohort(n=80, seed=0):
    rng = np.random.default_rng(seed)
    patients = [f"p{rng.integers(0, 30)}" for _ in range(n)]
    labels = [int(p[1:]) % 2 for p in patients]  # label per patient
    return [f"s{i}" for i in range(n)], labels, patients


def test_splits_never_share_a_patient_and_are_stratified():
    ids, y, pats = _cohort()
    sp = make_splits(ids, y, pats, folds=4, repeats=2, test_frac=0.2, seed=3)
    patient = dict(zip(ids, pats, strict=True))
    assert len(sp.folds) == 8
    held = {patient[s] for s in sp.heldout}
    assert sp.heldout and held
    for r in (0, 1):
        tests = [s for f in sp.folds if f.repeat == r for s in f.test]
        assert sorted(tests) == sorted(set(ids) - set(sp.heldout))  # each slide tested once
    for f in sp.folds:
        parts = [{patient[s] for s in getattr(f, p)} for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert not (held & (parts[0] | parts[1] | parts[2]))
        assert set(np.array(y)[[ids.index(s) for s in f.test]]) == {0, 1}
    assert make_splits(ids, y, pats, folds=4, repeats=2, test_frac=0.2, seed=3) == sp
    assert make_splits(ids, y, pats, folds=4, seed=4).folds[0].test != sp.folds[0].test


def test_splits_roundtrip_and_leak_check(tmp_path):
    ids, y, pats = _cohort()
    sp = make_splits(ids, y, pats, folds=3, seed=0)
    sp.save(tmp_path, dict(zip(ids, pats, strict=True)))
    assert Splits.load(tmp_path) == sp
    csv = pd.read_csv(tmp_path / "splits.csv")
    assert set(csv.columns) == {"slide_id", "patient_id", "repeat", "fold", "part"}
    leaky = dict(zip(ids, pats, strict=True))
    f0 = sp.folds[0]
    leaky[f0.test[0]] = leaky[f0.train[0]]  # same patient now in train and test
    with pytest.raises(SplitError, match="fold0: patient"):
        sp.check(leaky)
    with pytest.raises(SplitError, match="at least 5 patients per class"):
        make_splits(ids[:6], y[:6], pats[:6], folds=5)


# --------------------------------------------------------------------------- batching
def test_length_batches_bucket_and_cover_everything():
    lengths = np.random.default_rng(0).integers(1, 1000, 200)
    g = torch.Generator().manual_seed(0)
    batches = length_batches(lengths, 8, generator=g)
    assert sorted(i for b in batches for i in b) == list(range(200))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[i : i + 8]) for i in range(0, 200, 8)])
    assert spread < random_spread / 3  # bucketing keeps padding small
    again = length_batches(lengths, 8, generator=torch.Generator().manual_seed(0))
    assert again == batches
    eval_batches = length_batches(lengths, 8)
    assert [i for b in eval_batches for i in b] == np.argsort(lengths, kind="stable").tolist()


def test_collate_pads_standardises_and_masks():
    bags = [torch.full((3, 2), 2.0, dtype=torch.float16), torch.full((1, 2), 4.0, dtype=torch.float16)]
    mean, std = standardization_stats(bags)
    torch.testing.assert_close(mean, torch.tensor([2.5, 2.5]))
    x, mask = collate(bags, mean, std)
    assert x.shape == (2, 3, 2) and x.dtype == torch.float32
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(x[1, 0], (torch.tensor([4.0, 4.0]) - 2.5) / std)
    assert torch.all(x[1, 1:] == 0)
    big = [torch.arange(20, dtype=torch.float16)[:, None]]
    xs, ms = collate(big, None, None, max_instances=5, generator=torch.Generator().manual_seed(0))
    assert xs.shape == (1, 5, 1) and ms.all()
    assert torch.all(xs[0, 1:, 0] > xs[0, :-1, 0])  # subsample keeps instance order
    # into a reused buffer: the same batch, in the same memory pass after pass (stale rows zeroed)
    buf = PassBuffer()
    first, _ = collate([torch.full((9, 2), 7.0, dtype=torch.float16)], mean, std, out=buf)
    xb, mb = collate(bags, mean, std, out=buf)
    assert xb.data_ptr() == first.data_ptr()
    torch.testing.assert_close(xb, x, rtol=0, atol=0)
    assert torch.equal(mb, mask)


def test_token_chunks_keep_passes_within_budget():
    lengths = [100, 200, 300, 300, 900, 5000, 5000]
    chunks = token_chunks(lengths, 1000)
    assert [i for c in chunks for i in c] == list(range(len(lengths)))  # every bag once, in order
    assert chunks == [[0, 1, 2], [3], [4], [5], [6]]  # a bag above the budget runs alone
    for c in chunks:
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 1000
    assert token_chunks(lengths, None) == [list(range(len(lengths)))]
    assert token_chunks([0, 0, 0], 2) == [[0, 1], [2]]  # empty bags pad to one instance
    assert batch_token_budget(TrainJob(model="transmil")) == 4096  # the head's default
    assert batch_token_budget(TrainJob(model="abmil")) is None
    assert batch_token_budget(TrainJob(model="transmil", max_batch_tokens="none")) is None
    assert batch_token_budget(TrainJob(model="abmil", max_batch_tokens=512)) == 512
    # on CPU, 'auto' keeps a pass's float32 features cache-sized (16 MiB), under the head's own cap
    assert batch_token_budget(TrainJob(model="abmil"), device="cpu", in_dim=768) == (16 << 20) // (4 * 768)
    assert batch_token_budget(TrainJob(model="transmil"), device="cpu", in_dim=768) == 4096
    assert batch_token_budget(TrainJob(model="transmil"), device="cpu", in_dim=2560) == (16 << 20) // (4 * 2560)
    assert batch_token_budget(TrainJob(model="abmil", max_batch_tokens=None), device="cpu", in_dim=768) is None


def test_prefetch_keeps_order_threads_and_errors():
    import threading

    made = []

    def make(i):
        made.append(threading.get_ident())
        if i == 3:
            raise KeyError("bag 3")
        return i * i

    it = Prefetch(make, 5)
    assert [next(it) for _ in range(3)] == [0, 1, 4]
    with pytest.raises(KeyError, match="bag 3"):
        next(it)
    assert threading.get_ident() not in made  # made by the background thread
    assert len(made) == 4
    stopped = Prefetch(lambda i: i, 100)
    assert next(stopped) == 0
    stopped.close()  # stops early, returns at once


def test_cpu_training_collates_on_its_own_thread_only(tmp_path, witness, monkeypatch):
    """On CPU no other thread runs torch ops (a second OpenMP team slows the compute)."""
    import threading

    import pipelines.train as train_module

    threads = []
    real = train_module.collate

    def recording(*args, **kwargs):
        threads.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "collate", recording)
    store, labels = witness
    train_mil(store, labels, model="abmil", out=tmp_path / "run", **{**FAST, "epochs": 2, "folds": 2})
    assert threads and set(threads) == {threading.get_ident()}


@pytest.mark.parametrize("name", ["abmil", "clam-sb"])
def test_passes_accumulate_the_whole_batch_gradient(tmp_path, witness, name):
    """Splitting every batch into one-bag passes trains the same model as whole batches."""
    store, labels = witness
    kw = {"abmil": {"hidden": 16, "attn_dim": 8, "dropout": 0.0},
          "clam-sb": {"hidden": 16, "attn_dim": 8, "dropout": 0.0, "k_sample": 4}}[name]  # fmt: skip
    opts = dict(model=name, folds=2, epochs=2, lr=1e-3, batch_size=6, model_kwargs=kw, seed=3, device="cpu")
    whole = train_mil(store, labels, out=tmp_path / "whole", max_batch_tokens=None, **opts)
    split = train_mil(store, labels, out=tmp_path / "split", max_batch_tokens=1, **opts)
    a, b = (pd.read_csv(r.run_dir / "log.csv") for r in (whole, split))
    np.testing.assert_allclose(a[["train_loss", "val_loss"]], b[["train_loss", "val_loss"]], rtol=1e-4)
    cols = ["prob_neg", "prob_pos"]
    np.testing.assert_allclose(whole.predictions[cols], split.predictions[cols], atol=1e-4)


# --------------------------------------------------------------------------- training
HEAVY = pytest.mark.slow  # same acceptance, run with -m slow (about 5-20 s each here)


@pytest.mark.parametrize(
    "name",
    ["abmil", "mean", "max", "dsmil", *(pytest.param(n, marks=HEAVY) for n in ("gated-abmil", "clam-sb", "clam-mb", "transmil"))],
)
def test_every_head_finds_the_witnesses(tmp_path, witness, name):
    store, labels = witness
    kw = HEAD_KW.get(name, {"hidden": 32})
    extra = {"max_instances": 128} if name == "transmil" else {}
    res = train_mil(store, labels, model=name, out=tmp_path / name, model_kwargs=kw, **FAST, **extra)
    assert res.summary["auc"]["mean"] >= 0.95, res.folds


def test_all_registered_heads_are_trained_above():
    assert set(list_mil()) == {"abmil", "gated-abmil", "mean", "max", "clam-sb", "clam-mb", "dsmil", "transmil"}


def test_run_outputs_and_same_seed_same_numbers(tmp_path, witness):
    store, labels = witness
    opts = dict(model="abmil", folds=3, epochs=4, lr=2e-3, batch_size=4, test_frac=0.2,
                model_kwargs={"hidden": 16, "attn_dim": 8}, seed=7, device="cpu")  # fmt: skip
    a = train_mil(store, labels, out=tmp_path / "a", **opts)
    b = train_mil(store, labels, out=tmp_path / "b", **opts)
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    # outputs
    run = tmp_path / "a"
    for name in ("config.yaml", "labels.csv", "splits.json", "splits.csv", "log.csv", "predictions.csv",
                 "metrics.json", "README.md", "fold0.pt", "fold1.pt", "fold2.pt"):  # fmt: skip
        assert (run / name).is_file(), name
    assert ma["checkpoint_rule"] == CHECKPOINT_RULE and "best validation" in (run / "README.md").read_text()
    assert len(ma["folds"]) == 3 and {"auc", "accuracy", "balanced_accuracy", "f1", "best_epoch"} <= set(ma["folds"][0])
    assert set(ma["summary"]["auc"]) >= {"mean", "std"} and "heldout_auc" in ma["summary"]
    pred = pd.read_csv(run / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "patient_id", "fold", "repeat", "label", "prob_neg", "prob_pos",
                                  "pred", "part"]  # fmt: skip
    np.testing.assert_allclose(pred[["prob_neg", "prob_pos"]].sum(axis=1), 1, atol=1e-6)
    test_rows = pred[pred.part == "test"]
    assert test_rows.slide_id.is_unique and len(test_rows) + len(a.splits.heldout) == 60
    assert (pred.part == "heldout").sum() == 3 * len(a.splits.heldout)
    logs = pd.read_csv(run / "log.csv")
    assert {"train_loss", "val_loss", "val_auc", "data_wait_seconds"} <= set(logs.columns)
    assert TrainJob.model_validate(yaml.safe_load((run / "config.yaml").read_text())).seed == 7
    # the checkpoint rebuilds the model and reproduces predictions.csv
    model, ckpt = load_checkpoint(run / "fold1.pt")
    assert ckpt["classes"] == ["neg", "pos"] and ckpt["in_dim"] == D
    assert ckpt["best_epoch"] == ma["folds"][1]["best_epoch"]
    fs = FeatureStore(store, mode="r")
    ids = a.splits.folds[1].test
    bags = [torch.from_numpy(fs.read(s).features) for s in ids]
    probs = torch.softmax(predict(model, bags, ckpt["mean"], ckpt["std"]), 1).numpy()
    mine = pred[(pred.fold == 1) & (pred.part == "test")].set_index("slide_id").loc[ids]
    np.testing.assert_allclose(mine[["prob_neg", "prob_pos"]].to_numpy(), probs, atol=1e-6)
    # standardisation statistics come from the training part only
    train_bags = [torch.from_numpy(fs.read(s).features) for s in a.splits.folds[1].train]
    torch.testing.assert_close(ckpt["mean"], standardization_stats(train_bags)[0])
    # reusing the splits gives the same folds
    c = train_mil(store, labels, out=tmp_path / "c", splits=run / "splits.json", **{**opts, "epochs": 1})
    assert c.splits == a.splits


def test_cli_train(tmp_path, witness):
    from pipelines.cli import app

    store, labels = witness
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: mean\nmodel_kwargs: {hidden: 8}\nepochs: 2\nfolds: 2\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--labels", str(labels), "--out", str(out),
                                 "--config", str(cfg), "--epochs", "1", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    job = TrainJob.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert (job.model, job.epochs, job.folds) == ("mean", 1, 2)  # flags override the file
    assert len(json.loads((out / "metrics.json").read_text())["folds"]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\ns000,0\nnope,1\n")
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--labels", str(bad), "--out", str(out)])
    assert r.exit_code == 2 and "nope" in r.output


def test_tensorboard_scalars_per_fold(tmp_path, witness):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.cli import app

    store, labels = witness
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--labels", str(labels), "--out", str(out),
                                 "--model", "mean", "--folds", "2", "--epochs", "3", "--patience", "3",
                                 "--device", "cpu", "--tensorboard", "--max-batch-tokens", "600"])  # fmt: skip
    assert r.exit_code == 0, r.output
    job = TrainJob.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert job.tensorboard and job.max_batch_tokens == 600
    logs = pd.read_csv(out / "log.csv")
    for fold in (0, 1):
        acc = EventAccumulator(str(out / "tensorboard" / f"fold{fold}"))
        acc.Reload()
        assert {"train/loss", "val/loss", "val/auc", "train/lr"} <= set(acc.Tags()["scalars"])
        mine = logs[logs.fold == fold]
        for tag, col in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("train/lr", "lr")):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [0, 1, 2]
            np.testing.assert_allclose([e.value for e in events], mine[col], rtol=1e-6)


def test_tensorboard_missing_is_a_named_error(tmp_path, witness, monkeypatch):
    import sys

    store, labels = witness
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(TensorBoardUnavailableError, match=r'pip install "slidepipe\[tensorboard\]"'):
        train_mil(store, labels, out=tmp_path / "run", model="mean", epochs=1, folds=2, tensorboard=True,
                  device="cpu")  # fmt: skip
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_fold_runner_from_store_path_matches_in_memory(tmp_path, witness):
    """Folds shipped elsewhere (pickled kwargs, bags read from the store path) give the same run."""
    store, labels = witness
    opts = dict(model="mean", folds=2, epochs=2, model_kwargs={"hidden": 8}, device="cpu")
    calls_seen = []

    def runner(fn, calls):
        calls_seen.extend(calls)
        return [fn(**pickle.loads(pickle.dumps(c))) for c in calls]

    a = train_mil(store, labels, out=tmp_path / "a", **opts)
    b = train_mil(store, labels, out=tmp_path / "b", fold_runner=runner, **opts)
    assert len(calls_seen) == 2 and calls_seen[0]["source"] == str(store)
    assert a.folds == b.folds
    pd.testing.assert_frame_equal(a.predictions, b.predictions)


def test_repeats_and_multiclass(tmp_path, witness):
    store, labels = witness
    table = pd.read_csv(labels).assign(grade=[f"g{i % 3}" for i in range(60)])
    res = train_mil(store, table, target="grade", model="mean", folds=2, repeats=2, epochs=1,
                    out=tmp_path / "r", model_kwargs={"hidden": 8}, device="cpu")  # fmt: skip
    assert res.classes == ["g0", "g1", "g2"]
    assert [(f["repeat"], f["fold"]) for f in res.folds] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(p.name for p in res.checkpoints) == ["fold0.pt", "fold1.pt", "repeat1-fold0.pt", "repeat1-fold1.pt"]
    assert all(0 <= f["auc"] <= 1 for f in res.folds)  # one-vs-rest macro AUC
    assert {"prob_g0", "prob_g1", "prob_g2"} <= set(res.predictions.columns)
    assert len(res.predictions) == 2 * 60  # every slide tested once per repeat


def test_run_directories_are_owned(tmp_path, witness):
    """A second run never mixes into a first one's directory; a failed run leaves nothing behind;
    predict and heatmap use the folds metrics.json lists, never a glob."""
    from pipelines.cli import app
    from pipelines.predict import PredictError, fold_checkpoints
    from pipelines.train import RunDirectoryError

    store, labels = witness
    opts = dict(model="mean", folds=2, epochs=1, model_kwargs={"hidden": 8}, device="cpu")
    run = tmp_path / "run"
    first = train_mil(store, labels, out=run, **opts)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunDirectoryError, match="holds another run.*--overwrite"):
        train_mil(store, labels, out=run, **{**opts, "folds": 3})
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--labels", str(labels), "--out", str(run),
                                 "--model", "mean", "--epochs", "1", "--folds", "3", "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 2 and "holds another run" in r.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # untouched

    def failing(fn, calls):
        fn(**calls[0])  # the first fold is written (into the staging directory) ...
        raise RuntimeError("node lost")  # ... then the run dies

    with pytest.raises(RuntimeError, match="node lost"):
        train_mil(store, labels, out=run, overwrite=True, fold_runner=failing, **{**opts, "folds": 3})
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # the old run is intact
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left
    second = train_mil(store, labels, out=run, overwrite=True, **{**opts, "folds": 3})
    assert sorted(p.name for p in run.glob("*.pt")) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    assert second.checkpoints[0].parent == run and first.run_dir == run
    (run / "fold7.pt").write_bytes((run / "fold0.pt").read_bytes())  # a stray checkpoint
    assert [p.name for p in fold_checkpoints(run)] == ["fold0.pt", "fold1.pt", "fold2.pt"]
    (run / "metrics.json").unlink()
    with pytest.raises(PredictError, match="not a finished training run"):
        fold_checkpoints(run)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        train_mil(store, labels, out=tmp_path / "afile", **opts)


def test_a_truncated_checkpoint_is_a_named_error(tmp_path, witness):
    from models.mil.checkpoint import CheckpointError

    store, labels = witness
    run = tmp_path / "run"
    train_mil(store, labels, out=run, model="mean", folds=2, epochs=1, model_kwargs={"hidden": 8}, device="cpu")
    data = (run / "fold1.pt").read_bytes()
    (run / "fold1.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"fold1.pt: not a readable checkpoint.*train the run again"):
        load_checkpoint(run / "fold1.pt")
