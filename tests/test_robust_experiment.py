"""End-to-end robustness studies on their quick configs: files, the diagonal, numbers,
recomputation. The linear study (optimisers, regularisers, max-margin classifiers in three
norms) and the linear-convolution experiment (conv vs fully connected network)."""

import contextlib
import io
import json
import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.robust import linear_conv, main, train
from experiments.robust.configs import default, linear_conv_quick, quick
from jaxeff import robust

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELL = re.compile(r"(-?\d+\.\d{4})(\*?)")
# The norm each method must be biased towards, written out independently of the experiment.
OWN_NORM = {
    "gradient_descent": "2",
    "coordinate_descent": "1",
    "sign_descent": "inf",
    "regularized_1": "1",
    "regularized_2": "2",
    "regularized_inf": "inf",
    "max_margin_1": "1",
    "max_margin_2": "2",
    "max_margin_inf": "inf",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("robust_quick"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = train.train_and_evaluate(quick.get_config(), workdir)
    return workdir, results, printed.getvalue()


def parse_table(text):
    """``{d/n: {method: (9 values, 9 star flags)}}`` from the printed table."""
    tables, current = {}, None
    for line in text.splitlines():
        if line.startswith("d/n = "):
            current = tables.setdefault(line.removeprefix("d/n = ").strip(), {})
            continue
        name = line.split(" ", 1)[0]
        if current is not None and name in train.METHODS:
            cells = CELL.findall(line)
            assert len(cells) == 9, line
            current[name] = ([float(v) for v, _ in cells], [bool(s) for _, s in cells])
    return tables


def test_writes_every_file(quick_run):
    workdir, results, printed = quick_run
    for name in (train.RESULTS, train.RECORDS, train.WEIGHTS):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for name in (train.MARGIN_PLOT, train.ROBUST_PLOT):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    config = quick.get_config()
    runs = len(config.data.d_over_n) * config.num_seeds * len(train.METHODS)
    with open(os.path.join(workdir, train.RECORDS)) as f:
        records = [json.loads(line) for line in f]
    per_run = len(train.NORMS) + len(train.ATTACKS) * config.robust.num_eps
    assert len(records) == runs * per_run
    assert len(results["runs"]) == runs
    assert set(parse_table(printed)) == {str(r) for r in config.data.d_over_n}


def test_diagonal_and_margin_bound(quick_run):
    """Each method's best margin ratio and cosine is in its own norm; ratios <= 1."""
    _, _, printed = quick_run
    tables = parse_table(printed)
    norms = list(train.NORMS)
    for methods in tables.values():
        assert set(methods) == set(OWN_NORM)
        for method, (values, stars) in methods.items():
            own = norms.index(OWN_NORM[method])
            margin, cosine = values[0:3], values[3:6]
            assert int(np.argmax(margin)) == own, (method, margin)
            assert int(np.argmax(cosine)) == own, (method, cosine)
            assert stars[0:3].index(True) == own and stars[3:6].index(True) == own
            assert max(margin) <= 1 + 1e-4, (method, margin)
        # The optimisers and the regularisation paths get close to their own max-margin
        # (measured: margins 0.990 to 0.998 of it, cosines 0.983 to 1).
        for name in (*train.OPTIMISERS, *train.REGULARIZED):
            values, _ = methods[name]
            own = norms.index(OWN_NORM[name])
            assert values[own] > 0.98 and values[3 + own] > 0.98, (name, values)


def test_printed_table_is_results_json(quick_run):
    workdir, _, printed = quick_run
    with open(os.path.join(workdir, train.RESULTS)) as f:
        saved = json.load(f)
    tables = parse_table(printed)
    for ratio, methods in saved["summary"].items():
        for method, row in methods.items():
            expected = [
                *(row["margin_ratio"][q] for q in train.NORMS),
                *(row["cosine"][q] for q in train.NORMS),
                *(row["robust_auc"][p] for p in train.ATTACKS),
            ]
            np.testing.assert_allclose(tables[ratio][method][0], expected, atol=5.1e-5)


def test_results_recomputed_from_saved_weights(quick_run):
    """Margins, cosines and robust accuracies of results.json and the JSON lines, from the
    saved weights and regenerated data, in float64 numpy (no jaxeff measurement)."""
    workdir, _, _ = quick_run
    config = quick.get_config()
    with open(os.path.join(workdir, train.RESULTS)) as f:
        saved = json.load(f)
    with open(os.path.join(workdir, train.RECORDS)) as f:
        records = [json.loads(line) for line in f]
    weights = np.load(os.path.join(workdir, train.WEIGHTS))
    norms = {"1": 1, "2": 2, "inf": np.inf}
    duals = {"1": np.inf, "2": 2, "inf": 1}
    for run in saved["runs"]:
        x, y, x_test, y_test = train.synthetic_data(
            dim=config.data.dim, n=run["n"], num_test=config.data.num_test, seed=run["seed"]
        )
        w = weights[f"dn{run['d_over_n']}_seed{run['seed']}/{run['method']}"]
        mine = [
            r
            for r in records
            if (r["d_over_n"], r["seed"], r["method"])
            == (run["d_over_n"], run["seed"], run["method"])
        ]
        for q, order in norms.items():
            solution = weights[f"dn{run['d_over_n']}_seed{run['seed']}/max_margin_{q}"]
            best = 1 / np.linalg.norm(solution, order)
            margin = np.min(y * (x @ w)) / np.linalg.norm(w, order)
            cosine = w @ solution / np.linalg.norm(w) / np.linalg.norm(solution)
            assert run["max_margin"][q] == pytest.approx(best, rel=1e-9)
            assert run["margin_ratio"][q] == pytest.approx(margin / best, rel=2e-5, abs=1e-6)
            assert run["cosine"][q] == pytest.approx(cosine, rel=1e-9)
            (record,) = [r for r in mine if r["kind"] == "margin" and r["norm"] == q]
            assert record["margin_ratio"] == run["margin_ratio"][q]
            assert record["cosine"] == run["cosine"][q]
        test_margins = y_test * (x_test @ w)
        for p in train.ATTACKS:
            q = next(k for k, v in norms.items() if v == duals[p])
            eps = np.asarray(train.eps_ratios(config)) * run["max_margin"][q]
            np.testing.assert_allclose(run["eps"][p], eps, rtol=1e-12)
            cost = np.linalg.norm(w, norms[q])
            accuracy = np.mean(test_margins[None] > eps[:, None] * cost, axis=1)
            # float32 in jaxeff: a point within rounding of the boundary may flip.
            np.testing.assert_allclose(run["robust_accuracy"][p], accuracy, atol=2.5 / len(y_test))
            curve = [r["accuracy"] for r in mine if r["kind"] == "robust" and r["attack"] == p]
            assert curve == run["robust_accuracy"][p]


def test_saved_weights_give_jaxeff_numbers(quick_run):
    """The saved weights reproduce results.json through the same jaxeff functions exactly."""
    workdir, results, _ = quick_run
    config = quick.get_config()
    weights = np.load(os.path.join(workdir, train.WEIGHTS))
    run = results["runs"][0]
    x, y, x_test, y_test = train.synthetic_data(
        dim=config.data.dim, n=run["n"], num_test=config.data.num_test, seed=run["seed"]
    )
    w = weights[f"dn{run['d_over_n']}_seed{run['seed']}/{run['method']}"]
    for q, order in train.NORMS.items():
        margin = float(robust.normalized_margin(w, x, y, norm=order))
        assert margin == run["margin"][q]
    accuracy = robust.robust_accuracy(w, x_test, y_test, eps=jnp.asarray(run["eps"]["2"]), p=2.0)
    assert np.asarray(accuracy, np.float64).tolist() == run["robust_accuracy"]["2"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_steps", 0, "config.num_steps"),
        ("data.d_over_n", (4, -1), "config.data.d_over_n"),
        ("data.d_over_n", (1000,), "no training point"),
        ("step_scale.sign_descent", 0.0, "config.step_scale.sign_descent"),
        ("robust.max_eps_ratio", -1.0, "config.robust.max_eps_ratio"),
        ("regularization.min_log_lambda", 0.0, "config.regularization.min_log_lambda"),
        ("regularization.min_log_lambda", float("-inf"), "config.regularization.min_log_lambda"),
        ("regularization.path_length", 0, "config.regularization.path_length"),
        ("regularization.steps_per_lambda", 0, "config.regularization.steps_per_lambda"),
    ],
)
def test_bad_config_is_refused(tmp_path, field, value, message):
    config = default.get_config()
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        train.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_regularized_weights_are_the_end_of_the_configured_path(quick_run):
    """The saved weights of each penalty are those of ``regularization_path`` at the config's
    smallest λ (e^-100), reached in ``path_length`` steps from λ = 1."""
    workdir, _, _ = quick_run
    config = quick.get_config()
    weights = np.load(os.path.join(workdir, train.WEIGHTS))
    (ratio,) = config.data.d_over_n
    n = train.num_train(config.data.dim, ratio)
    x, y, _, _ = train.synthetic_data(
        dim=config.data.dim, n=n, num_test=config.data.num_test, seed=config.seed
    )
    log_lambdas = np.linspace(0.0, -100.0, config.regularization.path_length)
    np.testing.assert_allclose(train.log_lambdas(config), log_lambdas)
    path = robust.regularization_path(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        norm=1,
        log_lambdas=log_lambdas,
        steps_per_lambda=config.regularization.steps_per_lambda,
    )
    np.testing.assert_array_equal(weights[f"dn{ratio}_seed{config.seed}/regularized_1"], path[-1])
    # At λ = e^-100 the smallest margin is about log(1/λ) = 100.
    assert 90 < np.min(y * (x @ weights[f"dn{ratio}_seed{config.seed}/regularized_1"])) < 101


# ----------------------------------------------------------------------------------------
# The linear-convolution experiment.
# ----------------------------------------------------------------------------------------
FOURIER = {"fourier_1": 1, "fourier_inf": np.inf}


def weight_norm(w, q):
    """``||w||_q`` in float64 numpy; the Fourier norms of the orthonormal DFT, every
    coefficient counted."""
    if q in FOURIER:
        return float(np.linalg.norm(np.abs(np.fft.fft(w, norm="ortho")), FOURIER[q]))
    return float(np.linalg.norm(w, {"1": 1, "2": 2, "inf": np.inf}[q]))


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("robust_conv"))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = linear_conv.train_and_evaluate(linear_conv_quick.get_config(), workdir)
    return workdir, results, printed.getvalue()


def test_conv_writes_every_file(conv_run):
    workdir, results, printed = conv_run
    config = linear_conv_quick.get_config()
    for name in (linear_conv.RESULTS, linear_conv.WEIGHTS):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for name in (linear_conv.TRAINING_PLOT, linear_conv.ROBUST_PLOT):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    run_dir = os.path.join(workdir, f"seed{config.seed}")
    assert any(
        name.startswith("events.") for name in os.listdir(os.path.join(run_dir, "tensorboard"))
    )
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = list(range(0, config.num_steps + 1, config.log_every))
    for network in linear_conv.MODELS:  # one record per network and logged step
        mine = [r for r in records if f"{network}/log_loss" in r]
        assert [r["step"] for r in mine] == steps, network
        for q in linear_conv.NORMS:
            assert {f"{network}/margin_ratio/{q}", f"{network}/cosine/{q}"} <= set(mine[-1])
    rows = [line.split()[0] for line in printed.splitlines()[2:]]
    assert rows == ["conv", "fully_connected", "max_margin_fourier_1", "max_margin_2"]
    assert results["table"] in printed


def test_conv_net_ends_near_the_fourier_l1_max_margin(conv_run):
    """The claim: of the five max-margin classifiers the conv net is most aligned with the
    Fourier-L1 one, its Fourier-L1 margin rises towards the max-margin with training, and
    the fully connected network goes to the L2 max-margin instead."""
    _, results, _ = conv_run
    final = {r["classifier"]: r for r in results["runs"]}
    conv, dense = final["conv"], final["fully_connected"]
    assert max(conv["cosine"], key=conv["cosine"].get) == "fourier_1", conv["cosine"]
    assert max(dense["cosine"], key=dense["cosine"].get) == "2", dense["cosine"]
    # Measured at step 1000: 0.971 of the Fourier-L1 max-margin (cosine 0.968); the fully
    # connected network 0.999 of the L2 one (cosine 1.0000).
    assert conv["margin_ratio"]["fourier_1"] > 0.95 and conv["cosine"]["fourier_1"] > 0.95
    assert dense["margin_ratio"]["2"] > 0.99 and dense["cosine"]["2"] > 0.999
    assert conv["margin_ratio"]["2"] < 0.8 and dense["margin_ratio"]["fourier_1"] < 0.8
    history = [r["margin_ratio/fourier_1"] for r in results["histories"]["seed0/conv"]]
    assert history[1] < history[len(history) // 2] < history[-1] <= 1 + 1e-4, history
    # The last logged measurements (float32, compiled) are the final float64 ones.
    for network in linear_conv.MODELS:
        logged = results["histories"][f"seed0/{network}"][-1]
        for q in linear_conv.NORMS:
            for key in ("margin_ratio", "cosine"):
                expected = final[network][key][q]
                assert logged[f"{key}/{q}"] == pytest.approx(expected, rel=1e-4), (network, q)


def test_conv_net_is_the_more_robust_to_fourier_linf(conv_run):
    """Against Fourier-L∞ the conv net's robust accuracy (mean over ε) beats the fully
    connected network's, and on the training points its Fourier-L∞ radius (its Fourier-L1
    margin) does; against L2 the fully connected network is the more robust."""
    _, results, _ = conv_run
    summary = results["summary"]
    conv, dense = summary["conv"], summary["fully_connected"]
    assert conv["robust_auc"]["fourier_inf"] > dense["robust_auc"]["fourier_inf"]  # .240 > .143
    assert dense["robust_auc"]["2"] > conv["robust_auc"]["2"]  # .193 > .163
    assert conv["margin_ratio"]["fourier_1"] > dense["margin_ratio"]["fourier_1"]
    assert dense["margin_ratio"]["2"] > conv["margin_ratio"]["2"]


def test_conv_results_recomputed_from_saved_weights(conv_run):
    """Margins, cosines and robust accuracies of results.json from the saved weights and
    regenerated data, in float64 numpy (numpy's FFT for the Fourier norms)."""
    workdir, _, _ = conv_run
    config = linear_conv_quick.get_config()
    with open(os.path.join(workdir, linear_conv.RESULTS)) as f:
        saved = json.load(f)
    weights = np.load(os.path.join(workdir, linear_conv.WEIGHTS))
    duals = {"fourier_inf": "fourier_1", "inf": "1", "2": "2"}
    for run in saved["runs"]:
        x, y, x_test, y_test = train.synthetic_data(
            dim=config.data.dim,
            n=config.data.num_train,
            num_test=config.data.num_test,
            seed=run["seed"],
        )
        w = weights[f"seed{run['seed']}/{run['classifier']}"]
        for q in linear_conv.NORMS:
            solution = weights[f"seed{run['seed']}/max_margin_{q}"]
            best = 1 / weight_norm(solution, q)
            assert run["max_margin"][q] == pytest.approx(best, rel=1e-6)
            ratio = np.min(y * (x @ w)) / weight_norm(w, q) / best
            assert run["margin_ratio"][q] == pytest.approx(ratio, rel=2e-5, abs=1e-6)
            cosine = w @ solution / np.linalg.norm(w) / np.linalg.norm(solution)
            assert run["cosine"][q] == pytest.approx(cosine, rel=1e-9)
        margins = y_test * (x_test @ w)
        for p, q in duals.items():
            eps = np.asarray(run["eps_ratio"]) * run["max_margin"][q]
            np.testing.assert_allclose(run["eps"][p], eps, rtol=1e-12)
            accuracy = np.mean(margins[None] > eps[:, None] * weight_norm(w, q), axis=1)
            np.testing.assert_allclose(run["robust_accuracy"][p], accuracy, atol=2.5 / len(y_test))


def test_conv_networks_start_at_zero_with_identity_first_layers():
    """Both networks compute w = 0 at the start; the conv layer multiplies every frequency
    by α, the dense layer is α·I."""
    conv = linear_conv.build_model("conv", 8, 0.5, seed=0)
    multipliers, w = nnx.jit(lambda m: (m.multipliers()[0], m.linear_classifier().w))(conv)
    np.testing.assert_allclose(np.abs(np.asarray(multipliers))[:, 0, 0], 0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(w), np.zeros(8))
    dense = linear_conv.build_model("fully_connected", 8, 0.5, seed=0)
    np.testing.assert_array_equal(np.asarray(dense.layers[0].kernel[...]), 0.5 * np.eye(8))
    np.testing.assert_array_equal(np.asarray(dense.linear_classifier().w), np.zeros(8))
    with pytest.raises(ValueError, match="`name`"):
        linear_conv.build_model("recurrent", 8, 0.5, seed=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_steps", 0, "config.num_steps"),
        ("log_every", -5, "config.log_every"),
        ("data.num_train", 0, "config.data.num_train"),
        ("model.init_scale", 0.0, "config.model.init_scale"),
        ("step_scale", float("nan"), "config.step_scale"),
        ("robust.max_eps_ratio", -1.0, "config.robust.max_eps_ratio"),
    ],
)
def test_conv_bad_config_is_refused(tmp_path, field, value, message):
    config = linear_conv_quick.get_config()
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    node[leaf] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        linear_conv.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_entry_point_runs_the_config_experiment():
    """main.py picks the study from ``config.experiment``; each config names its own."""
    assert main.EXPERIMENTS[default.get_config().experiment] is train
    assert main.EXPERIMENTS[quick.get_config().experiment] is train
    assert main.EXPERIMENTS[linear_conv_quick.get_config().experiment] is linear_conv


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_two_processes_compute_the_same_study_and_process_zero_writes(quick_run, tmp_path):
    """``python -m experiments.robust.main`` under the local launcher: both processes join
    one cluster, and the results process 0 writes equal the single-process run's."""
    from experiments.launch import local

    _, results, _ = quick_run
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.robust.main",
        f"--config={os.path.join(ROOT, 'experiments/robust/configs/quick.py')}",
        f"--workdir={workdir}",
    ]
    outcome = local.launch(command, num_processes=2, cpu_devices=1, log_dir=str(tmp_path / "logs"))
    errors = [(tmp_path / "logs" / f"process{i}.err").read_text()[-2000:] for i in range(2)]
    assert outcome == ([0, 0], None), errors
    printed = [(tmp_path / "logs" / f"process{i}.out").read_text() for i in range(2)]
    assert "time" in printed[0] and "time" not in printed[1]  # process 0 alone prints
    saved = json.load(open(workdir / train.RESULTS))
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
