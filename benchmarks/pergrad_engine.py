"""The per-example engine on unmodified models of every framework, against plain grad and vmap.

    python -m benchmarks.pergrad_engine [--steps 10 --directions 32 --only mlp]

Cases (side by side in one run):

* MLP 784-512-512-10, B = 128, written four ways: a plain params dict (``x @ W + b``),
  flax linen, equinox (``jax.vmap`` of ``W @ x``), flax nnx through ``nnx.split``;
* a transformer in linen: vocabulary 1000, width 256, 4 layers, 4 heads, T = 128, B = 32,
  causal, tied output head, next-token loss summed per sequence;
* the VSE++ text encoder (``jaxeff.models.GRUTextEncoder``: embedding 300, GRU 1024 under
  ``lax.scan`` with its hand-written backward pass), B = 128, 16 tokens;
* a linen CNN: 3x3 convs 32, 64 stride 2, 64 stride 2, a dense head; 32x32x3, B = 128.

Variants, each a compiled function (``jax.jit(...).lower(...).compile()``; an eager call
adds Python dispatch on top, reported separately for the first case):

* ``plain``: ``jax.grad`` of the mean loss, the baseline of every ratio;
* ``engine norms``: ``per_example_stats(..., with_sum_sq=False)``;
* ``engine all``: norms, per-coordinate sums of squares and ``--directions`` rank-1 (or
  Kronecker) dots on every leaf;
* ``engine grad+all``: ``value_grad_and_stats`` (weighted gradient and all statistics);
* ``vmap norms``: ``vmap`` over examples of ``grad`` of the one-example loss, then the
  norms: per-example gradients in the model's own layout, all at once (the fastest
  ``vmap`` layout on these models; chunks only save memory).

Times are the best of ``--steps`` interleaved rounds; memory is the compiled executable's
temporary buffers plus outputs (``memory_analysis()``).
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.models.text_encoder import GRUTextEncoder
from jaxeff.pergrad.engine import direction_shapes, per_example_stats, value_grad_and_stats


def ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def mnist_batch(size):
    kx, ky = jax.random.split(jax.random.key(0))
    return {"x": jax.random.normal(kx, (size, 784)), "y": jax.random.randint(ky, (size,), 0, 10)}


def mlp_plain():
    keys = jax.random.split(jax.random.key(1), 3)
    sizes = [(784, 512), (512, 512), (512, 10)]
    params = [
        {"w": jax.random.normal(k, s) / np.sqrt(s[0]), "b": jnp.zeros(s[1])}
        for k, s in zip(keys, sizes, strict=True)
    ]

    def loss_fn(params, batch):
        h = batch["x"]
        for layer in params[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return ce(h @ params[-1]["w"] + params[-1]["b"], batch["y"])

    return loss_fn, params, mnist_batch(128)


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(512)(x))
        x = nn.relu(nn.Dense(512)(x))
        return nn.Dense(10)(x)


def mlp_linen():
    module = LinenMLP()
    params = module.init(jax.random.key(2), jnp.zeros((1, 784)))["params"]
    return (lambda p, b: ce(module.apply({"params": p}, b["x"]), b["y"])), params, mnist_batch(128)


def mlp_equinox():
    model = eqx.nn.MLP(784, 10, 512, 2, key=jax.random.key(3))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, batch):
        return ce(jax.vmap(eqx.combine(params, static))(batch["x"]), batch["y"])

    return loss_fn, params, mnist_batch(128)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(784, 512, rngs=rngs)
        self.fc2 = nnx.Linear(512, 512, rngs=rngs)
        self.fc3 = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def mlp_nnx():
    graphdef, params, rest = nnx.split(NnxMLP(nnx.Rngs(4)), nnx.Param, ...)

    def loss_fn(params, batch):
        return ce(nnx.merge(graphdef, params, rest)(batch["x"]), batch["y"])

    return loss_fn, params, mnist_batch(128)


class Transformer(nn.Module):
    vocab: int = 1000
    width: int = 256
    layers: int = 4
    heads: int = 4

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.width)
        x = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.layers):
            y = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(self.heads)(y, mask=mask)
            y = nn.LayerNorm()(x)
            x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))
        return embed.attend(nn.LayerNorm()(x))


def transformer():
    module = Transformer()
    tokens = jax.random.randint(jax.random.key(5), (32, 129), 0, 1000)
    params = module.init(jax.random.key(6), tokens[:1, :-1])["params"]

    def loss_fn(params, batch):
        logits = module.apply({"params": params}, batch["tokens"][:, :-1])
        return jnp.sum(ce(logits, batch["tokens"][:, 1:]), axis=1)

    return loss_fn, params, {"tokens": tokens}


def vse_text():
    model = GRUTextEncoder(1000, 300, 1024, rngs=nnx.Rngs(7))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    k1, k2, k3 = jax.random.split(jax.random.key(8), 3)
    batch = {
        "tokens": jax.random.randint(k1, (128, 16), 0, 1000),
        "lengths": jax.random.randint(k2, (128,), 4, 17),
        "target": jax.random.normal(k3, (128, 1024)) / 32,
    }

    def loss_fn(params, batch):
        v = nnx.merge(graphdef, params, rest)(batch["tokens"], batch["lengths"])
        return jnp.sum((v - batch["target"]) ** 2, axis=-1)

    return loss_fn, params, batch


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def cnn():
    module = CNN()
    kx, ky = jax.random.split(jax.random.key(9))
    batch = {
        "x": jax.random.normal(kx, (128, 32, 32, 3)),
        "y": jax.random.randint(ky, (128,), 0, 10),
    }
    params = module.init(jax.random.key(10), batch["x"][:1])["params"]
    return (lambda p, b: ce(module.apply({"params": p}, b["x"]), b["y"])), params, batch


CASES = {
    "mlp plain": mlp_plain,
    "mlp linen": mlp_linen,
    "mlp equinox": mlp_equinox,
    "mlp nnx": mlp_nnx,
    "transformer": transformer,
    "vse text": vse_text,
    "cnn": cnn,
}


def variants(loss_fn, params, batch, num_directions):
    shapes = direction_shapes(loss_fn, params, batch)
    keys = iter(jax.random.split(jax.random.key(11), 2 * len(shapes)))
    directions = {
        p: tuple(jax.random.normal(next(keys), (num_directions, *s)) for s in split)
        for p, split in shapes.items()
    }
    size = jax.tree.leaves(batch)[0].shape[0]
    weights = jnp.full((size,), 1.0 / size)

    def plain(params, batch, directions):
        return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)

    def norms(params, batch, directions):
        return per_example_stats(loss_fn, params, batch, with_sum_sq=False).total_sq_norms

    def everything(params, batch, directions):
        return per_example_stats(loss_fn, params, batch, directions=directions)

    def grad_and_all(params, batch, directions):
        return value_grad_and_stats(loss_fn, params, batch, weights=weights, directions=directions)

    def vmap_norms(params, batch, directions):
        def one(example):
            ex = jax.tree.map(lambda x: x[None], example)
            g = jax.grad(lambda p: loss_fn(p, ex)[0])(params)
            return sum(jnp.sum(x * x) for x in jax.tree.leaves(g))

        return jax.vmap(one)(batch)

    fns = {
        "plain": plain,
        "engine norms": norms,
        "engine all": everything,
        "engine grad+all": grad_and_all,
        "vmap norms": vmap_norms,
    }
    return fns, (params, batch, directions)


def compile_all(fns, args):
    out = {}
    for name, fn in fns.items():
        compiled = jax.jit(fn).lower(*args).compile()
        memory = compiled.memory_analysis()
        mib = None
        if memory is not None:
            mib = (memory.temp_size_in_bytes + memory.output_size_in_bytes) / 2**20
        out[name] = (compiled, mib)
    return out


def time_all(compiled, args, steps):
    best = dict.fromkeys(compiled, float("inf"))
    for fn, _ in compiled.values():
        jax.block_until_ready(fn(*args))
    for _ in range(steps):
        for name, (fn, _) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--directions", type=int, default=32)
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].device_kind}, {jax.device_count()} device(s)")
    print(f"{'case':<13} {'variant':<16} {'ms':>9} {'ratio':>7} {'MiB':>8}")
    for case, make in CASES.items():
        if args.only and args.only not in case:
            continue
        loss_fn, params, batch = make()
        fns, fn_args = variants(loss_fn, params, batch, args.directions)
        compiled = compile_all(fns, fn_args)
        best = time_all(compiled, fn_args, args.steps)
        stats = per_example_stats(loss_fn, params, batch)
        slow = sorted(p for p, path in stats.paths.items() if path != "fast")
        for name, seconds in best.items():
            mib = compiled[name][1]
            mem = "" if mib is None else f"{mib:8.1f}"
            print(
                f"{case:<13} {name:<16} {1e3 * seconds:9.2f} {seconds / best['plain']:7.2f} {mem}"
            )
        print(f"{case:<13} vmap-path leaves: {slow or 'none'}")


if __name__ == "__main__":
    main()
