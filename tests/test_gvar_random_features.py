"""The random-features sweep of the gradient-variance study on tiny sizes: files, numbers,
fixed features, SGD-2B against SGD-B, GC against SGD-B, config errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments.gvar import random_features as rf
from experiments.gvar.configs import random_features, random_features_quick
from jaxeff import clustering, gvar


def tiny_config(type_safe=True, **fields):
    config = random_features.get_config()
    if not type_safe:  # a config from elsewhere, whose fields may hold any type
        config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    config.num_seeds = 2
    config.ratios = (0.5, 2.0)
    config.size = 24  # hidden 24, N = 48 and 12
    config.data.dim = 8
    config.data.teacher_hidden = 8
    config.data.num_test = 32
    config.batch_size = 4
    config.learning_rates = (0.5, 2.0)
    config.num_steps = 20
    config.gvar.measure_every = 5
    config.gvar.num_draws = 4
    config.gvar.num_clusters = 2
    config.gvar.chunk_size = 16
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def per_example_grads(model, data):
    """``(N, P)`` per-example gradients of the head, by vmap over single examples."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, x, y):
        batch = {"x": x[None], "y": y[None]}
        return rf.example_loss(nnx.merge(graphdef, p, rest), batch)[0]

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, data["x"], data["y"])
    leaves = [np.asarray(g, np.float64).reshape(len(data["y"]), -1) for g in jax.tree.leaves(grads)]
    return np.concatenate(leaves, axis=1)


# ----------------------------------------------------------------------------------------
# The sweep end to end.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rf_sweep"))
    config = tiny_config(num_seeds=1, gvar__num_draws=16)  # 2 ratios x 2 learning rates
    return config, workdir, rf.run_sweep(config, workdir)


def test_sweep_writes_its_files_and_numbers(sweep):
    config, workdir, results = sweep
    for name in ("config.json", rf.RECORDS, rf.RESULTS, rf.PLOT, "metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, rf.RECORDS)) as f:
        lines = [json.loads(line) for line in f]
    assert rf.measurement_steps(config) == [0, 5, 10, 15, 20]
    # ratios x learning rates x seeds x measurements x estimators
    assert len(lines) == 2 * 2 * 1 * 5 * 3 == len(results["records"])
    assert lines == json.loads(json.dumps(results["records"]))
    sizes = {(r["ratio"], r["hidden"], r["num_examples"]) for r in lines}
    assert sizes == {(0.5, 24, 48), (2.0, 24, 12)}
    assert {r["batch_size"] for r in lines if r["estimator"] == "sgd_2b"} == {8}
    assert all(math.isfinite(r["variance"]) and r["variance"] > 0 for r in lines)
    assert all(0 < r["normalized_variance"] <= 1 for r in lines)
    with open(os.path.join(workdir, rf.RESULTS)) as f:
        assert json.load(f)["summary"] == json.loads(json.dumps(results["summary"]))
    assert json.dumps(results["summary"]) == json.dumps(rf.summarize(config, lines))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    assert len(metrics) == 2 * 2 * 5
    assert [m["step"] for m in metrics[:5]] == [0, 5, 10, 15, 20]
    first = [r for r in lines if r["step"] == 0 and r["estimator"] == "gc"][0]
    assert metrics[0]["ratio_0.5/lr_0.5/seed_0/gc/variance"] == first["variance"]
    np.testing.assert_allclose(
        metrics[0]["ratio_0.5/lr_0.5/seed_0/train_loss"], math.log(2), rtol=1e-6
    )
    table = results["table"]
    assert "(V_B-V_GC)/(V_B-V_2B)" in table and table.count("\n") == 2 * (2 + 4)
    for entry in results["summary"]:
        # On average over the last 70% SGD-2B has less variance than SGD-B.
        assert entry["sgd_2b"]["variance"]["mean"] < entry["sgd"]["variance"]["mean"]


def test_sweep_refuses_a_used_workdir(sweep):
    config, workdir, _ = sweep
    with pytest.raises(ValueError, match="already holds"):
        rf.run_sweep(config, workdir)


def fake_records(values):
    """Records of one estimator table ``values[(ratio, lr, seed, name)] = [v per step]``."""
    records = []
    for (ratio, lr, seed, name), series in values.items():
        for step, v in zip((0, 10, 20, 30), series, strict=True):
            records.append(
                {
                    "step": step,
                    "estimator": name,
                    "variance": v,
                    "normalized_variance": v / 10,
                    "ratio": ratio,
                    "learning_rate": lr,
                    "seed": seed,
                    "hidden": 7,
                    "num_examples": int(7 / ratio),
                    "train_accuracy": 0.5 + seed / 10,
                    "test_accuracy": 0.5,
                    "train_loss": 0.6,
                }
            )
    return records


def test_summary_is_the_mean_over_the_last_part_then_over_seeds():
    config = tiny_config(ratios=(1.0,), learning_rates=(0.1,), num_steps=30, summary_fraction=0.7)
    rng = np.random.default_rng(0)
    values = {
        (1.0, 0.1, seed, name): list(rng.uniform(1, 2, size=4) * scale)
        for seed in (0, 1)
        for name, scale in (("sgd", 4.0), ("gc", 2.5), ("sgd_2b", 2.0))
    }
    (entry,) = rf.summarize(config, fake_records(values))
    # Steps >= 0.3 * 30 = 9: the last three of 0, 10, 20, 30.
    per_seed = {key: sum(series[1:]) / 3 for key, series in values.items()}
    for name in rf.ESTIMATORS:
        a, b = per_seed[1.0, 0.1, 0, name], per_seed[1.0, 0.1, 1, name]
        np.testing.assert_allclose(entry[name]["variance"]["mean"], (a + b) / 2, rtol=1e-12)
        np.testing.assert_allclose(entry[name]["variance"]["std"], abs(a - b) / 2, rtol=1e-9)
        np.testing.assert_allclose(
            entry[name]["normalized_variance"]["mean"], (a + b) / 20, rtol=1e-12
        )
    fractions = [
        (per_seed[1.0, 0.1, s, "sgd"] - per_seed[1.0, 0.1, s, "gc"])
        / (per_seed[1.0, 0.1, s, "sgd"] - per_seed[1.0, 0.1, s, "sgd_2b"])
        for s in (0, 1)
    ]
    np.testing.assert_allclose(entry["fraction"]["variance"]["mean"], np.mean(fractions))
    np.testing.assert_allclose(entry["fraction"]["variance"]["std"], np.std(fractions))
    np.testing.assert_allclose(entry["train_accuracy"]["mean"], 0.55)
    assert entry["num_seeds"] == 2 and entry["num_examples"] == 7


def test_gc_fraction():
    assert rf.gc_fraction(1.0, 0.75, 0.5) == 0.5
    assert rf.gc_fraction(1.0, 1.2, 0.5) == pytest.approx(-0.4)
    assert rf.gc_fraction(1.0, 0.4, 0.5) == pytest.approx(1.2)
    assert math.isnan(rf.gc_fraction(1.0, 0.9, 1.0))


# ----------------------------------------------------------------------------------------
# Data, model and batches against loop references.
# ----------------------------------------------------------------------------------------
def test_teacher_labels_and_nested_data():
    teacher = rf.make_teacher(dim=5, hidden=7, seed=3)
    assert abs(teacher.output.sum()) < 1e-12
    train, test = rf.make_data(teacher, num_examples=40, num_test=10, seed=3)
    small, _ = rf.make_data(teacher, num_examples=15, num_test=10, seed=3)
    np.testing.assert_array_equal(small["x"], train["x"][:15])
    for x, y in zip(train["x"], train["y"], strict=True):
        score = sum(
            max(0.0, sum(float(x[i]) * teacher.weights[i, j] for i in range(5))) * teacher.output[j]
            for j in range(7)
        )
        assert y == int(score > 0)
    assert 0 < train["y"].mean() < 1
    assert abs(float(np.mean(np.sum(train["x"].astype(np.float64) ** 2, 1))) - 1) < 0.3


def test_student_is_fixed_relu_features_and_a_linear_head():
    model = rf.make_student(dim=3, hidden=5, seed=0)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(x))), 0.0)  # zero head
    kernel = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    model.head.kernel[...] = kernel
    model.head.bias[...] = np.array([0.3, -0.2], np.float32)
    weights = np.asarray(model.weights[...], np.float64)
    for row, out in zip(x, np.asarray(model(jnp.asarray(x))), strict=True):
        features = [max(0.0, float(row @ weights[:, j])) / math.sqrt(5) for j in range(5)]
        expected = np.array(features) @ kernel + np.array([0.3, -0.2])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    params = nnx.state(model, nnx.Param)
    assert {path for path, _ in nnx.to_flat_state(params)} == {("head", "kernel"), ("head", "bias")}


def test_batch_indices_are_epoch_permutations_in_any_segments():
    full = rf.batch_indices(10, 3, 7, 0, 9)  # 3 steps per epoch, last row left out
    assert full.shape == (9, 3)
    for epoch in range(3):
        rows = full[3 * epoch : 3 * epoch + 3].ravel()
        assert len(set(rows.tolist())) == 9 and rows.max() < 10
    for start, stop in ((0, 4), (4, 5), (5, 9), (2, 8)):
        np.testing.assert_array_equal(rf.batch_indices(10, 3, 7, start, stop), full[start:stop])


# ----------------------------------------------------------------------------------------
# One run: what is trained, what is measured.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_run():
    """One tiny run (seed 1, hidden/N = 2, N = 12) whose GC records its clusterings."""
    config = tiny_config(num_steps=15)
    config.gvar.num_draws = 200  # the statistics test below reuses these estimators
    seed = 1
    estimators = rf.make_estimators(config, rf.make_student(dim=8, hidden=24, seed=seed), seed=seed)
    seen = []
    gc = estimators["gc"]

    def recording_init(params, data):
        seen.append(np.array(params["head"]["kernel"][...]))
        return gc.init(params, data)

    estimators = dict(estimators, gc=gvar.GradientEstimator(recording_init, gc.estimate))
    run = rf.run_one(
        config,
        ratio=2.0,
        learning_rate=2.0,
        seed=seed,
        key=jax.random.key(0),
        estimators=estimators,
    )
    return config, seed, run, list(seen), estimators


def test_features_are_not_trained_and_the_head_is(one_run):
    _, _, run, _, _ = one_run
    model = run["model"]
    np.testing.assert_array_equal(np.asarray(model.weights[...]), run["initial_weights"])
    assert np.abs(np.asarray(model.head.kernel[...])).max() > 1e-3  # moved from zero
    final = [r for r in run["records"] if r["step"] == 15]
    assert final[0]["train_loss"] < math.log(2) - 1e-3  # below the loss at the zero init


def test_gc_is_reclustered_at_every_measurement(one_run):
    config, _, run, seen, _ = one_run
    assert len(seen) == len(rf.measurement_steps(config)) == 4
    assert all(np.abs(a - b).max() > 0 for a, b in zip(seen[:-1], seen[1:], strict=True))
    np.testing.assert_array_equal(seen[0], 0.0)
    np.testing.assert_array_equal(seen[-1], np.asarray(run["model"].head.kernel[...]))


def test_measurement_does_not_change_training(one_run):
    config, seed, run, _, estimators = one_run
    config = tiny_config(num_steps=15)
    config.gvar.num_draws = 200
    config.gvar.measure_every = 15  # only at the start and the end, other keys
    other = rf.run_one(
        config,
        ratio=2.0,
        learning_rate=2.0,
        seed=seed,
        key=jax.random.key(9),
        estimators=estimators,
    )
    for a, b in zip(
        jax.tree.leaves(nnx.state(run["model"], nnx.Param)),
        jax.tree.leaves(nnx.state(other["model"], nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_sgd_2b_has_half_the_variance_and_gc_less_than_sgd_b(one_run):
    """At the trained tiny model: the measured variances against the exact ones from
    per-example gradients; tolerances from the spread of repeated measurements."""
    config, seed, run, _, estimators = one_run
    model = run["model"]
    hidden, size = rf.sizes(config, 2.0)
    teacher = rf.make_teacher(dim=8, hidden=8, seed=seed)
    data, _ = rf.make_data(teacher, num_examples=size, num_test=4, seed=seed)
    data = jax.device_put(data)
    repeats = [
        rf.measure_at(config, estimators, model, data, jax.random.key(100 + r)) for r in range(6)
    ]
    measured = {
        name: np.array([float(stats[name].variance) for stats, _ in repeats])
        / (1 + 1 / config.gvar.num_draws)
        for name in rf.ESTIMATORS
    }

    # Exact: per-coordinate variance over the N examples (with replacement), averaged.
    grads = per_example_grads(model, data)
    batch = config.batch_size
    exact_sgd = grads.var(axis=0).mean() / batch
    assignments = np.asarray(repeats[0][1]["gc"].assignments)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def params_loss(params, examples):
        return rf.example_loss(nnx.merge(graphdef, params, rest), examples)

    # GC clusters the head's kernel (rank-1 centres) and bias; the fixed features, not an
    # nnx.Param, are not clustered.
    assert clustering.cluster_leaves(params_loss, params, data) == {
        "head/kernel": ((hidden,), (2,)),
        "head/bias": ((2,),),
    }
    fresh = clustering.cluster_examples(
        params_loss,
        params,
        data,
        num_clusters=2,
        key=jax.random.key(seed),
        num_passes=config.gvar.num_passes,
        chunk_size=config.gvar.chunk_size,
    )[1]
    np.testing.assert_array_equal(assignments, np.asarray(fresh))  # clustered at these params
    counts = np.bincount(assignments, minlength=2)
    assert counts.min() >= 1  # both clusters used: B = 4 slots, 2 each
    exact_gc = sum(
        (counts[k] / size) ** 2 * grads[assignments == k].var(axis=0).mean() / (batch // 2)
        for k in range(2)
    )
    assert exact_gc < exact_sgd

    def close(values, expected):
        spread = values.std(ddof=1) / math.sqrt(len(values))
        assert spread < 0.1 * expected  # the check has power
        assert abs(values.mean() - expected) < 4 * spread + 1e-3 * expected

    close(measured["sgd"], exact_sgd)
    close(measured["sgd_2b"], exact_sgd / 2)
    close(measured["gc"], exact_gc)
    close(measured["sgd_2b"] / measured["sgd"], 0.5)
    assert measured["gc"].mean() < measured["sgd"].mean()


# ----------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------
def test_configs_are_valid_and_their_sizes():
    for module in (random_features, random_features_quick):
        config = module.get_config()
        rf.validate_config(config)
    config = random_features.get_config()
    assert [rf.sizes(config, r) for r in config.ratios] == [
        (1000, 10000),
        (1000, 3333),
        (1000, 1000),
        (1000, 333),
        (1000, 100),
    ]
    config.vary = "hidden"
    config.size = 500
    assert rf.sizes(config, 0.1) == (50, 500) and rf.sizes(config, 10.0) == (5000, 500)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("ratios", (), "config.ratios must be distinct positive"),
        ("ratios", (1.0, -2.0), "config.ratios must be distinct positive"),
        ("ratios", (1.0, 1.0), "config.ratios must be distinct positive"),
        ("ratios", (100.0,), "config.ratios holds 100.0"),
        ("learning_rates", (0.0,), "config.learning_rates"),
        ("vary", "width", "config.vary must be one of"),
        ("batch_size", 4.5, "config.batch_size must be a positive integer"),
        ("num_seeds", 0, "config.num_seeds must be a positive integer"),
        ("summary_fraction", 0.0, "config.summary_fraction"),
        ("summary_fraction", 1.5, "config.summary_fraction must lie in"),
        ("gvar__num_clusters", 5, "must not exceed config.batch_size"),
        ("gvar__allocation", "random", "config.gvar.allocation must be one of"),
        ("gvar__replace", 1, "config.gvar.replace must be a bool"),
        ("gvar__min_fraction", 1.0, "config.gvar.min_fraction must lie in"),
        ("gvar__num_passes", -1, "config.gvar.num_passes must be a non-negative"),
        ("data__dim", True, "config.data.dim must be a positive integer"),
    ],
)
def test_bad_config_raises_naming_the_field(tmp_path, field, value, match):
    config = tiny_config(type_safe=False, **{field: value})
    with pytest.raises(ValueError, match=match):
        rf.run_sweep(config, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, rf.RECORDS))
