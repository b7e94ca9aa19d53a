"""The nnx form of the engine (jaxeff.pergrad.stats) against one jax.grad per example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff.pergrad import FAST, VMAP, PerExampleStats, direction_shapes
from jaxeff.pergrad.stats import per_example_stats

# ----------------------------------------------------------------------------- models


class MLP(nnx.Module):
    def __init__(self, rngs, sizes=(5, 16, 3)):
        self.layers = nnx.List(
            [nnx.Linear(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = jnp.tanh(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    """Strided SAME, dilated VALID and circular convolutions, several channels, then Dense."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(4, 6, (3, 2), padding="VALID", kernel_dilation=(1, 2), rngs=rngs)
        self.c3 = nnx.Conv(6, 2, (2, 2), strides=(1, 2), padding="CIRCULAR", rngs=rngs)
        self.c4 = nnx.Conv(3, 3, (3, 3), strides=2, padding="VALID", use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))  # (B, 6, 6, 4)
        h = jax.nn.relu(self.c2(h))  # (B, 4, 4, 6)
        h = jax.nn.relu(self.c3(h))  # (B, 4, 2, 2)
        skip = self.c4(x)  # (B, 5, 5, 3)
        return self.fc(h.reshape(h.shape[0], -1)) + jnp.mean(skip, axis=(1, 2))


class SequenceMLP(nnx.Module):
    """A Dense layer over (B, T, d) inputs, mean pooling, a Dense head."""

    def __init__(self, rngs, d=16, hidden=16):
        self.token = nnx.Linear(d, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.mean(jax.nn.gelu(self.token(x)), axis=1))


class SharedLayer(nnx.Module):
    """One Linear applied twice (also reachable through a second attribute)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(5, 8, rngs=rngs)
        self.shared = nnx.Linear(8, 8, rngs=rngs)
        self.alias = self.shared
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.inp(x))
        h = jnp.tanh(self.shared(h))
        h = jnp.tanh(self.alias(h))
        return self.out(h)


class EmbedModel(nnx.Module):
    """Embed (vmap path) -> Linear over tokens -> LayerNorm (vmap path) -> head."""

    def __init__(self, rngs, vocab=13):
        self.embed = nnx.Embed(vocab, 6, rngs=rngs)
        self.token = nnx.Linear(6, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, tokens):
        h = jnp.tanh(self.token(self.embed(tokens)))
        return self.head(self.norm(jnp.mean(h, axis=1)))


def regression_loss(model, batch):
    return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=-1)


def make_batch(kind, size, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "mlp": (5,),
        "cnn": (11, 11, 3),
        "sequence": (6, 16),
        "shared": (5,),
    }
    if kind == "embed":
        x = rng.integers(0, 13, size=(size, 4)).astype(np.int32)
    else:
        x = rng.normal(size=(size, *shapes[kind])).astype(np.float32)
    y_dim = 2 if kind == "shared" else 3
    return {"x": x, "y": rng.normal(size=(size, y_dim)).astype(np.float32)}


MODELS = {
    "mlp": lambda: MLP(nnx.Rngs(0)),
    "cnn": lambda: CNN(nnx.Rngs(1)),
    "sequence": lambda: SequenceMLP(nnx.Rngs(2)),
    "shared": lambda: SharedLayer(nnx.Rngs(3)),
    "embed": lambda: EmbedModel(nnx.Rngs(4)),
}

# ----------------------------------------------------------------------------- brute force


def brute_force_grads(model, loss_fn, batch):
    """One jax.grad per example: a list of {parameter path "a/b": gradient}."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    size = jax.tree.leaves(batch)[0].shape[0]
    grads = []
    for i in range(size):
        example = jax.tree.map(lambda x, i=i: x[i : i + 1], batch)
        g = jax.grad(lambda p, e=example: loss_fn(nnx.merge(graphdef, p, rest), e)[0])(params)
        grads.append(
            {
                "/".join(map(str, path)): np.asarray(v.get_value())
                for path, v in nnx.to_flat_state(g)
            }
        )
    return grads


def canonical_path(model, key):
    """The path under which nnx lists the layer reached by ``key`` (first path in the graph)."""
    node = model
    for part in key.split("/") if isinstance(key, str) else key:
        node = node[int(part)] if str(part).isdigit() else getattr(node, part)
    return next(path for path, value in nnx.iter_graph(model) if value is node)


def dense_direction(factors):
    """``(K, *leaf_shape)``: each direction's factors multiplied out."""
    out = np.asarray(factors[0])
    for f in factors[1:]:
        f = np.asarray(f)
        out = np.einsum("ki,kj->kij", out.reshape(len(out), -1), f.reshape(len(f), -1))
    return out


def brute_force_dots(grads, directions):
    """``{path: (K, B)}`` inner products of the brute-force gradients with the directions."""
    out = {}
    for path, factors in directions.items():
        d = dense_direction(factors).reshape(len(factors[0]), -1)
        out[path] = np.stack([d @ g[path].ravel() for g in grads], axis=1)
    return out


def params_loss(model, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return (lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b)), params


def random_directions(model, layer_keys, batch, k=4, seed=0):
    """Random directions ``{path: factors}`` on the kernel and bias of each named layer, in
    the split of :func:`jaxeff.pergrad.direction_shapes`."""
    rng = np.random.default_rng(seed)
    shapes = direction_shapes(*params_loss(model, regression_loss), batch)
    out = {}
    for key in layer_keys:
        layer = "/".join(map(str, canonical_path(model, key)))
        for leaf in ("kernel", "bias"):
            if f"{layer}/{leaf}" in shapes:
                out[f"{layer}/{leaf}"] = tuple(
                    rng.normal(size=(k, *shape)).astype(np.float32)
                    for shape in shapes[f"{layer}/{leaf}"]
                )
    return out


def close(actual, expected, rtol=2e-4):
    expected = np.asarray(expected)
    atol = 1e-6 * max(1.0, float(np.max(np.abs(expected)))) if expected.size else 0
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


def check_against_brute_force(model, loss_fn, batch, stats, directions=None):
    grads = brute_force_grads(model, loss_fn, batch)

    def flat(state):
        return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}

    flat_sq = flat(stats.sq_norms)
    assert set(flat_sq) == set(grads[0]) == set(stats.paths)
    for path in grads[0]:
        close(flat_sq[path], [np.sum(g[path] ** 2) for g in grads])
    close(stats.total_sq_norms, [sum(np.sum(x**2) for x in g.values()) for g in grads])
    if stats.sum_sq is not None:
        for path, value in flat(stats.sum_sq).items():
            close(value, sum(g[path] ** 2 for g in grads))
    if directions:
        expected = brute_force_dots(grads, directions)
        assert set(stats.leaf_dots) == set(expected)
        for path, dots in expected.items():
            close(stats.leaf_dots[path], dots)
        close(stats.dots, sum(expected.values()))
    else:
        assert stats.dots is None and stats.leaf_dots is None
    losses = regression_loss(model, batch) if loss_fn is regression_loss else None
    if losses is not None:
        close(stats.losses, losses)


# ----------------------------------------------------------------------------- correctness

DIRECTION_LAYERS = {
    "mlp": ["layers/0", ("layers", 1)],
    "cnn": ["c1", "c2", "c4", "fc"],
    "sequence": ["token", "head"],
    "shared": ["alias", "out"],
    "embed": ["token", "head"],
}
EXPECTED_VMAP = {
    "mlp": set(),
    "cnn": set(),
    "sequence": set(),
    "shared": set(),
    "embed": set(),  # embedding rows and LayerNorm scale/offset have fast rules
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("size", [1, 7])
def test_matches_brute_force(kind, size):
    model = MODELS[kind]()
    batch = make_batch(kind, size, seed=size)
    directions = random_directions(model, DIRECTION_LAYERS[kind], batch, seed=size)
    stats = per_example_stats(model, regression_loss, batch, directions=directions)
    assert isinstance(stats, PerExampleStats)
    assert stats.total_sq_norms.shape == (size,)
    assert stats.dots.shape == (4, size)
    vmap_paths = {p for p, how in stats.paths.items() if how == VMAP}
    assert vmap_paths == EXPECTED_VMAP[kind]
    assert set(stats.reasons) == set(stats.paths)
    assert all(why.startswith("fast: ") for why in stats.reasons.values()), stats.reasons
    check_against_brute_force(model, regression_loss, batch, stats, directions)


def test_batch_of_128_on_small_mlp():
    model = MLP(nnx.Rngs(5), sizes=(5, 8, 3))
    batch = make_batch("mlp", 128, seed=11)
    directions = random_directions(model, ["layers/0", "layers/1"], batch, k=3)
    stats = per_example_stats(model, regression_loss, batch, directions=directions)
    check_against_brute_force(model, regression_loss, batch, stats, directions)


@pytest.mark.parametrize("kind", ["sequence", "cnn", "shared"])
def test_norms_without_sum_sq_use_the_cheaper_contraction(kind):
    model = MODELS[kind]()
    batch = make_batch(kind, 5, seed=3)
    stats = per_example_stats(model, regression_loss, batch, with_sum_sq=False)
    assert stats.sum_sq is None
    check_against_brute_force(model, regression_loss, batch, stats)


def test_embed_model_with_chunked_vmap_path():
    model = MODELS["embed"]()
    batch = make_batch("embed", 7, seed=5)
    stats = per_example_stats(model, regression_loss, batch, chunk_size=3)
    check_against_brute_force(model, regression_loss, batch, stats)


def test_shared_layer_sums_over_its_calls():
    model = MODELS["shared"]()
    batch = make_batch("shared", 6)
    stats = per_example_stats(model, regression_loss, batch)
    assert canonical_path(model, "shared") == ("alias",)  # nnx lists a shared module once
    assert stats.paths["alias/kernel"] == FAST
    check_against_brute_force(model, regression_loss, batch, stats)


def test_model_is_not_modified():
    model = MODELS["embed"]()
    before = jax.tree.map(np.asarray, nnx.state(model))
    per_example_stats(model, regression_loss, make_batch("embed", 3))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    assert nnx.Linear.__call__.__module__ == "flax.nnx.nn.linear"


def test_batchnorm_in_eval_mode_is_exact_on_the_fast_path():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(5, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.bn(self.fc(x))))

    model = Net(nnx.Rngs(0))
    batch = make_batch("mlp", 4)
    with pytest.raises(ValueError, match="`model` has BatchNorm 'bn' in training mode"):
        per_example_stats(model, regression_loss, batch)
    model.eval()
    stats = per_example_stats(model, regression_loss, batch)
    assert stats.paths["bn/scale"] == FAST and stats.paths["fc/kernel"] == FAST
    check_against_brute_force(model, regression_loss, batch, stats)


# ----------------------------------------------------------------------------- jit


def test_second_call_with_new_values_does_not_recompile():
    traces = []

    def counting_loss(model, batch):
        traces.append(1)
        return regression_loss(model, batch)

    first = per_example_stats(MODELS["cnn"](), counting_loss, make_batch("cnn", 4, seed=0))
    count = len(traces)
    assert count > 0
    other_model = CNN(nnx.Rngs(7))  # same structure, new values
    second = per_example_stats(other_model, counting_loss, make_batch("cnn", 4, seed=1))
    assert len(traces) == count
    assert not np.allclose(first.total_sq_norms, second.total_sq_norms)


def test_runs_inside_jit_with_a_traced_model():
    model = MODELS["embed"]()
    graphdef, state = nnx.split(model)
    batch = make_batch("embed", 5)
    directions = random_directions(model, ["token"], batch)

    @jax.jit
    def stats_fn(state, batch, directions):
        return per_example_stats(
            nnx.merge(graphdef, state), regression_loss, batch, directions=directions
        )

    jitted = stats_fn(state, batch, directions)
    eager = per_example_stats(model, regression_loss, batch, directions=directions)
    assert jitted.paths == eager.paths
    jax.tree.map(close, jitted, eager)


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
def test_sharded_batch_equals_unsharded(kind, axis_type):
    assert jax.device_count() == 8
    model = MODELS[kind]()
    batch = make_batch(kind, 16, seed=4)
    directions = random_directions(model, DIRECTION_LAYERS[kind], batch)
    expected = per_example_stats(model, regression_loss, batch, directions=directions)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        actual = per_example_stats(model, regression_loss, sharded, directions=directions)
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)


def test_sharded_batch_with_vmap_path_equals_unsharded():
    model = MODELS["embed"]()
    batch = make_batch("embed", 16, seed=4)
    expected = per_example_stats(model, regression_loss, batch)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    actual = per_example_stats(model, regression_loss, sharded, chunk_size=8)
    jax.tree.map(lambda a, e: close(a, e, rtol=1e-5), actual, expected)


# ----------------------------------------------------------------------------- errors


def test_loss_fn_must_return_one_loss_per_example():
    model, batch = MODELS["mlp"](), make_batch("mlp", 4)
    with pytest.raises(ValueError, match=r"`loss_fn` must return one loss per example.*\(4,\)"):
        per_example_stats(model, lambda m, b: jnp.mean(regression_loss(m, b)), batch)
    with pytest.raises(ValueError, match="`loss_fn` must return one loss per example"):
        per_example_stats(model, lambda m, b: regression_loss(m, b)[:, None], batch)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        per_example_stats(model, "mse", batch)


def test_directions_must_match_the_parameters():
    model, batch = MODELS["mlp"](), make_batch("mlp", 4)
    good = random_directions(model, ["layers/0"], batch, k=2)
    v, u = good["layers/0/kernel"]
    with pytest.raises(ValueError, match=r"`directions\['layers/0/kernel'\]` factors of shapes"):
        per_example_stats(model, regression_loss, batch, directions={"layers/0/kernel": (v.T, u)})
    with pytest.raises(ValueError, match="`directions` names 'layers/0', which is not a param"):
        per_example_stats(model, regression_loss, batch, directions={"layers/0": (v, u)})
    with pytest.raises(ValueError, match=r"has 1 directions; others have 2"):
        per_example_stats(model, regression_loss, batch, directions={"layers/0/kernel": (v, u[:1])})
    other = random_directions(model, ["layers/1"], batch, k=3)
    with pytest.raises(ValueError, match=r"has 3 directions; others have 2"):
        per_example_stats(model, regression_loss, batch, directions={**good, **other})
    with pytest.raises(TypeError, match="`directions` must be a mapping"):
        per_example_stats(model, regression_loss, batch, directions=[good])


def test_bad_model_batch_and_chunk_size():
    class NoParams(nnx.Module):
        def __call__(self, x):
            return x

    batch = make_batch("mlp", 4)
    with pytest.raises(ValueError, match="`model` has no nnx.Param"):
        per_example_stats(NoParams(), regression_loss, batch)
    with pytest.raises(TypeError, match="`model` must be an nnx.Module"):
        per_example_stats(lambda x: x, regression_loss, batch)
    model = MODELS["mlp"]()
    with pytest.raises(ValueError, match="`batch` leaves must share the leading axis"):
        per_example_stats(model, regression_loss, {"x": batch["x"], "y": batch["y"][:3]})
    with pytest.raises(ValueError, match="`batch` must hold at least one array"):
        per_example_stats(model, regression_loss, {})
    with pytest.raises(ValueError, match="`chunk_size` must be a positive integer"):
        per_example_stats(model, regression_loss, batch, chunk_size=0)
