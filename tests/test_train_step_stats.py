"""Tests for make_train_step(per_example_stats=True): statistics from the step's own pass."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_models import MLP, make_batch
from flax import nnx
from jax.sharding import AxisType
from test_pergrad import brute_force_dots, brute_force_grads

from jaxeff.pergrad import PerExampleStats
from jaxeff.pergrad.stats import per_example_stats
from jaxeff.train import (
    create_train_state,
    data_sharding,
    make_mesh,
    make_train_step,
    merge_model,
    replicate,
    replicated_sharding,
    shard_batch,
)

# ----------------------------------------------------------------------------- helpers


class NormedMLP(nnx.Module):
    """Linear -> LayerNorm (vmap path) -> Linear, so both paths carry the gradient."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(3, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(jax.nn.relu(self.fc1(x))))


MODELS = {
    "mlp": lambda: MLP(nnx.Rngs(0)),
    "dropout": lambda: MLP(nnx.Rngs(0, dropout=3), dropout=0.3),
    "layernorm": lambda: NormedMLP(nnx.Rngs(1)),
}


def per_example_mse(model, batch, hparams):
    """``hparams["scale"]``-scaled squared errors, one per example, and a scalar aux metric."""
    err = jnp.mean((model(batch["x"]) - batch["y"]) ** 2, axis=1)
    return hparams["scale"] * err, {"max_err": jnp.max(err)}


def stats_loss(model, batch, scale=1.0):
    """The same per-example loss in the form per_example_stats takes."""
    return per_example_mse(model, batch, {"scale": scale})[0]


def weighted(batch, seed):
    weights = np.random.default_rng(seed).uniform(0.0, 0.2, size=16).astype(np.float32)
    weights[3] = 0.0
    return {**batch, "weights": weights}


def make_tx():
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))


def tree_close(actual, expected, rtol=2e-5, atol=1e-6):
    la, lb = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(la) == len(lb)
    for a, b in zip(la, lb, strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


class Recorded(NamedTuple):
    """State of :func:`record_stats`: what the transform saw of the statistics."""

    total_sq_norms: jax.Array  # (B,) of the last step
    sum_sq_total: jax.Array  # running Σ over steps of Σ_coords sum_sq
    steps: jax.Array


def record_stats(batch_size=16):
    """An ExtraArgs transform that keeps part of ``per_example_stats`` in its state."""

    def init(params):
        return Recorded(jnp.zeros(batch_size), jnp.zeros(()), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, per_example_stats=None, **extra):
        total = sum(jnp.sum(x) for x in jax.tree.leaves(per_example_stats.sum_sq))
        new = Recorded(
            per_example_stats.total_sq_norms, state.sum_sq_total + total, state.steps + 1
        )
        return updates, new

    return optax.GradientTransformationExtraArgs(init, update)


class Centres(NamedTuple):
    """Directions per parameter, as gradient-cluster centres would be held."""

    directions: dict  # {"fc1/kernel": (v (K, d_in), u (K, d_out)), "fc1/bias": (u (K, d),)}
    last_dots: jax.Array  # (K, B)


def hold_centres(model, k=3, seed=0):
    """An ExtraArgs transform holding directions; each step halves ``v`` and keeps the dots."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.normal(size=(k, *shape)), jnp.float32)

    initial = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, name = value.get_value().shape, "/".join(map(str, path))
        initial[name] = (
            (normal(*shape[:-1]), normal(shape[-1])) if len(shape) > 1 else (normal(*shape),)
        )

    def init(params):
        return Centres(initial, jnp.zeros((k, 16)))

    def update(updates, state, params=None, *, per_example_stats=None, **extra):
        halved = {name: (0.5 * f[0], *f[1:]) for name, f in state.directions.items()}
        return updates, Centres(halved, per_example_stats.dots)

    return optax.GradientTransformationExtraArgs(init, update)


def centres_of(state):
    return state.opt_state[0].directions


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("use_weights", [False, True])
def test_step_with_stats_equals_the_plain_step(kind, use_weights):
    tx = make_tx()
    graphdef, state = create_train_state(MODELS[kind](), tx)
    plain = make_train_step(graphdef, per_example_mse, tx, donate=False)
    with_stats = make_train_step(graphdef, per_example_mse, tx, per_example_stats=True)
    plain_state, stats_state = state, jax.tree.map(jnp.copy, state)
    for i, scale in enumerate([1.0, 0.5, 2.0]):
        batch = make_batch(i)
        if use_weights:
            batch = weighted(batch, seed=i)
        hparams = {"scale": scale}
        before = stats_state
        expected_stats = per_example_stats(
            merge_model(graphdef, before),
            lambda m, b, s=scale: stats_loss(m, b, s),
            batch,
        )
        plain_state, plain_metrics = plain(plain_state, batch, hparams)
        stats_state, metrics, stats = with_stats(stats_state, batch, hparams)
        tree_close(stats_state, plain_state)  # params, opt state, step, model state
        assert set(metrics) == set(plain_metrics)
        for key, value in plain_metrics.items():
            np.testing.assert_allclose(metrics[key], value, rtol=2e-5, err_msg=key)
        assert isinstance(stats, PerExampleStats)
        assert stats.paths == expected_stats.paths
        tree_close(stats, expected_stats, rtol=1e-5)
    if kind == "dropout":  # the model state (RNG counter) moved once per step
        assert int(stats_state.model_state["drop"]["rngs"]["count"][...]) == 3


def test_line_search_gets_value_fn_with_stats_on():
    tx = optax.chain(optax.sgd(30.0), optax.scale_by_backtracking_linesearch(30))
    graphdef, state = create_train_state(MODELS["mlp"](), tx)
    batch, hparams = weighted(make_batch(5), seed=5), {"scale": 1.0}
    plain_state, plain_metrics = make_train_step(graphdef, per_example_mse, tx, donate=False)(
        state, batch, hparams
    )
    step = make_train_step(graphdef, per_example_mse, tx, donate=False, per_example_stats=True)
    new_state, metrics, _ = step(state, batch, hparams)
    assert 0 < float(new_state.opt_state[1].learning_rate) < 1.0  # it backtracked
    tree_close(new_state, plain_state)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)


# ----------------------------------------------------------------------------- optimizer


def test_extra_args_transform_receives_the_stats():
    tx = optax.chain(record_stats(), make_tx())
    graphdef, state = create_train_state(MODELS["layernorm"](), tx)
    step = make_train_step(graphdef, per_example_mse, tx, per_example_stats=True)
    running = 0.0
    for i in range(2):
        batch = weighted(make_batch(i), seed=i)
        state, _, stats = step(state, batch, {"scale": 1.0})
        recorded = state.opt_state[0]
        np.testing.assert_allclose(recorded.total_sq_norms, stats.total_sq_norms, rtol=1e-6)
        running += sum(float(jnp.sum(x)) for x in jax.tree.leaves(stats.sum_sq))
        np.testing.assert_allclose(recorded.sum_sq_total, running, rtol=1e-5)
        assert int(recorded.steps) == i + 1
        assert float(jnp.min(stats.total_sq_norms)) > 0


def test_directions_come_from_the_optimizer_state():
    model = MODELS["mlp"]()
    tx = optax.chain(hold_centres(model), optax.sgd(0.1))
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(
        graphdef,
        per_example_mse,
        tx,
        donate=False,
        per_example_stats=True,
        directions_fn=centres_of,
    )
    for i in range(2):  # the second step uses the halved v written by the first
        batch = weighted(make_batch(i), seed=i)
        directions = jax.tree.map(np.asarray, centres_of(state))
        before = merge_model(graphdef, state)
        state, _, stats = step(state, batch, {"scale": 1.0})
        grads = brute_force_grads(before, stats_loss, batch)
        expected = brute_force_dots(grads, directions)
        assert set(stats.leaf_dots) == {"fc1/kernel", "fc1/bias", "fc2/kernel", "fc2/bias"}
        for path, dots in expected.items():
            np.testing.assert_allclose(stats.leaf_dots[path], dots, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(stats.dots, sum(expected.values()), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(state.opt_state[0].last_dots, stats.dots, rtol=1e-6)
    np.testing.assert_allclose(
        centres_of(state)["fc1/kernel"][0],
        0.25 * hold_centres(model).init(None).directions["fc1/kernel"][0],
    )


# ----------------------------------------------------------------------------- sharding, jit


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_batch_equals_one_device(axis_type):
    assert jax.device_count() == 8
    model = MODELS["layernorm"]()
    tx = optax.chain(hold_centres(model), make_tx())
    graphdef, state = create_train_state(model, tx)
    batch = weighted(make_batch(7), seed=7)
    hparams = {"scale": 1.0}
    one = make_train_step(
        graphdef,
        per_example_mse,
        tx,
        donate=False,
        per_example_stats=True,
        directions_fn=centres_of,
    )
    expected = one(state, batch, hparams)

    if axis_type == AxisType.Auto:
        mesh = make_mesh()
    else:  # shardings are part of the arrays' types
        mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    sharded_step = make_train_step(
        graphdef,
        per_example_mse,
        tx,
        state_sharding=replicated_sharding(mesh),
        batch_sharding=data_sharding(mesh),
        per_example_stats=True,
        directions_fn=centres_of,
        chunk_size=8,
    )
    new_state, metrics, stats = sharded_step(
        replicate(state, mesh), shard_batch(batch, mesh), hparams
    )
    assert new_state.params["fc1"]["kernel"][...].sharding.is_fully_replicated
    assert metrics["loss"].sharding.is_fully_replicated
    tree_close((new_state, metrics, stats), expected, rtol=1e-5)


def test_new_values_do_not_recompile_and_donation_still_works():
    traces = []

    def counting_loss(model, batch, hparams):
        traces.append(1)
        return per_example_mse(model, batch, hparams)

    model = MODELS["mlp"]()
    tx = optax.chain(hold_centres(model), optax.adam(1e-2))
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(
        graphdef, counting_loss, tx, per_example_stats=True, directions_fn=centres_of
    )
    for i, scale in enumerate([1.0, 0.0, 3.0]):
        leaves = jax.tree.leaves(state.params)
        state, metrics, stats = step(state, weighted(make_batch(i), seed=i), {"scale": scale})
        assert all(x.is_deleted() for x in leaves)  # the input state was donated
        if scale == 0.0:
            assert float(metrics["loss"]) == 0.0  # hparams are read at run time
    count = len(traces)
    state, _, _ = step(state, weighted(make_batch(3), seed=3), {"scale": 0.5})
    assert len(traces) == count
    assert step.jitted._cache_size() == 1
    assert int(state.step) == 4


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    model = MODELS["mlp"]()
    tx = optax.chain(hold_centres(model), optax.sgd(0.1))
    graphdef, state = create_train_state(model, tx)
    batch, hparams = make_batch(0), {"scale": 1.0}

    def scalar_loss(model, batch, hparams):
        return jnp.mean(per_example_mse(model, batch, hparams)[0]), {}

    step = make_train_step(graphdef, scalar_loss, tx, per_example_stats=True)
    with pytest.raises(ValueError, match=r"per_example_stats=True.*\(B,\) vector.*got shape \(\)"):
        step(state, batch, hparams)

    def wrong_shapes(state):
        v, u = centres_of(state)["fc2/kernel"]
        return {"fc2/kernel": (v.T, u)}

    step = make_train_step(
        graphdef, per_example_mse, tx, per_example_stats=True, directions_fn=wrong_shapes
    )
    with pytest.raises(
        ValueError,
        match=r"`directions_fn\(state\)` returned unusable directions: "
        r"`directions\['fc2/kernel'\]` factors of shapes",
    ):
        step(state, batch, hparams)
    step = make_train_step(
        graphdef, per_example_mse, tx, per_example_stats=True, directions_fn=lambda s: {"fc9": 1}
    )
    with pytest.raises(ValueError, match=r"`directions_fn\(state\)`.*'fc9', which is not a param"):
        step(state, batch, hparams)

    step = make_train_step(graphdef, per_example_mse, tx, per_example_stats=True)
    bad_weights = {**batch, "weights": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match=r"batch\['weights'\]. must hold one weight"):
        step(state, bad_weights, hparams)
    with pytest.raises(TypeError, match="`directions_fn` must be callable"):
        make_train_step(graphdef, per_example_mse, tx, per_example_stats=True, directions_fn=1)
    with pytest.raises(ValueError, match="pass `per_example_stats=True`"):
        make_train_step(graphdef, per_example_mse, tx, directions_fn=centres_of)
    with pytest.raises(TypeError, match="`per_example_stats` must be a bool"):
        make_train_step(graphdef, per_example_mse, tx, per_example_stats="yes")

    bn_tx = optax.sgd(0.1)
    bn_graphdef, bn_state = create_train_state(MLP(nnx.Rngs(0), batch_norm=True), bn_tx)
    step = make_train_step(bn_graphdef, per_example_mse, bn_tx, per_example_stats=True)
    with pytest.raises(ValueError, match="BatchNorm 'bn' in training mode"):
        step(bn_state, batch, hparams)
