"""End-to-end gradient-variance experiments on tiny sizes: files, numbers, trajectory, resume."""

import collections
import json
import os

import jax
import numpy as np
import pytest
from test_data_classification import write_tiny_image_dataset

from experiments.gvar import compare, train
from experiments.gvar.configs import cifar10, default, digits_duplicates, linreg, mnist
from jaxeff import gvar
from jaxeff import train as jt


def override(config, **fields):
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_digits(**fields):
    config = default.get_config()
    override(
        config,
        data__max_examples=240,
        model__hidden=(16,),
        batch_size=16,
        learning_rate=0.1,
        num_steps=40,
        log_every=10,
        checkpoint_every=20,
        gvar__measure_every=10,
        gvar__num_draws=12,
        gvar__svrg_snapshot_every=15,
        gvar__chunk_size=128,
    )
    return override(config, **fields)


def tiny_linreg(**fields):
    config = linreg.get_config()
    override(
        config,
        data__dim=40,
        data__num_examples=30,
        data__num_test=20,
        batch_size=5,
        num_steps=20,
        log_every=5,
        checkpoint_every=10,
        gvar__measure_every=5,
        gvar__num_draws=4,
        gvar__estimators="sgd,svrg",
        gvar__svrg_snapshot_every=8,
        gvar__exact=False,
        gvar__chunk_size=16,
    )
    return override(config, **fields)


def by_step(records):
    table = collections.defaultdict(dict)
    for r in records:
        table[r["step"]][r["estimator"]] = r
    return table


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("gvar_digits"))
    return workdir, train.train_and_evaluate(tiny_digits(), workdir)


def test_digits_run_writes_records_events_and_plot(digits_run):
    workdir, results = digits_run
    records = gvar.read_records(os.path.join(workdir, train.RECORDS))
    assert records == results["records"]
    table = by_step(records)
    assert sorted(table) == [0, 10, 20, 30, 40]
    measured = {"sgd", "sgd_2b", "gc", "importance", "exact_sgd"}
    assert set(table[0]) == measured  # no SVRG before its snapshot
    for step in (10, 20, 30, 40):
        assert set(table[step]) == measured | {"svrg"}
    for r in records:
        for name in gvar.STATISTICS:
            assert np.isfinite(r[name]), (r["step"], r["estimator"], name)
        assert r["variance"] > 0 and 0 < r["normalized_variance"] <= 1 and r["grad_norm"] > 0
        assert r["batch_size"] == (32 if r["estimator"] == "sgd_2b" else 16)
    # Twice the batch: about half the variance, at every measured step.
    ratios = [row["sgd_2b"]["variance"] / row["sgd"]["variance"] for row in table.values()]
    assert all(r < 0.85 for r in ratios), ratios
    assert 0.3 < np.mean(ratios) < 0.7, ratios
    # Gradient clustering reduces SGD's variance at the same batch. (Importance sampling's
    # measured variance is heavy-tailed, its weights 1/(N b p_i); 12 draws do not settle it.)
    ratios = [row["gc"]["variance"] / row["sgd"]["variance"] for row in table.values()]
    assert np.mean(ratios) < 0.9, ratios
    # 12 draws around an estimated mean: SGD's measured variance is near its exact value.
    for row in table.values():
        assert 0.4 < row["sgd"]["variance"] / row["exact_sgd"]["variance"] < 2.5
    # The metrics file and TensorBoard hold the same numbers, plus the training loss.
    metrics = jt.read_metrics(workdir)
    rows = [m for m in metrics if "gvar/sgd/variance" in m]
    assert [m["step"] for m in rows] == [0, 10, 20, 30, 40]
    assert rows[-1]["gvar/sgd/variance"] == pytest.approx(table[40]["sgd"]["variance"])
    assert "test_accuracy" in rows[-1] and "train_loss" in rows[-1]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in events)
    with open(os.path.join(workdir, train.PLOT), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.load(open(os.path.join(workdir, train.RESULTS)))
    assert saved["final"]["test_accuracy"] == pytest.approx(results["final"]["test_accuracy"])
    assert results["final"]["train_accuracy"] > 0.3  # chance is 0.1


@pytest.fixture(scope="module")
def linreg_run(tmp_path_factory):
    return train.train_and_evaluate(tiny_linreg(), str(tmp_path_factory.mktemp("gvar_linreg")))


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"]), strict=True):
        np.testing.assert_array_equal(x, y)


def test_measuring_does_not_change_the_training_run(linreg_run, tmp_path):
    plain = train.train_and_evaluate(tiny_linreg(gvar__measure_every=0), str(tmp_path))
    assert plain["records"] == [] and len(linreg_run["records"]) == 5 * 2 - 1
    assert_same_params(linreg_run, plain)  # bit for bit


def test_resumed_run_matches_uninterrupted_run(linreg_run, tmp_path):
    first = train.train_and_evaluate(tiny_linreg(num_steps=10), str(tmp_path))
    assert first["records"][-1]["step"] == 10
    # The second part restores the state and SVRG's snapshot (taken at step 8) at step 10.
    resumed = train.train_and_evaluate(tiny_linreg(), str(tmp_path))
    assert_same_params(resumed, linreg_run)
    assert resumed["records"] == linreg_run["records"]
    assert any(r["estimator"] == "svrg" and r["step"] == 15 for r in resumed["records"])


def test_mnist_cnn_from_tfds_files(tmp_path):
    write_tiny_image_dataset("mnist", tmp_path / "tfds", {"train": 32, "test": 8})
    config = mnist.get_config()
    override(
        config,
        data__data_dir=str(tmp_path / "tfds"),
        model__features=(4,),
        model__dense=8,
        batch_size=8,
        num_steps=6,
        log_every=3,
        checkpoint_every=3,
        gvar__measure_every=3,
        gvar__num_draws=3,
        gvar__estimators="sgd,svrg",
        gvar__svrg_snapshot_every=2,
        gvar__exact=False,
        gvar__chunk_size=16,
    )
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    table = by_step(results["records"])
    assert sorted(table) == [0, 3, 6] and set(table[6]) == {"sgd", "svrg"}
    assert all(np.isfinite(r["variance"]) and r["variance"] > 0 for r in results["records"])
    assert os.path.exists(os.path.join(workdir, train.PLOT))


def test_variants_change_the_training_set():
    config = tiny_digits(data__imbalance=0.5, data__label_noise=0.5, data__duplicates=4)
    config.data.duplicate_copies = 10
    data = train.load_data(config)
    clean = train.load_data(tiny_digits())
    assert len(data.train["label"]) < len(clean.train["label"]) + 40
    assert len(data.train["label"]) > 40
    tail = data.train["image"][-10:]
    assert (tail == tail[:1]).all()  # the last duplicated example, 10 copies
    assert len(train.load_data(digits_duplicates.get_config()).train["label"]) == 1438 + 1000


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"gvar__estimators": "sgd,bogus"}, "gvar.estimators"),
        ({"data__label_noise": 1.5}, "label_noise"),
        ({"gvar__svrg_snapshot_every": 0}, "svrg_snapshot_every"),
        ({"gvar__num_draws": 0}, "num_draws"),
        ({"model__name": "linear"}, "model.name"),
    ],
)
def test_bad_configs_are_refused_before_anything_runs(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_digits(**fields), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_config_checks_per_dataset():
    with pytest.raises(ValueError, match="data_dir"):
        train.validate_config(cifar10.get_config())
    with pytest.raises(ValueError, match="model.name='linear'"):
        train.validate_config(tiny_linreg(model__name="mlp"))
    with pytest.raises(ValueError, match="need classes"):
        train.validate_config(tiny_linreg(data__label_noise=0.1))


def test_workdir_of_another_config_is_refused(digits_run):
    workdir, _ = digits_run
    with pytest.raises(ValueError, match="learning_rate"):
        train.train_and_evaluate(tiny_digits(learning_rate=0.3), workdir)


def tiny_gc_training(**fields):
    defaults = dict(
        sampler="gc",
        gc__recluster_every=7,
        gc__num_passes=1,
        gvar__measure_every=0,
        num_steps=20,
        checkpoint_every=10,
    )
    return tiny_digits(**{**defaults, **fields})


GC_COMPARISON = dict(gvar__measure_every=10, gvar__estimators="", gvar__exact=False)


@pytest.fixture(scope="module")
def sampler_comparison(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gvar_compare")
    return workdir, compare.compare_samplers(tiny_gc_training(**GC_COMPARISON), str(workdir))


def test_sampler_comparison_trains_both_at_equal_examples_seen(sampler_comparison):
    workdir, curves = sampler_comparison
    assert set(curves) == {"uniform", "gc"}
    for rows in curves.values():
        assert [r["examples"] for r in rows] == [0, 160, 320]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
        assert rows[-1]["train_accuracy"] > 0.2
    assert curves["gc"][0]["train_loss"] == curves["uniform"][0]["train_loss"]  # same init
    assert curves["gc"][-1]["train_loss"] != curves["uniform"][-1]["train_loss"]
    with open(workdir / compare.PLOT, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(workdir / compare.RESULTS)) == curves


def test_gc_sampler_resumes_exactly(sampler_comparison, tmp_path):
    """A GC-sampled run stopped at step 10 (between the clusterings at 7 and 14) resumes to
    the uninterrupted run's numbers exactly: the sampler's assignments and the centres are
    checkpointed."""
    _, curves = sampler_comparison
    train.train_and_evaluate(tiny_gc_training(**GC_COMPARISON, num_steps=10), str(tmp_path))
    resumed = train.train_and_evaluate(tiny_gc_training(**GC_COMPARISON), str(tmp_path))
    whole = {k: v for k, v in curves["gc"][-1].items() if k.startswith(("train_", "test_"))}
    assert resumed["final"] == whole
