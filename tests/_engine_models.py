"""Models in every framework the per-example engine claims, each as ``(loss_fn, params, batch_fn)``.

``loss_fn(params, batch) -> (B,)``; ``batch_fn(size, seed)`` draws a batch. The reference
for all of them is :func:`brute_force`: one ``jax.grad`` per example.
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.models.text_encoder import GRUTextEncoder


def classification_batch(shape, classes):
    def make(size, seed=0):
        kx, ky = jax.random.split(jax.random.key(seed))
        return {
            "x": jax.random.normal(kx, (size, *shape)),
            "y": jax.random.randint(ky, (size,), 0, classes),
        }

    return make


def token_batch(length, vocab, classes=None):
    def make(size, seed=0):
        kx, ky = jax.random.split(jax.random.key(seed))
        # Few distinct tokens, so tokens repeat within an example.
        tokens = jax.random.randint(kx, (size, length), 0, min(vocab, 5))
        out = {"tokens": tokens}
        if classes is not None:
            out["y"] = jax.random.randint(ky, (size,), 0, classes)
        return out

    return make


def ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# -- plain JAX ----------------------------------------------------------------------------


def plain_mlp(weight_decay=1e-2):
    keys = jax.random.split(jax.random.key(1), 4)
    params = {
        "hidden": {
            "w": jax.random.normal(keys[0], (6, 9)) * 0.4,
            "b": jax.random.normal(keys[1], (9,)),
        },
        "out": {
            "w": jax.random.normal(keys[2], (9, 4)) * 0.4,
            "b": jax.random.normal(keys[3], (4,)),
        },
    }

    def loss_fn(params, batch):
        h = jax.nn.relu(jnp.dot(batch["x"], params["hidden"]["w"]) + params["hidden"]["b"])
        logits = h @ params["out"]["w"] + params["out"]["b"]
        penalty = weight_decay * sum(jnp.sum(w**2) for w in jax.tree.leaves(params))
        return ce(logits, batch["y"]) + penalty

    return loss_fn, params, classification_batch((6,), 4)


def plain_shared(jit_inner=True, remat=True):
    """One hidden matrix used twice, inside ``jit`` and ``checkpoint``."""
    keys = jax.random.split(jax.random.key(2), 3)
    params = {
        "inp": jax.random.normal(keys[0], (5, 7)) * 0.5,
        "shared": jax.random.normal(keys[1], (7, 7)) * 0.5,
        "out": jax.random.normal(keys[2], (7, 3)) * 0.5,
    }

    def block(w, h):
        return jnp.tanh(h @ w)

    if jit_inner:
        block = jax.jit(block)
    if remat:
        block = jax.checkpoint(block)

    def loss_fn(params, batch):
        h = jnp.tanh(batch["x"] @ params["inp"])
        h = block(params["shared"], block(params["shared"], h))
        return ce(h @ params["out"], batch["y"])

    return loss_fn, params, classification_batch((5,), 3)


@jax.custom_vjp
def _scaled_dense(w, x):
    return x @ w


def _scaled_dense_fwd(w, x):
    return x @ w, (w, x)


def _scaled_dense_bwd(res, g):
    w, x = res
    return jnp.einsum("bi,bo->io", x, g), g @ w.T


_scaled_dense.defvjp(_scaled_dense_fwd, _scaled_dense_bwd)


@jax.custom_jvp
def _soft_scale(s, h):
    return h * jax.nn.softplus(s)


@_soft_scale.defjvp
def _soft_scale_jvp(primals, tangents):
    (s, h), (ds, dh) = primals, tangents
    return _soft_scale(s, h), dh * jax.nn.softplus(s) + h * jax.nn.sigmoid(s) * ds


def plain_custom_calls():
    keys = jax.random.split(jax.random.key(3), 3)
    params = {
        "w": jax.random.normal(keys[0], (5, 6)) * 0.5,
        "scale": jax.random.normal(keys[1], (6,)),
        "out": jax.random.normal(keys[2], (6, 3)) * 0.5,
    }

    def loss_fn(params, batch):
        h = jnp.tanh(_scaled_dense(params["w"], batch["x"]))
        h = _soft_scale(params["scale"], h)
        return ce(h @ params["out"], batch["y"])

    return loss_fn, params, classification_batch((5,), 3)


# -- flax linen ---------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(12)(x))
        return nn.Dense(4)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")(x))
        x = nn.relu(
            nn.Conv(6, (3, 3), feature_group_count=2, padding="VALID", kernel_dilation=(1, 1))(x)
        )
        x = nn.Conv(6, (2, 2), feature_group_count=6, padding=((1, 0), (0, 1)))(x)  # depthwise
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


class LinenTransformer(nn.Module):
    vocab: int = 11
    width: int = 8
    heads: int = 2
    classes: int = 3

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.width)
        x = embed(tokens)
        for _ in range(2):
            y = nn.LayerNorm()(x)
            mask = nn.make_causal_mask(tokens)
            x = x + nn.MultiHeadDotProductAttention(self.heads, qkv_features=self.width)(
                y, mask=mask
            )
            y = nn.LayerNorm()(x)
            x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(y)))
        x = nn.LayerNorm()(x)
        return embed.attend(x)  # tied output head, (B, T, vocab)


def _wrap_input(module, shape, classes):
    variables = module.init(jax.random.key(4), jnp.zeros((1, *shape)))

    def loss_fn(params, batch):
        return ce(module.apply({"params": params}, batch["x"]), batch["y"])

    return loss_fn, variables["params"], classification_batch(shape, classes)


def linen_mlp():
    return _wrap_input(LinenMLP(), (6,), 4)


def linen_cnn():
    return _wrap_input(LinenCNN(), (8, 8, 2), 3)


def linen_transformer():
    module = LinenTransformer()
    variables = module.init(jax.random.key(5), jnp.zeros((1, 6), jnp.int32))

    def loss_fn(params, batch):
        logits = module.apply({"params": params}, batch["tokens"])
        # Next-token prediction, summed over positions of each example.
        return jnp.sum(ce(logits[:, :-1], batch["tokens"][:, 1:]), axis=1)

    return loss_fn, variables["params"], token_batch(6, 11)


# -- equinox ------------------------------------------------------------------------------


def _eqx(model, batch_fn, apply):
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        return apply(eqx.combine(params, static), batch)

    return loss_fn, params, batch_fn


def equinox_mlp():
    model = eqx.nn.MLP(6, 4, 10, 2, key=jax.random.key(6))
    return _eqx(model, classification_batch((6,), 4), lambda m, b: ce(jax.vmap(m)(b["x"]), b["y"]))


def equinox_conv():
    k1, k2 = jax.random.split(jax.random.key(7))
    model = (
        eqx.nn.Conv2d(2, 4, 3, stride=2, padding=1, key=k1),
        eqx.nn.Linear(4 * 4 * 4, 3, key=k2),
    )

    def apply(m, b):
        conv, lin = m

        def one(x):  # x (C, H, W)
            return lin(jax.nn.relu(conv(x)).reshape(-1))

        return ce(jax.vmap(one)(b["x"]), b["y"])

    return _eqx(model, classification_batch((2, 8, 8), 3), apply)


def equinox_gru():
    k1, k2 = jax.random.split(jax.random.key(8))
    model = (eqx.nn.GRUCell(3, 5, key=k1), eqx.nn.Linear(5, 2, key=k2))

    def apply(m, b):
        cell, head = m

        def one(xs):  # (T, 3)
            def step(h, x):
                return cell(x, h), None

            h, _ = jax.lax.scan(step, jnp.zeros(5), xs)
            return head(h)

        return ce(jax.vmap(one)(b["x"]), b["y"])

    return _eqx(model, classification_batch((4, 3), 2), apply)


# -- haiku --------------------------------------------------------------------------------


def haiku_mlp():
    f = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([10, 4])(x)))
    params = f.init(jax.random.key(9), jnp.zeros((1, 6)))
    return (lambda p, b: ce(f.apply(p, b["x"]), b["y"])), params, classification_batch((6,), 4)


def haiku_lstm():
    def forward(x):  # (B, T, d)
        core = hk.LSTM(5)
        outs, _ = hk.dynamic_unroll(core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0]))
        return hk.Linear(2)(outs[-1])

    f = hk.without_apply_rng(hk.transform(forward))
    params = f.init(jax.random.key(10), jnp.zeros((1, 4, 3)))
    return (lambda p, b: ce(f.apply(p, b["x"]), b["y"])), params, classification_batch((4, 3), 2)


# -- flax nnx -----------------------------------------------------------------------------


class NnxTransformerBits(nnx.Module):
    def __init__(self, rngs, vocab=9, width=8):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, width, decode=False, rngs=rngs)
        self.proj = nnx.LinearGeneral(width, (2, 3), rngs=rngs)
        self.mix = nnx.Einsum("bthk,hkd->btd", (2, 3, width), (width,), rngs=rngs)
        self.head = nnx.Linear(width, 3, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(self.norm(x))
        x = x + self.mix(jax.nn.gelu(self.proj(x)))
        return self.head(jnp.mean(x, axis=1))


def nnx_bits():
    model = NnxTransformerBits(nnx.Rngs(11))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        return ce(nnx.merge(graphdef, params, rest)(batch["tokens"]), batch["y"])

    return loss_fn, params, token_batch(5, 9, classes=3)


def vse_text_encoder():
    model = GRUTextEncoder(12, 6, 5, rngs=nnx.Rngs(12))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        v = nnx.merge(graphdef, params, rest)(batch["tokens"], batch["lengths"])
        return jnp.sum((v - batch["target"]) ** 2, axis=-1)

    def make(size, seed=0):
        k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
        return {
            "tokens": jax.random.randint(k1, (size, 6), 0, 12),
            "lengths": jax.random.randint(k2, (size,), 1, 7),
            "target": jax.random.normal(k3, (size, 5)),
        }

    return loss_fn, params, make


MODELS = {
    "plain_mlp_weight_decay": plain_mlp,
    "plain_shared_jit_remat": plain_shared,
    "plain_custom_jvp_vjp": plain_custom_calls,
    "linen_mlp": linen_mlp,
    "linen_cnn": linen_cnn,
    "linen_transformer_tied": linen_transformer,
    "equinox_mlp": equinox_mlp,
    "equinox_conv": equinox_conv,
    "equinox_gru_scan": equinox_gru,
    "haiku_mlp": haiku_mlp,
    "haiku_lstm": haiku_lstm,
    "nnx_einsum_attention": nnx_bits,
    "vse_text_encoder": vse_text_encoder,
}


def brute_force(loss_fn, params, batch):
    """Per-example gradients, one ``jax.grad`` per example: a pytree with leading ``B``."""
    size = jax.tree.leaves(batch)[0].shape[0]
    grad = jax.jit(jax.grad(lambda p, ex: loss_fn(p, ex)[0]))
    grads = [grad(params, jax.tree.map(lambda x, i=i: x[i : i + 1], batch)) for i in range(size)]
    return jax.tree.map(lambda *g: np.stack(g), *grads)
