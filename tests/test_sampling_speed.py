"""The sampling-speed study: unbiased batches, steps to target, config errors, outputs, resume."""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from experiments import quickstart
from experiments.sampling_speed import analysis, samplers, train
from experiments.sampling_speed import data as regime_data
from experiments.sampling_speed.configs import default, quick
from jaxeff import clustering, gvar
from jaxeff import train as jt


def quick_config(**fields):
    config = quick.get_config()
    for key, value in fields.items():
        node = config
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


# ----------------------------------------------------------------------------------------
# Unbiasedness: every sampler's weighted batch gradient averages to the full gradient.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def duplicated():
    """The quick duplicated regime (240 digits + 4 images x 40 copies), the MLP at its
    initial weights and after 30 SGD steps."""
    config = quick_config()
    data = regime_data.load_regime(config, config.regimes.duplicates)
    graphdef, initial = train.build_model(config, data, 0)
    _, loss_fn = train.model_functions(graphdef)
    device_data = jax.device_put(data.train)
    sampler = samplers.make_sampler("uniform", loss_fn, device_data, config=config, seed=0)
    later = train.train_segment(
        initial,
        device_data,
        sampler.state,
        sampler.inputs(0, 30),
        jnp.float32(0.5),
        loss_fn=loss_fn,
        draw=sampler.draw,
    )
    chunks = train.chunk_list(train.as_chunks(data.train, config.chunk_size))
    return config, loss_fn, device_data, chunks, initial, later


def batch_gradients(loss_fn, params, data, draw, state, xs, *, broken=False):
    """``(M, P)``: the flat weighted gradient of each of the ``M`` drawn batches (weights
    ``1/b`` instead of the sampler's when ``broken``)."""

    @jax.jit
    def run(state, xs):
        def one(x):
            sample = draw(state, x)
            if broken:
                sample = gvar.Sample(
                    sample.indices, jnp.full_like(sample.weights, 1 / sample.weights.shape[0])
                )
            return ravel_pytree(gvar.weighted_gradient(loss_fn, params, data, sample))[0]

        return jax.lax.map(one, xs)

    return np.asarray(run(state, xs))


def z_scores(grads, full):
    """Per coordinate: (batch mean - full gradient) / standard error from the batches."""
    se = grads.std(axis=0, ddof=1) / np.sqrt(len(grads))
    keep = se > 0  # coordinates of dead units have no gradient at all
    return (grads.mean(axis=0) - full)[keep] / se[keep]


@pytest.mark.parametrize(
    "name, replace", [(name, False) for name in samplers.SAMPLERS] + [("gc", True)]
)
def test_weighted_batch_gradient_is_unbiased_on_duplicated_data(duplicated, name, replace):
    """4000 batches; GC's clusters and importance's norms are stale (set at the initial
    weights, the gradients taken 30 steps later), which costs variance, never bias. GC's
    slots walk through its clusters (``replace=False``) or draw independently."""
    config, loss_fn, data, chunks, initial, later = duplicated
    config = quick_config(gc__replace=replace)
    sampler = samplers.make_sampler(name, loss_fn, data, config=config, seed=1, chunks=chunks)
    if sampler.refreshes:
        sampler.refresh(initial)
    xs = sampler.inputs(0, 4000)
    full = np.asarray(ravel_pytree(gvar.mean_gradient(loss_fn, later, data))[0])
    grads = batch_gradients(loss_fn, later, data, sampler.draw, sampler.state, xs)
    z = z_scores(grads, full)
    assert len(z) > 500
    assert np.max(np.abs(z)) < 5.5 and np.mean(z**2) < 2.0, (np.max(np.abs(z)), np.mean(z**2))
    if name in ("gc", "importance"):  # the same draws weighted 1/b: clearly biased here
        broken = batch_gradients(loss_fn, later, data, sampler.draw, sampler.state, xs, broken=True)
        assert np.max(np.abs(z_scores(broken, full))) > 15


def test_gc_table_weights_are_the_librarys_stratified_weights(duplicated):
    config, loss_fn, data, chunks, initial, _ = duplicated
    sampler = samplers.make_sampler("gc", loss_fn, data, config=config, seed=0, chunks=chunks)
    sizes = sampler.refresh(initial)["cluster_sizes"]
    assert sum(sizes) == gvar.num_examples(data) and len(sizes) == config.gc.num_clusters
    table, _ = sampler.state
    assignments = np.empty(len(table.order), np.int32)
    assignments[np.asarray(table.order)] = np.repeat(np.arange(len(sizes)), sizes)
    for step in range(5):
        sample = jax.device_get(sampler.draw(sampler.state, jnp.int32(step)))
        expected = clustering.stratified_weights(
            assignments, sample.indices, num_clusters=config.gc.num_clusters
        )
        np.testing.assert_allclose(sample.weights, expected, rtol=1e-6)
        slots = clustering.slots_per_cluster(
            assignments, num_clusters=config.gc.num_clusters, batch_size=config.batch_size
        )
        np.testing.assert_array_equal(
            np.bincount(assignments[sample.indices], minlength=len(sizes)), slots
        )


# ----------------------------------------------------------------------------------------
# Steps to target, tuning and speed-ups on hand-made curves.
# ----------------------------------------------------------------------------------------
def fake_run(sampler, lr, seed, losses, *, seconds_per_step=1.0, diverged=False):
    curve = [
        {
            "step": 10 * i,
            "examples": 10 * i * 4,
            "seconds": 10 * i * seconds_per_step,
            "refresh_seconds": 0.0,
            "train_loss": loss,
            "train_accuracy": 0.0,
            "test_loss": loss,
            "test_accuracy": 1.0 - loss,
        }
        for i, loss in enumerate(losses)
    ]
    return {
        "regime": "r",
        "sampler": sampler,
        "learning_rate": lr,
        "seed": seed,
        "num_train": 100,
        "diverged": diverged,
        "curve": curve,
    }


def test_first_crossing():
    curve = fake_run("uniform", 0.1, 0, [1.0, 0.6, 0.4, 0.5])["curve"]
    assert analysis.first_crossing(curve, "train_loss", 0.45)["step"] == 20
    assert analysis.first_crossing(curve, "train_loss", 0.6)["step"] == 10  # at the target
    assert analysis.first_crossing(curve, "train_loss", 0.3) is None
    accuracy = analysis.first_crossing(curve, "test_accuracy", 0.45, higher_is_better=True)
    assert accuracy["step"] == 20  # accuracies 0, 0.4, 0.6, 0.5
    assert analysis.first_crossing(curve, "test_accuracy", 0.65, higher_is_better=True) is None


def test_tuning_targets_and_speedups_by_hand():
    config = quick_config(
        samplers=("uniform", "gc"), learning_rates=(0.1, 0.2), num_steps=30, target_step=20
    )
    config.regimes = ml_collections.ConfigDict({"r": default.regime()})
    runs = [
        # uniform: 0.2 wins (mean final 0.35 against 0.45); targets 0.5 and 0.4 at step 20
        fake_run("uniform", 0.1, 0, [1.0, 0.7, 0.6, 0.5]),
        fake_run("uniform", 0.1, 1, [1.0, 0.7, 0.5, 0.4]),
        fake_run("uniform", 0.2, 0, [1.0, 0.6, 0.5, 0.4]),
        fake_run("uniform", 0.2, 1, [1.0, 0.5, 0.4, 0.3]),
        # gc: 0.1 wins (0.2 diverged on seed 1); at twice uniform's cost per step
        fake_run("gc", 0.1, 0, [1.0, 0.5, 0.3, 0.2], seconds_per_step=2.0),
        fake_run("gc", 0.1, 1, [1.0, 0.8, 0.7, 0.6], seconds_per_step=2.0),
        fake_run("gc", 0.2, 0, [1.0, 0.1, 0.1, 0.1]),
        fake_run("gc", 0.2, 1, [1.0], diverged=True),
    ]
    results = analysis.summarize(config, runs)
    entry = results["regimes"]["r"]
    assert entry["targets"] == {
        "0": {"loss": 0.5, "accuracy": 0.5},
        "1": {"loss": 0.4, "accuracy": pytest.approx(0.6)},
    }
    uniform, gc = entry["samplers"]["uniform"], entry["samplers"]["gc"]
    assert uniform["learning_rate"] == 0.2 and gc["learning_rate"] == 0.1
    assert gc["tuning"] == {"0.1": pytest.approx(0.4), "0.2": float("inf")}
    seed0, seed1 = gc["per_seed"]
    # seed 0: GC reaches 0.5 at step 10, uniform at 20: twice as fast in steps, as fast in
    # seconds; seed 1: GC never reaches 0.4 (0.6 at the end)
    assert seed0["step_to_loss"] == 10 and seed0["seconds_to_loss"] == 20.0
    assert seed0["speedup_steps_loss"] == 2.0 and seed0["speedup_seconds_loss"] == 1.0
    assert seed1["step_to_loss"] is None and seed1["speedup_steps_loss"] is None
    assert seed0["final_train_loss_minus_uniform"] == pytest.approx(0.2 - 0.4)
    summary = gc["summary"]["speedup_steps_loss"]
    assert summary == {"mean": 2.0, "std": 0.0, "n": 1}
    assert uniform["summary"]["speedup_steps_loss"] == {"mean": 1.0, "std": 0.0, "n": 2}
    table = analysis.format_table(results)
    assert "| r | 2.00 ± 0.00 / 1.00 ± 0.00 (1/2) |" in table


# ----------------------------------------------------------------------------------------
# Config errors: named, before anything is read or written.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"samplers": ("uniform", "bogus")}, "config.samplers"),
        ({"samplers": ("gc", "uniform")}, "start with 'uniform'"),
        ({"learning_rates": (0.1, -0.2)}, "config.learning_rates"),
        ({"learning_rates": ()}, "config.learning_rates"),
        ({"eval_every": 7}, r"config.num_steps \(40\) must be a multiple of config.eval_every"),
        ({"refresh_every": 12}, "config.refresh_every"),
        ({"target_step": 45}, "config.target_step"),
        ({"batch_size": 2}, r"config.batch_size \(2\) must be >= config.gc.num_clusters"),
        ({"num_seeds": 0}, "config.num_seeds"),
        ({"importance__smoothing": 0.0}, "config.importance.smoothing"),
        ({"gc__allocation": "even"}, "config.gc.allocation"),
        ({"regimes__duplicates__label_noise": 1.5}, "config.regimes.duplicates.label_noise"),
        ({"regimes__clean__majority_factor": 0}, "config.regimes.clean.majority_factor"),
        ({"data__name": "mnist"}, "config.data.data_dir"),
    ],
)
def test_bad_configs_are_refused_before_anything_runs(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(quick_config(**fields), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_majority_class_regime():
    config = quick_config()
    config.data.max_examples = 0
    data = regime_data.load_regime(config, default.regime(majority_factor=20)).train
    counts = np.bincount(data["label"], minlength=10)
    assert all(counts[0] >= 19 * c for c in counts[1:]) and counts[1:].min() >= 1


# ----------------------------------------------------------------------------------------
# End to end: the quick study, its files and numbers; a killed study resumed.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sampling_speed"))
    return workdir, train.train_and_evaluate(quick_config(), workdir)


def test_quick_study_writes_runs_results_table_and_plots(quick_study):
    workdir, results = quick_study
    config = quick_config()
    runs = train.read_runs(os.path.join(workdir, train.RUNS))
    assert len(runs) == len(results["runs"]) == 2 * 4 * 2 * 2  # regimes, samplers, lrs, seeds
    for run in runs:
        curve = run["curve"]
        b = samplers.batch_size_of(run["sampler"], config.batch_size)
        assert not run["diverged"] and [p["step"] for p in curve] == list(range(0, 41, 5))
        assert [p["examples"] for p in curve] == [p["step"] * b for p in curve]
        seconds = [p["seconds"] for p in curve]
        assert seconds[0] == 0 and all(np.diff(seconds) > 0)
        refreshed = curve[-1]["refresh_seconds"]
        assert (refreshed > 0) == (run["sampler"] in ("gc", "importance"))
        assert all(np.isfinite(p["train_loss"]) for p in curve)
        assert curve[-1]["train_loss"] < 0.8 * curve[0]["train_loss"]  # chance: 2.3
        if run["sampler"] == "gc":  # 4 refreshes, every example in one cluster
            assert len(run["cluster_sizes"]) == 4
            assert all(sum(s) == run["num_train"] for s in run["cluster_sizes"])
    assert {r["num_train"] for r in runs if r["regime"] == "duplicates"} == {240 + 4 * 40}
    saved = json.load(open(os.path.join(workdir, train.RESULTS)))
    assert saved["regimes"].keys() == {"clean", "duplicates"}
    for entry in saved["regimes"].values():
        uniform = entry["samplers"]["uniform"]["summary"]
        assert uniform["speedup_steps_loss"] == {"mean": 1.0, "std": 0.0, "n": 2}
        for row in entry["samplers"].values():
            assert row["learning_rate"] in config.learning_rates
            assert row["summary"]["final_train_loss"]["mean"] < 0.5 * entry["initial_train_loss"]
            for seed in row["per_seed"]:
                ratio = seed["speedup_steps_loss"]
                assert ratio is None or 0.4 < ratio < 5
    table = open(os.path.join(workdir, train.TABLE)).read()
    assert "| clean |" in table and "| duplicates |" in table and "uniform_2b" in table
    for name in ("loss_clean.png", "loss_duplicates.png", "speedup.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    run_dir = os.path.join(workdir, train.RUNS_DIR, "duplicates", "gc", "lr0.5_seed1")
    metrics = jt.read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(0, 41, 5))
    assert any(f.startswith("events.out") for f in os.listdir(os.path.join(run_dir, "tensorboard")))


class Killed(Exception):
    pass


def without_seconds(run):
    curve = [
        {k: v for k, v in p.items() if k not in ("seconds", "refresh_seconds")}
        for p in run["curve"]
    ]
    return {**run, "curve": curve}


def test_killed_study_resumes_to_the_same_curves(quick_study, tmp_path):
    """Killed in the middle of its fifth run, then rerun: the stored runs are skipped, the
    interrupted one starts over, and every curve in steps and examples is the uninterrupted
    study's, bit for bit."""
    _, results = quick_study
    config = quick_config(samplers=("uniform", "gc"))
    config.regimes = ml_collections.ConfigDict({"duplicates": config.regimes.duplicates})
    calls = []

    def kill_fifth_run_at_step_20(name, step):
        calls.append(name)
        if len(set(calls)) == 5 and step == 20:
            raise Killed(name)

    workdir = str(tmp_path)
    with pytest.raises(Killed):
        train.train_and_evaluate(config, workdir, hook=kill_fifth_run_at_step_20)
    assert len(train.read_runs(os.path.join(workdir, train.RUNS))) == 4
    with open(os.path.join(workdir, train.RUNS), "a") as f:
        f.write('{"regime": "duplicates", "sampler"')  # a line cut short by the kill
    compiled = train.train_segment._cache_size()
    resumed = train.train_and_evaluate(config, workdir)
    assert train.train_segment._cache_size() == compiled  # nothing recompiled
    assert len(resumed["trained"]) == 4  # the interrupted run and the three after it
    assert len(resumed["runs"]) == len(train.read_runs(os.path.join(workdir, train.RUNS))) == 8
    reference = {train._key(r): r for r in results["runs"]}
    for run in resumed["runs"]:
        assert without_seconds(run) == without_seconds(reference[train._key(run)])
    interrupted = os.path.join(workdir, train.RUNS_DIR, *resumed["trained"][0].split("/"))
    assert [m["step"] for m in jt.read_metrics(interrupted)] == list(range(0, 41, 5))


def test_workdir_of_another_config_is_refused(quick_study):
    workdir, _ = quick_study
    with pytest.raises(ValueError, match="learning_rates"):
        train.train_and_evaluate(quick_config(learning_rates=(0.1, 0.2)), workdir)


def test_quickstart_line_reports_the_runs_steps_to_target(tmp_path, capsys):
    args = argparse.Namespace(workdir=str(tmp_path), gvar_steps=60)  # 24 steps, target at 12
    out = quickstart.steps_to_target(args)
    printed = capsys.readouterr().out
    saved = json.load(open(tmp_path / "sampling_speed" / train.RESULTS))
    rows = saved["regimes"]["duplicates"]["samplers"]
    assert out["target_step"] == saved["target_step"] == 12
    for name in ("uniform", "gc"):
        assert out[name]["step_to_loss"] == rows[name]["per_seed"][0]["step_to_loss"]
    assert 0 < out["uniform"]["step_to_loss"] <= 12
    assert f"uniform: {out['uniform']['step_to_loss']} steps" in printed
    assert "GC on duplicated digits reaches uniform's training loss at step 12" in printed
