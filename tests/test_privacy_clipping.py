"""Per-example clipped gradients against the vmap reference and against jax-privacy.

The reference clips each brute-force per-example gradient (one ``jax.grad`` per example)
to norm ``C`` and sums; thresholds sit at the median norm, so some examples are clipped
and some are not.
"""

import _engine_models as models
import jax
import jax.numpy as jnp
import jax_privacy
import numpy as np
import optax
import pytest

from jaxeff.pergrad import CouplingError, param_paths
from jaxeff.privacy import clipped_grad
from jaxeff.privacy import clipping as clipping_module

METHODS = ("book-keeping", "ghost")


def close(actual, expected, rtol=2e-4):
    """Equal to float32 tolerance on the scale of the whole pytree."""
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(actual) == len(expected)
    scale = max(float(np.max(np.abs(e))) for e in expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=rtol * scale + 1e-7)


def per_example_norms(grads):
    size = jax.tree.leaves(grads)[0].shape[0]
    return np.sqrt(sum(np.sum(np.reshape(g, (size, -1)) ** 2, 1) for g in jax.tree.leaves(grads)))


def clipped_reference(grads, threshold, keep=None, normalize_by=1.0):
    norms = per_example_norms(grads)
    scale = np.minimum(1.0, threshold / np.maximum(norms, 1e-30))
    if keep is not None:
        scale = np.where(keep, scale, 0.0)
    return jax.tree.map(lambda g: np.einsum("b...,b->...", g, scale) / normalize_by, grads)


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_equals_the_clipped_vmap_reference(name):
    loss_fn, params, make = models.MODELS[name]()
    batch = make(6)
    grads = models.brute_force(loss_fn, params, batch)
    norms = per_example_norms(grads)
    threshold = float(np.median(norms))
    assert (norms > threshold * 1.01).any() and (norms < threshold * 0.99).any()
    expected = clipped_reference(grads, threshold, normalize_by=6.0)
    for method in METHODS:
        fn = clipped_grad(loss_fn, l2_clip_norm=threshold, method=method, normalize_by=6.0)
        out, report = fn(params, batch)
        close(out, expected)
        np.testing.assert_allclose(report.grad_norms, norms, rtol=2e-4)
        np.testing.assert_allclose(report.values, loss_fn(params, batch), rtol=1e-5)
        assert not np.any(report.non_finite)
        for a, p in zip(jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
            assert a.dtype == p.dtype and a.shape == p.shape


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threshold", [1e-3, 1e3])
def test_one_example(method, threshold):
    loss_fn, params, make = models.linen_transformer()
    batch = make(1)
    grads = models.brute_force(loss_fn, params, batch)
    out, report = clipped_grad(loss_fn, l2_clip_norm=threshold, method=method)(params, batch)
    close(out, clipped_reference(grads, threshold))
    assert report.grad_norms.shape == (1,)


@pytest.mark.parametrize("method", METHODS)
def test_padding_and_non_finite_examples_reach_nothing(method):
    loss_fn, params, make = models.linen_cnn()
    batch = make(8)
    real = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)  # slots 2 and 6 are padding
    broken = 4  # a real example whose input is NaN
    x = batch["x"].at[2].set(jnp.inf).at[6].set(jnp.nan).at[broken].set(jnp.nan)
    batch = {**batch, "x": x}
    keep = real.copy()
    keep[broken] = False
    rows = np.flatnonzero(keep)
    good = jax.tree.map(lambda v: v[rows], batch)
    grads = models.brute_force(loss_fn, params, good)
    threshold = float(np.median(per_example_norms(grads)))
    fn = clipped_grad(loss_fn, l2_clip_norm=threshold, method=method)
    out, report = fn(params, batch, is_padding_example=jnp.asarray(~real))
    close(out, clipped_reference(grads, threshold))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(out))
    np.testing.assert_array_equal(report.non_finite, np.arange(8) == broken)
    # Every example padding or broken: a zero gradient, not NaN.
    none, _ = fn(params, batch, is_padding_example=jnp.asarray(np.arange(8) != broken))
    assert all(np.array_equal(g, np.zeros_like(g)) for g in jax.tree.leaves(none))


def test_group_wise_thresholds():
    loss_fn, params, make = models.linen_mlp()
    batch = make(6)
    grads = models.brute_force(loss_fn, params, batch)
    paths = param_paths(params)
    flat = dict(zip(paths, jax.tree.leaves(grads), strict=True))
    groups = {"Dense_0": [p for p in paths if p.startswith("Dense_0/")]}
    groups[""] = [p for p in paths if p not in groups["Dense_0"]]
    norms = {
        g: np.sqrt(sum(np.sum(flat[p].reshape(6, -1) ** 2, 1) for p in ps))
        for g, ps in groups.items()
    }
    thresholds = {g: float(np.median(n)) for g, n in norms.items()}
    expected = []
    for p in paths:
        (g,) = [g for g, ps in groups.items() if p in ps]
        scale = np.minimum(1.0, thresholds[g] / norms[g])
        expected.append(np.einsum("b...,b->...", flat[p], scale))
    fn = clipped_grad(loss_fn, l2_clip_norm=thresholds)
    out, report = fn(params, batch)
    close(jax.tree.leaves(out), expected)
    assert fn.sensitivity() == pytest.approx(np.sqrt(sum(c * c for c in thresholds.values())))
    for g, n in norms.items():
        np.testing.assert_allclose(report.group_norms[g], n, rtol=2e-4)
    # One threshold for all is the ordinary clipping, not the per-group one.
    whole, _ = clipped_grad(loss_fn, l2_clip_norm=thresholds["Dense_0"])(params, batch)
    assert not np.allclose(jax.tree.leaves(whole)[0], jax.tree.leaves(out)[0], rtol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_path_leaves_share_the_norm(method):
    loss_fn, params, make = models.linen_mlp()
    batch = make(6)
    grads = models.brute_force(loss_fn, params, batch)
    threshold = float(np.median(per_example_norms(grads)))
    fn = clipped_grad(
        loss_fn, l2_clip_norm=threshold, method=method, vmap_leaves=("Dense_1/kernel",)
    )
    out, report = fn(params, batch)
    close(out, clipped_reference(grads, threshold))
    np.testing.assert_allclose(report.grad_norms, per_example_norms(grads), rtol=2e-4)


@pytest.mark.parametrize("name", ["equinox_gru_scan", "linen_transformer_tied", "haiku_mlp"])
def test_equals_jax_privacy(name):
    loss_fn, params, make = models.MODELS[name]()
    batch = make(6)
    threshold = float(np.median(per_example_norms(models.brute_force(loss_fn, params, batch))))
    padding = jnp.array([0, 0, 1, 0, 0, 0], bool)
    theirs_fn = jax_privacy.clipped_grad(
        lambda p, b: loss_fn(p, b)[0], l2_clip_norm=threshold, normalize_by=4.0
    )
    theirs = theirs_fn(params, batch, is_padding_example=padding)
    ours_fn = clipped_grad(loss_fn, l2_clip_norm=threshold, normalize_by=4.0)
    ours, _ = ours_fn(params, batch, is_padding_example=padding)
    close(ours, theirs)
    assert ours_fn.sensitivity() == theirs_fn.sensitivity() == pytest.approx(threshold / 4.0)
    assert isinstance(ours_fn, jax_privacy.clipping.BoundedSensitivityCallable)
    unit = {"l2_clip_norm": threshold, "normalize_by": 4.0, "rescale_to_unit_norm": True}
    theirs_fn = jax_privacy.clipped_grad(lambda p, b: loss_fn(p, b)[0], **unit)
    ours_fn = clipped_grad(loss_fn, method="ghost", **unit)
    close(ours_fn(params, batch)[0], theirs_fn(params, batch))
    assert ours_fn.sensitivity() == theirs_fn.sensitivity() == pytest.approx(0.25)


@pytest.mark.parametrize("method", METHODS)
def test_infinite_threshold_clips_nothing(method):
    loss_fn, params, make = models.equinox_gru()
    batch = make(5)
    padding = jnp.array([0, 1, 0, 0, 0], bool)
    grads = models.brute_force(loss_fn, params, batch)
    keep = ~np.asarray(padding)
    expected = jax.tree.map(lambda g: np.einsum("b...,b->...", g, keep) / 4.0, grads)
    fn = clipped_grad(loss_fn, l2_clip_norm=float("inf"), method=method, normalize_by=4.0)
    ours, report = fn(params, batch, is_padding_example=padding)
    close(ours, expected)
    np.testing.assert_allclose(report.grad_norms, per_example_norms(grads), rtol=2e-4)
    theirs_fn = jax_privacy.clipped_grad(
        lambda p, b: loss_fn(p, b)[0], l2_clip_norm=jnp.inf, normalize_by=4.0
    )
    close(ours, theirs_fn(params, batch, is_padding_example=padding))
    assert fn.sensitivity() == theirs_fn.sensitivity() == float("inf")


def test_noise_has_the_scale_of_the_sensitivity():
    """jax-privacy's privatizer, fed our clipped gradient: noise std ``σ C / n``."""
    loss_fn, params, make = models.linen_mlp()
    batch = make(8)
    fn = clipped_grad(loss_fn, l2_clip_norm=0.5, normalize_by=8.0)
    clipped, _ = fn(params, batch)
    sigma = 1.3

    @jax.jit
    def noise(key):
        tx = jax_privacy.noise_addition.gaussian_privatizer(
            stddev=sigma * fn.sensitivity(), prng_key=key
        )
        noisy, _ = tx.update(clipped, tx.init(params))
        diff = jax.tree.map(lambda a, b: (a - b).ravel(), noisy, clipped)
        return jnp.concatenate(jax.tree.leaves(diff))

    draws = np.concatenate([noise(k) for k in jax.random.split(jax.random.key(0), 40)])
    expected = sigma * 0.5 / 8.0
    # The sample std of n normal draws has relative standard error ~ 1/sqrt(2n).
    assert abs(np.std(draws) / expected - 1) < 5 / np.sqrt(2 * draws.size)
    assert abs(np.mean(draws)) < 5 * expected / np.sqrt(draws.size)


def test_one_optax_step_inside_jit_compiles_once():
    loss_fn, params, make = models.linen_mlp()
    fn = clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=8.0)
    tx = optax.chain(
        jax_privacy.noise_addition.gaussian_privatizer(stddev=fn.sensitivity(), prng_key=0),
        optax.sgd(0.1),
    )

    @jax.jit
    def step(params, opt_state, batch):
        grads, report = fn(params, batch, is_padding_example=batch["weights"] == 0)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, report

    opt_state = tx.init(params)
    for seed in range(3):
        batch = {**make(8, seed), "weights": jnp.ones(8).at[seed].set(0.0)}
        params, opt_state, report = step(params, opt_state, batch)
    assert step._cache_size() == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert report.grad_norms.shape == (8,)


def test_sharded_batch_equals_unsharded():
    from jax.sharding import NamedSharding, PartitionSpec

    loss_fn, params, make = models.linen_cnn()
    batch = make(16)
    padding = jnp.arange(16) % 5 == 0
    fn = clipped_grad(loss_fn, l2_clip_norm=0.3)
    expected, _ = fn(params, batch, is_padding_example=padding)
    mesh = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put((batch, padding), NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
        out, report = fn(params, sharded[0], is_padding_example=sharded[1])
    close(out, expected)


def test_loss_that_couples_examples_is_refused():
    def coupled(w, b):
        centred = b["x"] - jnp.mean(b["x"], axis=0)
        return jnp.sum((centred @ w) ** 2, axis=1)

    batch = {"x": jax.random.normal(jax.random.key(1), (5, 3))}
    with pytest.raises(CouplingError, match="reduce_sum"):
        clipped_grad(coupled, l2_clip_norm=1.0)(jnp.ones((3, 2)), batch)


def test_bad_arguments_are_named():
    loss_fn, params, make = models.linen_mlp()
    batch = make(4)
    with pytest.raises(ValueError, match="`l2_clip_norm` must be a positive number or inf"):
        clipped_grad(loss_fn, l2_clip_norm=-1.0)
    with pytest.raises(ValueError, match="`l2_clip_norm\\['x'\\]` must be a positive"):
        clipped_grad(loss_fn, l2_clip_norm={"x": float("nan")})
    with pytest.raises(ValueError, match="`normalize_by` must be a positive finite"):
        clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=float("inf"))
    with pytest.raises(ValueError, match="`rescale_to_unit_norm` divides by the clip norm"):
        clipped_grad(loss_fn, l2_clip_norm=float("inf"), rescale_to_unit_norm=True)
    with pytest.raises(ValueError, match="`method` must be one of"):
        clipped_grad(loss_fn, l2_clip_norm=1.0, method="fast")
    with pytest.raises(ValueError, match='Group-wise `l2_clip_norm` needs method="book-keeping"'):
        clipped_grad(loss_fn, l2_clip_norm={"": 1.0}, method="ghost")
    with pytest.raises(ValueError, match="`normalize_by` must be a positive"):
        clipped_grad(loss_fn, l2_clip_norm=1.0, normalize_by=0)
    fn = clipped_grad(loss_fn, l2_clip_norm=1.0)
    with pytest.raises(ValueError, match="`is_padding_example` must hold one flag per example"):
        fn(params, batch, is_padding_example=jnp.zeros(3, bool))
    with pytest.raises(ValueError, match="`is_padding_example` must be bool"):
        fn(params, batch, is_padding_example=jnp.zeros(4))
    with pytest.raises(ValueError, match="no threshold for the parameters"):
        clipped_grad(loss_fn, l2_clip_norm={"Dense_0": 1.0})(params, batch)
    with pytest.raises(ValueError, match="names the groups \\['Dense_9'\\], which hold no"):
        clipped_grad(loss_fn, l2_clip_norm={"Dense_9": 1.0, "": 1.0})(params, batch)
    assert clipping_module.METHODS == METHODS
