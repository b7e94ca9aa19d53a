"""Linear networks: the extracted classifier is the network, and its closed-form robustness
is what an attack on the network finds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import robust
from jaxeff.models.linear import DeepLinear, LinearClassifier, LinearConvNet
from jaxeff.robust.attacks import pgd_attack


@nnx.jit
def outputs_and_classifier(model, x):
    """One compiled program instead of many op-by-op dispatches (test time)."""
    clf = model.linear_classifier()
    return model(x), clf, clf(x)


def randomize_biases(model, rng):
    """Biases start at zero; random ones make a dropped or misplaced bias visible."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and path[-1] == "bias":
            node[...] = rng.normal(size=node.shape).astype(np.float32)


def assert_same_function(model, seed=0, n=6):
    rng = np.random.default_rng(seed)
    randomize_biases(model, rng)
    x = rng.normal(size=(n, *model.in_shape)).astype(np.float32)
    out, clf, clf_out = outputs_and_classifier(model, x)
    assert isinstance(clf, LinearClassifier)
    out = np.asarray(out)
    expected_w_shape = model.in_shape + (() if model.num_classes is None else (model.num_classes,))
    assert clf.w.shape == expected_w_shape
    assert clf.b.shape == (() if model.num_classes is None else (model.num_classes,))
    assert out.shape == (n,) + clf.b.shape
    scale = np.abs(out).max()
    by_hand = np.tensordot(x, np.asarray(clf.w), axes=len(model.in_shape)) + np.asarray(clf.b)
    np.testing.assert_allclose(out, by_hand, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(clf_out, by_hand, rtol=1e-5, atol=1e-5 * scale)
    return clf


@pytest.mark.parametrize(
    "in_shape, widths, num_classes, use_bias",
    [
        (5, (), None, True),
        (7, (6,), None, True),
        (4, (8, 8, 8), 3, True),
        ((3, 4), (5, 2), None, False),
        ((4, 4, 2), (3, 3, 3, 3, 3), 4, True),
    ],
)
def test_deep_linear_equals_its_linear_classifier(in_shape, widths, num_classes, use_bias):
    model = DeepLinear(
        in_shape, widths, num_classes=num_classes, use_bias=use_bias, rngs=nnx.Rngs(len(widths))
    )
    assert len(model.layers) == len(widths) + 1
    clf = assert_same_function(model)
    if not use_bias:
        assert float(jnp.max(jnp.abs(clf.b))) == 0.0


@pytest.mark.parametrize(
    "in_shape, channels, kernel_size, num_classes, use_bias",
    [
        ((8,), (1,), None, None, True),
        ((8,), (1, 1, 1), None, None, True),  # the full-width single-channel setting
        ((9,), (2, 3), 3, 4, True),
        ((8,), (1, 1), None, None, False),
        ((4, 6), (2, 1), None, None, True),
        ((4, 4, 3), (2, 2), (3, 3), 5, True),
        ((4, 4, 3), (1,), None, None, True),
    ],
)
def test_linear_conv_net_equals_its_linear_classifier(
    in_shape, channels, kernel_size, num_classes, use_bias
):
    model = LinearConvNet(
        in_shape,
        channels,
        kernel_size=kernel_size,
        num_classes=num_classes,
        use_bias=use_bias,
        rngs=nnx.Rngs(len(channels)),
    )
    assert len(model.convs) == len(channels)
    assert_same_function(model, seed=1)


def test_conv_layers_are_circular_convolutions():
    # Each layer commutes with cyclic shifts, and its multipliers are the DFT of its
    # kernel read as a circular filter.
    model = LinearConvNet((8,), (2, 1), kernel_size=3, use_bias=False, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 8, 1)).astype(np.float32)
    conv = model.convs[0]
    np.testing.assert_allclose(
        conv(np.roll(x, 3, axis=1)), np.roll(conv(x), 3, axis=1), rtol=1e-5, atol=1e-6
    )
    m = np.asarray(model.multipliers()[0])  # (8, c_out, c_in)
    spectrum = np.fft.fft(x[..., 0], axis=1)  # (3, 8)
    via_multipliers = np.fft.ifft(m[None, :, :, 0] * spectrum[:, :, None], axis=1).real
    np.testing.assert_allclose(via_multipliers, conv(x), rtol=1e-5, atol=1e-5)


def gap_eps(radii):
    r = np.sort(np.asarray(radii)[np.asarray(radii) > 0])
    lo, hi = len(r) // 4, 3 * len(r) // 4
    i = int(np.argmax(np.diff(r[lo : hi + 1])))
    return float((r[lo + i] + r[lo + i + 1]) / 2)


@pytest.mark.parametrize(
    "make_model, p",
    [
        (lambda: DeepLinear(12, (16, 16), rngs=nnx.Rngs(0)), jnp.inf),
        (lambda: LinearConvNet((16,), (1, 1, 1), rngs=nnx.Rngs(1)), "fourier_inf"),
        (lambda: LinearConvNet((4, 4, 3), (2, 1), rngs=nnx.Rngs(2)), "fourier_inf"),
    ],
)
def test_closed_form_robust_accuracy_of_the_network_is_the_attacks(make_model, p):
    model = make_model()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, *model.in_shape)).astype(np.float32)
    scores, clf, _ = outputs_and_classifier(model, x)
    y = np.sign(np.asarray(scores))
    y[:4] *= -1  # some points misclassified before any attack
    eps = gap_eps(robust.certified_radius(clf.w, x, y, p=p, b=clf.b))
    closed = float(robust.robust_accuracy(clf.w, x, y, eps=eps, p=p, b=clf.b))
    margin = np.asarray(robust.robust_margin(clf.w, x, y, eps=eps, p=p, b=clf.b))
    result = pgd_attack(
        model, x, y, eps=eps, p=p, steps=30, step_size=eps / 2, key=jax.random.key(0)
    )
    assert 0 < closed < 1
    assert float(result.robust_accuracy) == closed
    np.testing.assert_array_equal(np.asarray(result.success), margin <= 0)


def test_invalid_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="`x`"):
        DeepLinear(4, (3,), rngs=nnx.Rngs(0))(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="`widths`"):
        DeepLinear(4, (3, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`num_classes`"):
        DeepLinear(4, num_classes=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`in_shape`"):
        LinearConvNet((2, 2, 2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`kernel_size`"):
        LinearConvNet((8,), kernel_size=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`channels`"):
        LinearConvNet((8,), channels=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`x`"):
        LinearConvNet((4, 4, 3), rngs=nnx.Rngs(0))(jnp.ones((2, 4, 4)))
