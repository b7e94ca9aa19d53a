"""End-to-end VSE++ experiment on tiny data: train, resume, evaluate, quickstart."""

import json
import os

import numpy as np
import pytest
from _data_files import write_precomp

from experiments import quickstart
from experiments.vsepp import evaluate, train
from experiments.vsepp.configs import default, order0, shapes
from jaxeff import gvar, retrieval
from jaxeff import train as jt


def tiny_shapes_config(**overrides):
    config = shapes.get_config()
    config.data.train_families = 16
    config.data.dev_families = 4
    config.data.test_families = 4
    config.batch_size = 32
    config.model.cnn_features = (8, 16)
    config.model.word_dim = 16
    config.model.embed_size = 32
    config.num_steps = 12
    config.loss.warmup_steps = 4
    config.log_every = 3
    config.eval_every = 6
    config.checkpoint_every = 6
    config.lr_decay_fraction = 0.0
    config.lr_decay_epochs = 1000
    config.learning_rate = 1e-3
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("shapes_run"))
    config = tiny_shapes_config()
    config.data.data_dir = os.path.join(os.path.dirname(workdir), "tfds")
    return config, workdir, train.train_and_evaluate(config, workdir)


def test_train_writes_metrics_checkpoints_and_results(shapes_run):
    config, workdir, results = shapes_run
    records = jt.read_metrics(workdir)
    train_rows = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_rows] == [3, 6, 9, 12]
    # SH for the first 4 steps, MH after: the logged weight follows the schedule.
    assert [r["hard_weight"] for r in train_rows] == [0.0, 1.0, 1.0, 1.0]
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train_rows)
    assert [r["step"] for r in results["history"]] == [6, 12]
    assert results["best_step"] in (6, 12)
    assert results["dev"].rsum == max(r["dev_rsum"] for r in results["history"])
    assert 0 < results["test"].rsum <= 600 and len(results["test"].i2t) == 5
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert saved["test"]["rsum"] == pytest.approx(results["test"].rsum)
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in events)
    assert os.path.exists(os.path.join(workdir, "vocab.txt"))


def test_evaluate_entry_reproduces_test_numbers(shapes_run):
    _, workdir, results = shapes_run
    rows = evaluate.evaluate_run(workdir)
    (row,) = rows.values()
    np.testing.assert_allclose(row.rsum, results["test"].rsum, rtol=1e-6)
    assert row.i2t == pytest.approx(results["test"].i2t)


def test_resumed_run_matches_uninterrupted_run(shapes_run, tmp_path):
    config, _, results = shapes_run
    first = tiny_shapes_config(num_steps=6)
    first.data.data_dir = config.data.data_dir
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(first, workdir)  # stops (as if killed) after the step-6 save
    resumed = train.train_and_evaluate(config, workdir)
    np.testing.assert_allclose(resumed["test"].rsum, results["test"].rsum, rtol=1e-5)
    # The dev history before the stop came back from the checkpoint, not from the log.
    assert [r["step"] for r in resumed["history"]] == [6, 12]
    for got, want in zip(resumed["history"], results["history"], strict=True):
        np.testing.assert_allclose(got["dev_rsum"], want["dev_rsum"], rtol=1e-5)
    losses = lambda d: {r["step"]: r["loss"] for r in jt.read_metrics(d) if "loss" in r}
    np.testing.assert_allclose(losses(workdir)[12], losses(shapes_run[1])[12], rtol=1e-5)


def test_precomp_coco_order_embeddings_and_5_fold_evaluation(tmp_path):
    rng = np.random.default_rng(0)
    manual = tmp_path / "coco_precomp"
    for split, n in (("train", 40), ("dev", 10), ("test", 10), ("testall", 20)):
        words = [f"w{i % 7}" for i in range(n)]
        feats = np.eye(7, 24, dtype=np.float32)[[i % 7 for i in range(n)]]
        feats += 0.05 * rng.normal(size=feats.shape).astype(np.float32)
        caps = [f"a photo of {w} number {j}" for w in words for j in range(5)]
        write_precomp(manual, split, feats, caps, per_caption=split == "train")
    config = order0.get_config()
    config.data.manual_dir = str(manual)
    config.data.vocab_threshold = 1
    config.model.img_dim = 24
    config.model.word_dim = 8
    config.model.embed_size = 16
    config.batch_size = 24  # divisible by the 8 test devices
    config.num_steps = 8
    config.eval_every = 4
    config.log_every = 4
    config.loss.max_violation = True  # Order++
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    assert results["best_step"] in (4, 8) and 0 < results["test"].rsum <= 600
    assert not results["collapsed"]

    rows = evaluate.evaluate_run(workdir)
    assert list(rows) == ["COCO 1K (5 folds)", "COCO 5K"]
    config, vocab, splits, graphdef, state = evaluate.load_run(workdir)
    ims, caps = train.make_embed_fn(graphdef, config)(state, splits["testall"], vocab)
    folds = [
        retrieval.evaluate(ims[4 * f : 4 * f + 4], caps[20 * f : 20 * f + 20], measure="order")
        for f in range(5)
    ]
    np.testing.assert_allclose(rows["COCO 1K (5 folds)"].i2t, np.mean([r.i2t for r in folds], 0))
    np.testing.assert_allclose(rows["COCO 1K (5 folds)"].rsum, np.mean([r.rsum for r in folds]))
    whole = retrieval.evaluate(ims, caps, measure="order")
    np.testing.assert_allclose(rows["COCO 5K"].t2i, whole.t2i)


def test_missing_precomp_dir_is_a_clear_error(tmp_path):
    config = default.get_config()
    with pytest.raises(ValueError, match="manual_dir"):
        train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "field, value",
    [
        ("grad_clip", -2.0),  # optax would negate the gradient: gradient ascent
        ("learning_rate", float("nan")),
        ("learning_rate", 0.0),
        ("log_every", 0),
        ("eval_every", -1),
        ("num_steps", -5),
        ("batch_size", 0),
        ("checkpoint_every", 0),
        ("lr_decay_fraction", 1.5),
        ("model.embed_size", 0),
        ("loss.margin", -0.2),
        ("loss.top_k", 0),
        ("data.train_families", 0),
    ],
)
def test_bad_config_fields_are_refused_before_anything_is_built(tmp_path, field, value):
    config = tiny_shapes_config(**{field: value})
    config.data.data_dir = str(tmp_path / "tfds")
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^config\.{field} must be"):
        train.train_and_evaluate(config, str(workdir))
    assert not (tmp_path / "tfds").exists() and not workdir.exists()


def test_inconsistent_loss_and_batch_fields_are_refused(tmp_path):
    sh_with_warmup = tiny_shapes_config(**{"loss.max_violation": False})  # warmup_steps = 4
    with pytest.raises(ValueError, match="config.loss.max_violation=True"):
        train.train_and_evaluate(sh_with_warmup, str(tmp_path))
    with pytest.raises(ValueError, match="config.batch_size"):
        train.train_and_evaluate(tiny_shapes_config(batch_size=36), str(tmp_path))
    with pytest.raises(ValueError, match="config.loss.measure"):
        train.train_and_evaluate(tiny_shapes_config(**{"loss.measure": "dot"}), str(tmp_path))


def test_workdir_with_another_config_is_refused(shapes_run, tmp_path):
    config, workdir, _ = shapes_run
    before = open(os.path.join(workdir, "config.json")).read()
    changed = tiny_shapes_config(learning_rate=5e-3, **{"model.embed_size": 64})
    changed.data.data_dir = config.data.data_dir
    with pytest.raises(ValueError) as error:
        train.train_and_evaluate(changed, workdir)
    assert "learning_rate: 0.001 -> 0.005" in str(error.value)
    assert "model.embed_size: 32 -> 64" in str(error.value)
    assert open(os.path.join(workdir, "config.json")).read() == before
    # Logging fields may change: the finished run is reopened and tested again.
    relogged = tiny_shapes_config(log_every=4)
    relogged.data.data_dir = config.data.data_dir
    assert train.train_and_evaluate(relogged, workdir)["best_step"] == shapes_run[2]["best_step"]


def test_quickstart_table_gains_and_files_agree_with_its_runs(tmp_path, capsys):
    results = quickstart.main(
        ["--workdir", str(tmp_path), "--steps", "6", "--families", "16", "--eval-families", "4"]
        + ["--gvar-steps", "60"]
    )
    printed = capsys.readouterr().out
    table, gains = results["vsepp"]["table"], results["vsepp"]["gains"]
    runs = {}
    for name, folder in (("VSE0 (SH)", "vse0"), ("VSE++ (MH)", "vse++")):
        with open(tmp_path / folder / "seed0" / "results.json") as f:
            runs[name] = retrieval.RetrievalResult.from_dict(json.load(f)["test"])
    assert set(table) == set(runs)
    for name, run in runs.items():
        # One seed: the table row is that run's test result, and the printed row shows it.
        assert table[name] == run
        assert f"{name:<16} | {run.i2t.r1:7.1f} {run.i2t.r5:6.1f}" in printed
        np.testing.assert_allclose(run.rsum, sum(run.i2t[:3]) + sum(run.t2i[:3]))
    sh, mh = runs["VSE0 (SH)"], runs["VSE++ (MH)"]
    assert gains == {"i2t": [mh.i2t.r1 - sh.i2t.r1], "t2i": [mh.t2i.r1 - sh.t2i.r1]}
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["vsepp"]["r1_gain_mh_minus_sh"] == gains and saved["vsepp"]["steps"] == 6
    assert saved["vsepp"]["test"] == {name: [run.as_dict()] for name, run in runs.items()}
    assert set(saved["seconds"]) == {"vsepp", "gvar", "robust"}

    # Optimisation bias: each optimiser ends nearest the max-margin solution of its norm.
    own = {"gradient_descent": "2", "coordinate_descent": "1", "sign_descent": "inf"}
    summary = saved["robust"]["summary"]["4"]
    for method, norm in own.items():
        ratios = summary[method]["margin_ratio"]
        assert max(ratios, key=ratios.get) == norm and 0.98 < ratios[norm] <= 1 + 1e-4
    assert "coordinate_descent   0.99" in printed

    # Gradient variance: the printed means are those of the run's own records.
    records = gvar.read_records(tmp_path / "gvar" / "gvar.jsonl")
    mean = saved["gvar"]["mean_variance"]
    assert set(mean) == {"sgd", "sgd_2b", "exact_sgd", "svrg", "gc", "importance"}
    for name, value in mean.items():
        values = [r["variance"] for r in records if r["estimator"] == name]
        np.testing.assert_allclose(value, np.mean(values), rtol=1e-12)
        assert f"{name:<12} {value:10.3g} {value / mean['sgd']:8.2f}" in printed
    assert 0.3 < mean["sgd_2b"] / mean["sgd"] < 0.8  # twice the batch, about half
    assert mean["gc"] < mean["sgd"]  # stratified over gradient clusters: lower variance
    for name in ("dev_curves.png", "test_recalls.png", "gradient_variance.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(tmp_path / name) > 10_000
