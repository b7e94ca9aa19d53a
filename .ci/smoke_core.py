"""The core install works alone: run in a virtual environment holding only the jaxeff wheel.

``pip install jaxeff`` (no extras) must bring jax, flax, optax, chex and numpy only; the
core subpackages must import and compute; every feature that needs an extra must say
which one, in an ``ImportError`` that is not a bare ``ModuleNotFoundError``.

    python .ci/smoke_core.py
"""

import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np

CORE = {"jax", "flax", "optax", "chex", "numpy"}
CORE_MODULES = (
    "jaxeff.losses",
    "jaxeff.retrieval",
    "jaxeff.pergrad",
    "jaxeff.gvar",
    "jaxeff.models",
    "jaxeff.robust",
    "jaxeff.clustering",
)
# (code that reaches the feature, the extra it must name, a package the core lacks)
NEEDS_EXTRA = (
    ("import jaxeff.data", "data", "tensorflow_datasets"),
    ("from jaxeff.clustering import StratifiedSampler", "data", "grain"),
    ("from jaxeff.robust import max_margin", "robust", "cvxpy"),
    ("import jaxeff.train", "train", "ml_collections"),
    ("import jaxeff.gvar; jaxeff.gvar.plot_records([], ['sgd'])", "plots", "matplotlib"),
    ("import jaxeff.privacy", "privacy", "dp_accounting"),
)


def check_requirements():
    required = importlib.metadata.requires("jaxeff") or []
    unconditional = {
        re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in required if "extra ==" not in r
    }
    assert unconditional == CORE, f"the core requires {sorted(unconditional)}, not {CORE}"
    typed = importlib.resources.files("jaxeff").joinpath("py.typed")
    assert typed.is_file(), "the wheel lacks jaxeff/py.typed"


def check_losses():
    from jaxeff import losses

    # Equal scores: every hinge costs exactly the margin (B - 1 negatives, two directions).
    b, margin = 6, 0.2
    scores = jnp.zeros((b, b))
    sh = losses.hinge_loss(scores, margin=margin)
    mh = losses.hinge_loss(scores, margin=margin, max_violation=True)
    np.testing.assert_allclose(sh, 2 * b * (b - 1) * margin, rtol=1e-6)
    np.testing.assert_allclose(mh, 2 * b * margin, rtol=1e-6)


def check_per_example_stats():
    from jaxeff import pergrad

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(k1, (5, 7)),
        "b1": jnp.zeros(7),
        "w2": jax.random.normal(k2, (7, 3)),
    }
    batch = {"x": jax.random.normal(k3, (4, 5)), "y": jax.random.normal(k4, (4, 3))}

    def loss_fn(p, b):
        h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
        return jnp.sum((h @ p["w2"] - b["y"]) ** 2, axis=-1)

    stats = pergrad.per_example_stats(loss_fn, params, batch)
    ours = sum(jax.tree.leaves(stats.sq_norms))
    grad = jax.grad(lambda p, ex: loss_fn(p, ex)[0])
    brute = []
    for i in range(4):  # one grad per example
        g = grad(params, jax.tree.map(lambda a, i=i: a[i : i + 1], batch))
        brute.append(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g)))
    np.testing.assert_allclose(ours, brute, rtol=1e-4)


def _per_example_grads(loss_fn, params, batch):
    """Brute force: ``{path: (B, *leaf shape)}``, one ``jax.grad`` per example (vmapped)."""
    from jaxeff import pergrad

    one = jax.grad(lambda p, ex: loss_fn(p, jax.tree.map(lambda a: a[None], ex))[0])
    grads = jax.jit(jax.vmap(one, (None, 0)))(params, batch)
    leaves = map(np.asarray, jax.tree.leaves(grads))
    return dict(zip(pergrad.param_paths(params), leaves, strict=True))


def check_scan_per_example_stats():
    from jaxeff import pergrad

    # A recurrent net: the weights are used at every step of a `lax.scan`.
    rng = np.random.default_rng(1)
    params = {"u": rng.normal(size=(3, 4)), "w": 0.3 * rng.normal(size=(4, 4))}
    batch = {"x": rng.normal(size=(5, 6, 3)), "y": rng.normal(size=5)}
    params, batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (params, batch))

    def loss_fn(p, b):
        def step(h, x_t):
            return jnp.tanh(h @ p["w"] + x_t @ p["u"]), None

        h, _ = jax.lax.scan(step, jnp.zeros((b["x"].shape[0], 4)), jnp.swapaxes(b["x"], 0, 1))
        return (jnp.sum(h, axis=-1) - b["y"]) ** 2

    stats = pergrad.per_example_stats(loss_fn, params, batch)
    for path, g in _per_example_grads(loss_fn, params, batch).items():
        np.testing.assert_allclose(stats.sq_norms[path], np.sum(g**2, axis=(1, 2)), rtol=1e-4)
        np.testing.assert_allclose(stats.sum_sq[path], np.sum(g**2, axis=0), rtol=1e-4)


def check_gradient_clustering():
    import flax.linen as nn
    import optax

    from jaxeff import clustering, pergrad

    model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(3)])
    rng = np.random.default_rng(2)
    batch = {"x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), "y": jnp.arange(8) % 3}
    params = model.init(jax.random.key(2), batch["x"])["params"]

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

    k = 3
    tx = optax.chain(clustering.gradient_clustering(loss_fn, batch, num_clusters=k), optax.sgd(0.1))
    step = jax.jit(lambda g, s, p, st: tx.update(g, s, p, per_example_stats=st))
    state = tx.init(params)
    per_example = _per_example_grads(loss_fn, params, batch)

    def flat(centre):  # (K, leaf size): the outer product of a centre's factors, flattened
        out = np.ones((k, 1))
        for f in centre:
            out = (out[:, :, None] * np.asarray(f).reshape(k, 1, -1)).reshape(k, -1)
        return out

    # The first update seeds each centre at a different example's gradient (exactly, for
    # a Dense layer); in the second, each seed is at distance 0 from its own centre.
    for first in (True, False):
        centres = state[0].clusters.centres
        _, grads, stats = pergrad.value_grad_and_stats(loss_fn, params, batch, directions=centres)
        dots = sum(per_example[p].reshape(8, -1) @ flat(c).T for p, c in centres.items())
        np.testing.assert_allclose(stats.dots, dots.T, rtol=1e-4, atol=1e-6)
        updates, state = step(grads, state, params, stats)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(u, -0.1 * np.asarray(g), rtol=1e-6)
        if first:
            dist = sum(
                np.sum((per_example[p].reshape(8, 1, -1) - flat(c)[None]) ** 2, axis=-1)
                for p, c in state[0].clusters.centres.items()
            )  # (B, K)
            seeds = np.argmin(dist, axis=0)
            np.testing.assert_allclose(dist[seeds, np.arange(k)], 0.0, atol=1e-8)
            assert len(set(seeds.tolist())) == k, f"two centres seeded at one example: {seeds}"
        else:
            np.testing.assert_array_equal(state[0].assignments[seeds], np.arange(k))


def check_steepest_descent():
    import optax

    from jaxeff import robust

    # Coordinate descent (norm 1): the step moves the largest |g_j| coordinate only,
    # by -η ||g||_∞ sign(g_j).
    w = {"w": jnp.zeros(3)}
    g = {"w": jnp.array([0.5, -2.0, 1.0])}
    tx = robust.steepest_descent(0.1, norm=1)
    updates, _ = tx.update(g, tx.init(w), w)
    np.testing.assert_allclose(optax.apply_updates(w, updates)["w"], [0.0, 0.2, 0.0], atol=1e-7)


def check_missing_extras():
    for code, extra, package in NEEDS_EXTRA:
        assert importlib.util.find_spec(package) is None, f"the core environment holds {package}"
        try:
            exec(code, {})
        except ModuleNotFoundError as err:
            raise AssertionError(f"{code!r} raised a bare ModuleNotFoundError: {err}") from err
        except ImportError as err:
            assert f'pip install "jaxeff[{extra}]"' in str(err), (code, str(err))
        else:
            raise AssertionError(f"{code!r} ran without {package}")


def main():
    check_requirements()
    for name in CORE_MODULES:
        importlib.import_module(name)
    check_losses()
    check_per_example_stats()
    check_scan_per_example_stats()
    check_gradient_clustering()
    check_steepest_descent()
    check_missing_extras()
    print(f"core smoke test passed (jax {jax.__version__}, {len(CORE_MODULES)} core packages)")


if __name__ == "__main__":
    main()
