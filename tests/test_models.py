"""Tests for jaxeff.models: VSE++ encoders, the joint model and its factory.

Models are shared between tests and kept to a few shapes so that compilations are reused;
references are computed in NumPy.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxeff import models
from jaxeff.models import (
    GRU,
    CNNImageEncoder,
    GRUTextEncoder,
    PrecompImageEncoder,
    SmallCNN,
    VSEModel,
    l2_normalize,
    vse_model,
)
from jaxeff.models.gru import gru_sequence, gru_update, resolve_unroll

VOCAB, WORD_DIM, EMBED = 30, 12, 16
IMG_DIM, IMAGE_SIZE, CNN_FEATURES = 20, 16, (4, 8)
BATCH, LENGTH = 8, 7

_apply = nnx.jit(lambda module, *args: module(*args))


def _captions(seed, batch=BATCH, length=LENGTH):
    """Random captions: ids in [1, VOCAB), lengths in [1, length], zero padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, size=batch).astype(np.int32)
    lengths[0], lengths[1] = length, 1  # both extremes appear
    tokens = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


def _images(seed, kind):
    shape = (BATCH, IMG_DIM) if kind == "precomp" else (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def _np_l2(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _norms(x):
    return np.linalg.norm(np.asarray(x, np.float64), axis=-1)


def _params(layer):
    """(w_ih, b_ih, w_hh, b_hh) of a GRU layer as float64 NumPy arrays."""
    arrays = (layer.input_proj.kernel, layer.input_proj.bias)
    arrays += (layer.hidden_proj.kernel, layer.hidden_proj.bias)
    return [np.asarray(a[...], np.float64) for a in arrays]


def _torch_gru_step(h, x, w_ih, b_ih, w_hh, b_hh):
    """PyTorch nn.GRU equations in NumPy (weights stored (in, 3H), gate order r, z, n)."""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    gi, gh = x @ w_ih + b_ih, h @ w_hh + b_hh
    hs = h.shape[-1]
    r = sig(gi[..., :hs] + gh[..., :hs])
    z = sig(gi[..., hs : 2 * hs] + gh[..., hs : 2 * hs])
    n = np.tanh(gi[..., 2 * hs :] + r * gh[..., 2 * hs :])
    return (1 - z) * n + z * h


def _np_text_encoder(enc, tokens, length):
    """One caption through the encoder, a Python loop over its real tokens only."""
    table = np.asarray(enc.embed.embedding[...], np.float64)
    xs = [table[t] for t in tokens[:length]]
    for layer in enc.layers:
        h = np.zeros(enc.embed_size)
        states = []
        for x in xs:
            h = _torch_gru_step(h, x, *_params(layer))
            states.append(h)
        xs = states
    return _np_l2(h)


@pytest.fixture(scope="module")
def precomp_model():
    return vse_model(
        img_dim=IMG_DIM,
        vocab_size=VOCAB,
        word_dim=WORD_DIM,
        embed_size=EMBED,
        num_layers=2,
        rngs=0,
    )


@pytest.fixture(scope="module")
def cnn_model():
    return vse_model(
        image_encoder="cnn",
        image_size=IMAGE_SIZE,
        vocab_size=VOCAB,
        word_dim=WORD_DIM,
        embed_size=EMBED,
        cnn_features=CNN_FEATURES,
        rngs=nnx.Rngs(0),
    )


# --- l2_normalize -----------------------------------------------------------------------


def test_l2_normalize_values_zero_rows_and_grad():
    x = jnp.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]])
    np.testing.assert_allclose(
        jax.jit(l2_normalize)(x), [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6
    )
    c = np.array([1.0, 2.0])
    grad = jax.jit(jax.grad(lambda v: jnp.sum(l2_normalize(v) * c)))(x)
    assert np.all(np.isfinite(grad))
    # d/dx (x/|x|)·c at (3, 4) is (c - (u·c) u)/|x| with u = (0.6, 0.8).
    np.testing.assert_allclose(grad[0], (c - 2.2 * np.array([0.6, 0.8])) / 5, rtol=1e-5)
    np.testing.assert_allclose(grad[1], 1e12 * c, rtol=1e-5)  # large but finite at zero
    by_column = jax.jit(l2_normalize, static_argnums=1)(x, 0)
    np.testing.assert_allclose(by_column[:, 0], np.array([3.0, 0.0, 1e-3]) / 3.0, rtol=1e-6)
    assert l2_normalize(jnp.array([[3.0, 4.0]], jnp.bfloat16)).dtype == jnp.bfloat16


# --- image encoders ---------------------------------------------------------------------


def test_precomp_encoder_xavier_init_and_zero_bias():
    d_in, d_out = 300, 60
    enc = PrecompImageEncoder(d_in, d_out, rngs=nnx.Rngs(0))
    w = np.asarray(enc.fc.kernel[...])
    r = math.sqrt(6.0) / math.sqrt(d_in + d_out)
    assert w.shape == (d_in, d_out)
    assert np.abs(w).max() <= r and np.abs(w).max() > 0.99 * r
    np.testing.assert_allclose(w.std(), r / math.sqrt(3.0), rtol=0.02)  # std of U(-r, r)
    np.testing.assert_allclose(w.mean(), 0.0, atol=0.02 * r)
    np.testing.assert_array_equal(enc.fc.bias[...], np.zeros(d_out))


@pytest.mark.parametrize("no_imgnorm", [False, True])
@pytest.mark.parametrize("use_abs", [False, True])
def test_precomp_encoder_outputs(no_imgnorm, use_abs):
    enc = PrecompImageEncoder(
        IMG_DIM, EMBED, no_imgnorm=no_imgnorm, use_abs=use_abs, rngs=nnx.Rngs(0)
    )
    enc.fc.bias[...] = 0.1 * jnp.arange(EMBED, dtype=jnp.float32)  # exercise the bias
    x = _images(0, "precomp")
    out = np.asarray(_apply(enc, x))
    # Reference order: fc -> l2norm (unless no_imgnorm) -> abs (if use_abs).
    expected = x @ np.asarray(enc.fc.kernel[...], np.float64) + np.asarray(enc.fc.bias[...])
    if not no_imgnorm:
        expected = _np_l2(expected)
    if use_abs:
        expected = np.abs(expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if no_imgnorm:
        assert np.all(np.abs(_norms(out) - 1.0) > 1e-2)
    else:
        np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-5)
    if use_abs:
        assert np.all(out >= 0)
    else:
        assert np.any(out < 0)


def test_small_cnn_shapes_and_output_features():
    def out_shape(image_shape, **kwargs):
        apply = lambda: SmallCNN(image_shape[-1], **kwargs, rngs=nnx.Rngs(0))(
            jnp.zeros(image_shape)
        )
        return nnx.eval_shape(apply).shape

    cnn = nnx.eval_shape(lambda: SmallCNN(3, rngs=nnx.Rngs(0)))
    assert cnn.output_features(32) == 4 * 4 * 128
    assert cnn.output_features(64) == 8 * 8 * 128
    assert cnn.output_shape((33, 20)) == (5, 3, 128)
    for size in (32, 64, (33, 20)):
        hw = (size, size) if isinstance(size, int) else size
        assert out_shape((2, *hw, 3)) == (2, cnn.output_features(size))
    assert out_shape((3, 16, 16, 1), features=(4, 8)) == (3, 4 * 4 * 8)


def test_small_cnn_keeps_spatial_layout(cnn_model):
    """Changing the top-left pixel changes only the top-left cell of the flattened map."""
    cnn = cnn_model.image_encoder.backbone
    x = _images(0, "cnn")
    x[1] = x[0]
    x[1, 0, 0, :] += 5.0
    features = np.asarray(_apply(cnn, x))
    diff = np.abs(features[1] - features[0]).reshape(cnn.output_shape(IMAGE_SIZE))
    assert diff[0, 0].max() > 0
    diff[0, 0] = 0
    assert diff.max() == 0
    he_limit = math.sqrt(6.0 / (3 * 3 * 3))
    kernel = np.asarray(cnn.convs[0].kernel[...])
    assert np.abs(kernel).max() <= he_limit and np.abs(kernel).max() > 0.8 * he_limit


@pytest.mark.parametrize("no_imgnorm, use_abs", [(False, False), (True, False), (False, True)])
def test_cnn_encoder_matches_reference_order(cnn_model, no_imgnorm, use_abs):
    backbone = cnn_model.image_encoder.backbone
    n_features = backbone.output_features(IMAGE_SIZE)
    enc = CNNImageEncoder(
        backbone, n_features, EMBED, no_imgnorm=no_imgnorm, use_abs=use_abs, rngs=nnx.Rngs(1)
    )
    r = math.sqrt(6.0 / (n_features + EMBED))
    assert np.abs(enc.fc.kernel[...]).max() <= r
    np.testing.assert_array_equal(enc.fc.bias[...], 0.0)
    x = _images(1, "cnn")
    # Reference order: cnn -> l2norm -> fc -> l2norm (unless no_imgnorm) -> abs (if use_abs).
    expected = _np_l2(_apply(backbone, x)) @ np.asarray(enc.fc.kernel[...], np.float64)
    if not no_imgnorm:
        expected = _np_l2(expected)
    if use_abs:
        expected = np.abs(expected)
    out = np.asarray(_apply(enc, x))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if no_imgnorm:
        assert np.all(np.abs(_norms(out) - 1.0) > 1e-2)
    else:
        np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-5)
    assert np.all(out >= 0) == use_abs


def test_cnn_encoder_accepts_any_backbone():
    class Flatten(nnx.Module):
        def __call__(self, images):
            return images.reshape(images.shape[0], -1)

    enc = CNNImageEncoder(Flatten(), 2 * 2 * 3, EMBED, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 2, 2, 3)).astype(np.float32)
    expected = _np_l2(_np_l2(x.reshape(3, -1)) @ np.asarray(enc.fc.kernel[...], np.float64))
    np.testing.assert_allclose(enc(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backbone"):
        enc(jnp.ones((3, 4, 4, 3)))


# --- text encoder -----------------------------------------------------------------------


def test_gru_cell_matches_torch_equations_and_init_bounds(cnn_model):
    enc = cnn_model.text_encoder
    table = np.asarray(enc.embed.embedding[...])
    assert table.shape == (VOCAB, WORD_DIM)
    assert np.abs(table).max() <= 0.1 and np.abs(table).max() > 0.09
    layer = enc.layers[0]
    assert isinstance(layer, GRU)
    limit = 1.0 / math.sqrt(EMBED)
    for p in _params(layer):
        assert np.abs(p).max() <= limit and np.abs(p).max() > 0.8 * limit
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, EMBED)).astype(np.float32)
    x = rng.normal(size=(3, WORD_DIM)).astype(np.float32)
    expected = _torch_gru_step(h, x, *_params(layer))
    np.testing.assert_allclose(layer.step(h, x), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(layer.initial_state(3), np.zeros((3, EMBED)))


@pytest.mark.parametrize("kind", ["cnn", "precomp"])  # 1 and 2 GRU layers
def test_text_encoder_matches_step_by_step_loop(kind, request):
    enc = request.getfixturevalue(f"{kind}_model").text_encoder
    assert enc.num_layers == (1 if kind == "cnn" else 2)
    tokens, lengths = _captions(0)
    out = np.asarray(_apply(enc, tokens, lengths))
    step = nnx.jit(lambda layer, h, x: layer.step(h, x))
    for b in range(BATCH):
        # The model's own GRU cell, one real token at a time.
        xs = [enc.embed.embedding[...][t] for t in tokens[b, : lengths[b]]]
        for layer in enc.layers:
            h = layer.initial_state(1)[0]
            states = []
            for x in xs:
                h = step(layer, h, x)
                states.append(h)
            xs = states
        np.testing.assert_allclose(out[b], _np_l2(h), rtol=1e-5, atol=1e-6)
        # The PyTorch GRU equations in NumPy.
        expected = _np_text_encoder(enc, tokens[b], lengths[b])
        np.testing.assert_allclose(out[b], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_norms(out), 1.0, rtol=1e-5)


def test_text_encoder_ignores_padding(precomp_model):
    enc = precomp_model.text_encoder
    tokens, lengths = _captions(0)
    base = np.asarray(_apply(enc, tokens, lengths))
    # Longer rows, padded with zeros or with arbitrary ids.
    rng = np.random.default_rng(1)
    for long in (np.zeros((BATCH, 12), np.int32), rng.integers(0, VOCAB, size=(BATCH, 12))):
        long = long.astype(np.int32)
        for b in range(BATCH):
            long[b, : lengths[b]] = tokens[b, : lengths[b]]
        np.testing.assert_allclose(_apply(enc, long, lengths), base, rtol=1e-5, atol=1e-6)
    # One caption alone, unpadded.
    b = 2
    alone = _apply(enc, tokens[b : b + 1, : lengths[b]], lengths[b : b + 1])
    np.testing.assert_allclose(alone[0], base[b], rtol=1e-5, atol=1e-6)


def test_gru_layer_outputs_and_final_state(cnn_model):
    enc = cnn_model.text_encoder
    tokens, lengths = _captions(0)
    inputs = enc.embed(jnp.asarray(tokens))
    outputs, final = _apply(enc.layers[0], inputs, jnp.asarray(lengths))
    assert outputs.shape == (BATCH, LENGTH, EMBED)
    np.testing.assert_array_equal(final, np.asarray(outputs)[np.arange(BATCH), lengths - 1])
    np.testing.assert_array_equal(np.asarray(outputs)[0, -1], final[0])  # held past the end
    np.testing.assert_array_equal(
        np.asarray(outputs)[1, 1:], np.broadcast_to(final[1], (LENGTH - 1, EMBED))
    )


def _loop_sequence(inputs, mask, input_kernel, input_bias, kernel, bias, h0):
    """The GRU layer as a Python loop of GRU cells, for JAX's own autodiff."""
    h, outputs = h0, []
    for t in range(inputs.shape[0]):
        projected = inputs[t] @ input_kernel + input_bias
        h = jnp.where(mask[t], gru_update(h, projected, kernel, bias), h)
        outputs.append(h)
    return jnp.stack(outputs)


@pytest.mark.parametrize("jit, unroll", [(False, 1), (True, 1), (True, 4), (True, True)])
def test_gru_sequence_gradients_match_autodiff_of_the_loop(jit, unroll):
    rng = np.random.default_rng(0)
    length, batch, features, hidden = 6, 5, 3, 4
    lengths = np.array([6, 1, 3, 6, 2])
    mask = (np.arange(length)[:, None] < lengths[None, :])[..., None]
    args = [
        rng.normal(size=(length, batch, features)),
        rng.normal(size=(features, 3 * hidden)) / 2,
        rng.normal(size=(3 * hidden,)) / 2,
        rng.normal(size=(hidden, 3 * hidden)) / 2,
        rng.normal(size=(3 * hidden,)) / 2,
        rng.normal(size=(batch, hidden)),
    ]
    args = [jnp.asarray(a, jnp.float32) for a in args]
    weights = jnp.asarray(rng.normal(size=(length, batch, hidden)), jnp.float32)

    def loss(fn):
        def f(x, *params):
            outputs = fn(x, mask, *params)
            # Every output step and the final state, as the stacked and last layers use them.
            return jnp.sum(weights * outputs) + jnp.sum(jnp.sin(outputs[-1]))

        grad = jax.value_and_grad(f, argnums=tuple(range(6)))
        return jax.jit(grad) if jit else grad

    value, grads = loss(lambda *a: gru_sequence(*a, unroll))(*args)
    ref_value, ref_grads = loss(_loop_sequence)(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
    names = ("inputs", "input_kernel", "input_bias", "kernel", "bias", "h0")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
    # Padding steps get no gradient; a sequence's state before its first step gets one.
    np.testing.assert_array_equal(grads[0][3:, 2], 0.0)
    assert np.all(np.abs(np.asarray(grads[5])) > 0)


def test_gru_sequence_rejects_bad_arguments():
    length, batch, features, hidden = 3, 2, 5, 4
    good = {
        "inputs": jnp.ones((length, batch, features)),
        "mask": jnp.ones((length, batch, 1), bool),
        "input_kernel": jnp.ones((features, 3 * hidden)),
        "input_bias": jnp.ones((3 * hidden,)),
        "hidden_kernel": jnp.ones((hidden, 3 * hidden)),
        "hidden_bias": jnp.ones((3 * hidden,)),
        "initial_state": jnp.zeros((batch, hidden)),
    }
    assert gru_sequence(**good).shape == (length, batch, hidden)
    bad = {
        "inputs": jnp.ones((length, batch, features), jnp.int32),
        "mask": jnp.ones((length, batch), bool),
        "input_kernel": jnp.ones((features + 1, 3 * hidden)),
        "input_bias": jnp.ones((hidden,)),
        "hidden_kernel": jnp.ones((hidden, 2 * hidden)),
        "hidden_bias": jnp.ones((3 * hidden, 1)),
        "initial_state": jnp.zeros((batch + 1, hidden)),
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"`{name}`"):
            gru_sequence(**dict(good, **{name: value}))
    with pytest.raises(ValueError, match="`mask` must be a boolean"):
        gru_sequence(**dict(good, mask=jnp.ones((length, batch, 1))))
    for unroll in (0, -1, False, 1.5, "all"):
        with pytest.raises(ValueError, match="`unroll`"):
            gru_sequence(**good, unroll=unroll)
        with pytest.raises(ValueError, match="`unroll`"):
            GRU(features, hidden, unroll=unroll, rngs=nnx.Rngs(0))


def test_gru_unroll_default_depends_on_the_backend(monkeypatch):
    assert resolve_unroll(4) == 4 and resolve_unroll(True) is True
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve_unroll(None) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_unroll(None) is True


def test_gru_time_major_equals_batch_major(cnn_model):
    layer = cnn_model.text_encoder.layers[0]
    tokens, lengths = _captions(0)
    inputs = cnn_model.text_encoder.embed(jnp.asarray(tokens))
    outputs, final = _apply(layer, inputs, jnp.asarray(lengths))
    run = nnx.jit(lambda layer, x, n: layer(x, n, time_major=True))
    outputs_t, final_t = run(layer, jnp.swapaxes(inputs, 0, 1), jnp.asarray(lengths))
    np.testing.assert_array_equal(np.swapaxes(outputs_t, 0, 1), outputs)
    np.testing.assert_array_equal(final_t, final)


def test_text_encoder_abs():
    enc = GRUTextEncoder(VOCAB, WORD_DIM, EMBED, use_abs=True, rngs=nnx.Rngs(0))
    plain = GRUTextEncoder(VOCAB, WORD_DIM, EMBED, rngs=nnx.Rngs(0))  # same parameters
    tokens, lengths = _captions(0)
    out = np.asarray(_apply(enc, tokens, lengths))
    assert np.all(out >= 0)
    np.testing.assert_allclose(out, np.abs(np.asarray(_apply(plain, tokens, lengths))))


def test_invalid_lengths_inside_jit_give_nan_rows(precomp_model):
    enc = precomp_model.text_encoder
    tokens, lengths = _captions(0)
    good = np.asarray(_apply(enc, tokens, lengths))
    bad = lengths.copy()
    bad[2], bad[3] = 0, LENGTH + 1
    out = np.asarray(_apply(enc, tokens, bad))
    assert np.all(np.isnan(out[2:4]))
    np.testing.assert_array_equal(out[4:], good[4:])


# --- joint model, factory, jit, gradients -----------------------------------------------


def test_factory_builds_configured_models(precomp_model, cnn_model):
    assert isinstance(precomp_model, VSEModel)
    assert isinstance(precomp_model.image_encoder, PrecompImageEncoder)
    assert (
        precomp_model.text_encoder.num_layers == 2 and len(precomp_model.text_encoder.layers) == 2
    )
    assert isinstance(cnn_model.image_encoder, CNNImageEncoder)
    assert isinstance(cnn_model.image_encoder.backbone, SmallCNN)
    assert cnn_model.image_encoder.backbone.features == CNN_FEATURES
    assert cnn_model.image_encoder.backbone_features == 4 * 4 * 8
    m = vse_model(
        img_dim=IMG_DIM,
        vocab_size=VOCAB,
        word_dim=WORD_DIM,
        embed_size=EMBED,
        no_imgnorm=True,
        use_abs=True,
        rngs=0,
    )
    assert m.image_encoder.no_imgnorm and m.image_encoder.use_abs and m.text_encoder.use_abs
    with pytest.raises(ValueError, match="img_dim"):
        vse_model(vocab_size=5, rngs=0)
    with pytest.raises(ValueError, match="image_size"):
        vse_model(image_encoder="cnn", vocab_size=5, rngs=0)
    with pytest.raises(ValueError, match="image_encoder"):
        vse_model(image_encoder="vgg", img_dim=4, vocab_size=5, rngs=0)
    with pytest.raises(TypeError):
        vse_model("precomp", 4, vocab_size=5, rngs=0)  # keyword-only


def test_jit_does_not_retrace_and_matches_encoders(cnn_model):
    traces = []

    @nnx.jit
    def forward(model, images, tokens, lengths):
        traces.append(1)
        return model(images, tokens, lengths)

    forward(cnn_model, _images(0, "cnn"), *_captions(0))
    images, (tokens, lengths) = _images(1, "cnn"), _captions(1)
    u, v = forward(cnn_model, images, tokens, lengths)
    assert len(traces) == 1
    np.testing.assert_allclose(u, _apply(cnn_model.image_encoder, images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        v, _apply(cnn_model.text_encoder, tokens, lengths), rtol=1e-5, atol=1e-6
    )
    encode = nnx.jit(lambda m, *a: (m.encode_images(a[0]), m.encode_captions(*a[1:])))
    u2, v2 = encode(cnn_model, images, tokens, lengths)
    np.testing.assert_allclose(u2, u, rtol=1e-6)
    np.testing.assert_allclose(v2, v, rtol=1e-6)


@pytest.mark.parametrize("kind", ["precomp", "cnn"])
def test_gradients_reach_every_parameter(kind, request):
    model = request.getfixturevalue(f"{kind}_model")
    images, (tokens, lengths) = _images(0, kind), _captions(0)
    weights = np.random.default_rng(0).normal(size=(BATCH, BATCH)).astype(np.float32)

    @nnx.jit
    def grads(model):
        def loss(model):
            u, v = model(images, tokens, lengths)
            return jnp.sum(weights * (u @ v.T))

        return nnx.grad(loss)(model)

    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads(model), nnx.Param))
    assert len(leaves) == len(jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    for path, leaf in leaves:
        leaf = np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), path
        assert np.abs(leaf).max() > 0, path


def test_forward_sharded_over_devices_matches_single_device(precomp_model):
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    n = jax.device_count()
    images = np.tile(_images(0, "precomp"), (n, 1))[: 2 * n]
    tokens, lengths = (np.tile(a, (n,) + (1,) * (a.ndim - 1))[: 2 * n] for a in _captions(0))
    u, v = _apply(precomp_model, images, tokens, lengths)
    us, vs = _apply(precomp_model, *(jax.device_put(a, shard) for a in (images, tokens, lengths)))
    assert us.sharding.is_equivalent_to(shard, 2)
    np.testing.assert_allclose(us, u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vs, v, rtol=1e-5, atol=1e-6)


# --- errors at the boundary -------------------------------------------------------------

_TOK = np.ones((3, 5), np.int32)
_LEN = np.array([5, 2, 1], np.int32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: m.encode_images(np.ones((3, IMG_DIM, 1))), "images.*rank-2"),
        (lambda m: m.encode_images(np.ones((3, IMG_DIM + 1))), f"images.*{IMG_DIM} features"),
        (lambda m: m.encode_images(np.ones((3, IMG_DIM), np.int32)), "images.*floating"),
        (lambda m: m.encode_captions(_TOK[0], _LEN), "tokens.*rank-2"),
        (lambda m: m.encode_captions(_TOK.astype(np.float32), _LEN), "tokens.*integer"),
        (lambda m: m.encode_captions(np.ones((3, 0), np.int32), _LEN), "tokens.*time step"),
        (lambda m: m.encode_captions(_TOK, _LEN[:2]), r"lengths.*shape \(batch,\)"),
        (lambda m: m.encode_captions(_TOK, _LEN[:, None]), r"lengths.*shape \(batch,\)"),
        (lambda m: m.encode_captions(_TOK, _LEN.astype(np.float32)), "lengths.*integer"),
        (lambda m: m.encode_captions(_TOK, np.array([5, 0, 1])), r"lengths.*\[1, 5\]"),
        (lambda m: m.encode_captions(_TOK, np.array([6, 2, 1])), r"lengths.*\[1, 5\]"),
        (lambda m: m.encode_captions(_TOK * VOCAB, _LEN), "tokens.*ids"),
        (lambda m: m.encode_captions(-_TOK, _LEN), "tokens.*ids"),
    ],
)
def test_model_rejects_bad_inputs(precomp_model, call, match):
    with pytest.raises(ValueError, match=match):
        call(precomp_model)


def test_cnn_rejects_bad_images_and_bad_config(cnn_model):
    cnn = cnn_model.image_encoder.backbone
    with pytest.raises(ValueError, match="images.*rank-4"):
        cnn(np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="images.*3 channels"):
        cnn(np.ones((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="images.*floating"):
        cnn(np.ones((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="images.*floating"):
        cnn_model.encode_images(np.ones((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="features"):
        SmallCNN(3, features=(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers"):
        GRUTextEncoder(5, 4, 4, num_layers=0, rngs=nnx.Rngs(0))


def test_public_api():
    assert set(models.__all__) == {
        "CNNImageEncoder",
        "DeepLinear",
        "LinearClassifier",
        "LinearConvNet",
        "GRU",
        "GRUTextEncoder",
        "IMAGE_ENCODERS",
        "PrecompImageEncoder",
        "SmallCNN",
        "VSEModel",
        "l2_normalize",
        "vse_model",
    }
    assert all(hasattr(models, name) for name in models.__all__)
