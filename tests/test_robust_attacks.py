"""PGD attacks: the closed-form worst case on linear models, and invariants on a small CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jaxeff import robust
from jaxeff.robust import attacks
from jaxeff.robust.attacks import pgd_attack

NORMS = [jnp.inf, 2, 1, "fourier_inf"]
SHAPE = (6, 6, 2)  # images (H, W, C): Fourier norms act per channel over (H, W)


def gap_eps(radii):
    """A radius in the middle of the widest gap between the middle points' certified radii,
    so no point's robust margin is near 0 (the attack need not be exact to the last digit)."""
    r = np.sort(np.asarray(radii)[np.asarray(radii) > 0])
    lo, hi = len(r) // 4, 3 * len(r) // 4
    i = int(np.argmax(np.diff(r[lo : hi + 1])))
    return float((r[lo + i] + r[lo + i + 1]) / 2)


def binary_problem(n=48, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=SHAPE).astype(np.float32)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    score = np.tensordot(x, w, 3) + 0.3
    flip = rng.random(n) < 0.1  # a few points misclassified before any attack
    y = np.where(flip, -np.sign(score), np.sign(score)).astype(np.float32)
    return w, np.float32(0.3), x, y


def multiclass_problem(n=48, k=3, seed=1):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(*SHAPE, k)).astype(np.float32)
    b = rng.normal(size=k).astype(np.float32)
    x = rng.normal(size=(n, *SHAPE)).astype(np.float32)
    y = np.argmax(np.tensordot(x, w, 3) + b + 0.5 * rng.normal(size=(n, k)), axis=1)
    return w, b, x, y.astype(np.int32)


class Affine(nnx.Module):
    """``<w, x> + b`` as an nnx module: its weights are traced, so every test with the same
    attack settings shares one compiled program."""

    def __init__(self, w, b):
        self.w, self.b = nnx.Param(jnp.asarray(w)), nnx.Param(jnp.asarray(b))

    def __call__(self, x):
        return jnp.tensordot(x, self.w[...], axes=len(SHAPE)) + self.b[...]


def linear_fn(w, b):
    return lambda z: jnp.tensordot(z, w, axes=len(SHAPE)) + b


def in_ball(x_adv, x, p, eps):
    size = np.asarray(robust.norm(x_adv - x, p, batch_dims=1))
    return np.all(size <= eps * (1 + 1e-5) + 1e-6), size.max()


# ----------------------------------------------------------------------------- linear


@pytest.mark.parametrize("p", NORMS)
def test_binary_linear_attack_reproduces_the_closed_form(p):
    w, b, x, y = binary_problem()
    eps = gap_eps(robust.certified_radius(w, x, y, p=p, b=b))
    result = pgd_attack(
        Affine(w, b), x, y, eps=eps, p=p, steps=30, step_size=eps / 2, restarts=2,
        key=jax.random.key(0),
    )  # fmt: skip
    margin = np.asarray(robust.robust_margin(w, x, y, eps=eps, p=p, b=b))
    assert 0 < np.mean(margin > 0) < np.mean(y * (np.tensordot(x, w, 3) + b) > 0)
    np.testing.assert_array_equal(np.asarray(result.success), margin <= 0)
    assert float(result.robust_accuracy) == float(
        robust.robust_accuracy(w, x, y, eps=eps, p=p, b=b)
    )
    # The kept point lowers each margin by the closed form's ε ||w||_q.
    attained = y * np.asarray(linear_fn(w, b)(result.x_adv))
    decrease = eps * float(robust.dual_norm(w, p))
    np.testing.assert_allclose(attained, margin, atol=1e-4 * decrease)
    np.testing.assert_allclose(result.logits, y * attained, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.loss, np.logaddexp(0, -attained), rtol=1e-5, atol=1e-6)
    ok, largest = in_ball(result.x_adv, x, p, eps)
    assert ok, largest


@pytest.mark.parametrize("p", NORMS)
def test_one_step_is_the_steepest_ascent_direction(p):
    # From δ = 0 (no key) one step of length α < ε stays inside the ball: x - α y d*(w).
    w, b, x, y = binary_problem(n=16)
    alpha = 0.01
    result = pgd_attack(Affine(w, b), x, y, eps=1.0, p=p, steps=1, step_size=alpha)
    expected = x - alpha * y[:, None, None, None] * np.asarray(robust.maximizing_direction(w, p))
    np.testing.assert_allclose(result.x_adv, expected, atol=1e-6)


def test_multiclass_linear_attack_reproduces_the_closed_form(p="fourier_inf"):
    # The closed form takes the worst class pair: min over δ and over j commute. Untargeted
    # PGD can stop at a vertex that is a local maximum for the wrong pair, so the exact
    # check attacks each pair (the loss z_{y+o} - z_y for each offset o) and keeps any
    # success; the plain untargeted attack must still be sound (never beat the closed form).
    w, b, x, y = multiclass_problem()
    k = w.shape[-1]
    eps = gap_eps(robust.certified_radius(w, x, y, p=p, b=b))
    margin = np.asarray(robust.robust_margin(w, x, y, eps=eps, p=p, b=b))
    success = np.zeros(len(y), bool)
    for offset in range(1, k):

        def pair_loss(logits, labels, offset=offset):
            other = jnp.take_along_axis(logits, ((labels + offset) % k)[:, None], axis=1)
            true = jnp.take_along_axis(logits, labels[:, None], axis=1)
            return (other - true)[:, 0]

        result = pgd_attack(
            Affine(w, b), x, y, eps=eps, p=p, steps=30, step_size=eps / 2, loss=pair_loss
        )
        success |= np.asarray(result.success)
        assert in_ball(result.x_adv, x, p, eps)[0]
    np.testing.assert_array_equal(success, margin <= 0)
    untargeted = pgd_attack(
        Affine(w, b), x, y, eps=eps, p=p, steps=30, step_size=eps / 2, loss="margin",
        restarts=2, key=jax.random.key(1),
    )  # fmt: skip
    assert not np.any(np.asarray(untargeted.success) & (margin > 0))
    logits = np.asarray(untargeted.logits)
    true = logits[np.arange(len(y)), y]
    other = np.where(np.arange(k) == y[:, None], -np.inf, logits).max(axis=1)
    np.testing.assert_allclose(untargeted.loss, other - true, rtol=1e-5, atol=1e-5)


def test_a_success_is_kept_over_a_higher_loss():
    # The loss -(s - 0.2)² peaks at a correctly classified score: its ascent goes from the
    # misclassified clean point s = -0.5 through -0.3, -0.1 to 0.1, 0.3 (correct, higher
    # loss); the kept point is the misclassified candidate with the highest loss.
    x, y = np.array([[-0.5]], np.float32), np.array([1.0], np.float32)
    result = pgd_attack(
        lambda z: z[:, 0], x, y, eps=1.0, p=jnp.inf, steps=5, step_size=0.2,
        loss=lambda s, labels: -jnp.square(s - 0.2),
    )  # fmt: skip
    assert bool(result.success[0])
    np.testing.assert_allclose(result.x_adv, [[-0.1]], atol=1e-6)


def test_the_clean_point_is_a_candidate():
    # A narrow dip makes only the clean point misclassified; random starts land outside
    # it, where the gradient vanishes, so the clean point itself must be kept.
    x, y = np.zeros((1, 1), np.float32), np.ones(1, np.float32)
    result = pgd_attack(
        lambda z: 1 - 2 * jnp.exp(-jnp.square(z[:, 0] / 0.01)), x, y, eps=1.0, p=jnp.inf,
        steps=2, step_size=0.1, restarts=3, key=jax.random.key(0),
    )  # fmt: skip
    assert bool(result.success[0]) and float(result.robust_accuracy) == 0.0
    np.testing.assert_array_equal(result.x_adv, x)


def test_unrolled_attack_equals_the_looped_one():
    w, b, x, y = binary_problem(n=16)
    x = (x - x.min()) / (x.max() - x.min())  # inside the box [0, 1]
    kwargs = dict(eps=0.2, p="fourier_inf", steps=2, step_size=0.1, restarts=2,
                  key=jax.random.key(2), clip=(0.0, 1.0))  # fmt: skip
    looped = pgd_attack(Affine(w, b), x, y, **kwargs)
    unrolled = pgd_attack(Affine(w, b), x, y, unroll=True, **kwargs)
    np.testing.assert_allclose(unrolled.x_adv, looped.x_adv, atol=1e-5)
    np.testing.assert_array_equal(unrolled.success, looped.success)


def test_default_unrolls_short_attacks_of_costly_models_on_cpu(monkeypatch):
    # unroll=None: on CPU an attack of at most 32 gradient steps in all (steps x restarts)
    # is written out, with no loop left in its program, when a forward pass costs enough
    # for the faster steps to repay the compilation; otherwise the loops stay.
    assert jax.default_backend() == "cpu"
    w, b, x, y = binary_problem(n=4)

    def has_loop(**kwargs):
        def attack(z):
            return pgd_attack(Affine(w, b), z, y, eps=0.1, p=2, step_size=0.05, **kwargs).x_adv

        return "while" in str(jax.make_jaxpr(attack)(x))

    model_fn, state = attacks._split_model(Affine(w, b))
    flops = attacks._forward_flops(model_fn, state, jnp.asarray(x))
    assert 2 * 4 * 72 <= flops <= 2 * 4 * 72 + 8  # <w, x> for 4 rows of 72 inputs, + bias
    assert has_loop(steps=5)  # far below the threshold: compiling more would not pay
    monkeypatch.setattr(attacks, "_UNROLL_MIN_FLOPS", flops)
    key = jax.random.key(0)
    assert not has_loop(steps=16, restarts=2, key=key)
    assert has_loop(steps=11, restarts=3, key=key)
    assert has_loop(steps=5, unroll=False)
    monkeypatch.setattr(attacks, "_UNROLL_MIN_FLOPS", flops + 1)
    assert has_loop(steps=5)
    assert not has_loop(steps=40, unroll=True)


def test_targeted_binary_attack_is_the_untargeted_one_toward_the_other_label():
    w, b, x, y = binary_problem(n=16)
    eps = gap_eps(robust.certified_radius(w, x, y, p=2, b=b))
    kwargs = dict(eps=eps, p=2, steps=20, step_size=eps / 2)
    untargeted = pgd_attack(Affine(w, b), x, y, **kwargs)
    targeted = pgd_attack(Affine(w, b), x, -y, targeted=True, **kwargs)
    np.testing.assert_array_equal(targeted.success, untargeted.success)
    np.testing.assert_allclose(targeted.x_adv, untargeted.x_adv, atol=1e-5)


def test_l1_top_k_moves_k_coordinates_per_step():
    w, b, x, y = binary_problem(n=4)
    # A plain closure as the model (the other linear tests pass a module).
    result = pgd_attack(linear_fn(w, b), x, y, eps=1.0, p=1, steps=1, step_size=0.5, top_k=5)
    delta = np.asarray(result.x_adv - x).reshape(4, -1)
    np.testing.assert_array_equal(np.sum(np.abs(delta) > 1e-7, axis=1), 5)
    np.testing.assert_allclose(np.abs(delta).sum(axis=1), 0.5, rtol=1e-5)
    largest = np.argsort(-np.abs(w.reshape(-1)))[:5]
    assert np.all(np.abs(delta[:, largest]) > 0)


# ----------------------------------------------------------------------------- CNN


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 8, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x))
        return self.fc(h.reshape(h.shape[0], -1))


@nnx.jit
def forward(model, x):
    return model(x)


def cnn_batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(n, 8, 8, 3)).astype(np.float32)
    return x, rng.integers(0, 10, n).astype(np.int32)


def cnn_and_labels(seed=0):
    """A random CNN, and as labels its own predictions with a few changed (clean
    accuracy strictly between 0 and 1)."""
    model = CNN(nnx.Rngs(seed))
    x, noise = cnn_batch(seed)
    y = np.array(jnp.argmax(forward(model, x), axis=1))
    y[:3] = noise[:3]
    return model, x, y.astype(np.int32)


CNN_EPS = {jnp.inf: 0.03, 2: 0.3, 1: 2.0, "fourier_inf": 0.08}


@pytest.mark.parametrize("p", NORMS)
def test_cnn_attack_stays_in_the_ball_and_box_and_lowers_accuracy(p):
    model, x, y = cnn_and_labels()
    eps = CNN_EPS[p]
    kwargs = dict(eps=eps, p=p, steps=5, step_size=eps / 2, restarts=2, clip=(0.0, 1.0))
    result = pgd_attack(model, x, y, key=jax.random.key(3), **kwargs)
    clean = np.mean(np.argmax(forward(model, x), axis=1) == y)
    accuracy = float(result.robust_accuracy)
    assert accuracy <= clean and accuracy < 1
    ok, largest = in_ball(result.x_adv, x, p, eps)
    assert ok, largest
    assert np.all(np.asarray(result.x_adv) >= 0) and np.all(np.asarray(result.x_adv) <= 1)
    np.testing.assert_allclose(result.logits, forward(model, result.x_adv), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        result.success, np.argmax(np.asarray(result.logits), axis=1) != y
    )  # no ties in float logits here
    again = pgd_attack(model, x, y, key=jax.random.key(3), **kwargs)
    np.testing.assert_array_equal(again.x_adv, result.x_adv)
    other = pgd_attack(model, x, y, key=jax.random.key(4), **kwargs)
    assert not np.array_equal(other.x_adv, result.x_adv)


@pytest.mark.parametrize("p", ["fourier_inf", jnp.inf])
def test_saturated_pixels_do_not_collapse_a_boxed_attack(p):
    # Images with pixels at exactly 0 or 1 (digits, CIFAR-10): a dense Fourier step always
    # pushes some of them out of the box, so shrinking the whole perturbation toward x until
    # x + tδ fits gives t = 0. The kept perturbations must still fill most of the ball.
    model, x, _ = cnn_and_labels(seed=5)
    x = np.where(x < 0.3, 0.0, np.where(x > 0.7, 1.0, x)).astype(np.float32)
    y = np.asarray(jnp.argmax(forward(model, x), axis=1), np.int32)  # clean accuracy 1
    eps = 0.1
    result = pgd_attack(model, x, y, eps=eps, p=p, steps=5, step_size=eps / 2,
                        key=jax.random.key(0), clip=(0.0, 1.0))  # fmt: skip
    ok, largest = in_ball(result.x_adv, x, p, eps)
    assert ok, largest
    assert np.all(np.asarray(result.x_adv) >= 0) and np.all(np.asarray(result.x_adv) <= 1)
    size = np.asarray(robust.norm(result.x_adv - x, p, batch_dims=1))
    assert np.all(size > 0.8 * eps), size
    assert float(result.robust_accuracy) < 0.5


def test_more_steps_or_restarts_never_raise_robust_accuracy(p="fourier_inf"):
    # Restart r starts from fold_in(key, r) and the iterates of a longer run extend those
    # of a shorter one, so the kept worst point can only get worse for the model. With no
    # steps the candidates are the random starts alone, so keeping the last restart instead
    # of the worst would show.
    model, x, y = cnn_and_labels(seed=1)
    eps = CNN_EPS[p]

    def run(steps, restarts):
        return pgd_attack(model, x, y, eps=eps, p=p, steps=steps, step_size=eps / 4,
                          restarts=restarts, key=jax.random.key(5), clip=(0.0, 1.0))  # fmt: skip

    runs = {(s, r): run(s, r) for s, r in [(0, 1), (0, 4), (2, 1), (4, 1), (4, 3), (4, 4)]}
    chains = [[(0, 1), (0, 4), (4, 4)], [(2, 1), (4, 1), (4, 3), (4, 4)]]
    for chain in chains:
        for fewer, more in zip(chain[:-1], chain[1:], strict=True):
            fewer, more = runs[fewer], runs[more]
            assert np.all(np.asarray(more.success) >= np.asarray(fewer.success))
            still = ~np.asarray(more.success)
            assert np.all(np.asarray(more.loss)[still] >= np.asarray(fewer.loss)[still])
    assert float(runs[4, 4].robust_accuracy) < float(runs[2, 1].robust_accuracy)


def test_new_data_and_new_weights_do_not_recompile():
    traces = []

    def counting_loss(logits, labels):
        traces.append(1)
        return (
            jnp.sum(jax.nn.softplus(logits), axis=1)
            - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        )

    kwargs = dict(p="fourier_inf", steps=3, restarts=2, loss=counting_loss, clip=(0.0, 1.0))
    model, x, y = cnn_and_labels(seed=2)
    pgd_attack(model, x, y, eps=0.05, step_size=0.02, key=jax.random.key(0), **kwargs)
    count = len(traces)
    assert count > 0
    other = CNN(nnx.Rngs(9))  # same structure, new weights; new data, radius and key
    x2, y2 = cnn_batch(seed=3)
    result = pgd_attack(other, x2, y2, eps=0.07, step_size=0.03, key=jax.random.key(1), **kwargs)
    assert len(traces) == count
    np.testing.assert_allclose(result.logits, forward(other, result.x_adv), rtol=1e-5, atol=1e-5)


def test_split_merge_closure_inside_jit_equals_the_module():
    model, x, y = cnn_and_labels(seed=4)
    graphdef, state = nnx.split(model)
    kwargs = dict(eps=0.03, p=jnp.inf, steps=3, step_size=0.01)

    @jax.jit
    def attack(state, x, y):
        return pgd_attack(lambda z: nnx.merge(graphdef, state)(z), x, y, **kwargs)

    inside = attack(state, x, y)
    direct = pgd_attack(model, x, y, **kwargs)
    np.testing.assert_allclose(inside.x_adv, direct.x_adv, atol=1e-6)
    np.testing.assert_array_equal(inside.success, direct.success)


def test_concrete_arrays_closed_over_inside_jit():
    # Inside a jit trace the checks on concrete (closed-over) arrays run eagerly instead of
    # being staged into the trace, where they could not be turned into a Python bool.
    w, b, x, y = multiclass_problem(n=8)
    x, y = jnp.asarray(x), jnp.asarray(y)
    kwargs = dict(eps=0.5, p=jnp.inf, steps=2, step_size=0.25, clip=(-10.0, 10.0))
    inside = jax.jit(lambda: pgd_attack(Affine(w, b), x, y, **kwargs).x_adv)()
    direct = pgd_attack(Affine(w, b), x, y, **kwargs).x_adv
    np.testing.assert_allclose(inside, direct, atol=1e-6)
    with pytest.raises(ValueError, match="`x` must lie inside"):  # checked, not skipped
        jax.jit(lambda: pgd_attack(Affine(w, b), x, y, **{**kwargs, "clip": (0.0, 1.0)}).x_adv)()


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_batch_sharded_over_devices_equals_one_device(axis_type):
    # The same settings as the ball-and-box test for Fourier-L∞, whose unsharded program
    # this reuses.
    model, x, y = cnn_and_labels()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    eps = CNN_EPS["fourier_inf"]
    kwargs = dict(eps=eps, p="fourier_inf", steps=5, step_size=eps / 2, restarts=2,
                  clip=(0.0, 1.0), key=jax.random.key(3))  # fmt: skip
    single = pgd_attack(model, x, y, **kwargs)
    sharded = pgd_attack(model, jax.device_put(x, sharding), jax.device_put(y, sharding), **kwargs)
    assert sharded.x_adv.sharding.is_equivalent_to(sharding, x.ndim)
    np.testing.assert_allclose(sharded.x_adv, single.x_adv, atol=1e-5)
    np.testing.assert_array_equal(sharded.success, single.success)


# ----------------------------------------------------------------------------- errors


def test_invalid_arguments_are_refused_by_name():
    w, b, x, y = binary_problem(n=4)
    f = linear_fn(w, b)
    good = dict(eps=0.1, p=2, steps=2, step_size=0.05)

    def refused(match, fn=f, x=x, y=y, **changes):
        with pytest.raises(ValueError, match=match):
            pgd_attack(fn, x, y, **{**good, **changes})

    refused("`eps`", eps=-0.1)
    refused("`eps`", eps=np.full(3, 0.1))
    refused("`p`", p="fourier_2")
    refused("`p`", p=0.5)
    refused("`step_size`", step_size=-1.0)
    refused("`steps`", steps=-1)
    refused("`restarts`", restarts=0)
    refused("`key`", restarts=2)
    refused("`top_k`", top_k=3)
    refused("`loss`", loss="hinge")
    refused("`y`", y=y[:3])
    refused("`y`", y=np.zeros(4))
    refused("`y`", fn=lambda z: jnp.stack([f(z), -f(z)], axis=1), y=y)  # float labels
    refused("`apply_fn`", fn=lambda z: f(z)[:, None])  # (B, 1) is neither form
    refused("`apply_fn`", fn=lambda z: f(z)[:2])
    refused("`x`", clip=(0.0, 1.0))  # x has entries outside [0, 1]
    refused("`x`", x=np.where(np.arange(4)[:, None, None, None] == 2, np.nan, x))
    refused("`clip`", clip=(1.0, 0.0))
    refused("`loss`", loss=lambda logits, labels: jnp.sum(logits))
    refused("`unroll`", unroll="auto")
    with pytest.raises(TypeError, match="`apply_fn`"):
        pgd_attack(3.0, x, y, **good)
