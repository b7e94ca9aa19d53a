"""jaxeff.gvar: estimators and the variance suite against numpy loops over explicit gradients."""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxeff import gvar
from jaxeff import train as jt
from jaxeff.pergrad import per_example_grads

N, D = 60, 7


# ------------------------------------------------------------------ linear regression


def linreg_data(seed=0, n=N, d=D):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, d)).astype(np.float32),
        "y": rng.normal(size=n).astype(np.float32),
    }


def linreg_loss(w, batch):
    return 0.5 * jnp.square(batch["x"] @ w - batch["y"])


def linreg_example_grads(w, data):
    """Closed form, float64: ``g_i = (x_i·w - y_i) x_i`` for every example."""
    x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.float64)
    return (x @ np.asarray(w, np.float64) - y)[:, None] * x


def reference_stats(mean_draws, variance_draws, mean=None):
    """The statistics of the module docstring, from explicit draws (rows), in numpy."""
    gbar = np.mean(mean_draws, axis=0) if mean is None else np.asarray(mean, np.float64)
    v = np.mean((variance_draws - gbar) ** 2, axis=0)
    second = v + gbar**2
    active = second > 0
    norm = np.linalg.norm(gbar)
    return {
        "variance": v.mean(),
        "normalized_variance": np.mean(v[active] / second[active]),
        "snr": norm / np.sqrt(v.sum()),
        "grad_norm": norm,
        "active_fraction": active.mean(),
    }


def assert_stats_close(stats, expected, rtol=2e-5):
    got = {k: float(v) for k, v in stats._asdict().items()}
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=1e-12, err_msg=key)


def documented_keys(key, m, name=None):
    """The key schedule of the docs, restated: fold in crc32(name), split into 2m."""
    if name is not None:
        key = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
    keys = jax.random.split(key, 2 * m)
    return keys[:m], keys[m:]


def uniform_indices(key, n, b):
    """The documented with-replacement rule of ``uniform_sample``."""
    return np.asarray(jax.random.randint(key, (b,), 0, n))


@pytest.fixture(scope="module")
def linreg():
    data = linreg_data()
    w = jnp.asarray(np.random.default_rng(1).normal(size=D).astype(np.float32))
    anchor = w + 0.3 * jnp.asarray(np.random.default_rng(2).normal(size=D).astype(np.float32))
    return data, w, anchor


@pytest.mark.parametrize("name", ["sgd", "sgd_2b", "svrg"])
def test_measure_matches_numpy_from_explicit_minibatch_gradients(linreg, name):
    data, w, anchor = linreg
    b, m = 5, 6
    size = {"sgd": b, "sgd_2b": 2 * b, "svrg": b}[name]
    if name == "svrg":
        est = gvar.svrg_estimator(linreg_loss, batch_size=size)
        state = est.init(anchor, data)
    else:
        est = gvar.sgd_estimator(linreg_loss, batch_size=size)
        state = est.init(w, data)
    key = jax.random.key(3)
    stats = gvar.measure({name: est}, {name: state}, w, data, key, num_draws=m)[name]

    # numpy: materialise every mini-batch gradient from the per-example gradients.
    per_example = linreg_example_grads(w, data)
    at_anchor = linreg_example_grads(anchor, data)
    mean_keys, var_keys = documented_keys(key, m, name)

    def minibatch(k):
        rows = uniform_indices(k, N, size)
        g = per_example[rows].mean(0)
        if name == "svrg":
            g = g - at_anchor[rows].mean(0) + at_anchor.mean(0)
        return g

    draws_mean = np.stack([minibatch(k) for k in mean_keys])
    draws_var = np.stack([minibatch(k) for k in var_keys])
    assert_stats_close(stats, reference_stats(draws_mean, draws_var))


def test_known_mean_skips_the_mean_draws(linreg):
    data, w, _ = linreg
    est = gvar.sgd_estimator(linreg_loss, batch_size=4)
    full = gvar.mean_gradient(linreg_loss, w, data)
    key = jax.random.key(0)
    stats = gvar.measure_variance(est, est.init(w, data), w, data, key, num_draws=5, mean=full)
    per_example = linreg_example_grads(w, data)
    _, var_keys = documented_keys(key, 5)
    draws = np.stack([per_example[uniform_indices(k, N, 4)].mean(0) for k in var_keys])
    assert_stats_close(stats, reference_stats(None, draws, mean=per_example.mean(0)))


# ------------------------------------------------------------------ an MLP (nnx pytree)


class MLP(nnx.Module):
    def __init__(self, rngs, din=6, hidden=5, classes=3):
        self.fc1 = nnx.Linear(din, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def mlp_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])


@pytest.fixture(scope="module")
def mlp():
    model = MLP(nnx.Rngs(0))
    rng = np.random.default_rng(5)
    data = {
        "x": rng.normal(size=(45, 6)).astype(np.float32),
        "y": rng.integers(0, 3, 45).astype(np.int32),
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        return mlp_loss(nnx.merge(graphdef, params, rest), batch)

    def example_loss(params, example):
        return loss_fn(params, jax.tree.map(lambda x: x[None], example))[0]

    return model, params, data, loss_fn, example_loss


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_measure_matches_numpy_on_an_mlp(mlp):
    _, params, data, loss_fn, example_loss = mlp
    est = gvar.sgd_estimator(loss_fn, batch_size=4)
    key = jax.random.key(11)
    stats = gvar.measure_variance(est, est.init(params, data), params, data, key, num_draws=7)
    grads = per_example_grads(example_loss, params, data)
    per_example = np.stack([flat(jax.tree.map(lambda g, i=i: g[i], grads)) for i in range(45)])
    mean_keys, var_keys = documented_keys(key, 7)
    draws = [
        np.stack([per_example[uniform_indices(k, 45, 4)].mean(0) for k in ks])
        for ks in (mean_keys, var_keys)
    ]
    assert_stats_close(stats, reference_stats(*draws), rtol=1e-4)


def test_weighted_gradient_is_the_weighted_sum_of_per_example_gradients(mlp):
    _, params, data, loss_fn, example_loss = mlp
    grads = per_example_grads(example_loss, params, data)
    indices = jnp.array([3, 3, 17, 44, 0], jnp.int32)
    weights = jnp.array([0.5, 0.1, 2.0, -0.3, 1e-3], jnp.float32)
    got = gvar.weighted_gradient(loss_fn, params, data, gvar.Sample(indices, weights))
    want = jax.tree.map(lambda g: jnp.tensordot(weights, g[indices], axes=1), grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_mean_gradient_chunks_equal_one_pass(mlp):
    _, params, data, loss_fn, _ = mlp
    whole = gvar.mean_gradient(loss_fn, params, data)
    chunked = gvar.mean_gradient(loss_fn, params, data, chunk_size=8)  # 45 = 5·8 + 5
    direct = jax.grad(lambda p: jnp.mean(loss_fn(p, data)))(params)
    for got in (whole, chunked):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, direct
        )


# ------------------------------------------------------------------ statistical properties


def draws_of(est, state, params, data, key, count):
    keys = jax.random.split(key, count)
    grads = jax.jit(jax.vmap(lambda k: est.estimate(state, params, data, k)[0]))(keys)
    return np.asarray(grads, np.float64)


def test_svrg_is_unbiased_and_quieter_than_sgd_near_its_snapshot(linreg):
    data, w, anchor = linreg
    full = np.asarray(gvar.mean_gradient(linreg_loss, w, data), np.float64)
    svrg = gvar.svrg_estimator(linreg_loss, batch_size=5)
    sgd = gvar.sgd_estimator(linreg_loss, batch_size=5)
    count = 4000
    draws = draws_of(svrg, svrg.init(anchor, data), w, data, jax.random.key(0), count)
    # Unbiased: the mean of K draws misses the full gradient by a chi-square amount whose
    # expectation is the total variance / K; allow 3x (P = 7 degrees of freedom).
    total_var = np.sum(np.var(draws, axis=0))
    miss = np.sum((draws.mean(0) - full) ** 2)
    assert miss < 3 * total_var / count
    # Near the snapshot (a small step away) SVRG's variance is far below SGD's, and
    # exactly 0 at the snapshot itself.
    near = w + 0.01 * (anchor - w)
    key = jax.random.key(1)
    v_svrg = gvar.measure_variance(svrg, svrg.init(w, data), near, data, key).variance
    v_sgd = gvar.measure_variance(sgd, sgd.init(w, data), near, data, key).variance
    assert v_svrg < 0.01 * v_sgd
    at = gvar.measure_variance(svrg, svrg.init(w, data), w, data, key)
    assert float(at.variance) == pytest.approx(0.0, abs=1e-12)
    assert float(at.snr) > 1e3


def test_sgd_2b_has_half_the_variance_of_sgd_b(linreg):
    data, w, _ = linreg
    full = gvar.mean_gradient(linreg_loss, w, data)
    m = 400
    variances, errors = {}, {}
    for b in (6, 12):
        est = gvar.sgd_estimator(linreg_loss, batch_size=b)
        key = jax.random.key(b)
        stats = gvar.measure_variance(est, est.init(w, data), w, data, key, num_draws=m, mean=full)
        # The standard error of V from the spread of the per-draw squared deviations.
        # The same draws in numpy, from the closed-form per-example gradients.
        _, var_keys = gvar.draw_keys(key, m)
        rows = np.asarray(jax.vmap(lambda k, b=b: jax.random.randint(k, (b,), 0, N))(var_keys))
        draws = linreg_example_grads(w, data)[rows].mean(1)
        per_draw = np.sum((draws - np.asarray(full, np.float64)) ** 2, axis=1) / D
        np.testing.assert_allclose(float(stats.variance), per_draw.mean(), rtol=1e-4)
        variances[b], errors[b] = per_draw.mean(), per_draw.std() / np.sqrt(m)
    gap = variances[12] - variances[6] / 2
    assert abs(gap) < 4 * np.hypot(errors[12], errors[6] / 2)
    assert 0.4 < variances[12] / variances[6] < 0.6


def test_importance_sampling_through_sampling_estimator_is_unbiased(linreg):
    """Per-example weights 1/(N b p_i) with non-uniform p_i: the interface's other use."""
    data, w, _ = linreg
    b = 4
    probs = np.linspace(1.0, 3.0, N)
    probs = jnp.asarray(probs / probs.sum(), jnp.float32)

    def sample_fn(state, key, size):
        rows = jax.random.choice(key, size, (b,), p=state)
        return gvar.Sample(rows, 1.0 / (size * b * state[rows]))

    est = gvar.sampling_estimator(linreg_loss, sample_fn, init_fn=lambda params, data: probs)
    count = 6000
    draws = draws_of(est, est.init(w, data), w, data, jax.random.key(9), count)
    full = linreg_example_grads(w, data).mean(0)
    assert np.sum((draws.mean(0) - full) ** 2) < 3 * np.sum(np.var(draws, axis=0)) / count


# ------------------------------------------------------------------ exact variance


def test_exact_variance_fast_path_equals_brute_force(mlp):
    model, params, data, loss_fn, example_loss = mlp
    moments = gvar.gradient_moments(loss_fn, params, data, chunk_size=16)  # 16 + 16 + 13
    grads = per_example_grads(example_loss, params, data)
    brute_var = jax.tree.map(lambda g: np.var(np.asarray(g, np.float64), axis=0), grads)
    brute_mean = jax.tree.map(lambda g: np.mean(np.asarray(g, np.float64), axis=0), grads)
    fast_var = jax.tree.map(lambda m2, mu: m2 - mu**2, moments.second_moment, moments.mean)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9), fast_var, brute_var
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
        moments.mean,
        brute_mean,
    )
    assert moments.num_examples == 45
    np.testing.assert_allclose(moments.mean_loss, np.mean(mlp_loss(model, data)), rtol=1e-5)
    # The statistics of SGD-b from the moments, against numpy on the brute-force gradients.
    g = np.stack([flat(jax.tree.map(lambda x, i=i: x[i], grads)) for i in range(45)])
    mu, var = g.mean(0), g.var(0)
    for b, replace, scale in ((1, True, 1.0), (8, True, 1 / 8), (8, False, (45 - 8) / (8 * 44))):
        v = scale * var
        active = (var + mu**2) > 0
        want = {
            "variance": v.mean(),
            "normalized_variance": np.mean(v[active] / (v + mu**2)[active]),
            "snr": np.linalg.norm(mu) / np.sqrt(v.sum()),
            "grad_norm": np.linalg.norm(mu),
            "active_fraction": active.mean(),
        }
        assert_stats_close(gvar.exact_variance(moments, batch_size=b, replace=replace), want, 1e-4)


def test_gradient_moments_of_a_plain_array_loss_equal_the_closed_form(linreg):
    """Any ``loss_fn(params, batch)``: here ``params`` is one array, ``g_i = (x_i·w - y_i) x_i``."""
    data, w, _ = linreg
    moments = gvar.gradient_moments(linreg_loss, w, data, chunk_size=25)  # 25 + 25 + 10
    g = linreg_example_grads(w, data)
    np.testing.assert_allclose(moments.mean, g.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(moments.second_moment, np.mean(g**2, 0), rtol=1e-5, atol=1e-7)
    assert moments.num_examples == N
    np.testing.assert_allclose(moments.mean_loss, np.mean(linreg_loss(w, data)), rtol=1e-5)


@pytest.mark.parametrize("replace", [True, False])
def test_measured_sgd_variance_converges_to_the_exact_one(mlp, replace):
    _, params, data, loss_fn, _ = mlp
    moments = gvar.gradient_moments(loss_fn, params, data)
    exact = gvar.exact_variance(moments, batch_size=8, replace=replace)
    est = gvar.sgd_estimator(loss_fn, batch_size=8, replace=replace)
    mean = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), moments.mean)
    stats = gvar.measure_variance(
        est, est.init(params, data), params, data, jax.random.key(2), num_draws=1000, mean=mean
    )
    np.testing.assert_allclose(float(stats.variance), exact.variance, rtol=0.1)
    np.testing.assert_allclose(
        float(stats.normalized_variance), exact.normalized_variance, rtol=0.1
    )


# ------------------------------------------------------------------ jit, keys, sharding


def test_measurement_is_deterministic_and_compiled_once(linreg):
    data, w, _ = linreg
    traces = []

    def counting_loss(w, batch):
        traces.append(1)
        return linreg_loss(w, batch)

    est = gvar.sgd_estimator(counting_loss, batch_size=4)
    first = gvar.measure_variance(est, est.init(w, data), w, data, jax.random.key(0))
    count = len(traces)
    again = gvar.measure_variance(est, est.init(w, data), w + 1.0, data, jax.random.key(0))
    same = gvar.measure_variance(est, est.init(w, data), w, data, jax.random.key(0))
    other = gvar.measure_variance(est, est.init(w, data), w, data, jax.random.key(1))
    assert len(traces) == count  # new params and keys: no retrace
    assert not np.allclose(float(again.variance), float(first.variance))
    assert all(np.array_equal(a, b) for a, b in zip(first, same, strict=True))
    assert float(other.variance) != float(first.variance)


def test_measure_keys_depend_on_the_name_not_the_position(linreg):
    data, w, _ = linreg
    a = gvar.sgd_estimator(linreg_loss, batch_size=3)
    b = gvar.sgd_estimator(linreg_loss, batch_size=6)
    key = jax.random.key(4)
    alone = gvar.measure({"b": b}, {"b": None}, w, data, key)
    both = gvar.measure({"a": a, "b": b}, {"a": None, "b": None}, w, data, key)
    assert list(both) == ["a", "b"]
    assert float(alone["b"].variance) == float(both["b"].variance)


def test_sharded_inputs_give_the_same_numbers(linreg):
    data, w, anchor = linreg
    est = gvar.svrg_estimator(linreg_loss, batch_size=5)
    key = jax.random.key(6)
    plain = gvar.measure_variance(est, est.init(anchor, data), w, data, key)
    mesh = jt.make_mesh()
    assert mesh.size == 8
    on_mesh = jt.replicate((data, w, anchor), mesh)
    sharded = gvar.measure_variance(
        est, est.init(on_mesh[2], on_mesh[0]), on_mesh[1], on_mesh[0], key
    )
    for got, want in zip(sharded, plain, strict=True):
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


# ------------------------------------------------------------------ errors


def test_bad_arguments_are_refused(linreg):
    data, w, _ = linreg
    est = gvar.sgd_estimator(linreg_loss, batch_size=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_draws"):
        gvar.measure_variance(est, None, w, data, key, num_draws=0)
    with pytest.raises(ValueError, match="`mean` must have the structure"):
        gvar.measure_variance(est, None, w, data, key, mean={"w": w})
    with pytest.raises(TypeError, match="GradientEstimator"):
        gvar.measure_variance((est.init, est.estimate), None, w, data, key)
    with pytest.raises(ValueError, match="batch_size"):
        gvar.sgd_estimator(linreg_loss, batch_size=0)
    with pytest.raises(ValueError, match="exceed"):
        gvar.uniform_sample(key, 3, 4, replace=False)
    with pytest.raises(ValueError, match="one loss per example"):
        scalar = gvar.sgd_estimator(lambda w, b: jnp.sum(linreg_loss(w, b)), batch_size=4)
        gvar.measure_variance(scalar, None, w, data, key)
    with pytest.raises(ValueError, match="leading axis"):
        gvar.mean_gradient(linreg_loss, w, {"x": data["x"], "y": data["y"][:5]})
    with pytest.raises(ValueError, match="states"):
        gvar.measure({"a": est}, {}, w, data, key)


def test_gradient_moments_refuse_nan(mlp):
    _, params, data, loss_fn, _ = mlp
    bad = dict(data, x=data["x"].copy())
    bad["x"][3, 0] = np.nan
    with pytest.raises(FloatingPointError, match="not finite"):
        gvar.gradient_moments(loss_fn, params, bad)


# ------------------------------------------------------------------ records and plot


def test_records_round_trip_and_plot(tmp_path, linreg):
    data, w, _ = linreg
    est = gvar.sgd_estimator(linreg_loss, batch_size=4)
    path = tmp_path / "gvar.jsonl"
    for step in (0, 10, 20):
        stats = gvar.measure_variance(est, None, w * (1 + step), data, jax.random.key(step))
        gvar.append_records(path, [gvar.stats_record(step, "sgd", stats, batch_size=4)])
    # A resumed run rewrites step 20; a kill leaves half a line.
    rewritten = dict(zip(gvar.STATISTICS, (1.0, 0.5, float("inf"), 1.0, 1.0), strict=True))
    gvar.append_records(path, [{"step": 20, "estimator": "sgd", **rewritten}])
    with open(path, "a") as f:
        f.write('{"step": 30, "estim')
    records = gvar.read_records(path)
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[-1]["variance"] == 1.0 and records[-1]["snr"] == float("inf")
    assert records[0]["batch_size"] == 4 and set(gvar.STATISTICS) <= set(records[0])
    json.dumps(records[0])
    png = tmp_path / "gvar.png"
    gvar.plot_records(records, png, quantities=gvar.STATISTICS, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not statistics"):
        gvar.plot_records(records, png, quantities=("loss",))
    with pytest.raises(ValueError, match="empty"):
        gvar.plot_records([], png)
