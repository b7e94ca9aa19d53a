"""End-to-end robustness study on the quick config: files, the diagonal, numbers, recomputation."""

import contextlib
import io
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.robust import train
from experiments.robust.configs import default, quick
from jaxeff import robust

CELL = re.compile(r"(-?\d+\.\d{4})(\*?)")
# The norm each method must be biased towards, written out independently of the experiment.
OWN_NORM = {
    "gradient_descent": "2",
    "coordinate_descent": "1",
    "sign_descent": "inf",
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
        for name in train.OPTIMISERS:  # the optimisers get close to their own max-margin
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
