"""Tests for jaxeff.train.sharding on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_models import MLP, make_batch, mse_loss
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from jaxeff.train import (
    create_train_state,
    data_sharding,
    make_mesh,
    make_train_step,
    replicate,
    replicated_sharding,
    shard_batch,
)
from jaxeff.train.sharding import local_rows, with_auto_axes


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


# ----------------------------------------------------------------------------------------
# Meshes with explicit axes (jax.make_mesh's default).
# ----------------------------------------------------------------------------------------
def test_make_mesh_axis_types():
    assert make_mesh().axis_types == (AxisType.Auto,)
    explicit = make_mesh(axis_type="explicit")
    assert explicit.axis_types == (AxisType.Explicit,) and explicit.shape["data"] == 8
    with pytest.raises(ValueError, match="axis_type"):
        make_mesh(axis_type="manual")


def test_shard_batch_replicate_and_local_rows_on_an_explicit_mesh():
    mesh = make_mesh(axis_type="explicit")
    batch = make_batch(0, n=16)
    sharded = shard_batch(batch, mesh)
    assert jax.typeof(sharded["x"]).sharding.spec == PartitionSpec("data", None)
    state = replicate({"w": np.ones((3, 2), np.float32)}, mesh)
    assert jax.typeof(state["w"]).sharding.spec == PartitionSpec(None, None)
    # local_rows undoes shard_batch, here and after a computation on the rows.
    np.testing.assert_array_equal(local_rows(sharded["x"]), batch["x"])
    doubled = jax.jit(lambda x: 2 * x)(sharded["x"])
    np.testing.assert_array_equal(local_rows(doubled), 2 * batch["x"])
    with pytest.raises(ValueError, match="leading batch axis"):
        local_rows(jnp.float32(1.0))


def test_with_auto_axes_runs_an_embedding_lookup_on_explicit_axes():
    # nnx.Embed's gather has no rule for ids sharded over an explicit axis.
    embed = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(embed)
    lookup = lambda params, ids: nnx.merge(graphdef, params)(ids)
    ids = np.arange(16, dtype=np.int32).reshape(8, 2) % 10
    mesh = make_mesh(axis_type="explicit")
    sharded = shard_batch({"ids": ids}, mesh)["ids"]
    with pytest.raises(Exception, match="out_sharding"):
        jax.jit(lookup)(replicate(params, mesh), sharded)
    out = jax.jit(with_auto_axes(lookup))(replicate(params, mesh), sharded)
    assert jax.typeof(out).sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lookup(params, ids)))
    np.testing.assert_array_equal(with_auto_axes(lookup)(params, ids), lookup(params, ids))


def test_vsepp_step_equal_on_auto_and_explicit_meshes():
    from experiments.vsepp import train
    from experiments.vsepp.configs import shapes

    config = shapes.get_config()
    config.model.cnn_features, config.model.word_dim, config.model.embed_size = (8,), 8, 16
    config.model.image_size = 8
    tx, _ = train.make_optimizer(config, num_steps=10, steps_per_epoch=5)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.random((16, 8, 8, 3), dtype=np.float32),
        "tokens": rng.integers(4, 30, (16, 6)).astype(np.int32),
        "lengths": rng.integers(2, 7, (16,)).astype(np.int32),
        "image_id": np.repeat(np.arange(8), 2).astype(np.int32),  # two captions per image
    }
    runs = {}
    for axis_type in ("auto", "explicit"):
        mesh = make_mesh(axis_type=axis_type)
        graphdef, state = create_train_state(train.build_model(config, 30, 0), tx)
        step = train.make_step(graphdef, config, tx, mesh)  # donates the state it is given
        s, losses = replicate(state, mesh), []
        for weight in (0.0, 1.0):  # SH, then MH: the hard negatives cross devices
            s, metrics = step(s, shard_batch(batch, mesh), {"hard_weight": np.float32(weight)})
            losses.append(float(metrics["loss"]))
        runs[axis_type] = (losses, s)
    np.testing.assert_allclose(runs["explicit"][0], runs["auto"][0], rtol=1e-6)
    explicit, auto = jax.tree.leaves(runs["explicit"][1]), jax.tree.leaves(runs["auto"][1])
    for a, b in zip(explicit, auto, strict=True):
        assert len(a.sharding.device_set) == 8 and a.sharding.is_fully_replicated
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
