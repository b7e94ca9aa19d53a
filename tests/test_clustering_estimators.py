"""GC and importance sampling as variance-suite estimators: unbiased, and GC's variance
vanishes on exact duplicates while SGD's does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_clustering import as_params_loss as params_loss

from jaxeff import clustering, gvar


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def data(n, seed=0, copies=1):
    rng = np.random.default_rng(seed)
    base = {"x": rng.normal(size=(n, 6)).astype(np.float32), "y": rng.integers(0, 3, n)}
    return {k: np.repeat(v, copies, axis=0) for k, v in base.items()}


def draws(est, state, params, dataset, num):
    keys = jax.random.split(jax.random.key(7), num)
    grads = jax.jit(jax.vmap(lambda k: est.estimate(state, params, dataset, k)[0]))(keys)
    return np.concatenate([np.asarray(x).reshape(num, -1) for x in jax.tree.leaves(grads)], 1)


def flat(tree):
    return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(tree)])


GC = dict(batch_size=12, num_clusters=4)


def gc_sample(state, key, **kw):
    return clustering.stratified_sample(key, state.assignments, **GC, **kw)


CASES = {
    "gc": (lambda loss: clustering.gc_estimator(loss, **GC, num_passes=2), gc_sample),
    "gc_proportional_noreplace": (
        lambda loss: clustering.gc_estimator(loss, **GC, allocation="proportional", replace=False),
        lambda s, k: gc_sample(s, k, allocation="proportional", replace=False),
    ),
    "importance_norm": (
        lambda loss: clustering.importance_estimator(loss, batch_size=12),
        lambda s, k: clustering.importance_sample(k, s, batch_size=12),
    ),
    "importance_loss": (
        lambda loss: clustering.importance_estimator(loss, batch_size=12, score="loss"),
        lambda s, k: clustering.importance_sample(k, s, batch_size=12),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimates_are_unbiased(name):
    """``||mean of M draws − ∇f||²`` stays within a few times its expectation ``tr Var / M``;
    the same draws with plain ``1/b`` weights do not."""
    make, sample = CASES[name]
    loss, params = params_loss(MLP(nnx.Rngs(0)))
    dataset = data(40)
    est = make(loss)
    state = est.init(params, dataset)
    num = 4000
    g = draws(est, state, params, dataset, num)
    full = flat(gvar.mean_gradient(loss, params, dataset))
    error = np.sum((g.mean(0) - full) ** 2)
    expected = np.sum(g.var(0)) / num
    assert error < 4 * expected, (error, expected)
    biased = gvar.sampling_estimator(
        loss,
        lambda s, k, n: sample(s, k)._replace(weights=jnp.full((12,), 1 / 12)),
    )
    b = draws(biased, state, params, dataset, num)
    assert np.sum((b.mean(0) - full) ** 2) > 10 * np.sum(b.var(0)) / num


def test_gc_variance_vanishes_on_exact_duplicates_and_sgd_does_not():
    loss, params = params_loss(MLP(nnx.Rngs(0)))
    dataset = data(6, copies=10)
    estimators = {
        "sgd": gvar.sgd_estimator(loss, batch_size=12),
        "sgd_2b": gvar.sgd_estimator(loss, batch_size=24),
        "gc": clustering.gc_estimator(
            loss, batch_size=12, num_clusters=6, num_passes=4, min_fraction=0.05
        ),
    }
    states = {n: e.init(params, dataset) for n, e in estimators.items()}
    groups = np.asarray(states["gc"].assignments).reshape(6, 10)
    assert all(len(set(row)) == 1 for row in groups) and len(set(groups[:, 0])) == 6
    stats = gvar.measure(estimators, states, params, dataset, jax.random.key(0), num_draws=20)
    sgd = float(stats["sgd"].variance)
    assert float(stats["gc"].variance) < 1e-6 * sgd
    assert float(stats["sgd_2b"].variance) < sgd


def test_estimator_arguments_are_checked():
    loss, params = params_loss(MLP(nnx.Rngs(0)))
    with pytest.raises(ValueError, match="`score`"):
        clustering.importance_estimator(loss, batch_size=4, score="norm")
    with pytest.raises(ValueError, match="`num_passes`"):
        clustering.cluster_examples(
            loss, params, data(8), num_clusters=2, key=jax.random.key(0), num_passes=-1
        )
