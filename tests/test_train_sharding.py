"""Tests for jaxeff.train.sharding on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_models import MLP, make_batch, mse_loss
from flax import nnx
from jax.sharding import PartitionSpec

from jaxeff.train import (
    create_train_state,
    data_sharding,
    make_mesh,
    make_train_step,
    replicate,
    replicated_sharding,
    shard_batch,
)


def test_make_mesh_spans_all_devices():
    assert jax.device_count() == 8, "tests/conftest.py should give 8 CPU devices"
    mesh = make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.shape["data"] == 8
    mesh2 = make_mesh("batch", devices=jax.devices()[:2])
    assert dict(mesh2.shape) == {"batch": 2}
    with pytest.raises(ValueError, match="axis_name"):
        make_mesh("")


def test_shard_batch_places_rows_on_devices():
    mesh = make_mesh()
    batch = make_batch(0, n=16)
    sharded = shard_batch(batch, mesh)
    assert sharded["x"].shape == (16, 3)
    assert sharded["x"].sharding.spec == PartitionSpec("data")
    assert len(sharded["x"].addressable_shards) == 8
    for shard in sharded["x"].addressable_shards:
        assert shard.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), batch["x"][shard.index])
    np.testing.assert_array_equal(np.asarray(sharded["y"]), batch["y"])


def test_shard_batch_rejects_indivisible_batch_and_scalars():
    mesh = make_mesh()
    with pytest.raises(ValueError, match=r"batch\['x'\].*12.*not divisible by the 8 devices"):
        shard_batch(make_batch(0, n=12), mesh)
    with pytest.raises(ValueError, match="scalar"):
        shard_batch({"x": np.zeros((8, 3)), "n": np.float32(1.0)}, mesh)
    with pytest.raises(ValueError, match="axis_name"):
        shard_batch(make_batch(0), mesh, axis_name="model")
    with pytest.raises(TypeError, match="mesh"):
        shard_batch(make_batch(0), "mesh")


def test_replicate_puts_full_copy_everywhere():
    mesh = make_mesh()
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}
    out = replicate(tree, mesh)
    for leaf, ref in [(out["a"], tree["a"]), (out["b"], np.ones(4))]:
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), ref)


def test_sharded_step_matches_single_device():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)

    single = make_train_step(graphdef, mse_loss, tx, donate=False)
    mesh = make_mesh()
    sharded = make_train_step(
        graphdef,
        mse_loss,
        tx,
        state_sharding=replicated_sharding(mesh),
        batch_sharding=data_sharding(mesh),
    )

    state_1 = jax.device_put(state, jax.devices()[0])
    state_8 = replicate(state, mesh)
    for i in range(3):
        hp = {"weight": 1.0 + i}
        batch = make_batch(i)
        state_1, m1 = single(state_1, batch, hp)
        state_8, m8 = sharded(state_8, shard_batch(batch, mesh), hp)
        for key in ("loss", "grad_norm", "param_norm", "update_norm", "mse"):
            np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)
        assert m8["loss"].sharding.is_fully_replicated

    for a, b in zip(jax.tree.leaves(state_8), jax.tree.leaves(state_1), strict=True):
        assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert int(state_8.step) == 3


def test_state_sharding_must_be_named():
    tx = optax.sgd(0.1)
    graphdef, _ = create_train_state(MLP(nnx.Rngs(0)), tx)
    with pytest.raises(TypeError, match="state_sharding"):
        make_train_step(graphdef, mse_loss, tx, state_sharding="replicated")
