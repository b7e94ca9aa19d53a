"""Tests for jaxeff.pergrad: layer hooks, the path chosen per layer, the Dense/Conv rules."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_pergrad import (
    check_against_brute_force,
    close,
    make_batch,
    random_directions,
    regression_loss,
)

from jaxeff.pergrad import (
    FAST,
    VMAP,
    conv_patches,
    direction_shapes,
    layer_stats,
    per_example_stats,
    rules,
)
from jaxeff.pergrad.capture import hooked_layers
from jaxeff.pergrad.rules import choose_contraction

ORIGINAL_LINEAR_CALL = nnx.Linear.__call__
ORIGINAL_CONV_CALL = nnx.Conv.__call__

# ----------------------------------------------------------------------------- hooks


def test_hooks_apply_to_registered_instances_only_and_are_removed():
    seen = []
    a = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    b = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

    def hook(module, x, apply):
        seen.append(module)
        return apply(module, x) + 1.0

    x = jnp.ones((1, 2))
    with hooked_layers({id(a): (a, hook)}):
        np.testing.assert_allclose(a(x), ORIGINAL_LINEAR_CALL(a, x) + 1.0)
        np.testing.assert_allclose(b(x), ORIGINAL_LINEAR_CALL(b, x))
    assert seen == [a]
    assert nnx.Linear.__call__ is ORIGINAL_LINEAR_CALL
    assert nnx.Conv.__call__ is ORIGINAL_CONV_CALL


def test_hooks_are_removed_when_the_loss_raises():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))

    def failing_loss(model, batch):
        model(batch["x"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_example_stats(model, failing_loss, make_batch("mlp", 2))
    assert nnx.Linear.__call__ is ORIGINAL_LINEAR_CALL
    assert nnx.Conv.__call__ is ORIGINAL_CONV_CALL


# ----------------------------------------------------------------------------- path per layer


class Tied(nnx.Module):
    """Decoder kernel is the encoder's kernel variable (weight tying)."""

    def __init__(self, rngs):
        self.enc = nnx.Linear(5, 5, rngs=rngs)
        self.dec = nnx.Linear(5, 5, rngs=rngs)
        self.dec.kernel = self.enc.kernel
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.dec(jnp.tanh(self.enc(x)))))


class ReadsKernel(nnx.Module):
    """Uses fc's kernel directly besides calling fc."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(5, 5, rngs=rngs)
        self.out = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.fc(x)) + x @ self.fc.kernel[...].T
        return self.out(h)


class Recurrent(nnx.Module):
    """A cell called inside lax.scan: its calls happen in another trace."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(5, 4, rngs=rngs)
        self.cell = nnx.Linear(4, 4, rngs=rngs)
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        xs = jnp.stack([self.inp(x), self.inp(-x), self.inp(2 * x)])  # (3, B, 4)

        def step(h, u):
            h = jnp.tanh(self.cell(h) + u)
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros_like(xs[0]), xs)
        return self.out(h)


class Unsupported(nnx.Module):
    """A grouped conv, a masked conv, an input-dilated conv, a Linear without example axis."""

    def __init__(self, rngs):
        self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
        mask = jnp.tril(jnp.ones((3, 4, 4)))
        self.masked = nnx.Conv(4, 4, (3,), mask=mask, rngs=rngs)
        self.dilated = nnx.Conv(4, 2, (2,), input_dilation=2, padding=[(1, 0)], rngs=rngs)
        self.gate = nnx.Linear(4, 4, rngs=rngs)
        self.causal = nnx.Conv(5, 4, (3,), padding="CAUSAL", rngs=rngs)
        self.out = nnx.Linear(2, 3, rngs=rngs)

    def __call__(self, x):  # x: (B, 5)
        h = self.causal(jnp.repeat(x[:, None, :], 6, axis=1))  # (B, 6, 4)
        h = jnp.tanh(self.grouped(h))
        h = jnp.tanh(self.masked(h)) * jax.nn.sigmoid(self.gate(jnp.ones(4)))
        return self.out(jnp.mean(self.dilated(h), axis=1))


def penalised_loss(model, batch):
    return regression_loss(model, batch) + 0.1 * jnp.sum(model.layers[0].kernel[...] ** 2)


def under_nnx_jit_loss(model, batch):
    predict = nnx.jit(lambda m, x: m(x))
    return jnp.sum((predict(model, batch["x"]) - batch["y"]) ** 2, axis=-1)


class SmallMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(5, 6, rngs=rngs), nnx.Linear(6, 3, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


CASES = {
    "tied": (Tied, regression_loss, {"enc", "dec"}, "shared with another module"),
    "reads_kernel": (ReadsKernel, regression_loss, {"fc"}, "used outside its own __call__"),
    "scan": (Recurrent, regression_loss, {"cell"}, "inside a JAX transformation"),
    "penalty": (SmallMLP, penalised_loss, {"layers/0"}, "used outside its own __call__"),
    "nnx_jit": (SmallMLP, under_nnx_jit_loss, {"layers/0", "layers/1"}, "outside its own"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_layers_without_a_valid_fast_rule_take_the_vmap_path(case):
    model_cls, loss_fn, vmap_layers, reason = CASES[case]
    model = model_cls(nnx.Rngs(0))
    batch = make_batch("mlp", 5, seed=2)
    # Directions on every layer, fast or not (a tied kernel belongs to no single layer).
    directions = None
    if case != "tied":
        directions = random_directions(model, list(direction_shapes(model)), k=3)
    stats = per_example_stats(model, loss_fn, batch, directions=directions)
    layer_of = lambda path: "/".join(map(str, path[:-1]))
    got = {layer_of(p) for p, how in stats.paths.items() if how == VMAP}
    assert got == vmap_layers
    for path, how in stats.paths.items():
        if how == VMAP:
            assert reason in stats.reasons[path]
    check_against_brute_force(model, loss_fn, batch, stats, directions)


def test_unsupported_layer_configurations_take_the_vmap_path():
    model = Unsupported(nnx.Rngs(0))
    batch = make_batch("mlp", 4, seed=3)
    directions = random_directions(model, ["grouped", "masked", "dilated", "gate", "out"], k=2)
    stats = per_example_stats(model, regression_loss, batch, directions=directions)
    reasons = {"/".join(map(str, p)): r for p, r in stats.reasons.items()}
    assert "feature_group_count" in reasons["grouped/kernel"]
    assert "masked kernel" in reasons["masked/kernel"]
    assert "input dilation" in reasons["dilated/kernel"]
    assert "without a leading example axis" in reasons["gate/kernel"]
    assert stats.paths[("causal", "kernel")] == FAST
    assert stats.paths[("out", "bias")] == FAST
    check_against_brute_force(model, regression_loss, batch, stats, directions)


def test_conv_over_extra_batch_axes_sums_over_them():
    class Multi(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (2, 2), strides=(2, 1), rngs=rngs)

        def __call__(self, x):  # (B, 5) -> (B, 2, 4, 3, 2) -> conv over the last 3 axes
            img = jnp.tile(x[:, None, :4, None, None], (1, 2, 1, 3, 2)) * jnp.arange(2.0)
            return jnp.mean(self.conv(img), axis=(1, 2, 3))

    model = Multi(nnx.Rngs(0))
    batch = make_batch("mlp", 4)
    stats = per_example_stats(model, regression_loss, batch)
    assert set(stats.paths.values()) == {FAST}
    check_against_brute_force(model, regression_loss, batch, stats)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_vmap_path_with_chunks_equals_unsharded(axis_type):
    class Normed(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 8, rngs=rngs)
            self.norm = nnx.LayerNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.norm(jnp.tanh(self.fc(x))))

    model = Normed(nnx.Rngs(0))
    batch = make_batch("mlp", 32, seed=1)
    expected = per_example_stats(model, regression_loss, batch)
    assert expected.paths[("norm", "scale")] == VMAP
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        actual = per_example_stats(model, regression_loss, sharded, chunk_size=8)
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)


# ----------------------------------------------------------------------------- rules

CONV_CASES = [
    # (kernel_size, strides, padding, kernel_dilation, spatial)
    ((3, 3), (2, 2), "SAME", (1, 1), (9, 8)),
    ((3, 2), (1, 1), "VALID", (1, 2), (7, 9)),
    ((2, 3), (2, 1), ((1, 0), (2, 1)), (1, 1), (6, 6)),
    ((3, 3), (1, 2), "CIRCULAR", (1, 1), (5, 7)),
    ((3, 3), (1, 1), "REFLECT", (2, 1), (8, 6)),
    ((3, 2), (2, 1), "SAME", (2, 3), (9, 8)),
    ((3,), (1,), "CAUSAL", (2,), (10,)),
    ((2, 2, 2), (1, 2, 1), "SAME", (1, 1, 1), (4, 5, 3)),
]


@pytest.mark.parametrize("kernel_size,strides,padding,dilation,spatial", CONV_CASES)
def test_conv_patches_reproduce_nnx_conv(kernel_size, strides, padding, dilation, spatial):
    conv = nnx.Conv(
        3,
        4,
        kernel_size,
        strides=strides,
        padding=padding if isinstance(padding, str) else list(padding),
        kernel_dilation=dilation,
        rngs=nnx.Rngs(0),
    )
    x = np.random.default_rng(0).normal(size=(2, *spatial, 3)).astype(np.float32)
    patches = conv_patches(
        jnp.asarray(x),
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
    )
    y = patches @ conv.kernel[...].reshape(-1, 4) + conv.bias[...]
    np.testing.assert_allclose(y, conv(x), rtol=1e-5, atol=1e-5)


def explicit_layer_stats(a, delta, direction):
    grads = np.einsum("bti,bto->bio", a, delta)
    bias = delta.sum(axis=1)
    v, u = direction
    dots = np.einsum("bio,ki,ko->kb", grads, v, u) + np.einsum("bo,ko->kb", bias, u)
    return {
        "kernel_sq_norms": (grads**2).sum(axis=(1, 2)),
        "bias_sq_norms": (bias**2).sum(axis=1),
        "kernel_sum_sq": (grads**2).sum(axis=0),
        "bias_sum_sq": (bias**2).sum(axis=0),
        "dots": dots,
    }


@pytest.mark.parametrize(
    "positions,d_in,d_out,with_sum_sq,contraction",
    [
        (1, 7, 5, True, "rank1"),
        (4, 16, 16, False, "gram"),
        (40, 3, 4, False, "outer"),
        (4, 16, 16, True, "outer"),
    ],
)
def test_layer_stats_match_explicit_outer_products(
    positions, d_in, d_out, with_sum_sq, contraction
):
    assert choose_contraction(positions, d_in, d_out, with_sum_sq=with_sum_sq) == contraction
    rng = np.random.default_rng(positions)
    a = rng.normal(size=(6, positions, d_in)).astype(np.float32)
    delta = rng.normal(size=(6, positions, d_out)).astype(np.float32)
    direction = (rng.normal(size=(3, d_in)), rng.normal(size=(3, d_out)))
    stats = layer_stats(a, delta, use_bias=True, with_sum_sq=with_sum_sq, direction=direction)
    expected = explicit_layer_stats(a, delta, direction)
    for name, value in expected.items():
        actual = getattr(stats, name)
        if name.endswith("sum_sq") and not with_sum_sq:
            assert actual is None
        else:
            close(actual, value)


@pytest.mark.parametrize(
    "positions,d_in,d_out,with_sum_sq",
    [(1, 7, 5, True), (4, 16, 16, False), (40, 3, 4, False), (4, 16, 16, True)],
)
@pytest.mark.parametrize("per_example", [True, False])
def test_layer_stats_weighted_gradient(
    monkeypatch, positions, d_in, d_out, with_sum_sq, per_example
):
    monkeypatch.setattr(rules, "OUTER_CHUNK_ENTRIES", 2 * d_in * d_out)  # 3 chunks of 2
    rng = np.random.default_rng(positions + 1)
    a = rng.normal(size=(6, positions, d_in)).astype(np.float32)
    delta = rng.normal(size=(6, positions, d_out)).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, size=6).astype(np.float32)
    weights[2] = 0.0
    if not per_example:
        weights = np.float32(0.25)
    stats = layer_stats(
        a, delta, use_bias=True, with_sum_sq=with_sum_sq, grad_weights=jnp.asarray(weights)
    )
    w = np.broadcast_to(weights, (6,))
    close(stats.kernel_grad, np.einsum("bti,bto,b->io", a, delta, w))
    close(stats.bias_grad, np.einsum("bto,b->o", delta, w))
    expected = explicit_layer_stats(a, delta, (np.ones((1, d_in)), np.ones((1, d_out))))
    close(stats.kernel_sq_norms, expected["kernel_sq_norms"])  # unweighted statistics
    unweighted = layer_stats(a, delta, use_bias=True, with_sum_sq=with_sum_sq)
    assert unweighted.kernel_grad is None and unweighted.bias_grad is None


def test_layer_stats_without_bias_or_directions():
    a, delta = jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))
    stats = layer_stats(a, delta, use_bias=False, with_sum_sq=False)
    assert stats.bias_sq_norms is None and stats.dots is None and stats.kernel_sum_sq is None
    np.testing.assert_allclose(stats.kernel_sq_norms, [9.0 * 20, 9.0 * 20])


def test_conv_patches_reproduce_every_1d_geometry():
    # Every stride/dilation/padding combination in 1-D reproduces lax's convolution.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 9, 2)).astype(np.float32)
    for k, s, d, pad in itertools.product((1, 2, 3), (1, 2, 3), (1, 2), ("SAME", "VALID")):
        conv = nnx.Conv(2, 3, (k,), strides=s, kernel_dilation=d, padding=pad, rngs=nnx.Rngs(k))
        patches = conv_patches(x, kernel_size=(k,), strides=(s,), padding=pad, kernel_dilation=(d,))
        y = patches @ conv.kernel[...].reshape(-1, 3) + conv.bias[...]
        np.testing.assert_allclose(y, conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,size", [("sequence", 8), ("cnn", 7)])
def test_outer_products_in_chunks_match_brute_force(monkeypatch, kind, size):
    from test_pergrad import MODELS

    monkeypatch.setattr(rules, "OUTER_CHUNK_ENTRIES", 600)  # a few examples per chunk
    model = MODELS[kind]()
    batch = make_batch(kind, size, seed=9)
    directions = random_directions(model, list(direction_shapes(model)), k=2)
    loss_fn = lambda m, b: regression_loss(m, b)  # a new function: traced anew
    stats = per_example_stats(model, loss_fn, batch, directions=directions)
    check_against_brute_force(model, loss_fn, batch, stats, directions)


def test_outer_products_in_chunks_on_explicitly_sharded_batch(monkeypatch):
    from test_pergrad import MODELS

    model = MODELS["sequence"]()
    batch = make_batch("sequence", 32, seed=4)
    directions = random_directions(model, ["token"], k=2)
    expected = per_example_stats(model, regression_loss, batch, directions=directions)
    monkeypatch.setattr(rules, "OUTER_CHUNK_ENTRIES", 8 * 16 * 16)  # 4 chunks of 8
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    loss_fn = lambda m, b: regression_loss(m, b)
    with jax.set_mesh(mesh):
        actual = per_example_stats(model, loss_fn, sharded, directions=directions)
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)
