"""Hyperparameters are checked where they are given: at the factory, naming the argument.

Every factory below gets NaN, infinities, out-of-range and wrong-type values for each of
its numeric hyperparameters and must refuse them when it is called, with the argument's
name in the message. Valid values, schedules (where a callable is accepted) and traced
values (the factory called inside ``jax.jit``) must still build a working transform or
estimator whose first update is finite.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_models import MLP
from flax import nnx

from jaxeff import clustering, gvar, losses, pergrad, robust, train
from jaxeff._checks import check_number

NAN, INF = float("nan"), float("inf")


def _mlp():
    graphdef, params, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)

    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    return loss_fn, params


LOSS, PARAMS = _mlp()
_RNG = np.random.default_rng(0)
DATA = {"x": _RNG.normal(size=(16, 3)).astype(np.float32), "y": _RNG.integers(0, 2, 16)}
GRAD = np.array([0.5, -2.0, 1.0, 0.25], np.float32)


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# -- one update of what each factory builds ---------------------------------------------
def run_transform(tx):
    updates, _ = tx.update(GRAD, tx.init(GRAD))
    return updates


def run_clustering(tx):
    """Two updates: the first seeds the centres, the second moves them (decay, splits)."""

    @jax.jit  # one compilation is faster than running the two updates op by op
    def two_updates():
        state = tx.init(PARAMS)
        for _ in range(2):
            _, grads, stats = pergrad.value_grad_and_stats(
                LOSS, PARAMS, DATA, directions=state.clusters.centres
            )
            _, state = tx.update(grads, state, PARAMS, per_example_stats=stats)
        return state.clusters

    return two_updates()


def run_estimator(estimator):
    state = estimator.init(PARAMS, DATA)
    grad, _ = estimator.estimate(state, PARAMS, DATA, jax.random.key(0))
    return grad


def run_schedule(schedule):
    return schedule(jnp.arange(6))


def make_train_step(chunk_size):
    """``(step, state)``: a train step with per-example statistics in chunks."""
    tx = optax.sgd(0.1)
    graphdef, state = train.create_train_state(MLP(nnx.Rngs(0)), tx)

    def loss_fn(model, batch, hparams):
        del hparams
        return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]), {}

    step = train.make_train_step(
        graphdef, loss_fn, tx, donate=False, per_example_stats=True, chunk_size=chunk_size
    )
    return step, state


def run_train_step(step_and_state):
    step, state = step_and_state
    _, metrics, _ = step(state, DATA)
    return metrics


class Hyperparameter(NamedTuple):
    """One numeric argument of one factory: how to build with it and run what it built."""

    build: Any  # value -> the transform, estimator or schedule
    run: Any  # what build returned -> a pytree that must be finite
    valid: tuple  # values that must build and run; the first also traced
    bad: tuple  # (value, exception) pairs that must be refused at build time
    traced_error: type[Exception] | None = None  # None: a traced value builds and runs


_REAL = (
    (NAN, ValueError),
    (INF, ValueError),
    (-INF, ValueError),
    (-0.5, ValueError),
    (jnp.asarray(NAN), ValueError),
    (np.float32(-1.0), ValueError),
    ("0.1", TypeError),
    (True, TypeError),
    (None, TypeError),
    (1j, TypeError),
    (np.ones(2), TypeError),
)
_FRACTION = (*_REAL, (1.0, ValueError), (1.5, ValueError))  # [0, 1)
_UNIT = (*_REAL, (1.5, ValueError))  # [0, 1]
# The integer counts keep their own checks, which raise ValueError for every bad value.
_COUNT = tuple(
    (value, ValueError) for value in (NAN, INF, -1, 2.5, True, "4", None, jnp.asarray(NAN))
)
_POSITIVE_COUNT = (*_COUNT, (0, ValueError))
_OPTIONAL_POSITIVE_COUNT = tuple(bad for bad in _POSITIVE_COUNT if bad[0] is not None)

GC = dict(batch_size=4, num_clusters=2, num_passes=1, chunk_size=8)
IMPORTANCE = dict(batch_size=4, chunk_size=8)


def estimator_counts(factory, counts: dict, *, bad=None, more_valid=None) -> dict:
    """One entry per integer argument ``name`` of an estimator factory, the others at
    ``counts``: valid ``counts[name]`` and ``more_valid[name]``, refused ``bad[name]``
    (default: every bad count and 0)."""
    bad, more_valid = bad or {}, more_valid or {}
    return {
        f"{factory.__name__}.{name}": Hyperparameter(
            lambda v, name=name: factory(LOSS, **{**counts, name: v}),
            run_estimator,
            valid=(counts[name], *more_valid.get(name, ())),
            bad=bad.get(name, _POSITIVE_COUNT),
            traced_error=ValueError,
        )
        for name in counts
    }


HYPERPARAMETERS = {
    "steepest_descent.learning_rate": Hyperparameter(
        lambda v: robust.steepest_descent(v, norm=2),
        run_transform,
        valid=(0.1, 0, 3, np.float32(0.1), jnp.asarray(0.1), optax.linear_schedule(0.1, 0.0, 5)),
        bad=_REAL,
    ),
    "gradient_clustering.decay": Hyperparameter(
        lambda v: clustering.gradient_clustering(LOSS, DATA, num_clusters=2, decay=v),
        run_clustering,
        valid=(0.5, 0.0),
        bad=_FRACTION,
    ),
    "gradient_clustering.min_fraction": Hyperparameter(
        lambda v: clustering.gradient_clustering(
            LOSS, DATA, num_clusters=2, min_fraction=v, reinit_every=1
        ),
        run_clustering,
        valid=(0.4,),
        bad=_FRACTION,
    ),
    "gradient_clustering.reinit_every": Hyperparameter(
        lambda v: clustering.gradient_clustering(LOSS, DATA, num_clusters=2, reinit_every=v),
        run_clustering,
        valid=(1,),
        bad=_COUNT,
        traced_error=ValueError,
    ),
    "gc_estimator.min_fraction": Hyperparameter(
        lambda v: clustering.gc_estimator(LOSS, **GC, min_fraction=v),
        run_estimator,
        valid=(0.25, 0.0),
        bad=_FRACTION,
        traced_error=TypeError,
    ),
    **estimator_counts(clustering.gc_estimator, GC, bad={"num_passes": _COUNT}),
    "importance_estimator.smoothing": Hyperparameter(
        lambda v: clustering.importance_estimator(LOSS, **IMPORTANCE, smoothing=v),
        run_estimator,
        valid=(0.1, 0.0, 1),
        bad=_UNIT,
        traced_error=TypeError,
    ),
    **estimator_counts(clustering.importance_estimator, IMPORTANCE),
    **estimator_counts(gvar.sgd_estimator, dict(batch_size=4)),
    **estimator_counts(
        gvar.svrg_estimator,
        dict(batch_size=4, chunk_size=8),
        bad={"chunk_size": _OPTIONAL_POSITIVE_COUNT},
        more_valid={"chunk_size": (None,)},
    ),
    "hard_negative_schedule.warmup_steps": Hyperparameter(
        losses.hard_negative_schedule,
        run_schedule,
        valid=(3, 0),
        bad=_COUNT,
        traced_error=ValueError,
    ),
    "hard_negative_schedule.transition_steps": Hyperparameter(
        lambda v: losses.hard_negative_schedule(2, transition_steps=v),
        run_schedule,
        valid=(3, 0),
        bad=_COUNT,
        traced_error=ValueError,
    ),
    "make_train_step.chunk_size": Hyperparameter(
        make_train_step,
        run_train_step,
        valid=(8,),
        bad=_OPTIONAL_POSITIVE_COUNT,
        traced_error=ValueError,
    ),
}


def argument(case: str) -> str:
    return case.split(".")[1]


def shown(value) -> str:
    return "schedule" if callable(value) else repr(value)


BAD_CASES = [
    pytest.param(case, value, error, id=f"{case}={shown(value)}")
    for case, spec in HYPERPARAMETERS.items()
    for value, error in spec.bad
]
VALID_CASES = [
    pytest.param(case, value, id=f"{case}={shown(value)}")
    for case, spec in HYPERPARAMETERS.items()
    for value in spec.valid
]


@pytest.mark.parametrize("case, value, error", BAD_CASES)
def test_bad_value_is_refused_at_build_time_naming_the_argument(case, value, error):
    with pytest.raises(error, match=f"`{argument(case)}`"):
        HYPERPARAMETERS[case].build(value)


@pytest.mark.parametrize("case, value", VALID_CASES)
def test_valid_value_builds_and_runs_finite(case, value):
    spec = HYPERPARAMETERS[case]
    assert all_finite(spec.run(spec.build(value)))


TRACED = [case for case, spec in HYPERPARAMETERS.items() if spec.traced_error is None]
STATIC = [case for case, spec in HYPERPARAMETERS.items() if spec.traced_error is not None]


@pytest.mark.parametrize("case", TRACED)
def test_traced_value_passes_unchecked_and_runs_as_the_concrete_one(case):
    spec = HYPERPARAMETERS[case]
    value = spec.valid[0]
    traced = jax.jit(lambda v: spec.run(spec.build(v)))(value)
    assert all_finite(traced)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        traced,
        spec.run(spec.build(value)),
    )


@pytest.mark.parametrize("case", STATIC)
def test_traced_value_of_a_static_argument_is_refused_naming_it(case):
    spec = HYPERPARAMETERS[case]
    with pytest.raises(spec.traced_error, match=f"`{argument(case)}`"):
        jax.make_jaxpr(lambda v: (spec.build(v), v)[1])(spec.valid[0])


def test_a_traced_bad_learning_rate_is_left_to_the_step():
    """Inside jit the value cannot be read: the transform builds and the update is NaN."""

    @jax.jit
    def update(learning_rate):
        return run_transform(robust.steepest_descent(learning_rate, norm=2))

    assert not all_finite(update(NAN))


def test_a_schedule_is_not_called_at_build_time():
    calls = []

    def schedule(step):
        calls.append(step)
        return 0.1

    tx = robust.steepest_descent(schedule, norm=2)
    assert not calls
    assert all_finite(run_transform(tx))


@pytest.mark.parametrize(
    "bounds, value, expected",
    [
        (dict(at_least=0), -1, "a finite number >= 0"),
        (dict(above=0), 0, "a finite number > 0"),
        (dict(below=1), 2, "a finite number < 1"),
        (dict(at_least=0, below=1), 1, r"a number in \[0, 1\)"),
        (dict(above=0, at_most=1), 0, r"a number in \(0, 1\]"),
        (dict(), NAN, "a finite number, got nan"),
        (dict(at_least=0, schedule=True), -1, "or a schedule"),
    ],
)
def test_check_number_says_what_was_expected(bounds, value, expected):
    with pytest.raises(ValueError, match=expected):
        check_number(value, "x", **bounds)


def test_check_number_returns_the_value_itself():
    value = jnp.asarray(0.5, jnp.bfloat16)
    assert check_number(value, "x", at_least=0) is value
    assert check_number(np.int64(3), "x", above=0) == 3
