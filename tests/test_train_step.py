"""Tests for jaxeff.train.step: train state, jitted update step, NaN detection."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_models import MLP, make_batch, mse_loss
from flax import nnx

from jaxeff.train import (
    RESERVED_METRICS,
    FiniteGuard,
    TrainState,
    check_finite,
    create_train_state,
    make_train_step,
    merge_model,
)


def make_tx():
    return optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))


def tree_allclose(a, b, **kw):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(as_numbers(x), as_numbers(y), **kw)


def as_numbers(x):
    """``x`` as a numpy array; a typed PRNG key as its raw key data."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def test_create_train_state_splits_params_and_other_variables():
    model = MLP(nnx.Rngs(0), batch_norm=True)
    graphdef, state = create_train_state(model, make_tx())
    assert isinstance(state, TrainState)
    assert int(state.step) == 0
    assert set(state.params.keys()) == {"fc1", "fc2", "bn"}
    assert set(state.params["bn"].keys()) == {"scale", "bias"}
    assert set(state.model_state["bn"].keys()) == {"mean", "var"}
    rebuilt = merge_model(graphdef, state)
    x = make_batch(0)["x"]
    model.eval()
    rebuilt.eval()
    np.testing.assert_allclose(rebuilt(x), model(x), rtol=1e-6)


def test_step_matches_manual_grad_and_update():
    tx = make_tx()
    model = MLP(nnx.Rngs(0))
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, mse_loss, tx, donate=False)

    @jax.jit
    def reference(params, opt_state, batch, hp):
        def ref_loss(p):
            return mse_loss(nnx.merge(graphdef, p), batch, hp)[0]

        value, grads = jax.value_and_grad(ref_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return value, grads, updates, optax.apply_updates(params, updates), opt_state

    params = state.params
    opt_state = tx.init(params)
    for i, weight in enumerate([1.0, 0.5, 2.0]):
        batch = make_batch(i)
        hp = {"weight": weight}
        ref_value, grads, updates, new_params, opt_state = reference(params, opt_state, batch, hp)

        state, metrics = step(state, batch, hp)
        assert int(state.step) == i + 1
        tree_allclose(state.params, new_params, rtol=1e-5, atol=1e-6)
        tree_allclose(state.opt_state, opt_state, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["loss"], ref_value, rtol=1e-6)
        flat_g = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
        flat_p = np.concatenate([np.ravel(p) for p in jax.tree.leaves(new_params)])
        flat_u = np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)])
        np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(flat_g), rtol=1e-5)
        np.testing.assert_allclose(metrics["param_norm"], np.linalg.norm(flat_p), rtol=1e-5)
        np.testing.assert_allclose(metrics["update_norm"], np.linalg.norm(flat_u), rtol=1e-5)
        np.testing.assert_allclose(metrics["mse"], ref_value / weight, rtol=1e-6)
        assert bool(metrics["finite"])
        params = new_params
    # Clipping at 0.5 is active: the raw gradient is larger than the clip threshold.
    assert float(metrics["grad_norm"]) > 0.5


def per_example_mse(model, batch, hparams):
    """One squared error per example, shape (B,)."""
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2, axis=1), {}


def test_per_example_losses_are_reduced_by_the_batch_weights():
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, per_example_mse, tx, donate=False)
    batch = make_batch(3)
    weights = np.random.default_rng(0).uniform(0, 2, size=16).astype(np.float32)

    def loop_reference(params, w):
        """Σ_i w_i ℓ_i, one example at a time."""
        model = nnx.merge(graphdef, params)
        total = 0.0
        for i in range(16):
            pred = model(batch["x"][i : i + 1])
            total += w[i] * jnp.mean((pred - batch["y"][i : i + 1]) ** 2)
        return total

    for w, weighted_batch in (
        (weights, {**batch, "weights": weights}),
        (np.full(16, 1 / 16), batch),
    ):
        value, grads = jax.value_and_grad(loop_reference)(state.params, w)
        new_state, metrics = step(state, weighted_batch)
        np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
        tree_allclose(new_state.params, expected, rtol=1e-5, atol=1e-6)
    # Without weights the per-example loss is the mean: the same step as the scalar loss.
    mean_loss = lambda m, b, h: (per_example_mse(m, b, h)[0].mean(), {})
    scalar = make_train_step(graphdef, mean_loss, tx, donate=False)
    tree_allclose(scalar(state, batch)[0].params, step(state, batch)[0].params, rtol=1e-6)


def recording(name):
    """A GradientTransformationExtraArgs that keeps the extra argument ``name`` in its state."""

    def init(params):
        return {"seen": jnp.zeros(16 if name in ("weights", "per_example_losses") else ())}

    def update(updates, state, params=None, **extra):
        return updates, {"seen": jnp.asarray(extra[name], jnp.float32)}

    return optax.GradientTransformationExtraArgs(init, update)


def test_extra_args_reach_the_optimizer():
    batch = {**make_batch(1), "weights": np.linspace(0.0, 1.0, 16, dtype=np.float32)}
    tx = optax.chain(recording("value"), recording("weights"), optax.sgd(0.05))
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    new_state, metrics = make_train_step(graphdef, per_example_mse, tx, donate=False)(state, batch)
    np.testing.assert_allclose(new_state.opt_state[0]["seen"], metrics["loss"], rtol=1e-6)
    np.testing.assert_array_equal(new_state.opt_state[1]["seen"], batch["weights"])

    # A backtracking line search gets value_fn and accepts a step satisfying Armijo.
    tx = optax.chain(optax.sgd(1.0), optax.scale_by_backtracking_linesearch(30))
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx, donate=False)
    hp = {"weight": 1.0}
    new_state, metrics = step(state, batch, hp)
    after = mse_loss(nnx.merge(graphdef, new_state.params), batch, hp)[0]
    lr = new_state.opt_state[1].learning_rate
    assert (
        float(after) <= float(metrics["loss"]) - 1e-4 * float(lr) * float(metrics["grad_norm"]) ** 2
    )
    assert 0 < float(lr) < 1.0  # it backtracked from the full step


class Sowing(nnx.Module):
    """An MLP that sows its hidden activations, as a probe would."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(3, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.fc1(x))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.fc2(h)


def test_sown_values_stay_out_of_the_state():
    tx = optax.sgd(0.1)
    model = Sowing(nnx.Rngs(0))
    model(make_batch(0)["x"])  # sows once before the state is made
    graphdef, state = create_train_state(model, tx)
    assert jax.tree.leaves(state.model_state) == []
    step = make_train_step(graphdef, lambda m, b, h: (jnp.mean((m(b["x"]) - b["y"]) ** 2), {}), tx)
    for i in range(3):  # the same state structure every step: one compilation
        state, _ = step(state, make_batch(i))
        assert jax.tree.leaves(state.model_state) == []
    assert step.jitted._cache_size() == 1


def test_finite_guard_names_the_first_bad_step_and_parameter():
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx)
    guard = FiniteGuard()
    for i in range(2):
        state, metrics = step(state, make_batch(i), {"weight": 1.0})
        guard.update(i + 1, metrics)
    guard.check(state.params)  # finite: passes, and forgets the checked steps
    bad = make_batch(2)
    bad["x"][5, 1] = np.nan
    for i, batch in ((3, bad), (4, make_batch(4))):
        state, metrics = step(state, batch, {"weight": 1.0})
        guard.update(i, metrics)
    with pytest.raises(FloatingPointError, match=r"at step 3: loss=nan.*parameter: \['fc1'\]"):
        guard.check(state.params)


def test_new_batch_and_hparams_values_do_not_recompile():
    traces = []

    def loss_fn(model, batch, hparams):
        traces.append(1)
        return mse_loss(model, batch, hparams)

    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, loss_fn, tx)
    losses = []
    for i, weight in enumerate([1.0, 0.0, 3.5, 0.25]):
        state, metrics = step(state, make_batch(i), {"weight": weight})
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    assert step.jitted._cache_size() == 1
    assert losses[1] == 0.0  # the weight really is used at run time
    assert int(state.step) == 4


def test_donation_consumes_input_state():
    tx = optax.adam(1e-2)
    model = MLP(nnx.Rngs(0, dropout=1), batch_norm=True, dropout=0.5)
    graphdef, state = create_train_state(model, tx)
    leaves = jax.tree.leaves(state)
    batch, hp = make_batch(0), {"weight": 1.0}
    kept_step = make_train_step(graphdef, mse_loss, tx, donate=False)
    donating_step = make_train_step(graphdef, mse_loss, tx)  # the default donates

    def aliased_inputs(step):
        hlo = step.jitted.lower(state, batch, hp).compile().as_text()
        return sorted(int(i) for i in re.findall(r"\{\d+\}: \((\d+), \{\}, may-alias\)", hlo))

    # Every state buffer (the first len(leaves) inputs), and nothing else, is aliased to an
    # output, so XLA writes the new state in place.
    assert aliased_inputs(donating_step) == list(range(len(leaves)))
    assert aliased_inputs(kept_step) == []

    kept_state, kept_metrics = kept_step(state, batch, hp)
    assert not any(x.is_deleted() for x in leaves)

    new_state, metrics = donating_step(state, batch, hp)
    deleted = [x.is_deleted() for x in leaves]
    assert all(deleted), f"{deleted.count(False)} of {len(leaves)} state buffers kept"
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state))
    with pytest.raises(RuntimeError, match="deleted"):
        np.asarray(state.params["fc1"]["kernel"][...])
    # Donation changes where the result lives, not what it is.
    tree_allclose(new_state, kept_state, rtol=0, atol=0)
    tree_allclose(metrics, kept_metrics, rtol=0, atol=0)


def test_model_state_is_updated_batch_stats_and_rng():
    tx = optax.sgd(0.1)
    model = MLP(nnx.Rngs(0, dropout=1), batch_norm=True, dropout=0.5)
    graphdef, state = create_train_state(model, tx)
    step = make_train_step(graphdef, mse_loss, tx, donate=False)
    batch = make_batch(0)
    new_state, _ = step(state, batch, {"weight": 1.0})

    # Reference: running the eager model once updates the batch stats identically.
    ref = merge_model(graphdef, state)
    mse_loss(ref, batch, {"weight": 1.0})
    np.testing.assert_allclose(
        new_state.model_state["bn"]["mean"][...], ref.bn.mean[...], rtol=1e-6
    )
    assert not np.allclose(new_state.model_state["bn"]["mean"][...], 0.0)
    count_before = int(state.model_state["drop"]["rngs"]["count"][...])
    count_after = int(new_state.model_state["drop"]["rngs"]["count"][...])
    assert count_after == count_before + 1  # a fresh dropout mask next step


def test_nan_batch_is_reported():
    tx = optax.adam(1e-2)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx)
    batch = make_batch(0)
    state, metrics = step(state, batch, {"weight": 1.0})
    check_finite(metrics, step=1)  # finite: no error

    bad = dict(batch, x=batch["x"].copy())
    bad["x"][3, 1] = np.nan
    state, metrics = step(state, bad, {"weight": 1.0})
    assert not bool(metrics["finite"])
    with pytest.raises(FloatingPointError, match=r"step 2.*loss=nan.*grad_norm=nan"):
        check_finite(metrics, step=state.step)


def test_infinite_gradient_with_finite_loss_is_reported():
    def loss_fn(model, batch, hparams):
        out = model(batch["x"])
        return jnp.sum(jnp.sqrt(jnp.abs(out - out))), {}  # value 0, gradient inf/nan

    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, loss_fn, tx)
    _, metrics = step(state, make_batch(0))
    assert float(metrics["loss"]) == 0.0
    assert not bool(metrics["finite"])
    with pytest.raises(FloatingPointError, match="step 7"):
        check_finite(metrics, 7)


def test_finite_flag_reads_the_norms():
    """A NaN entry, an inf entry, or a finite entry whose square overflows all clear it."""
    tx = optax.sgd(0.0)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx, donate=False)
    batch = make_batch(0)
    _, metrics = step(state, batch, {"weight": 1.0})
    assert bool(metrics["finite"])
    leaves, treedef = jax.tree.flatten(state.params)
    for value in (np.nan, np.inf, 1e20):
        bad = [np.array(x) for x in leaves]
        bad[-1].flat[0] = value
        bad_state = state.replace(params=jax.tree.unflatten(treedef, bad))
        _, metrics = step(bad_state, batch, {"weight": 1.0})
        assert not bool(metrics["finite"]), value
        assert not np.isfinite(float(metrics["param_norm"])), value


def test_bad_inputs_raise_clear_errors():
    tx = optax.sgd(0.1)
    graphdef, state = create_train_state(MLP(nnx.Rngs(0)), tx)
    step = make_train_step(graphdef, mse_loss, tx, donate=False)
    with pytest.raises(TypeError, match="hparams"):
        step(state, make_batch(0), [1.0])
    with pytest.raises(ValueError, match=r"hparams\['weight'\]"):
        step(state, make_batch(0), {"weight": np.ones(2)})
    with pytest.raises(TypeError, match="state"):
        step(state.params, make_batch(0), {"weight": 1.0})

    def clash(model, batch, hparams):
        return mse_loss(model, batch, hparams)[0], {"grad_norm": 0.0}

    with pytest.raises(ValueError, match="reserved"):
        make_train_step(graphdef, clash, tx)(state, make_batch(0), {"weight": 1.0})

    def vector_loss(model, batch, hparams):
        return jnp.ones(3), {}

    with pytest.raises(ValueError, match="3 per-example losses for a batch of \\[16\\]"):
        make_train_step(graphdef, vector_loss, tx)(state, make_batch(0))

    def matrix_loss(model, batch, hparams):
        return jnp.ones((16, 2)), {}

    with pytest.raises(ValueError, match="scalar loss or a \\(B,\\) vector"):
        make_train_step(graphdef, matrix_loss, tx)(state, make_batch(0))
    bad_weights = {**make_batch(0), "weights": np.ones(8, np.float32)}
    with pytest.raises(ValueError, match=r"batch\['weights'\]. must hold one weight"):
        make_train_step(graphdef, per_example_mse, tx)(state, bad_weights)
    with pytest.raises(TypeError, match="tx"):
        make_train_step(graphdef, mse_loss, "adam")
    with pytest.raises(KeyError, match="finite"):
        check_finite({"loss": 1.0}, 0)
    assert "finite" in RESERVED_METRICS
