"""The per-example engine against brute force (one ``jax.grad`` per example) on every framework."""

import _engine_models as models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxeff.pergrad import engine
from jaxeff.pergrad.tracing import CouplingError


def close(actual, expected, rtol=2e-4, scale=None):
    """Equal to float32 tolerance; ``scale`` (default: the largest expected entry) sets the
    absolute floor, so a leaf whose gradient is zero up to rounding is judged on the scale
    of the whole model."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-7)


def random_directions(shapes, k=3, seed=0):
    keys = iter(jax.random.split(jax.random.key(seed), 4 * len(shapes) + 1))
    return {
        path: tuple(jax.random.normal(next(keys), (k, *s)) for s in split)
        for path, split in shapes.items()
    }


def dense(factors):
    out = factors[0]
    for f in factors[1:]:
        out = (out.reshape(out.shape[0], -1, 1) * f.reshape(f.shape[0], 1, -1)).reshape(
            out.shape[0], *out.shape[1:], *f.shape[1:]
        )
    return out


def dot(grads, direction):
    """``<g_i, D_k>``: ``(K, B)``."""
    direction = np.asarray(direction)
    return direction.reshape(direction.shape[0], -1) @ grads.reshape(grads.shape[0], -1).T


def check(loss_fn, params, batch, *, all_fast=True, with_dots=True):
    size = jax.tree.leaves(batch)[0].shape[0]
    grads = models.brute_force(loss_fn, params, batch)
    paths = engine.param_paths(params)
    flat_grads = dict(zip(paths, jax.tree.leaves(grads), strict=True))
    directions = None
    if with_dots:
        directions = random_directions(engine.direction_shapes(loss_fn, params, batch))
    stats = engine.per_example_stats(loss_fn, params, batch, directions=directions)
    if all_fast:
        assert set(stats.paths.values()) == {engine.FAST}, dict(stats.reasons)
    close(stats.losses, loss_fn(params, batch))
    norms = {p: np.sum(flat_grads[p].reshape(size, -1) ** 2, axis=1) for p in paths}
    sums = {p: np.sum(flat_grads[p] ** 2, axis=0) for p in paths}
    total = sum(norms.values())
    close(stats.total_sq_norms, total)
    norm_scale = max(float(np.max(x)) for x in norms.values())
    sum_scale = max(float(np.max(x)) for x in sums.values())
    for path, n, s in zip(
        paths, jax.tree.leaves(stats.sq_norms), jax.tree.leaves(stats.sum_sq), strict=True
    ):
        close(n, norms[path], scale=norm_scale)
        close(s, sums[path], scale=sum_scale)
    if with_dots:
        leaf_dots = {p: dot(flat_grads[p], dense(f)) for p, f in directions.items()}
        dot_scale = max(float(np.max(np.abs(x))) for x in leaf_dots.values())
        close(stats.dots, sum(leaf_dots.values()), scale=dot_scale)
        for p in directions:
            close(stats.leaf_dots[p], leaf_dots[p], scale=dot_scale)
    weights = jax.random.uniform(jax.random.key(3), (size,)).at[0].set(0.0)
    loss, wgrads, stats2 = engine.value_grad_and_stats(loss_fn, params, batch, weights=weights)
    expected_loss, expected_grads = jax.value_and_grad(
        lambda p: jnp.sum(weights * loss_fn(p, batch))
    )(params)
    close(loss, expected_loss)
    grad_scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(expected_grads))
    for a, b in zip(jax.tree.leaves(wgrads), jax.tree.leaves(expected_grads), strict=True):
        assert a.dtype == b.dtype
        close(a, b, scale=grad_scale)
    close(stats2.total_sq_norms, stats.total_sq_norms)
    return stats


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_matches_brute_force(name):
    loss_fn, params, make = models.MODELS[name]()
    check(loss_fn, params, make(7, seed=7))


@pytest.mark.parametrize(
    "name", ["plain_mlp_weight_decay", "linen_transformer_tied", "equinox_gru_scan"]
)
def test_one_example(name):
    """``B = 1`` cannot be told from a broadcast in one trace; the engine pads it to two."""
    loss_fn, params, make = models.MODELS[name]()
    check(loss_fn, params, make(1, seed=1))


@pytest.mark.parametrize("name", ["linen_transformer_tied", "linen_cnn"])
def test_matches_brute_force_at_64(name):
    loss_fn, params, make = models.MODELS[name]()
    check(loss_fn, params, make(64, seed=64), with_dots=False)


def test_rules_taken():
    """The structured forms, not the explicit fallback, serve the matrix uses."""
    loss_fn, params, make = models.linen_transformer()
    stats = engine.per_example_stats(loss_fn, params, make(3))
    assert stats.reasons["Embed_0/embedding"] == "fast: outer"  # lookup and tied head, one layout
    assert stats.reasons["Dense_0/kernel"] == "fast: outer"
    assert stats.reasons["LayerNorm_0/scale"] == "fast: dense"
    loss_fn, params, make = models.linen_cnn()
    stats = engine.per_example_stats(loss_fn, params, make(3))
    assert stats.reasons["Conv_0/kernel"] == "fast: outer"  # unfolded patches
    assert stats.reasons["Conv_1/kernel"] == "fast: dense"  # two feature groups
    loss_fn, params, make = models.plain_mlp()
    stats = engine.per_example_stats(loss_fn, params, make(3))
    assert stats.reasons["hidden/w"] == "fast: basis, outer"  # weight decay inside the loss


def test_direction_shapes_follow_the_matrix_layout():
    loss_fn, params, make = models.nnx_bits()
    shapes = engine.direction_shapes(loss_fn, params, make(2))
    assert shapes["proj/kernel"] == ((8,), (2, 3))  # LinearGeneral: contracting | free
    assert shapes["mix/kernel"] == ((2, 3), (8,))  # Einsum "bthk,hkd->btd"
    assert shapes["embed/embedding"] == ((9,), (8,))
    assert shapes["head/bias"] == ((3,),)


def test_dense_and_misaligned_directions():
    loss_fn, params, make = models.nnx_bits()
    batch = make(5)
    grads = models.brute_force(loss_fn, params, batch)
    flat = dict(zip(engine.param_paths(params), jax.tree.leaves(grads), strict=True))
    keys = jax.random.split(jax.random.key(0), 3)
    directions = {
        "proj/kernel": jax.random.normal(keys[0], (2, 8, 2, 3)),  # one dense factor
        "mix/kernel": (jax.random.normal(keys[1], (2, 2)), jax.random.normal(keys[2], (2, 3, 8))),
    }
    stats = engine.per_example_stats(loss_fn, params, batch, directions=directions)
    for p, f in directions.items():
        f = f if isinstance(f, tuple) else (f,)
        close(stats.leaf_dots[p], dot(flat[p], dense(f)))


def test_factors_are_the_per_example_gradients():
    """A one-factor leaf's factor is its per-example gradient; a Dense kernel on ``(B, d)``
    inputs has ``ā_i ⊗ s_i = g_i``; a kernel over positions has ``s_i`` summed and ``ā_i``
    averaged over them; a grouped convolution's kernel has none."""
    for name, size in (("linen_mlp", 5), ("equinox_mlp", 1)):
        loss_fn, params, make = models.MODELS[name]()
        batch = make(size)
        shapes = engine.direction_shapes(loss_fn, params, batch)
        zeros = {p: tuple(jnp.zeros((1, *s)) for s in split) for p, split in shapes.items()}
        stats = engine.per_example_stats(loss_fn, params, batch, directions=zeros)
        grads = models.brute_force(loss_fn, params, batch)
        flat = dict(zip(engine.param_paths(params), jax.tree.leaves(grads), strict=True))
        assert set(stats.factors) == set(flat)
        for path, g in flat.items():
            factors = stats.factors[path]
            outer = dense(factors) if len(factors) == 2 else factors[0]
            close(outer.reshape(g.shape), g)
    loss_fn, params, make = models.linen_cnn()
    batch = make(3)
    shapes = engine.direction_shapes(loss_fn, params, batch)
    zeros = {p: tuple(jnp.zeros((1, *s)) for s in split) for p, split in shapes.items()}
    stats = engine.per_example_stats(loss_fn, params, batch, directions=zeros)
    assert "Conv_1/kernel" not in stats.factors  # two feature groups: no single outer product
    grads = models.brute_force(loss_fn, params, batch)
    flat = dict(zip(engine.param_paths(params), jax.tree.leaves(grads), strict=True))
    close(stats.factors["Conv_1/bias"][0], flat["Conv_1/bias"])
    a, s = stats.factors["Conv_0/kernel"]
    assert a.shape[1:] == shapes["Conv_0/kernel"][0]  # (kh, kw, c_in), as the directions
    close(jnp.sum(s, axis=0), jnp.sum(flat["Conv_0/bias"], axis=0))  # Σ_t δ is the bias grad


def test_unsupported_use_sends_only_that_leaf_to_vmap():
    keys = jax.random.split(jax.random.key(0), 2)
    params = {"w": jax.random.normal(keys[0], (4, 3)), "gain": jnp.array(0.7)}

    def loss_fn(params, batch):
        h = batch["x"] @ params["w"]
        gain = params["gain"]
        h = jax.lax.cond(gain > 0, lambda h: jnp.tanh(h * gain), lambda h: h, h)
        return jnp.sum(h**2, axis=1)

    batch = {"x": jax.random.normal(keys[1], (6, 4))}
    stats = check(loss_fn, params, batch, all_fast=False, with_dots=False)
    assert stats.paths == {"w": engine.FAST, "gain": engine.VMAP}
    assert "`cond`" in stats.reasons["gain"]


def test_vmap_leaves_option():
    loss_fn, params, make = models.linen_mlp()
    stats = check(loss_fn, params, make(4), all_fast=False, with_dots=False)
    assert set(stats.paths.values()) == {engine.FAST}
    forced = engine.per_example_stats(loss_fn, params, make(4), vmap_leaves=("Dense_0/kernel",))
    assert forced.paths["Dense_0/kernel"] == engine.VMAP
    close(forced.total_sq_norms, stats.total_sq_norms)


def _coupled_losses():
    w = jnp.ones((3, 3))

    def mean_centred(p, b):
        losses = jnp.sum((b["x"] @ p) ** 2, axis=1)
        return losses - jnp.mean(losses)

    def contrastive(p, b):
        e = b["x"] @ p
        logits = e @ e.T
        return models.ce(logits, jnp.arange(e.shape[0]))

    def cumulative(p, b):
        return jnp.cumsum(jnp.sum(b["x"] @ p, axis=1))

    def reversed_batch(p, b):
        return jnp.sum((b["x"] @ p) * b["x"][::-1], axis=1)

    def rolled(p, b):
        return jnp.sum(jnp.roll(b["x"] @ p, 1, axis=0), axis=1)

    def sorted_batch(p, b):
        return jnp.sort(jnp.sum(b["x"] @ p, axis=1))

    class BN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))

    bn = BN()
    variables = bn.init(jax.random.key(0), jnp.ones((2, 3)))

    def batchnorm(p, b):
        out, _ = bn.apply(
            {"params": p, "batch_stats": variables["batch_stats"]}, b["x"], mutable=["batch_stats"]
        )
        return jnp.sum(out**2, axis=1)

    return [
        (mean_centred, w, "reduce_sum"),
        (contrastive, w, "dot_general"),
        (cumulative, w, "cumsum"),
        (reversed_batch, w, "rev"),
        (rolled, w, "slice"),
        (sorted_batch, w, "sort"),
        (batchnorm, variables["params"], "reduce_sum` at .*flax/linen/normalization.py"),
    ]


@pytest.mark.parametrize("case", _coupled_losses(), ids=lambda c: c[0].__name__)
def test_loss_that_couples_examples_is_refused(case):
    loss_fn, params, primitive = case
    batch = {"x": jax.random.normal(jax.random.key(1), (5, 3))}
    where = "" if " at " in primitive else "` at .*test_pergrad_engine.py"
    with pytest.raises(CouplingError, match=f"`{primitive}{where}"):
        engine.per_example_stats(loss_fn, params, batch)


def test_non_finite_weights_are_named():
    loss_fn, params, make = models.linen_mlp()
    batch = make(4)
    with pytest.raises(ValueError, match="`weights` must be finite; entries \\[2\\]"):
        engine.value_grad_and_stats(
            loss_fn, params, batch, weights=jnp.array([1.0, 1.0, jnp.nan, 1.0])
        )
    with pytest.raises(ValueError, match="`weights` must hold one weight per example"):
        engine.value_grad_and_stats(loss_fn, params, batch, weights=jnp.ones(3))


def test_bad_arguments_are_named():
    loss_fn, params, make = models.linen_mlp()
    batch = make(4)
    with pytest.raises(ValueError, match="`directions` names 'nope'"):
        engine.per_example_stats(loss_fn, params, batch, directions={"nope": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="do not split the leaf's shape"):
        engine.per_example_stats(
            loss_fn, params, batch, directions={"Dense_0/kernel": jnp.ones((2, 3))}
        )
    with pytest.raises(ValueError, match="per-example losses of shape \\(4,\\)"):
        engine.per_example_stats(lambda p, b: jnp.sum(loss_fn(p, b)), params, batch)
    with pytest.raises(ValueError, match="`vmap_leaves` names"):
        engine.per_example_stats(loss_fn, params, batch, vmap_leaves=("x",))


def test_has_aux_and_inside_jit():
    loss_fn, params, make = models.linen_transformer()
    batch = make(4)

    def with_aux(p, b):
        losses = loss_fn(p, b)
        return losses, {"mean": jnp.mean(losses)}  # aux may couple examples

    @jax.jit
    def step(params, batch):
        return engine.value_grad_and_stats(with_aux, params, batch, has_aux=True)

    (loss, aux), grads, stats = step(params, batch)
    close(aux["mean"], jnp.mean(loss_fn(params, batch)))
    close(loss, jnp.mean(loss_fn(params, batch)))
    expected = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        close(a, b)


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_batch_equals_unsharded(axis_type):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    # An embedding lookup needs an explicit out_sharding under explicit axes, so the
    # explicit case runs a CNN; the auto case runs the transformer.
    model = models.linen_cnn if axis_type == "explicit" else models.linen_transformer
    loss_fn, params, make = model()
    batch = make(16)
    kind = AxisType.Explicit if axis_type == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    expected = engine.per_example_stats(loss_fn, params, batch)
    with jax.set_mesh(mesh):
        stats = engine.per_example_stats(loss_fn, params, sharded)
    close(stats.total_sq_norms, expected.total_sq_norms)
    for a, b in zip(jax.tree.leaves(stats.sum_sq), jax.tree.leaves(expected.sum_sq), strict=True):
        close(a, b)
