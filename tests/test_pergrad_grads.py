"""The nnx form's value_grad_and_stats (jaxeff.pergrad.stats) against jax.grad of the
weighted loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_pergrad import (
    DIRECTION_LAYERS,
    EXPECTED_VMAP,
    MODELS,
    close,
    make_batch,
    random_directions,
    regression_loss,
)

from jaxeff.pergrad import VMAP, check_directions, rules
from jaxeff.pergrad.stats import per_example_stats, value_grad_and_stats


def random_weights(size, seed=0):
    """Non-uniform positive weights with one exact zero."""
    weights = np.random.default_rng(seed).uniform(0.1, 2.0, size=size).astype(np.float32)
    weights[size // 2] = 0.0
    return weights


def weighted_reference(model, loss_fn, batch, weights):
    """``Σ_i w_i ℓ_i`` (mean without weights) and its ``jax.grad`` w.r.t. the parameters."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        losses = loss_fn(nnx.merge(graphdef, p, rest), batch)
        return jnp.mean(losses) if weights is None else jnp.sum(weights * losses)

    return jax.value_and_grad(loss)(params)


def assert_grads_close(actual, expected, rtol=2e-5):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), (_, e) in zip(
        nnx.to_flat_state(actual), nnx.to_flat_state(expected), strict=True
    ):
        assert a.get_value().dtype == e.get_value().dtype, path
        close(a.get_value(), e.get_value(), rtol=rtol)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("weighted", [True, False])
def test_gradient_equals_jax_grad_of_the_weighted_loss(kind, weighted):
    model = MODELS[kind]()
    batch = make_batch(kind, 7, seed=2)
    weights = random_weights(7) if weighted else None
    directions = random_directions(model, DIRECTION_LAYERS[kind], batch, seed=1)
    loss, grads, stats = value_grad_and_stats(
        model, regression_loss, batch, weights=weights, directions=directions
    )
    ref_loss, ref_grads = weighted_reference(model, regression_loss, batch, weights)
    close(loss, ref_loss, rtol=1e-6)
    assert_grads_close(grads, ref_grads)
    # The statistics are those of the unweighted per-example gradients.
    expected = per_example_stats(model, regression_loss, batch, directions=directions)
    assert stats.paths == expected.paths and stats.reasons == expected.reasons
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-6), stats, expected)
    assert {p for p, how in stats.paths.items() if how == VMAP} == EXPECTED_VMAP[kind]


def test_zero_weight_examples_keep_their_statistics():
    model = MODELS["mlp"]()
    batch = make_batch("mlp", 6, seed=4)
    weights = np.zeros(6, np.float32)
    weights[0] = 1.0
    loss, grads, stats = value_grad_and_stats(model, regression_loss, batch, weights=weights)
    first = jax.tree.map(lambda x: x[:1], batch)
    ref_loss, ref_grads = weighted_reference(model, regression_loss, first, jnp.ones(1))
    close(loss, ref_loss)
    assert_grads_close(grads, ref_grads)
    assert np.all(np.asarray(stats.total_sq_norms) > 0)  # every example, weighted or not


def test_unused_parameters_get_zero_gradients():
    class PartlyUsed(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 3, rngs=rngs)
            self.unused_linear = nnx.Linear(5, 3, rngs=rngs)
            self.unused_embed = nnx.Embed(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc(x)

    model = PartlyUsed(nnx.Rngs(0))
    batch = make_batch("mlp", 5)
    weights = random_weights(5)
    _, grads, stats = value_grad_and_stats(model, regression_loss, batch, weights=weights)
    _, ref_grads = weighted_reference(model, regression_loss, batch, weights)
    assert_grads_close(grads, ref_grads)
    for var in jax.tree.leaves(grads["unused_linear"]) + jax.tree.leaves(grads["unused_embed"]):
        np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(stats.sq_norms["unused_embed"]["embedding"][...], 0.0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_has_aux_returns_the_loss_aux(chunk_size):
    model = MODELS["embed"]()
    batch = make_batch("embed", 7, seed=6)
    weights = random_weights(7, seed=3)

    def loss_with_aux(model, batch):
        out = model(batch["x"])
        losses = jnp.sum((out - batch["y"]) ** 2, axis=-1)
        return losses, {"spread": jnp.std(out), "first": out[0]}

    (loss, aux), grads, stats = value_grad_and_stats(
        model, loss_with_aux, batch, weights=weights, has_aux=True, chunk_size=chunk_size
    )
    out = model(batch["x"])
    close(aux["spread"], jnp.std(out), rtol=1e-5)
    close(aux["first"], out[0], rtol=1e-5)
    ref_loss, ref_grads = weighted_reference(model, regression_loss, batch, weights)
    close(loss, ref_loss, rtol=1e-6)
    assert_grads_close(grads, ref_grads)
    close(stats.losses, regression_loss(model, batch), rtol=1e-5)


def test_dropout_uses_one_mask_and_advances_the_rng_like_nnx_grad():
    class DropoutMLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(5, 32, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.fc2 = nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, x):
            return self.fc2(self.drop(jax.nn.relu(self.fc1(x))))

    model = DropoutMLP(nnx.Rngs(0, dropout=7))
    twin = nnx.clone(model)
    batch = make_batch("mlp", 6, seed=8)
    weights = random_weights(6, seed=5)
    _, grads, _ = value_grad_and_stats(model, regression_loss, batch, weights=weights)

    def weighted(m):
        return jnp.sum(weights * regression_loss(m, batch))

    ref_grads = nnx.grad(weighted)(twin)  # advances twin's RNG counter as the pass does
    assert_grads_close(grads, ref_grads)
    for kind in (nnx.Param, nnx.RngCount):
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model, kind), nnx.state(twin, kind))
    assert int(model.drop.rngs.count[...]) == 1


def test_inside_jit_and_without_recompiling():
    traces = []

    def counting_loss(model, batch):
        traces.append(1)
        return regression_loss(model, batch)

    model = MODELS["cnn"]()
    graphdef, state = nnx.split(model)
    directions = random_directions(model, ["c1", "fc"], make_batch("cnn", 4))

    @jax.jit
    def fn(state, batch, weights, directions):
        return value_grad_and_stats(
            nnx.merge(graphdef, state), counting_loss, batch, weights=weights, directions=directions
        )

    for seed in range(3):
        batch = make_batch("cnn", 4, seed=seed)
        weights = random_weights(4, seed=seed)
        loss, grads, stats = fn(state, batch, weights, directions)
        ref_loss, ref_grads = weighted_reference(model, regression_loss, batch, weights)
        close(loss, ref_loss, rtol=1e-6)
        assert_grads_close(grads, ref_grads)
    assert fn._cache_size() == 1
    value_grad_and_stats(model, counting_loss, batch, weights=weights)
    count = len(traces)
    other = MODELS["cnn"]()  # same structure, new values
    value_grad_and_stats(other, counting_loss, make_batch("cnn", 4, seed=9), weights=weights * 2)
    assert len(traces) == count


@pytest.mark.parametrize(
    ("kind", "axis_type"),
    [
        ("mlp", AxisType.Auto),
        ("mlp", AxisType.Explicit),
        ("cnn", AxisType.Explicit),
        ("sequence", AxisType.Explicit),
        ("embed", AxisType.Auto),  # nnx.Embed's gather needs an out_sharding on explicit axes
    ],
)
def test_sharded_batch_equals_unsharded(kind, axis_type):
    model = MODELS[kind]()
    batch = make_batch(kind, 16, seed=4)
    weights = random_weights(16, seed=2)
    directions = random_directions(model, DIRECTION_LAYERS[kind], batch)
    expected = value_grad_and_stats(
        model, regression_loss, batch, weights=weights, directions=directions
    )
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    sharded, sharded_weights = jax.device_put((batch, weights), sharding)
    with jax.set_mesh(mesh):
        actual = value_grad_and_stats(
            model,
            regression_loss,
            sharded,
            weights=sharded_weights,
            directions=directions,
            chunk_size=8,
        )
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)


@pytest.mark.parametrize("kind", ["sequence", "cnn"])
@pytest.mark.parametrize("weighted", [True, False])
def test_gradient_from_outer_products_in_chunks(monkeypatch, kind, weighted):
    monkeypatch.setattr(rules, "OUTER_CHUNK_ENTRIES", 600)  # a few examples per chunk
    model = MODELS[kind]()
    batch = make_batch(kind, 8, seed=9)
    weights = random_weights(8, seed=4) if weighted else None
    loss_fn = lambda m, b: regression_loss(m, b)  # a new function: traced anew
    loss, grads, _ = value_grad_and_stats(model, loss_fn, batch, weights=weights)
    ref_loss, ref_grads = weighted_reference(model, regression_loss, batch, weights)
    close(loss, ref_loss, rtol=1e-6)
    assert_grads_close(grads, ref_grads)


def test_gradient_from_outer_products_on_explicitly_sharded_batch(monkeypatch):
    model = MODELS["sequence"]()
    batch = make_batch("sequence", 32, seed=4)
    weights = random_weights(32, seed=6)
    expected = value_grad_and_stats(model, regression_loss, batch, weights=weights)
    monkeypatch.setattr(rules, "OUTER_CHUNK_ENTRIES", 8 * 16 * 16)  # 4 chunks of 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    sharded, sharded_weights = jax.device_put((batch, weights), NamedSharding(mesh, P("data")))
    loss_fn = lambda m, b: regression_loss(m, b)
    with jax.set_mesh(mesh):
        actual = value_grad_and_stats(model, loss_fn, sharded, weights=sharded_weights)
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)


def test_check_directions_by_parameter_path():
    model = MODELS["shared"]()
    params = nnx.state(model, nnx.Param)
    directions = random_directions(model, ["shared", ("out",)], make_batch("shared", 2), k=2)
    checked = check_directions(params, directions)
    assert set(checked) == {"alias/kernel", "alias/bias", "out/kernel", "out/bias"}
    assert check_directions(params, None) == {}
    with pytest.raises(ValueError, match="`directions` names 'nope', which is not a param"):
        check_directions(params, {"nope": directions["out/bias"]})


def test_bad_weights_and_aux_raise_clear_errors():
    model, batch = MODELS["mlp"](), make_batch("mlp", 4)
    with pytest.raises(ValueError, match=r"`weights` must hold one weight per example.*\(4,\)"):
        value_grad_and_stats(model, regression_loss, batch, weights=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="`weights` must be floating point"):
        value_grad_and_stats(model, regression_loss, batch, weights=np.ones(4, np.int32))
    with pytest.raises(TypeError, match="`has_aux=True`, `loss_fn` must return a pair"):
        value_grad_and_stats(model, regression_loss, batch, has_aux=True)
    with pytest.raises(TypeError, match="`has_aux` must be a bool"):
        value_grad_and_stats(model, regression_loss, batch, has_aux=1)
    with pytest.raises(ValueError, match="`loss_fn` must return one loss per example"):
        value_grad_and_stats(model, lambda m, b: jnp.mean(regression_loss(m, b)), batch)
