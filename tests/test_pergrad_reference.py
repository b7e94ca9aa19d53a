"""Tests for jaxeff.pergrad.per_example_grads (vmap(grad) in chunks) against a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff.pergrad import per_example_grads


def example_loss(params, example):
    pred = jnp.tanh(example["x"] @ params["w"]) @ params["v"]
    return jnp.sum((pred - example["y"]) ** 2)


def make_problem(size, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.normal(size=(4, 6)).astype(np.float32),
        "v": rng.normal(size=(6, 2)).astype(np.float32),
    }
    batch = {
        "x": rng.normal(size=(size, 4)).astype(np.float32),
        "y": rng.normal(size=(size, 2)).astype(np.float32),
    }
    return params, batch


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def loop_grads(loss_fn, params, batch):
    size = jax.tree.leaves(batch)[0].shape[0]
    grads = [
        jax.grad(loss_fn)(params, jax.tree.map(lambda x, i=i: x[i], batch)) for i in range(size)
    ]
    return jax.tree.map(lambda *g: np.stack(g), *grads)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 10])
def test_matches_loop_for_any_chunk_size(chunk_size):
    params, batch = make_problem(7)
    actual = per_example_grads(example_loss, params, batch, chunk_size=chunk_size)
    expected = loop_grads(example_loss, params, batch)
    jax.tree.map(assert_close, actual, expected)


def test_nnx_params_and_batch_of_one():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = {"x": np.ones((1, 3), np.float32)}

    def loss_fn(params, example):
        return jnp.sum(nnx.merge(graphdef, params)(example["x"]) ** 2)

    grads = per_example_grads(loss_fn, params, batch)
    assert grads["kernel"].get_value().shape == (1, 3, 2)
    expected = loop_grads(loss_fn, params, batch)
    np.testing.assert_allclose(grads["bias"].get_value(), expected["bias"].get_value(), rtol=1e-6)


def test_jits_and_does_not_recompile():
    traces = []

    def counting_loss(params, example):
        traces.append(1)
        return example_loss(params, example)

    fn = jax.jit(per_example_grads, static_argnums=0, static_argnames="chunk_size")
    params, batch = make_problem(8)
    fn(counting_loss, params, batch, chunk_size=4)
    count = len(traces)
    params2, batch2 = make_problem(8, seed=1)
    out = fn(counting_loss, params2, batch2, chunk_size=4)
    assert len(traces) == count
    expected = loop_grads(example_loss, params2, batch2)
    jax.tree.map(assert_close, out, expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_sharded_batch_equals_unsharded(axis_type, chunk_size):
    params, batch = make_problem(32)
    expected = per_example_grads(example_loss, params, batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        actual = jax.jit(per_example_grads, static_argnums=0, static_argnames="chunk_size")(
            example_loss, params, sharded, chunk_size=chunk_size
        )
    jax.tree.map(assert_close, actual, expected)


def test_bad_inputs_name_the_argument():
    params, batch = make_problem(4)
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar loss for one example"):
        per_example_grads(lambda p, e: e["x"] @ p["w"], params, batch)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        per_example_grads(example_loss, params, batch, chunk_size=-1)
    with pytest.raises(ValueError, match="`batch` leaves must share the leading axis"):
        per_example_grads(example_loss, params, {"x": batch["x"], "y": batch["y"][:2]})
    with pytest.raises(ValueError, match="`batch` leaves must have a leading example axis"):
        per_example_grads(example_loss, params, {"x": batch["x"], "y": np.float32(1)})
